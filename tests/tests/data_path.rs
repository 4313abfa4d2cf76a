//! The secure data path, end to end: HBONE mTLS between real node proxies with the pods' own
//! identities, inbound capture in the kernel, authorization policy and STRICT mode.
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{client, client_cmd, echo_server, send_marker, testapp, wait_mesh_path};
use mesh_harness::controller::{namespace_yaml, pod_yaml, policy_yaml, service_yaml, Controller};
use mesh_harness::wire::Sniffer;
use mesh_harness::{wait_until, Cluster, Node, Pod, Proc};

const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";

/// Two nodes, a controller and agents; `shop` (enrolled, mTLS `mode`) has `client` on a,
/// `local` on a and `server` on b, and a Service `server` (VIP:80 → 8080) selecting `server`.
struct World {
    cluster: Cluster,
    controller: Controller,
    a: Node,
    client: Pod,
    local: Pod,
    server: Pod,
    outsider: Pod,
    agents: Vec<Agent>,
}

fn world(name: &str) -> Result<World> {
    let cluster = Cluster::new(name)?;
    let a = cluster.add_node("a")?;
    cluster.add_node("b")?;
    let client = cluster.add_pod("a", "client")?;
    let local = cluster.add_pod("a", "local")?;
    let server = cluster.add_pod("b", "server")?;
    let outsider = cluster.add_pod("a", "outsider")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let mut agent = Agent::new(&node, &controller, &[])?;
        agent.start(&cluster)?;
        agents.push(agent);
    }
    let w = World {
        cluster,
        controller,
        a,
        client,
        local,
        server,
        outsider,
        agents,
    };
    w.shop("permissive", "")?;
    w.controller.apply(
        "plain",
        &format!(
            "{}---\n{}",
            namespace_yaml("plain", &[]),
            pod_yaml(&w.outsider, "plain", "default", &[])
        ),
    )?;
    Ok(w)
}

impl World {
    /// (Re)writes namespace `shop` with mTLS `mode`, its pods, the Service and `extra` objects.
    fn shop(&self, mode: &str, extra: &str) -> Result<()> {
        let mut yaml = namespace_yaml("shop", &[("mesh.dev/enroll", "true"), ("mesh.dev/mtls", mode)]);
        for pod in [&self.client, &self.local, &self.server] {
            yaml.push_str("---\n");
            yaml.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
        }
        yaml.push_str("---\n");
        yaml.push_str(&service_yaml("server", "shop", VIP, 80, 8080, "server"));
        yaml.push_str(extra);
        self.controller.apply("shop", &yaml)
    }

    /// An echo server in `local` (same node as the client), once the mesh path to it works.
    fn local_echo(&self) -> Result<(Proc, SocketAddr)> {
        let server = echo_server(&self.cluster, &self.local, &[8080])?;
        let dst = SocketAddr::new(self.local.ipv4.into(), 8080);
        self.wait_path(dst)?;
        Ok((server, dst))
    }

    /// Waits until the client's connection to `dst` is served end to end (config, certificates
    /// and inbound capture are in place on both nodes).
    fn wait_path(&self, dst: SocketAddr) -> Result<()> {
        wait_mesh_path(&self.cluster, &self.agents, &self.client, dst)
    }
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().expect("a valid VIP"), 80)
}

#[test]
fn cross_node_traffic_through_a_service_is_mtls_on_the_wire_and_byte_exact() -> Result<()> {
    let w = world("dp-wire")?;
    let server = echo_server(&w.cluster, &w.server, &[8080])?;
    w.wait_path(vip())?;
    w.agents[1].wait_veth_ready(&w.cluster, &[&w.server])?;

    let sniffer = Sniffer::start(&w.cluster, &w.a)?;
    // 100 MB with half-close, byte for byte, through the Service VIP.
    let report = client(&w.cluster, &w.client, vip(), 100_000_000)?;
    ensure!(report.received == 100_000_000, "{report:?}");
    // The server sees the client pod's own address (--preserve-source), though the bytes
    // came over HBONE (below).
    let peers = accepted_from(&server);
    ensure!(
        !peers.is_empty() && peers.iter().all(|p| *p == std::net::IpAddr::from(w.client.ipv4)),
        "the server saw the client pod: {peers:?}"
    );
    let capture = sniffer.stop(&w.cluster)?;
    ensure!(
        capture.bytes.len() > 100_000_000 && capture.hbone_packets > 1000,
        "the 100 MB crossed the link over HBONE ({} bytes, {} HBONE packets captured)",
        capture.bytes.len(),
        capture.hbone_packets
    );

    let hbone = w.agents[0].metric(&w.cluster, r#"mesh_outbound_connections_total{route="hbone"}"#)?;
    ensure!(hbone >= 1.0, "node a counts its HBONE connections: {hbone}");

    // A printable marker sent through the mesh must not appear on the link.
    let marker = format!("MESH-PLAINTEXT-MARKER-{}", w.cluster.id());
    let sniffer = Sniffer::start(&w.cluster, &w.a)?;
    let echoed = send_marker(&w.cluster, &w.client, vip(), &marker)?;
    ensure!(
        echoed.contains(&marker),
        "the marker came back through the mesh: {echoed}"
    );
    let capture = sniffer.stop(&w.cluster)?;
    ensure!(
        capture.hbone_packets > 0,
        "the marker's exchange crossed the link over HBONE"
    );
    ensure!(
        !capture.contains(marker.as_bytes()),
        "the marker crossed the link in plaintext"
    );

    // The certificate the destination proxy presents for the server pod names its identity.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "openssl s_client -connect {}:15008 -alpn h2 </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName",
            w.server.ipv4
        ),
    ]);
    let out = w.cluster.exec_on_node(&w.a, cmd)?;
    ensure!(
        out.stdout
            .contains("URI:spiffe://cluster.local/ns/shop/sa/server"),
        "server certificate SAN: {} / {}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// The addresses the echo server saw connections from, in order.
fn accepted_from(server: &Proc) -> Vec<std::net::IpAddr> {
    server
        .lines()
        .iter()
        .filter_map(|(_, l)| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "accept")
        .filter_map(|v| v["peer"].as_str()?.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .collect()
}

fn policy(name: &str, action: &str, principal: &str) -> String {
    format!("---\n{}", policy_yaml(name, "shop", "server", action, principal))
}

/// The client's connection to `dst` fails, fast; returns the time it took.
fn refused(w: &World, dst: SocketAddr) -> Result<Duration> {
    let cmd = client_cmd(dst, 1024, 10000)?;
    let start = Instant::now();
    let out = w.cluster.exec_in_pod(&w.client, cmd)?;
    let took = start.elapsed();
    ensure!(
        !out.status.success(),
        "the connection to {dst} was refused: {}",
        out.stdout
    );
    ensure!(
        took < Duration::from_secs(2),
        "refused fast, took {took:?}: {}",
        out.stdout
    );
    Ok(took)
}

#[test]
fn authorization_policy_allows_and_denies_across_nodes() -> Result<()> {
    let w = world("dp-policy")?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    let direct = SocketAddr::new(w.server.ipv4.into(), 8080);
    w.wait_path(direct)?;

    w.shop(
        "permissive",
        &policy("no-client", "DENY", "cluster.local/ns/shop/sa/client"),
    )?;
    let took = wait_until(WAIT, "the DENY policy to apply", || {
        refused(&w, direct).map_err(|e| format!("{e:#}"))
    })?;
    println!("denied connection failed after {took:?}");
    let denials = w.agents[1].metric(
        &w.cluster,
        r#"mesh_policy_denials_total{policy="shop/no-client"}"#,
    )?;
    ensure!(denials >= 1.0, "node b counts the denials by policy: {denials}");

    // An ALLOW policy for someone else makes the server default-deny for the client.
    w.shop(
        "permissive",
        &policy("only-local", "ALLOW", "cluster.local/ns/shop/sa/local"),
    )?;
    wait_until(WAIT, "default deny", || {
        refused(&w, vip()).map_err(|e| format!("{e:#}"))
    })?;

    w.shop(
        "permissive",
        &policy("client-ok", "ALLOW", "cluster.local/ns/shop/sa/client"),
    )?;
    w.wait_path(vip())?;
    Ok(())
}

#[test]
fn strict_mode_drops_plaintext_that_bypasses_the_proxy() -> Result<()> {
    let w = world("dp-strict")?;
    let server = echo_server(&w.cluster, &w.local, &[8080])?;
    let dst = SocketAddr::new(w.local.ipv4.into(), 8080);
    // PERMISSIVE: once the pod is meshed, a pod outside the mesh reaches it through the proxy.
    w.wait_path(dst)?;
    let steered = r#"mesh_bpf_events_total{event="plain_redirected"}"#;
    let before = w.agents[0].metric(&w.cluster, steered)?;
    client(&w.cluster, &w.outsider, dst, 1024)?;
    let after = w.agents[0].metric(&w.cluster, steered)?;
    ensure!(
        after > before,
        "the outsider's plaintext was steered to the proxy ({before} → {after})"
    );

    w.shop("strict", "")?;
    wait_until(WAIT, "STRICT to drop plaintext", || {
        let mut cmd = testapp().map_err(|e| e.to_string())?;
        cmd.args([
            "client",
            "--connect",
            &dst.to_string(),
            "--bytes",
            "1024",
            "--timeout-ms",
            "1500",
        ]);
        let out = w
            .cluster
            .exec_in_pod(&w.outsider, cmd)
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Err("plaintext still gets through".into())
        } else {
            Ok(())
        }
    })?;
    // Dropped means nothing reached the pod: one more plaintext attempt adds no accept.
    let before = accepted_from(&server).len();
    ensure!(
        client(&w.cluster, &w.outsider, dst, 1024).is_err(),
        "plaintext is refused in STRICT"
    );
    ensure!(
        accepted_from(&server).len() == before,
        "the dropped connection delivered nothing to the pod"
    );
    // The mesh path still works in STRICT: the enrolled client goes through the proxy.
    let total = accepted_from(&server).len();
    w.wait_path(dst)?;
    ensure!(
        accepted_from(&server).len() > total,
        "the proxied connection reached the STRICT pod"
    );
    Ok(())
}

/// HTTP/1.1 (python's http.server) on 8081 and HTTP/2 cleartext (nghttpd) on 8082, serving
/// `dir`; returns once both answer from the pod itself.
fn http_servers(w: &World, pod: &Pod, dir: &std::path::Path) -> Result<(Proc, Proc)> {
    let mut h1 = Command::new("/usr/bin/python3");
    h1.args(["-c", HTTP11_SERVER, "8081"]).arg(dir);
    let h1 = w.cluster.spawn_in_pod(pod, h1)?;
    let mut h2 = Command::new("nghttpd");
    h2.args(["--no-tls", "-d"]).arg(dir).arg("8082");
    let h2 = w.cluster.spawn_in_pod(pod, h2)?;
    for (port, flag) in [(8081, "--http1.1"), (8082, "--http2-prior-knowledge")] {
        wait_until(WAIT, &format!("the HTTP server on {}:{port}", pod.name), || {
            let url = format!("http://127.0.0.1:{port}/hello.txt");
            let out = w
                .cluster
                .exec_in_pod(pod, curl(flag, &url))
                .map_err(|e| e.to_string())?;
            out.status.success().then_some(()).ok_or(out.stderr)
        })?;
    }
    Ok((h1, h2))
}

/// python's file server, speaking HTTP/1.1 (its default is 1.0).
const HTTP11_SERVER: &str = "import functools,http.server as h,sys\n\
h.SimpleHTTPRequestHandler.protocol_version='HTTP/1.1'\n\
handler=functools.partial(h.SimpleHTTPRequestHandler,directory=sys.argv[2])\n\
h.ThreadingHTTPServer(('0.0.0.0',int(sys.argv[1])),handler).serve_forever()\n";

fn curl(flag: &str, url: &str) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", flag, "-w", "\n%{http_version}", url]);
    cmd
}

#[test]
fn http1_h2c_and_tcp_flow_through_service_vips_cross_node_and_same_node() -> Result<()> {
    let w = world("dp-http")?;
    // A Service per (pod, protocol): server is on node b (cross-node), local on node a.
    let services = [
        ("server-h1", "10.96.0.20", 8081, "server"),
        ("server-h2", "10.96.0.21", 8082, "server"),
        ("local-h1", "10.96.0.22", 8081, "local"),
        ("local-h2", "10.96.0.23", 8082, "local"),
        ("local-tcp", "10.96.0.24", 8080, "local"),
    ];
    let extra: String = services
        .iter()
        .map(|(name, vip, target, app)| format!("---\n{}", service_yaml(name, "shop", vip, 80, *target, app)))
        .collect();
    w.shop("permissive", &extra)?;
    let dir = std::env::temp_dir().join(format!("{}-www", w.cluster.id()));
    std::fs::create_dir_all(&dir)?;
    let body = format!("hello from the mesh {}", w.cluster.id());
    std::fs::write(dir.join("hello.txt"), &body)?;
    let _remote = http_servers(&w, &w.server, &dir)?;
    let _local = http_servers(&w, &w.local, &dir)?;
    for (name, vip, target, _) in &services[..4] {
        let (flag, version) = if *target == 8081 {
            ("--http1.1", "1.1")
        } else {
            ("--http2-prior-knowledge", "2")
        };
        let url = format!("http://{vip}/hello.txt");
        wait_until(WAIT, &format!("HTTP/{version} via {name} ({url})"), || {
            let out = w
                .cluster
                .exec_in_pod(&w.client, curl(flag, &url))
                .map_err(|e| e.to_string())?;
            let want = format!("{body}\n{version}");
            (out.status.success() && out.stdout.trim_end() == want)
                .then_some(())
                .ok_or(format!("{:?} {}", out.stdout, out.stderr))
        })?;
    }
    std::fs::remove_dir_all(&dir)?;

    // 100 MB of raw TCP with half-close to a pod on the same node, through its VIP.
    let _echo = echo_server(&w.cluster, &w.local, &[8080])?;
    let local_tcp = SocketAddr::new("10.96.0.24".parse()?, 80);
    w.wait_path(local_tcp)?;
    let report = client(&w.cluster, &w.client, local_tcp, 100_000_000)?;
    ensure!(report.received == 100_000_000, "{report:?}");
    Ok(())
}

#[test]
fn a_thousand_concurrent_connections_through_one_pair_of_proxies_all_complete() -> Result<()> {
    let w = world("dp-fanout")?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    w.wait_path(vip())?;
    let mut cmd = testapp()?;
    cmd.args([
        "fan-out",
        "--connect",
        &vip().to_string(),
        "--connections",
        "1000",
        "--bytes",
        "65536",
    ]);
    let out = w.cluster.exec_in_pod(&w.client, cmd)?;
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    println!("1000 concurrent connections: {report}");
    ensure!(
        out.status.success() && report["ok"] == 1000,
        "all complete: {report} {}",
        out.stderr
    );
    Ok(())
}

#[test]
fn same_node_policy_is_enforced_in_the_proxy() -> Result<()> {
    let w = world("dp-local-policy")?;
    let (_server, dst) = w.local_echo()?;
    let deny = format!(
        "---\n{}",
        policy_yaml(
            "no-client",
            "shop",
            "local",
            "DENY",
            "cluster.local/ns/shop/sa/client"
        )
    );
    w.shop("permissive", &deny)?;
    wait_until(WAIT, "the same-node DENY", || {
        refused(&w, dst).map_err(|e| format!("{e:#}"))
    })?;
    w.shop("permissive", "")?;
    w.wait_path(dst)?;
    Ok(())
}

#[test]
fn foreign_certificates_and_garbage_on_the_hbone_port_are_refused_and_harmless() -> Result<()> {
    let w = world("dp-foreign")?;
    let (_server, dst) = w.local_echo()?;
    let b = w.cluster.node("b").expect("node b exists");

    // A client certificate for a mesh identity, from a CA the mesh does not trust.
    let dir = std::env::temp_dir().join(format!("{}-foreign", w.cluster.id()));
    std::fs::create_dir_all(&dir)?;
    let script = format!(
        "set -e; cd {dir}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
           -days 1 -subj /CN=foreign 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -out leaf.csr \
           -subj /CN=leaf 2>/dev/null; \
         printf 'subjectAltName=URI:spiffe://cluster.local/ns/shop/sa/client' > ext; \
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext \
           -out leaf.pem 2>/dev/null",
        dir = dir.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output()?;
    ensure!(
        out.status.success(),
        "making the foreign certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "printf 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' | openssl s_client -ign_eof -connect {ip}:15008 -alpn h2 \
             -cert {dir}/leaf.pem -key {dir}/leaf.key 2>&1",
            ip = w.local.ipv4,
            dir = dir.display()
        ),
    ]);
    let out = w.cluster.exec_on_node(&b, cmd)?;
    std::fs::remove_dir_all(&dir)?;
    ensure!(
        out.stdout.contains("unknown ca"),
        "the destination proxy refuses a client certificate from a foreign CA: {}",
        out.stdout
    );

    // Garbage on the captured HBONE port closes that connection only.
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        &format!(
            "head -c 65536 /dev/urandom > /dev/tcp/{}/15008 || true",
            w.local.ipv4
        ),
    ]);
    w.cluster.exec_on_node(&b, cmd)?;
    w.wait_path(dst)?;
    let remote = SocketAddr::new(w.server.ipv4.into(), 8080);
    let _remote_server = echo_server(&w.cluster, &w.server, &[8080])?;
    w.wait_path(remote)?;
    let agent = &w.agents[0];
    let unknown_ca = agent.metric(
        &w.cluster,
        r#"mesh_hbone_inbound_rejected_total{reason="unknown_ca"}"#,
    )?;
    ensure!(
        unknown_ca >= 1.0,
        "node a counts the foreign certificate: {unknown_ca}"
    );
    Ok(())
}
