//! Project automation: `cargo xtask setup | test | demo | bench | manifests`. Builds without the eBPF toolchain,
//! because its first job is to install it.
mod bench;
mod demo;
mod manifests;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mesh project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks to build and test mesh (idempotent; needs root).
    Setup,
    /// Set up, then run every check and test: fmt, clippy, unit tests and the kernel e2e tests.
    Test(test::Args),
    /// Set up, then bring up a local cluster in network namespaces and show mesh at work.
    Demo(demo::Args),
    /// Set up, then measure direct vs mesh (vs a peer proxy chain) on the netns harness:
    /// HTTP/1.1 req/s and latency, new connections, bulk TCP, proxy CPU and memory.
    Bench(bench::Args),
    /// Regenerate the CRD YAML in daemonset/base/crds from the Rust types.
    Manifests,
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test(args) => test::run(args),
        Task::Demo(args) => demo::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Manifests => manifests::run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
