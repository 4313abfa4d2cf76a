//! The pod's own address, end to end (`--preserve-source`, on by default): the HBONE connection
//! leaves node a from the client pod's address, the destination proxy delivers from it, and the
//! server app, and a firewall in its netns that admits only that address, see the client pod,
//! across nodes and on one node, over IPv4 and IPv6. STRICT still admits these connections and
//! refuses plaintext that goes around the proxy. With `--preserve-source=false` the node's
//! address shows instead (the firewall then refuses).
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{accept_peer, client, client_cmd, echo_server, testapp, wait_mesh_path};
use mesh_harness::controller::{namespace_yaml, pod_yaml, service_yaml, Controller};
use mesh_harness::wire::Sniffer;
use mesh_harness::{wait_until, Cluster, Node, Pod, Proc};

const VIP: &str = "10.96.0.30";
const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);

/// Two nodes; STRICT `shop` (enrolled) has `client` and `local` on a, `server` and `ghost` on
/// b, and a Service `server` (VIP:80 → 8080); `outsider` on a is outside the mesh.
struct World {
    cluster: Cluster,
    _controller: Controller,
    a: Node,
    b: Node,
    client: Pod,
    local: Pod,
    server: Pod,
    ghost: Pod,
    outsider: Pod,
    agents: Vec<Agent>,
}

fn world(name: &str, agent_args: &[&str]) -> Result<World> {
    let cluster = Cluster::new(name)?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let client = cluster.add_pod("a", "client")?;
    let local = cluster.add_pod("a", "local")?;
    let server = cluster.add_pod("b", "server")?;
    let ghost = cluster.add_pod("b", "ghost")?;
    let outsider = cluster.add_pod("a", "outsider")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut yaml = namespace_yaml(
        "shop",
        &[("mesh.dev/enroll", "true"), ("mesh.dev/mtls", "strict")],
    );
    for pod in [&client, &local, &server, &ghost] {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
    }
    yaml.push_str("---\n");
    yaml.push_str(&service_yaml("server", "shop", VIP, 80, PORT, "server"));
    yaml.push_str("---\n");
    yaml.push_str(&namespace_yaml("plain", &[]));
    yaml.push_str("---\n");
    yaml.push_str(&pod_yaml(&outsider, "plain", "default", &[]));
    controller.apply("shop", &yaml)?;
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let mut agent = Agent::new(&node, &controller, agent_args)?;
        agent.start(&cluster)?;
        agents.push(agent);
    }
    Ok(World {
        cluster,
        _controller: controller,
        a,
        b,
        client,
        local,
        server,
        ghost,
        outsider,
        agents,
    })
}

impl World {
    /// An echo server in `pod` behind a firewall in its netns that admits connections to the
    /// app port only from the client pod's addresses.
    fn guarded_server(&self, pod: &Pod) -> Result<Proc> {
        let rules = format!(
            "table inet guard {{ chain input {{ type filter hook input priority 0; policy accept; \
             tcp dport {PORT} ip saddr != {} drop; tcp dport {PORT} ip6 saddr != {} drop; }}; }}",
            self.client.ipv4, self.client.ipv6
        );
        let mut nft = Command::new("nft");
        nft.arg(rules);
        self.cluster.exec_in_pod(pod, nft)?.success()?;
        echo_server(&self.cluster, pod, &[PORT])
    }

    fn path(&self, dst: SocketAddr) -> Result<()> {
        wait_mesh_path(&self.cluster, &self.agents, &self.client, dst)
    }
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Every peer the server accepted so far, in order.
fn peers(server: &Proc) -> Result<Vec<IpAddr>> {
    let n = server
        .lines()
        .iter()
        .filter(|(_, l)| l.contains(r#""event":"accept""#))
        .count();
    (1..=n).map(|i| accept_peer(server, i).map(|p| p.ip())).collect()
}

#[test]
fn across_nodes_the_server_its_firewall_and_the_wire_see_the_client_pod() -> Result<()> {
    let w = world("src-cross", &[])?;
    let server = w.guarded_server(&w.server)?;
    w.agents[1].wait_veth_ready(&w.cluster, &[&w.server])?;
    let targets = [
        sock(VIP.parse::<IpAddr>()?, 80),
        sock(w.server.ipv4, PORT),
        sock(w.server.ipv6, PORT),
    ];
    for dst in targets {
        w.path(dst)?;
    }
    let sniffer = Sniffer::start(&w.cluster, &w.a)?;
    for dst in targets {
        client(&w.cluster, &w.client, dst, 64 * 1024).with_context(|| format!("client → {dst}"))?;
    }
    let capture = sniffer.stop(&w.cluster)?;
    let seen = peers(&server)?;
    let want: BTreeSet<IpAddr> = [w.client.ipv4.into(), w.client.ipv6.into()].into();
    ensure!(
        seen.iter().all(|p| want.contains(p)) && seen.contains(&w.client.ipv6.into()),
        "the server saw the client pod's addresses only: {seen:?}"
    );
    ensure!(
        capture.hbone_packets > 0,
        "the exchanges crossed the link over HBONE"
    );
    let sources = capture.hbone_sources();
    ensure!(
        sources == want,
        "HBONE connections left node a from the client pod's addresses, v4 and v6: {sources:?}"
    );
    let marked = w.agents[0].metric(
        &w.cluster,
        r#"mesh_bpf_events_total{event="reply_uplink_marked"}"#,
    );
    let delivered = w.agents[1].metric(&w.cluster, r#"mesh_bpf_events_total{event="reply_pod_marked"}"#);
    ensure!(
        marked? > 0.0 && delivered? > 0.0,
        "replies reached the proxies' transparent sockets through the tc programs"
    );
    Ok(())
}

#[test]
fn on_one_node_the_server_and_its_firewall_see_the_client_pod() -> Result<()> {
    let w = world("src-local", &[])?;
    let server = w.guarded_server(&w.local)?;
    w.agents[0].wait_veth_ready(&w.cluster, &[&w.local])?;
    let targets = [sock(w.local.ipv4, PORT), sock(w.local.ipv6, PORT)];
    for dst in targets {
        w.path(dst)?;
        client(&w.cluster, &w.client, dst, 64 * 1024).with_context(|| format!("client → {dst}"))?;
    }
    let seen = peers(&server)?;
    ensure!(
        seen.contains(&w.client.ipv4.into())
            && seen.contains(&w.client.ipv6.into())
            && seen
                .iter()
                .all(|p| [IpAddr::from(w.client.ipv4), w.client.ipv6.into()].contains(p)),
        "the local server saw the client pod's addresses only: {seen:?}"
    );
    Ok(())
}

#[test]
fn strict_admits_the_proxy_from_the_client_address_and_refuses_plaintext_around_it() -> Result<()> {
    let w = world("src-strict", &[])?;
    let _server = echo_server(&w.cluster, &w.local, &[PORT])?;
    w.agents[0].wait_veth_ready(&w.cluster, &[&w.local])?;
    let dst = sock(w.local.ipv4, PORT);
    w.path(dst)?;
    // The outsider is on the same node and not in the mesh: its connect is not steered
    // (STRICT has no plaintext listener), so its SYN reaches the pod's veth and is dropped.
    let out = w.cluster.exec_in_pod(&w.outsider, client_cmd(dst, 16, 1_500)?)?;
    ensure!(
        !out.status.success(),
        "plaintext from outside the mesh into a STRICT pod was refused: {} / {}",
        out.stdout,
        out.stderr
    );
    client(&w.cluster, &w.client, dst, 1024).context("the mesh path still works")?;
    Ok(())
}

#[test]
fn with_preserve_source_off_the_node_address_shows_and_the_firewall_refuses() -> Result<()> {
    let w = world("src-off", &["--preserve-source=false"])?;
    let server = echo_server(&w.cluster, &w.server, &[PORT])?;
    let dst = sock(w.server.ipv4, PORT);
    w.path(dst)?;
    let peer = accept_peer(&server, 1)?.ip();
    ensure!(
        peer != IpAddr::from(w.client.ipv4),
        "without --preserve-source the server sees node b, not the client pod: {peer}"
    );
    let sniffer = Sniffer::start(&w.cluster, &w.a)?;
    client(&w.cluster, &w.client, dst, 1024)?;
    let sources = sniffer.stop(&w.cluster)?.hbone_sources();
    ensure!(
        sources == BTreeSet::from([IpAddr::from(w.a.ipv4)]),
        "HBONE left node a from its own address: {sources:?}"
    );
    Ok(())
}

#[test]
fn a_pod_whose_veth_is_not_found_is_reached_from_the_node_address() -> Result<()> {
    let w = world("src-ghost", &[])?;
    // The server runs in the pod's netns but not in its cgroup, so the agent cannot enter the
    // pod to find its veth: no reply program there. Its replies to the client's own address
    // would go to the client, so the proxy connects from the node's address instead.
    let mut cmd = testapp()?;
    cmd.args(["echo-server", "--listen", &format!("0.0.0.0:{PORT}")]);
    let server = w.cluster.spawn_in_net(&w.ghost.netns, cmd)?;
    server.wait_for_line(WAIT, |l| l.contains(r#""event":"listening""#))?;
    wait_until(WAIT, "node b to report the pod it cannot find", || {
        let n = w.agents[1]
            .metric(&w.cluster, "mesh_strict_unresolved_pods")
            .map_err(|e| format!("{e:#}"))?;
        (n >= 1.0).then_some(()).ok_or(format!("{n} unresolved"))
    })?;
    let dst = sock(w.ghost.ipv4, PORT);
    wait_until(WAIT, &format!("an exchange with {dst}"), || {
        client(&w.cluster, &w.client, dst, 1024).map_err(|e| format!("{e:#}"))
    })?;
    let peer = accept_peer(&server, 1)?.ip();
    ensure!(
        peer == IpAddr::from(w.b.bridge_ipv4),
        "delivered from node b's own address: {peer}"
    );
    Ok(())
}
