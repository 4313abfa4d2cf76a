//! Egress: an enrolled pod's connection to a destination the mesh does not serve is left alone
//! by the kernel and leaves from the pod's own address; Service VIPs and enrolled pods are still
//! captured. Real agents on two nodes, real kernel programs, real TCP.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{accept_peer, client, echo_server, wait_mesh_path};
use mesh_harness::controller::{namespace_yaml, pod_yaml, service_yaml, Controller};
use mesh_harness::{wait_until, Cluster, Pod, Proc};

const WAIT: Duration = Duration::from_secs(20);
/// Service `outside/plain`, dual stack, port 80 → 8080 of the pod outside the mesh.
const OUTSIDE_VIP4: &str = "10.96.0.40";
const OUTSIDE_VIP6: &str = "fd00:96::40";
/// Service `local/shop`, port 80 → 8080 of the enrolled pod on the client's node.
const LOCAL_VIP: &str = "10.96.0.41";

/// Nodes a and b with agents; `shop` (enrolled) has `client` and `local` on a and `remote` on
/// b; `plain` (not enrolled) has `outside` on b. Every server echoes on 8080.
struct World {
    cluster: Cluster,
    controller: Controller,
    client: Pod,
    local: Pod,
    remote: Pod,
    outside: Pod,
    agents: Vec<Agent>,
    outside_server: Proc,
    _servers: Vec<Proc>,
}

fn world(name: &str) -> Result<World> {
    let cluster = Cluster::new(name)?;
    cluster.add_node("a")?;
    cluster.add_node("b")?;
    let client = cluster.add_pod("a", "client")?;
    let local = cluster.add_pod("a", "local")?;
    let remote = cluster.add_pod("b", "remote")?;
    let outside = cluster.add_pod("b", "outside")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let mut agent = Agent::new(&node, &controller, &[])?;
        agent.start(&cluster)?;
        agents.push(agent);
    }
    let mut shop = namespace_yaml("shop", &[("mesh.dev/enroll", "true")]);
    for pod in [&client, &local, &remote] {
        shop.push_str("---\n");
        shop.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
    }
    shop.push_str("---\n");
    shop.push_str(&service_yaml("local", "shop", LOCAL_VIP, 80, 8080, "local"));
    controller.apply("shop", &shop)?;
    let w = World {
        outside_server: echo_server(&cluster, &outside, &[8080])?,
        _servers: vec![
            echo_server(&cluster, &local, &[8080])?,
            echo_server(&cluster, &remote, &[8080])?,
        ],
        cluster,
        controller,
        client,
        local,
        remote,
        outside,
        agents,
    };
    w.plain(true)?;
    Ok(w)
}

impl World {
    /// (Re)writes namespace `plain` with `outside`, and its Service when `with_service`.
    fn plain(&self, with_service: bool) -> Result<()> {
        let mut yaml = namespace_yaml("plain", &[]);
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(
            &self.outside,
            "plain",
            "default",
            &[("app", "outside")],
        ));
        if with_service {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: outside, namespace: plain}}\nspec:\n  \
                 clusterIP: {OUTSIDE_VIP4}\n  clusterIPs: [{OUTSIDE_VIP4}, \"{OUTSIDE_VIP6}\"]\n  \
                 ipFamilies: [IPv4, IPv6]\n  selector: {{app: outside}}\n  \
                 ports: [{{name: tcp, port: 80, targetPort: 8080}}]\n"
            ));
        }
        self.controller.apply("plain", &yaml)
    }

    /// Node a's agent, the client's.
    fn a(&self) -> &Agent {
        &self.agents[0]
    }

    /// The entries of node a's mesh destinations map, as its admin API (`meshctl node bpf`)
    /// shows them.
    fn destinations(&self) -> Result<u64> {
        let bpf = self.a().admin_get(&self.cluster, "/v1/bpf")?;
        let map = bpf["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == "mesh_dests")
            .with_context(|| format!("mesh_dests in {bpf}"))?;
        map["entries"]
            .as_u64()
            .with_context(|| format!("entries of {map}"))
    }

    fn wait_destinations(&self, want: u64) -> Result<()> {
        wait_until(
            WAIT,
            &format!("node a's mesh_dests to hold {want} entries"),
            || match self.destinations() {
                Ok(n) if n == want => Ok(()),
                Ok(n) => Err(format!("{n} entries")),
                Err(e) => Err(format!("{e:#}")),
            },
        )
    }

    /// Waits until both agents have meshed their pods and every mesh destination is in node
    /// a's map: from then on capture is what the final state says.
    fn settle(&self, destinations: u64) -> Result<()> {
        wait_mesh_path(
            &self.cluster,
            &self.agents,
            &self.client,
            SocketAddr::new(self.remote.ipv4.into(), 8080),
        )?;
        self.wait_destinations(destinations)?;
        // A new set captures everything until the agent has first written the map.
        wait_until(WAIT, "node a to limit capture to the mesh destinations", || {
            self.a()
                .logs()
                .iter()
                .any(|l| l["message"] == "outbound capture limited to the mesh destinations")
                .then_some(())
                .ok_or_else(|| "not logged yet".to_owned())
        })
    }

    fn event(&self, name: &str) -> Result<f64> {
        self.a()
            .metric_sum(&self.cluster, "mesh_bpf_events_total", &[("event", name)])
    }

    /// Every connection node a's proxy took on the outbound side, whatever its route.
    fn outbound(&self) -> Result<f64> {
        self.a()
            .metric_sum(&self.cluster, "mesh_outbound_connections_total", &[])
    }
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn vip(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("a valid VIP"), 80)
}

/// Service VIPs (3: two families of `outside`, one of `local`) and the addresses of the three
/// enrolled pods (two families each).
const ALL_DESTINATIONS: u64 = 3 + 3 * 2;

#[test]
fn egress_outside_the_mesh_leaves_the_pod_from_its_own_address() -> Result<()> {
    let w = world("egress-out")?;
    w.settle(ALL_DESTINATIONS)?;
    let outbound = w.outbound()?;
    let skipped = w.event("skip_not_mesh_destination")?;
    let captured = w.a().captured().len();

    let cases = [
        (at(w.outside.ipv4, 8080), IpAddr::from(w.client.ipv4)),
        (at(w.outside.ipv6, 8080), IpAddr::from(w.client.ipv6)),
    ];
    for (n, (dst, client_ip)) in cases.into_iter().enumerate() {
        let report = client(&w.cluster, &w.client, dst, 64 * 1024)?;
        ensure!(report.received == 64 * 1024, "{report:?}");
        // The server outside the mesh sees the pod itself, not node a (the proxy's passthrough
        // would dial from the node's address).
        let peer = accept_peer(&w.outside_server, n + 1)?;
        ensure!(
            peer.ip() == client_ip,
            "the server outside the mesh saw {peer} for the connection to {dst}, want the client pod {client_ip}"
        );
    }
    // The kernel left both alone, and said so; the proxy never saw them.
    let skipped_now = w.event("skip_not_mesh_destination")?;
    ensure!(
        skipped_now == skipped + 2.0,
        "skip_not_mesh_destination: {skipped} → {skipped_now}, want +2"
    );
    let outbound_now = w.outbound()?;
    ensure!(
        outbound_now == outbound,
        "the proxy took no outbound connection: {outbound} → {outbound_now}"
    );
    let after = w.a().captured();
    ensure!(
        after.len() == captured,
        "the proxy captured nothing new: {:?}",
        &after[captured..]
    );
    Ok(())
}

#[test]
fn service_vips_and_enrolled_pods_are_still_captured_and_the_map_follows_the_services() -> Result<()> {
    let w = world("egress-mesh")?;
    w.settle(ALL_DESTINATIONS)?;
    let passthrough = w.a().metric(
        &w.cluster,
        r#"mesh_outbound_connections_total{route="passthrough"}"#,
    )?;
    let (v4, v6) = (IpAddr::from(w.client.ipv4), IpAddr::from(w.client.ipv6));
    let cases = [
        (vip(LOCAL_VIP), v4),
        (at(w.local.ipv4, 8080), v4),
        (at(w.local.ipv6, 8080), v6),
        (at(w.remote.ipv4, 8080), v4),
        (at(w.remote.ipv6, 8080), v6),
        // A Service whose endpoint is outside the mesh: still the mesh's to route (the proxy
        // picks the endpoint and passes the connection through).
        (vip(OUTSIDE_VIP4), v4),
        (vip(OUTSIDE_VIP6), v6),
    ];
    for (dst, client_ip) in cases {
        let report = client(&w.cluster, &w.client, dst, 4096)?;
        ensure!(report.received == 4096, "{report:?}");
        let src = w.a().wait_captured(dst)?;
        ensure!(
            src.ip() == client_ip,
            "the proxy captured {dst} from {src}, want the client pod {client_ip}"
        );
    }
    let passthrough_now = w.a().metric(
        &w.cluster,
        r#"mesh_outbound_connections_total{route="passthrough"}"#,
    )?;
    ensure!(
        passthrough_now == passthrough + 2.0,
        "the outside Service's two connections were passed through: {passthrough} → {passthrough_now}"
    );

    // The Service goes: so do its VIPs from the map, and nothing is captured to them any more.
    w.plain(false)?;
    w.wait_destinations(ALL_DESTINATIONS - 2)?;
    let skipped = w.event("skip_not_mesh_destination")?;
    let captured = w.a().captured().len();
    ensure!(
        client(&w.cluster, &w.client, vip(OUTSIDE_VIP4), 64).is_err(),
        "nothing serves a VIP the mesh no longer knows (no kube-proxy here)"
    );
    let skipped_now = w.event("skip_not_mesh_destination")?;
    ensure!(
        skipped_now == skipped + 1.0,
        "skip_not_mesh_destination: {skipped} → {skipped_now}, want +1"
    );
    ensure!(
        w.a().captured().len() == captured,
        "the proxy captured nothing new"
    );
    Ok(())
}
