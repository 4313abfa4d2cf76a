//! The reconcile loop's kernel, file and netlink work never holds up the metrics scrape or the
//! admin API: with 1,000 STRICT pods on the node, every scrape answers fast while rounds go by.
use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use mesh_harness::agent::Agent;
use mesh_harness::controller::{namespace_yaml, Controller};
use mesh_harness::{wait_until, Cluster, Node};

const PODS: u16 = 1000;
/// Scrapes of each endpoint, back to back, while the reconcile loop works.
const SCRAPES: usize = 25;
/// Generous for a scrape on a loaded machine; a round over 1,000 pods on a loop that holds the
/// scrape's lock takes longer.
const SCRAPE_BOUND: Duration = Duration::from_millis(750);

/// `GET url` from the node's netns: how long curl took for the request.
fn timed_get(cluster: &Cluster, node: &Node, url: &str) -> Result<Duration> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{time_total}",
        "--max-time",
        "30",
        url,
    ]);
    let out = cluster.exec_on_node(node, cmd)?.success()?;
    let secs: f64 = out
        .stdout
        .trim()
        .parse()
        .with_context(|| format!("curl: {}", out.stdout))?;
    Ok(Duration::from_secs_f64(secs))
}

/// 1,000 enrolled STRICT pods of `node` with cgroups made in bulk and no process (their veths
/// are never found), addressed on the node's pod network.
fn bulk_pods(node: &Node) -> Result<String> {
    let mut yaml = namespace_yaml(
        "bulk",
        &[("mesh.dev/enroll", "true"), ("mesh.dev/mtls", "strict")],
    );
    for i in 0..PODS {
        let uid = format!("0b3c7e0e-1111-4c8a-9c1e-{:012x}", u64::from(i) + 1);
        std::fs::create_dir(node.pods_cgroup.join(format!("pod{uid}")))?;
        let ip6 = Ipv6Addr::new(0xfd00, 1, 1, 0, 0, 0, 1, i + 1);
        write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: bulk\n  uid: {uid}\n\
             spec:\n  nodeName: {node}\n  serviceAccountName: default\n\
             status:\n  podIP: {ip6}\n  podIPs:\n  - ip: {ip6}\n",
            node = node.name,
        )?;
    }
    Ok(yaml)
}

#[test]
fn scrapes_answer_fast_while_reconcile_walks_1000_pods() -> Result<()> {
    let cluster = Cluster::new("reconcile-load")?;
    let node = cluster.add_node("a")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agent = Agent::new(&node, &controller, &[])?;
    agent.start(&cluster)?;
    controller.apply("bulk", &bulk_pods(&node)?)?;
    wait_until(Duration::from_secs(30), "the 1,000 pods to be enrolled", || {
        let n = agent.enrolled().map_err(|e| format!("{e:#}"))?.len();
        (n == usize::from(PODS))
            .then_some(())
            .ok_or(format!("{n} enrolled"))
    })?;

    let rounds_before = agent.metric(&cluster, "mesh_reconcile_rounds_total")?;
    let mut slowest = Vec::new();
    for _ in 0..SCRAPES {
        for url in ["http://127.0.0.1:15020/metrics", "http://127.0.0.1:15000/v1/bpf"] {
            let took = timed_get(&cluster, &node, url)?;
            ensure!(
                took < SCRAPE_BOUND,
                "{url} took {took:?} while the reconcile loop worked (bound {SCRAPE_BOUND:?})"
            );
            slowest.push(took);
        }
    }
    slowest.sort();
    let rounds = agent.metric(&cluster, "mesh_reconcile_rounds_total")? - rounds_before;
    let last_round = agent.metric(&cluster, "mesh_reconcile_last_duration_seconds")?;
    println!(
        "{} scrapes, slowest {:?}, {rounds} reconcile rounds meanwhile, the last one {last_round:.3}s",
        slowest.len(),
        slowest.last()
    );
    ensure!(
        rounds >= 3.0,
        "the reconcile loop went on during the scrapes: {rounds} rounds"
    );
    let unresolved = agent.metric(&cluster, "mesh_strict_unresolved_pods")?;
    ensure!(
        unresolved == f64::from(PODS),
        "every STRICT pod without a process is reported: {unresolved}"
    );
    Ok(())
}
