//! `cargo xtask bench`: the direct path, the mesh and optionally a peer proxy chain, measured
//! with real load tools on the netns harness, interleaved (each figure on every path in turn,
//! round after round) so that drift of the machine hits every path alike.
mod figures;
mod iperf;
mod peer;
mod proc_stats;
mod report;
mod topology;
mod wrk;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::run::{cargo, require_root, root, step};
use peer::PeerSpec;
use report::{markdown, rows, Samples};
use topology::Topology;

#[derive(clap::Args)]
#[command(after_long_help = peer::HELP)]
pub struct Args {
    /// Skip the machine set-up (when you know it is done).
    #[arg(long)]
    no_setup: bool,
    /// Rounds: every figure is measured this many times on each path; the table shows medians
    /// with min–max.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Seconds each timed measurement lasts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=50))]
    duration: u64,
    /// Where to write the results as JSON [default: target/bench/bench.json, or smoke.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// A seconds-long run that only checks that the bench works: one round of 1-second
    /// figures on debug binaries; with no peer given, a chain of socat relays stands in for one.
    #[arg(long)]
    smoke: bool,
    /// The peer chain's command on the client's node (see below).
    #[arg(long, requires = "peer_server_cmd", value_name = "TEMPLATE")]
    peer_client_cmd: Option<String>,
    /// The peer chain's command on the server's node (see below).
    #[arg(long, requires = "peer_client_cmd", value_name = "TEMPLATE")]
    peer_server_cmd: Option<String>,
    /// The peer's name in the table.
    #[arg(long, default_value = "peer")]
    peer_name: String,
}

/// What one bench run does.
pub struct Plan {
    pub runs: u32,
    pub duration: Duration,
    pub peer: Option<PeerSpec>,
    pub json: PathBuf,
    pub profile: &'static str,
}

pub fn run(args: Args) -> Result<()> {
    require_root("cargo xtask bench")?;
    if !args.no_setup {
        crate::setup::run()?;
    }
    let peer = match (args.peer_client_cmd, args.peer_server_cmd) {
        (Some(client_cmd), Some(server_cmd)) => Some(PeerSpec {
            name: args.peer_name,
            client_cmd,
            server_cmd,
        }),
        _ => None,
    };
    let bench_dir = root().join("target/bench");
    if args.smoke {
        step("build binaries", cargo().args(["build", "--workspace", "--bins"]))?;
        return measure(&smoke_plan(peer, args.json));
    }
    step(
        "build release binaries (mesh-node, mesh-testapp)",
        cargo().args([
            "build",
            "--release",
            "-p",
            "mesh-node",
            "-p",
            "mesh-tests",
            "--bins",
        ]),
    )?;
    // The controller is off the data path: the debug build that tests and demo use spares a
    // long release build of the Kubernetes client.
    step(
        "build debug binaries",
        cargo().args(["build", "--workspace", "--bins"]),
    )?;
    let bin_dir = bench_dir.join("bin");
    link_bins(&bin_dir)?;
    // The harness finds the binaries there; nothing else runs in this process yet.
    std::env::set_var("MESH_BIN_DIR", &bin_dir);
    measure(&Plan {
        runs: args.runs,
        duration: Duration::from_secs(args.duration),
        peer,
        json: args.json.unwrap_or_else(|| bench_dir.join("bench.json")),
        profile: "release",
    })
}

/// The smoke run `cargo xtask test` makes, on the debug binaries it has just built.
pub fn smoke() -> Result<()> {
    measure(&smoke_plan(None, None))
}

/// One round of 1-second figures; a chain of socat relays stands in for a peer not given.
fn smoke_plan(peer: Option<PeerSpec>, json: Option<PathBuf>) -> Plan {
    Plan {
        runs: 1,
        duration: Duration::from_secs(1),
        peer: peer.or_else(|| Some(PeerSpec::socat_relays())),
        json: json.unwrap_or_else(|| root().join("target/bench/smoke.json")),
        profile: "debug",
    }
}

fn measure(plan: &Plan) -> Result<()> {
    let start = Instant::now();
    eprintln!("bench: bringing up two nodes, the mesh, the servers and the paths");
    let topo = Topology::up(plan.peer.as_ref())?;
    let mut samples = Samples::default();
    for round in 1..=plan.runs {
        eprintln!("bench: round {round} of {}", plan.runs);
        figures::round(&topo, plan, &mut samples).with_context(|| format!("round {round}"))?;
    }
    drop(topo);
    let rows = rows(&figures::METRICS, &samples);
    if rows.is_empty() {
        bail!("no figures were measured");
    }
    let peer_name = plan.peer.as_ref().map(|p| p.name.as_str());
    let machine = machine();
    println!();
    println!(
        "mesh bench: {} rounds of {} s per figure, {} mesh-node; {machine}",
        plan.runs,
        plan.duration.as_secs(),
        plan.profile
    );
    println!("Medians (min–max); targets are judged on the mesh's medians.");
    println!();
    print!("{}", markdown(&rows, peer_name));
    let doc = json!({
        "machine": machine,
        "runs": plan.runs,
        "duration_s": plan.duration.as_secs(),
        "mesh_node_build": plan.profile,
        "peer": plan.peer.as_ref().map(|p| json!({
            "name": p.name, "client_cmd": p.client_cmd, "server_cmd": p.server_cmd})),
        "figures": rows,
    });
    if let Some(dir) = plan.json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&plan.json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", plan.json.display()))?;
    eprintln!(
        "bench: wrote {} ({:.0}s in all)",
        plan.json.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `dir` with the release data-path binaries and the debug controller.
fn link_bins(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, profile) in [
        ("mesh-node", "release"),
        ("mesh-testapp", "release"),
        ("mesh-controller", "debug"),
    ] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        let target = root().join("target").join(profile).join(name);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    }
    Ok(())
}

/// `<CPU model>, <n> CPUs, Linux <release>`.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cpus} CPUs, Linux {}", kernel.trim())
}
