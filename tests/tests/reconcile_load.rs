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

/// How long a scrape may take before curl gives up; it then counts as taking this long.
const CURL_LIMIT: Duration = Duration::from_secs(20);

/// `GET url` from the node's netns: the body, and how long curl took for the request.
fn timed_get(cluster: &Cluster, node: &Node, url: &str) -> Result<(String, Duration)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-w", "\n%{time_total}", "--max-time"])
        .arg(CURL_LIMIT.as_secs().to_string())
        .arg(url);
    let out = cluster.exec_on_node(node, cmd)?;
    // 28: the time limit passed.
    if out.status.code() == Some(28) {
        return Ok((String::new(), CURL_LIMIT));
    }
    let out = out.success()?;
    let (body, secs) = out
        .stdout
        .trim_end()
        .rsplit_once('\n')
        .with_context(|| format!("curl: {}", out.stdout))?;
    let secs: f64 = secs.parse().with_context(|| format!("curl: {secs}"))?;
    Ok((body.to_owned(), Duration::from_secs_f64(secs)))
}

/// The value of the unlabelled sample `name` in a scrape, 0 when absent.
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// 1,000 enrolled STRICT pods of `node` with cgroups made in bulk and no process (their veths
/// are never found), addressed on the node's pod network, where the node has a neighbour entry
/// for each (as a node with 1,000 pods does).
fn bulk_pods(cluster: &Cluster, node: &Node) -> Result<String> {
    let mut yaml = namespace_yaml(
        "bulk",
        &[("mesh.dev/enroll", "true"), ("mesh.dev/mtls", "strict")],
    );
    let mut neighbours = String::new();
    let mut fdb = String::new();
    for i in 0..PODS {
        let uid = format!("0b3c7e0e-1111-4c8a-9c1e-{:012x}", u64::from(i) + 1);
        std::fs::create_dir(node.pods_cgroup.join(format!("pod{uid}")))?;
        let ip6 = Ipv6Addr::new(0xfd00, 1, 1, 0, 0, 0, 1, i + 1);
        writeln!(
            neighbours,
            "neigh replace {ip6} lladdr 02:00:00:00:{:02x}:{:02x} dev {} nud permanent",
            i >> 8,
            i & 0xff,
            node.bridge
        )?;
        writeln!(
            fdb,
            "fdb add 02:00:00:00:{:02x}:{:02x} dev {PORT} master static",
            i >> 8,
            i & 0xff
        )?;
        write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: bulk\n  uid: {uid}\n\
             spec:\n  nodeName: {node}\n  serviceAccountName: default\n\
             status:\n  podIP: {ip6}\n  podIPs:\n  - ip: {ip6}\n",
            node = node.name,
        )?;
    }
    let mut port = Command::new("ip");
    port.args(["link", "add", PORT, "type", "veth", "peer", "name", "bulk1"]);
    cluster.exec_on_node(node, port)?.success()?;
    let mut port = Command::new("ip");
    port.args(["link", "set", PORT, "master", &node.bridge, "up"]);
    cluster.exec_on_node(node, port)?.success()?;
    batch(cluster, node, "ip", &neighbours)?;
    batch(cluster, node, "bridge", &fdb)?;
    Ok(yaml)
}

/// The bridge port the pods' MAC addresses are learned on.
const PORT: &str = "bulk0";

/// Runs `commands` with `tool -batch` in the node's netns.
fn batch(cluster: &Cluster, node: &Node, tool: &str, commands: &str) -> Result<()> {
    let file = std::env::temp_dir().join(format!("{}-{tool}.batch", cluster.id()));
    std::fs::write(&file, commands)?;
    let mut cmd = Command::new(tool);
    cmd.arg("-batch").arg(&file);
    let done = cluster.exec_on_node(node, cmd).and_then(|o| o.success());
    std::fs::remove_file(&file)?;
    done.map(|_| ())
}

#[test]
fn scrapes_answer_fast_while_reconcile_walks_1000_pods() -> Result<()> {
    let cluster = Cluster::new("reconcile-load")?;
    let node = cluster.add_node("a")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agent = Agent::new(&node, &controller, &[])?;
    agent.start(&cluster)?;
    controller.apply("bulk", &bulk_pods(&cluster, &node)?)?;
    wait_until(Duration::from_secs(30), "the 1,000 pods to be enrolled", || {
        let n = agent.enrolled().map_err(|e| format!("{e:#}"))?.len();
        (n == usize::from(PODS))
            .then_some(())
            .ok_or(format!("{n} enrolled"))
    })?;

    let metrics = "http://127.0.0.1:15020/metrics";
    let mut took = Vec::new();
    let mut first = None;
    let mut last = String::new();
    for _ in 0..SCRAPES {
        for url in [metrics, "http://127.0.0.1:15000/v1/bpf"] {
            let (body, time) = timed_get(&cluster, &node, url)?;
            took.push((time, url));
            if url == metrics && !body.is_empty() {
                first.get_or_insert_with(|| body.clone());
                last = body;
            }
        }
    }
    let first = first.unwrap_or_default();
    let rounds = sample(&last, "mesh_reconcile_rounds_total") - sample(&first, "mesh_reconcile_rounds_total");
    let last_round = sample(&last, "mesh_reconcile_last_duration_seconds");
    took.sort();
    let (slowest, url) = took[took.len() - 1];
    println!(
        "{} scrapes: median {:?}, slowest {slowest:?} ({url}); {rounds} reconcile rounds meanwhile, the last one {last_round:.3}s",
        took.len(),
        took[took.len() / 2].0,
    );
    ensure!(
        slowest < SCRAPE_BOUND,
        "{url} took {slowest:?} while the reconcile loop worked (bound {SCRAPE_BOUND:?})"
    );
    ensure!(
        rounds >= 3.0,
        "the reconcile loop went on during the scrapes: {rounds} rounds"
    );
    let unresolved = sample(&last, "mesh_strict_unresolved_pods");
    ensure!(
        unresolved == f64::from(PODS),
        "every STRICT pod without a process is reported: {unresolved}"
    );
    Ok(())
}
