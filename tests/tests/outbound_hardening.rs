//! The outbound proxy's promises, end to end on real agents: it carries only connections the
//! kernel redirected and never loops into itself, builds its TLS material once per
//! certificate, logs the TCP peer as the source, and dials HBONE marked, within
//! `--connect-timeout`, closing pooled connections left idle.
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use mesh_harness::agent::Agent;
use mesh_harness::app::{client, client_cmd, echo_server, wait_mesh_path, ClientReport};
use mesh_harness::controller::{namespace_yaml, pod_yaml, Controller};
use mesh_harness::{wait_until, Cluster, Node, Pod};

const WAIT: Duration = Duration::from_secs(20);
/// Descriptors the agent may open meanwhile for its own work (control stream, netlink, maps).
const FD_SLACK: usize = 8;
const TD: &str = "spiffe://cluster.local/ns/shop/sa";

/// Nodes a and b; `client` on a, `server` and `server2` (the same service account) on b, all
/// in the enrolled namespace `shop`; agents started with `agent_args`.
struct World {
    cluster: Cluster,
    _controller: Controller,
    a: Node,
    b: Node,
    client: Pod,
    server: Pod,
    server2: Pod,
    agents: Vec<Agent>,
}

fn world(name: &str, agent_args: &[&str]) -> Result<World> {
    let cluster = Cluster::new(name)?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let client = cluster.add_pod("a", "client")?;
    let server = cluster.add_pod("b", "server")?;
    let server2 = cluster.add_pod("b", "server2")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut yaml = namespace_yaml("shop", &[("mesh.dev/enroll", "true")]);
    for (pod, sa) in [(&client, "client"), (&server, "server"), (&server2, "server")] {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "shop", sa, &[("app", &pod.name)]));
    }
    controller.apply("shop", &yaml)?;
    let mut agents = Vec::new();
    for node in [&a, &b] {
        let mut agent = Agent::new(node, &controller, agent_args)?;
        agent.start(&cluster)?;
        agents.push(agent);
    }
    Ok(World {
        cluster,
        _controller: controller,
        a,
        b,
        client,
        server,
        server2,
        agents,
    })
}

impl World {
    fn wait_path(&self, dst: SocketAddr) -> Result<()> {
        wait_mesh_path(&self.cluster, &self.agents, &self.client, dst)
    }

    fn metric(&self, agent: usize, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.agents[agent].metric_sum(&self.cluster, name, labels)
    }
}

fn v4(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ipv4.into(), port)
}

/// Runs `nft` with `script` in the node's netns; fails loudly when nft is missing.
fn nft(cluster: &Cluster, node: &Node, script: &str) -> Result<()> {
    let mut cmd = Command::new("nft");
    cmd.arg(script);
    cluster
        .exec_on_node(node, cmd)
        .context("running nft (the nftables package; installed by the set-up script)")?
        .success()?;
    Ok(())
}

/// A client exchange that is expected to fail: its report.
fn failing_client(cluster: &Cluster, pod: &Pod, dst: SocketAddr, timeout_ms: u64) -> Result<ClientReport> {
    let cmd = client_cmd(dst, 1024, timeout_ms)?;
    let out = cluster.exec_in_pod(pod, cmd)?;
    let report: ClientReport = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("client output: {} / {}", out.stdout, out.stderr))?;
    ensure!(!report.ok, "the connection to {dst} was carried: {report:?}");
    Ok(report)
}

/// The descriptors process `pid` holds.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .count())
}

fn messages<'a>(logs: &'a [Value], message: &str) -> impl Iterator<Item = &'a Value> + 'a {
    let message = message.to_owned();
    logs.iter().filter(move |l| l["message"] == message.as_str())
}

/// Asks the kernel for `SO_ORIGINAL_DST` of a connection made inside the node netns, outside
/// the agent's cgroup: with conntrack active it answers with the connection's own destination.
const CONNTRACK_PROBE: &str = "import socket,struct,sys\n\
l=socket.socket(); l.bind((sys.argv[1],0)); l.listen(1)\n\
c=socket.create_connection(l.getsockname()); s,_=l.accept()\n\
v=s.getsockopt(socket.SOL_IP,80,16); port,ip=struct.unpack('!2xH4s8x',v)\n\
print(socket.inet_ntoa(ip), port)\n";

#[test]
fn a_direct_connection_to_another_node_address_on_15001_is_refused_without_a_loop() -> Result<()> {
    let cluster = Cluster::new("ob-loop")?;
    let a = cluster.add_node("a")?;
    let outsider = cluster.add_pod("a", "outsider")?;
    let controller = Controller::start(&cluster, &[])?;
    let yaml = format!(
        "{}---\n{}",
        namespace_yaml("plain", &[]),
        pod_yaml(&outsider, "plain", "default", &[])
    );
    controller.apply("plain", &yaml)?;
    // Conntrack active in the node netns, as any node with iptables or nftables rules has it.
    nft(
        &cluster,
        &a,
        "add table inet meshtest; \
         add chain inet meshtest input { type filter hook input priority 0; policy accept; }; \
         add rule inet meshtest input ct state established,related accept",
    )?;
    let mut probe = Command::new("/usr/bin/python3");
    probe.args(["-c", CONNTRACK_PROBE, &a.bridge_ipv4.to_string()]);
    let probe = cluster.spawn_in_node_cgroup(&a, "probe", probe)?;
    probe.wait_exit(WAIT)?;
    ensure!(
        probe.stdout().starts_with(&a.bridge_ipv4.to_string()),
        "conntrack answers SO_ORIGINAL_DST in the node netns: {} / {}",
        probe.stdout(),
        probe.stderr()
    );

    let mut agent = Agent::new(&a, &controller, &[])?;
    agent.start(&cluster)?;
    let pid = agent.proc()?.pid();
    let baseline = open_fds(pid)?;
    // The bridge's addresses: the node's, but not the one the proxy redirects to.
    let targets = [
        SocketAddr::new(a.bridge_ipv4.into(), 15001),
        SocketAddr::new(a.bridge_ipv6.into(), 15001),
    ];
    const ROUNDS: usize = 3;
    for _ in 0..ROUNDS {
        for dst in targets {
            failing_client(&cluster, &outsider, dst, 3000)?;
        }
    }
    let attempts = ROUNDS * targets.len();
    let logs = wait_until(WAIT, "the agent to refuse every direct connection", || {
        let logs = agent.logs();
        let refused = messages(&logs, "no original destination; closing").count();
        let fds = open_fds(pid).map_err(|e| format!("{e:#}"))?;
        // A loop shows as descriptors piling up: stop waiting and report it.
        if refused >= attempts || fds > baseline + 200 * FD_SLACK {
            Ok(logs)
        } else {
            Err(format!(
                "{refused} of {attempts} refused; {fds} descriptors (baseline {baseline})"
            ))
        }
    })?;
    if let Some(refusal) = messages(&logs, "no original destination; closing").next() {
        println!("the agent's refusal: {refusal}");
    }
    let carried: Vec<&Value> = messages(&logs, "captured").collect();
    ensure!(
        carried.is_empty(),
        "no direct connection was carried ({} were, e.g. {:?}); descriptors {} (baseline {baseline})",
        carried.len(),
        carried.first(),
        open_fds(pid)?
    );
    // Flat: back to the baseline, give or take what the agent opens for other work.
    wait_until(WAIT, "the agent's descriptors to stay flat", || {
        let fds = open_fds(pid).map_err(|e| format!("{e:#}"))?;
        if fds <= baseline + FD_SLACK {
            Ok(())
        } else {
            Err(format!("{fds} descriptors, baseline {baseline}"))
        }
    })?;
    let refused = agent.metric(
        &cluster,
        r#"mesh_outbound_connections_total{route="not_captured"}"#,
    )?;
    ensure!(refused == attempts as f64, "refusals counted: {refused}");
    Ok(())
}

#[test]
fn tls_material_is_built_once_per_certificate_on_the_proxy_path() -> Result<()> {
    let w = world("ob-tls", &[])?;
    let _s1 = echo_server(&w.cluster, &w.server, &[8080])?;
    let _s2 = echo_server(&w.cluster, &w.server2, &[8080])?;
    // Two destination pods, so two HBONE connections (the pool keys by pod address), of one
    // source identity to one destination identity.
    w.wait_path(v4(&w.server, 8080))?;
    w.wait_path(v4(&w.server2, 8080))?;
    for _ in 0..3 {
        client(&w.cluster, &w.client, v4(&w.server, 8080), 1024)?;
        client(&w.cluster, &w.client, v4(&w.server2, 8080), 1024)?;
    }
    let handshakes = |agent, direction| {
        w.metric(
            agent,
            "mesh_hbone_handshake_duration_seconds_count",
            &[("direction", direction)],
        )
    };
    let dials = handshakes(0, "client")?;
    let accepts = handshakes(1, "server")?;
    ensure!(
        dials >= 2.0 && accepts >= 2.0,
        "two HBONE connections or more: {dials} dialled, {accepts} accepted"
    );
    let builds = |agent, kind| w.metric(agent, "mesh_tls_config_builds_total", &[("kind", kind)]);
    for (agent, kind, want) in [
        (0, "key", 1.0),
        (0, "client", 1.0),
        (0, "server", 0.0),
        (1, "key", 1.0),
        (1, "server", 1.0),
        (1, "client", 0.0),
    ] {
        let got = builds(agent, kind)?;
        ensure!(
            got == want,
            "agent {agent}: {kind} built {got} times for {dials} dials and {accepts} accepts, want {want}"
        );
    }
    Ok(())
}

#[test]
fn the_inbound_access_log_names_the_tcp_peer_and_keeps_forwarded_apart() -> Result<()> {
    let w = world("ob-log", &[])?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    let dst = v4(&w.server, 8080);
    w.wait_path(dst)?;
    let report = client(&w.cluster, &w.client, dst, 1024)?;
    let client_addr = report.local.context("the client's address")?;
    let access = |agent: &Agent, direction: &str| -> Option<Value> {
        agent
            .logs()
            .into_iter()
            .filter(|l| l["target"] == "access" && l["direction"] == direction)
            .find(|l| {
                l["src.forwarded_for"] == client_addr.to_string().as_str()
                    || l["src.addr"] == client_addr.to_string().as_str()
            })
    };
    let inbound = wait_until(WAIT, "node b's access log line", || {
        access(&w.agents[1], "inbound").ok_or_else(|| "none yet".to_owned())
    })?;
    let src: SocketAddr = inbound["src.addr"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("src.addr in {inbound}"))?;
    ensure!(
        src.ip() == IpAddr::from(w.client.ipv4),
        "the source is the TCP peer, node a's proxy connecting from the client pod's address: {inbound}"
    );
    ensure!(
        inbound["src.forwarded_for"] == client_addr.to_string().as_str(),
        "what the peer forwarded is in its own field: {inbound}"
    );
    ensure!(
        inbound["src.identity"] == format!("{TD}/client").as_str(),
        "{inbound}"
    );
    let outbound = wait_until(WAIT, "node a's access log line", || {
        access(&w.agents[0], "outbound").ok_or_else(|| "none yet".to_owned())
    })?;
    ensure!(
        outbound["src.addr"] == client_addr.to_string().as_str()
            && outbound.get("src.forwarded_for").is_none(),
        "outbound, the TCP peer is the client itself: {outbound}"
    );
    Ok(())
}

/// The proxy's established HBONE connections on `node`, as `ss -e` prints them.
fn hbone_sockets(w: &World, node: &Node) -> Result<Vec<String>> {
    let mut cmd = Command::new("ss");
    cmd.args(["-tnHe", "state", "established", "( dport = :15008 )"]);
    let out = w.cluster.exec_on_node(node, cmd)?.success()?;
    Ok(out.stdout.lines().map(str::to_owned).collect())
}

#[test]
fn hbone_dials_carry_the_proxy_mark() -> Result<()> {
    let w = world("ob-mark", &[])?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    w.wait_path(v4(&w.server, 8080))?;
    let sockets = hbone_sockets(&w, &w.a)?;
    ensure!(!sockets.is_empty(), "node a holds a pooled HBONE connection");
    for s in &sockets {
        // --proxy-mark's default.
        ensure!(s.contains("fwmark:0x2000"), "the HBONE dial is marked: {s}");
    }
    Ok(())
}

#[test]
fn pooled_hbone_connections_without_streams_close_after_the_idle_timeout() -> Result<()> {
    let w = world("ob-idle", &["--hbone-idle-timeout", "1s"])?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    w.wait_path(v4(&w.server, 8080))?;
    client(&w.cluster, &w.client, v4(&w.server, 8080), 1024)?;
    wait_until(WAIT, "node a to close its idle HBONE connection", || {
        let pooled = w
            .metric(0, "mesh_pool_connections", &[])
            .map_err(|e| format!("{e:#}"))?;
        let sockets = hbone_sockets(&w, &w.a).map_err(|e| format!("{e:#}"))?;
        if pooled == 0.0 && sockets.is_empty() {
            Ok(())
        } else {
            Err(format!("{pooled} pooled, sockets {sockets:?}"))
        }
    })?;
    // And node b sees it go.
    wait_until(WAIT, "node b to see the connection closed", || {
        let mut cmd = Command::new("ss");
        cmd.args(["-tnH", "state", "established", "( sport = :15008 )"]);
        let out = w.cluster.exec_on_node(&w.b, cmd).map_err(|e| format!("{e:#}"))?;
        if out.stdout.trim().is_empty() {
            Ok(())
        } else {
            Err(out.stdout)
        }
    })?;
    Ok(())
}

#[test]
fn connect_timeout_bounds_hbone_dials_to_a_blackholed_peer() -> Result<()> {
    let w = world("ob-timeout", &["--connect-timeout", "1s"])?;
    for agent in &w.agents {
        agent.wait_meshed(&w.cluster)?;
    }
    // Node b drops every packet to 15008: the dial's SYN goes unanswered.
    nft(
        &w.cluster,
        &w.b,
        "add table inet meshtest; \
         add chain inet meshtest pre { type filter hook prerouting priority -300; policy accept; }; \
         add rule inet meshtest pre tcp dport 15008 drop",
    )?;
    let dst = v4(&w.server, 8080);
    let started = Instant::now();
    // The client would give up by itself after 8 s; the proxy's 1 s dial timeout comes first.
    let report = failing_client(&w.cluster, &w.client, dst, 8000)?;
    let took = started.elapsed();
    let error = report.error.clone().unwrap_or_default();
    // Reset by the proxy, not given up by the client (whose own timeout reads EAGAIN).
    ensure!(
        error.contains("reset"),
        "the proxy reset the connection when its dial timed out, after {took:?}: {report:?}"
    );
    let logs = w.agents[0].logs();
    ensure!(
        messages(&logs, "HBONE dial failed").any(|l| l["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out dialling"))),
        "node a's dial timed out"
    );
    Ok(())
}
