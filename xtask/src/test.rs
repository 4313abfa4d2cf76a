//! `cargo xtask test`: the one command CI runs.
use std::time::Instant;

use crate::run::{cargo, require_root, root, step};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the machine set-up (when you know it is done).
    #[arg(long)]
    no_setup: bool,
    /// Extra arguments for `cargo test` (e.g. a test-name filter), after `--`.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    let start = Instant::now();
    if !args.no_setup {
        crate::setup::run()?;
    }
    step("format check", cargo().args(["fmt", "--all", "--", "--check"]))?;
    step(
        "clippy",
        cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
    )?;
    // The e2e tests start the real binaries, so they must exist before the tests run.
    step("build binaries", cargo().args(["build", "--workspace", "--bins"]))?;
    step(
        "tests (unit and kernel e2e)",
        cargo()
            .args(["test", "--workspace"])
            .env("MESH_BIN_DIR", root().join("target/debug"))
            .arg("--")
            .args(&args.cargo_test_args),
    )?;
    crate::manifests::validate()?;
    eprintln!("xtask: ── demo --once");
    let demo = Instant::now();
    crate::demo::scenario(true).map_err(|e| e.context("demo --once"))?;
    eprintln!("xtask: ✓ demo --once ({:.1}s)", demo.elapsed().as_secs_f64());
    // Not a measurement: a seconds-long run so that the bench keeps working.
    eprintln!("xtask: ── bench --smoke");
    let bench = Instant::now();
    crate::bench::smoke().map_err(|e| e.context("bench --smoke"))?;
    eprintln!("xtask: ✓ bench --smoke ({:.1}s)", bench.elapsed().as_secs_f64());
    eprintln!(
        "xtask: all checks passed in {:.0}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
