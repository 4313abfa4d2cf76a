//! `cargo xtask demo`: a two-node cluster in network namespaces running a meshed app —
//! web → api → db in an enrolled, STRICT namespace, with a policy that lets only api reach
//! db. It shows what works, what is refused, and that the link between the nodes carries only
//! TLS. `--once` runs the scenario and exits 0 on success, 1 otherwise; without it the cluster
//! stays up until Ctrl-C.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{client, echo_server, send_marker};
use mesh_harness::controller::{namespace_yaml, pod_yaml, policy_yaml, service_yaml, Controller};
use mesh_harness::wire::Sniffer;
use mesh_harness::{wait_until, Cluster, Pod};

use crate::run::{cargo, require_root, step};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the machine set-up (when you know it is done).
    #[arg(long)]
    no_setup: bool,
    /// Run the scenario once and exit (0 on success, 1 otherwise) instead of staying up.
    #[arg(long)]
    once: bool,
}

const API_VIP: &str = "10.96.0.11";
const DB_VIP: &str = "10.96.0.12";

pub fn run(args: Args) -> Result<()> {
    require_root("cargo xtask demo")?;
    if !args.no_setup {
        crate::setup::run()?;
    }
    step("build binaries", cargo().args(["build", "--workspace", "--bins"]))?;
    scenario(args.once)
}

/// The demo itself, on binaries already built; `once` returns after the checks.
pub fn scenario(once: bool) -> Result<()> {
    let cluster = Cluster::new("demo")?;
    let a = cluster.add_node("a")?;
    cluster.add_node("b")?;
    let web = cluster.add_pod("a", "web")?;
    let api = cluster.add_pod("b", "api")?;
    let db = cluster.add_pod("b", "db")?;
    let controller = Controller::start(&cluster, &[])?;
    controller.apply("shop", &shop_yaml(&[&web, &api, &db]))?;
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let mut agent = Agent::new(&node, &controller, &[])?;
        agent.start(&cluster)?;
        agents.push(agent);
    }
    let _api_server = echo_server(&cluster, &api, &[8080])?;
    let _db_server = echo_server(&cluster, &db, &[5432])?;

    println!();
    println!("Two nodes (a, b) in network namespaces, mesh-controller, and mesh-node on each node.");
    println!("Namespace shop is labelled mesh.dev/enroll=true and mesh.dev/mtls=strict:");
    println!("  web (node a) → api (node b, Service {API_VIP}:80) → db (node b, Service {DB_VIP}:5432)");
    println!("  AuthorizationPolicy db-from-api: only shop/sa/api may reach db.");
    println!();

    let api_svc = SocketAddr::new(API_VIP.parse()?, 80);
    let db_svc = SocketAddr::new(DB_VIP.parse()?, 5432);
    // Certificates and inbound capture come up within moments of the pods' enrollment.
    wait_until(Duration::from_secs(30), "the mesh path web → api", || {
        client(&cluster, &web, api_svc, 1024)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    })?;

    let checks = [
        ("web", &web, api_svc, "api", true, "cross-node, HBONE mTLS"),
        ("api", &api, db_svc, "db", true, "same node, in the proxy"),
        ("web", &web, db_svc, "db", false, "cross-node, HBONE mTLS"),
    ];
    println!(
        "{:<6} {:<24} {:<24} {:<22} {:>8}",
        "from", "to", "path", "result", "time"
    );
    let mut failures = Vec::new();
    for (from, pod, dst, to, allowed, path) in checks {
        let start = Instant::now();
        let outcome = client(&cluster, pod, dst, 64 * 1024);
        let took = start.elapsed();
        let result = match (&outcome, allowed) {
            (Ok(_), true) => "ok (64 KiB echoed)".to_owned(),
            (Err(_), false) => "refused by policy".to_owned(),
            (Ok(_), false) => "NOT refused".to_owned(),
            (Err(e), true) => format!("FAILED: {e:#}"),
        };
        if outcome.is_ok() != allowed {
            failures.push(format!("{from} → {to}: {result}"));
        }
        let target = format!("{to} ({dst})");
        println!(
            "{from:<6} {target:<24} {path:<24} {result:<22} {:>6.1}ms",
            took.as_secs_f64() * 1e3
        );
    }

    let marker = format!("PLAINTEXT-MARKER-{}", cluster.id());
    let sniffer = Sniffer::start(&cluster, &a)?;
    let echoed = send_marker(&cluster, &web, api_svc, &marker)?;
    let capture = sniffer.stop(&cluster)?;
    let leaked = capture.contains(marker.as_bytes());
    println!();
    println!(
        "On the link between the nodes, while web sent {marker:?} to api: {} HBONE packets",
        capture.hbone_packets
    );
    let verdict = if leaked {
        "APPEARS IN PLAINTEXT"
    } else {
        "never appears in them"
    };
    println!("(TLS 1.3) crossed, and the marker {verdict}.");
    if leaked || capture.hbone_packets == 0 || !echoed.contains(&marker) {
        failures.push("the wire check failed".into());
    }
    println!();
    if !failures.is_empty() {
        bail!("demo failed: {}", failures.join("; "));
    }
    println!("All as expected.");
    if once {
        return Ok(());
    }
    println!(
        "The cluster stays up (namespaces {}*); press Ctrl-C to tear it down.",
        cluster.prefix()
    );
    loop {
        // The harness's Ctrl-C handler tears the cluster down and exits.
        std::thread::park();
    }
}

fn shop_yaml(pods: &[&Pod]) -> String {
    let mut yaml = namespace_yaml(
        "shop",
        &[("mesh.dev/enroll", "true"), ("mesh.dev/mtls", "strict")],
    );
    for pod in pods {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
    }
    for (name, vip, port, target) in [("api", API_VIP, 80, 8080), ("db", DB_VIP, 5432, 5432)] {
        yaml.push_str("---\n");
        yaml.push_str(&service_yaml(name, "shop", vip, port, target, name));
    }
    yaml.push_str("---\n");
    yaml.push_str(&policy_yaml(
        "db-from-api",
        "shop",
        "db",
        "ALLOW",
        "cluster.local/ns/shop/sa/api",
    ));
    yaml
}
