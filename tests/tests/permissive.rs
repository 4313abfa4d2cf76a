//! PERMISSIVE mode keeps AuthorizationPolicy: plaintext from outside the mesh to an enrolled
//! pod (a pod that is not enrolled, on the same node or another, or another node itself) is
//! steered to the node proxy's inbound plaintext listener, where policy applies with no
//! authenticated principal, and the proxy counts and logs it.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::Value;

use mesh_harness::agent::{log_message, Agent};
use mesh_harness::app::{accept_peer, client, client_cmd, echo_server, wait_mesh_path};
use mesh_harness::controller::{namespace_yaml, pod_yaml, policy_yaml, Controller};
use mesh_harness::{wait_until, Cluster, Node, Pod, Proc};

const WAIT: Duration = Duration::from_secs(20);

/// Nodes a and b. `shop` (enrolled, PERMISSIVE) has `server` on a and `frontend` on b;
/// `plain` (not enrolled) has `outsider` on a and `remote` on b. `agents[0]` runs on a.
struct World {
    /// Node a's agent when it runs inside the pods' cgroup root (`agents[0]` is then not
    /// started, only used to reach its endpoints).
    inside: Option<Proc>,
    cluster: Cluster,
    controller: Controller,
    b: Node,
    server: Pod,
    frontend: Pod,
    outsider: Pod,
    remote: Pod,
    agents: Vec<Agent>,
}

/// With `inside`, node a's agent is started with its node's whole cgroup as the pods' root,
/// so that its own cgroup is inside it, as a DaemonSet pod's is inside the kubelet's root.
/// `shop` is enrolled at once with `enroll`, else left out of the mesh.
fn world(name: &str, inside: bool, enroll: bool) -> Result<World> {
    let cluster = Cluster::new(name)?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let server = cluster.add_pod("a", "server")?;
    let frontend = cluster.add_pod("b", "frontend")?;
    let outsider = cluster.add_pod("a", "outsider")?;
    let remote = cluster.add_pod("b", "remote")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agents = Vec::new();
    let mut inside_proc = None;
    for node in cluster.nodes() {
        let mut agent = Agent::new(&node, &controller, &["--access-log-sample-rate", "1"])?;
        if inside && node.name == a.name {
            let proc = cluster.spawn_on_node(&node, agent.command_with(&node.pin_dir, &node.cgroup)?)?;
            proc.wait_for_line(WAIT, |l| log_message(l).as_deref() == Some("ready"))?;
            inside_proc = Some(proc);
        } else {
            agent.start(&cluster)?;
        }
        agents.push(agent);
    }
    let mut plain = namespace_yaml("plain", &[]);
    for pod in [&outsider, &remote] {
        plain.push_str("---\n");
        plain.push_str(&pod_yaml(pod, "plain", "default", &[]));
    }
    controller.apply("plain", &plain)?;
    let w = World {
        inside: inside_proc,
        cluster,
        controller,
        b,
        server,
        frontend,
        outsider,
        remote,
        agents,
    };
    if enroll {
        w.shop("")?;
    } else {
        w.controller.apply("shop", &w.shop_yaml(&[], ""))?;
    }
    Ok(w)
}

impl World {
    /// (Re)writes namespace `shop` (enrolled, PERMISSIVE) with its pods and `extra` objects.
    fn shop(&self, extra: &str) -> Result<()> {
        let labels = [("mesh.dev/enroll", "true"), ("mesh.dev/mtls", "permissive")];
        self.controller.apply("shop", &self.shop_yaml(&labels, extra))
    }

    fn shop_yaml(&self, labels: &[(&str, &str)], extra: &str) -> String {
        let mut yaml = namespace_yaml("shop", labels);
        for pod in [&self.server, &self.frontend] {
            yaml.push_str("---\n");
            yaml.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
        }
        yaml.push_str(extra);
        yaml
    }

    /// The server's address on `port`, IPv4 or IPv6.
    fn server(&self, port: u16, v6: bool) -> SocketAddr {
        let ip: IpAddr = if v6 {
            self.server.ipv6.into()
        } else {
            self.server.ipv4.into()
        };
        SocketAddr::new(ip, port)
    }

    /// Every plaintext client outside the mesh: a pod on the server's node, a pod on another
    /// node, and that other node's own network namespace.
    fn plaintext_clients(&self) -> [Source<'_>; 3] {
        [
            Source::Pod(&self.outsider),
            Source::Pod(&self.remote),
            Source::Node(&self.b),
        ]
    }

    /// One 1 KiB echo exchange from `src` to `dst`: whether it completed.
    fn exchange(&self, src: &Source<'_>, dst: SocketAddr) -> Result<bool> {
        let cmd = client_cmd(dst, 1024, 5000)?;
        let out = match src {
            Source::Pod(pod) => self.cluster.exec_in_pod(pod, cmd)?,
            Source::Node(node) => self.cluster.exec_on_node(node, cmd)?,
        };
        Ok(out.status.success())
    }

    /// Waits until the exchange from `src` to `dst` succeeds (`want`) or fails.
    fn wait_exchange(&self, src: &Source<'_>, dst: SocketAddr, want: bool) -> Result<()> {
        let what = format!(
            "{} → {dst} to {}",
            src.name(),
            if want { "pass" } else { "be refused" }
        );
        wait_until(WAIT, &what, || match self.exchange(src, dst) {
            Ok(ok) if ok == want => Ok(()),
            Ok(ok) => Err(format!("last exchange ok={ok}")),
            Err(e) => Err(format!("{e:#}")),
        })
    }

    /// The access-log lines of node a's agent for plaintext connections.
    fn plaintext_access(&self) -> Vec<Value> {
        self.agents[0]
            .logs()
            .into_iter()
            .filter(|l| l["target"] == "access" && l["route"] == "plaintext")
            .collect()
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.agents[0].metric_sum(&self.cluster, name, labels)
    }
}

/// How many connections the echo server has accepted so far.
fn accepts(server: &Proc) -> usize {
    server
        .lines()
        .iter()
        .filter(|(_, l)| l.contains(r#""event":"accept""#))
        .count()
}

enum Source<'a> {
    Pod(&'a Pod),
    Node(&'a Node),
}

impl Source<'_> {
    fn name(&self) -> String {
        match self {
            Source::Pod(p) => format!("pod {}", p.name),
            Source::Node(n) => format!("node {}", n.name),
        }
    }
}

/// An ALLOW policy on `server` for the frontend's identity only.
fn only_frontend() -> String {
    format!(
        "---\n{}",
        policy_yaml(
            "only-frontend",
            "shop",
            "server",
            "ALLOW",
            "cluster.local/ns/shop/sa/frontend"
        )
    )
}

/// A policy on `server` whose one rule matches `ports` from anyone.
fn by_port(name: &str, action: &str, ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "---\napiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: {action}\n  \
         rules: [{{to: [{{operation: {{ports: [{}]}}}}]}}]\n",
        ports.join(", ")
    )
}

#[test]
fn plaintext_to_a_permissive_pod_goes_through_the_proxy_and_its_policy() -> Result<()> {
    let w = world("permissive-policy", false, true)?;
    let server = echo_server(&w.cluster, &w.server, &[8080, 9090])?;
    wait_mesh_path(&w.cluster, &w.agents, &w.frontend, w.server(8080, false))?;
    w.agents[0].wait_veth_ready(&w.cluster, &[&w.server])?;

    // Without a policy plaintext gets in, but through node a's proxy, which counts and logs
    // each connection (below) and delivers it from the caller's own address.
    let mut accepted = accepts(&server);
    for src in w.plaintext_clients() {
        for v6 in [false, true] {
            let dst = w.server(8080, v6);
            w.wait_exchange(&src, dst, true)?;
            accepted += 1;
            let peer = accept_peer(&server, accepted)?.ip();
            let outside: Vec<IpAddr> = vec![
                w.outsider.ipv4.into(),
                w.outsider.ipv6.into(),
                w.remote.ipv4.into(),
                w.remote.ipv6.into(),
                w.b.ipv4.into(),
                w.b.ipv6.into(),
            ];
            ensure!(
                outside.contains(&peer),
                "{} → {dst}: the pod sees the caller's own address, not the node's (it saw {peer})",
                src.name()
            );
        }
    }
    let opened = w.metric(
        "mesh_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", "unknown"),
            ("destination_workload", "server"),
            ("response_flags", "-"),
        ],
    )?;
    ensure!(opened >= 6.0, "node a counts the plaintext connections: {opened}");
    println!("plaintext connections counted by node a: {opened}");
    // The kernel's side: connects rewritten on node a (the outsider's), SYNs from the uplink
    // assigned to the listener (the remote pod's and node b's), none without a listener.
    let event = |e: &str| w.metric("mesh_bpf_events_total", &[("event", e)]);
    let (redirected, steered) = (event("plain_redirected")?, event("plain_steered")?);
    println!("node a's kernel: {redirected} connects rewritten, {steered} SYNs assigned");
    ensure!(redirected >= 2.0, "connects rewritten: {redirected}");
    ensure!(steered >= 4.0, "SYNs assigned: {steered}");
    ensure!(event("plain_no_listener")? == 0.0, "every SYN found the listener");
    wait_until(WAIT, "access-log lines for the plaintext connections", || {
        let lines = w.plaintext_access();
        let ok = lines
            .iter()
            .filter(|l| l["result"] == "-" && l["direction"] == "inbound")
            .count();
        (ok >= 6).then_some(()).ok_or(format!("{ok} so far: {lines:?}"))
    })?;

    // ALLOW only the frontend: no plaintext source has its principal.
    w.shop(&only_frontend())?;
    for src in w.plaintext_clients() {
        for v6 in [false, true] {
            w.wait_exchange(&src, w.server(8080, v6), false)?;
        }
    }
    wait_mesh_path(&w.cluster, &w.agents, &w.frontend, w.server(8080, false))?;
    let denials = w.metric("mesh_policy_denials_total", &[("policy", "default-deny")])?;
    ensure!(denials >= 6.0, "node a counts the plaintext denials: {denials}");
    let denied = w.metric(
        "mesh_tcp_connections_opened_total",
        &[
            ("destination_workload", "server"),
            ("source_principal", "unknown"),
            ("response_flags", "DENIED"),
        ],
    )?;
    ensure!(
        denied >= 6.0,
        "the denied plaintext connections are counted: {denied}"
    );
    let logged = w
        .plaintext_access()
        .iter()
        .filter(|l| l["result"] == "DENIED")
        .count();
    ensure!(
        logged >= 6,
        "the denied plaintext connections are logged: {logged}"
    );
    println!("plaintext denials: {denials} by default-deny, {denied} counted DENIED, {logged} logged");

    // Port rules do apply to plaintext: ALLOW 8080 and 9090 from anyone, but DENY 9090.
    let policies = format!(
        "{}{}{}",
        only_frontend(),
        by_port("plain-ports", "ALLOW", &[8080, 9090]),
        by_port("no-9090", "DENY", &[9090])
    );
    w.shop(&policies)?;
    for src in w.plaintext_clients() {
        w.wait_exchange(&src, w.server(8080, false), true)?;
        w.wait_exchange(&src, w.server(9090, false), false)?;
        w.wait_exchange(&src, w.server(9090, true), false)?;
    }
    let port_denials = w.metric("mesh_policy_denials_total", &[("policy", "shop/no-9090")])?;
    ensure!(port_denials >= 3.0, "the DENY by port counted: {port_denials}");
    println!("plaintext denials by the DENY on port 9090: {port_denials}");
    // DENY comes first for the mesh too.
    wait_until(WAIT, "the frontend refused on 9090", || {
        match client(&w.cluster, &w.frontend, w.server(9090, false), 1024) {
            Ok(r) => Err(format!("passed: {r:?}")),
            Err(_) => Ok(()),
        }
    })?;
    Ok(())
}

#[test]
fn the_proxy_inside_the_pods_cgroup_root_is_not_steered_back_to_itself() -> Result<()> {
    let w = world("permissive-inside", true, true)?;
    ensure!(w.inside.is_some(), "node a's agent runs inside the pods' root");
    let server = echo_server(&w.cluster, &w.server, &[8080])?;
    w.agents[0].wait_veth_ready(&w.cluster, &[&w.server])?;
    // The proxy's own connects to the PERMISSIVE pod (from HBONE, and from the plaintext
    // listener) come from a cgroup the connect programs see, and must reach the pod.
    wait_mesh_path(&w.cluster, &w.agents, &w.frontend, w.server(8080, false))?;
    let mut accepted = accepts(&server);
    for src in w.plaintext_clients() {
        let dst = w.server(8080, false);
        w.wait_exchange(&src, dst, true)?;
        accepted += 1;
        let peer = accept_peer(&server, accepted)?.ip();
        ensure!(
            [
                IpAddr::from(w.outsider.ipv4),
                w.remote.ipv4.into(),
                w.b.ipv4.into()
            ]
            .contains(&peer),
            "{} → {dst}: the pod sees the caller's own address (it saw {peer})",
            src.name()
        );
    }
    let opened = w.metric(
        "mesh_tcp_connections_opened_total",
        &[
            ("source_principal", "unknown"),
            ("destination_workload", "server"),
            ("response_flags", "-"),
        ],
    )?;
    ensure!(
        opened == 3.0,
        "each plaintext connection went through the plaintext listener once: {opened}"
    );
    w.shop(&only_frontend())?;
    for src in w.plaintext_clients() {
        w.wait_exchange(&src, w.server(8080, false), false)?;
    }
    wait_mesh_path(&w.cluster, &w.agents, &w.frontend, w.server(8080, false))?;
    Ok(())
}

#[test]
fn a_flow_that_reached_the_pod_before_it_was_meshed_keeps_flowing() -> Result<()> {
    let w = world("permissive-held", false, false)?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    // A connection from another node, straight to the pod while `shop` is outside the mesh,
    // that sends once now and once more after the pod is meshed.
    let go = std::env::temp_dir().join(format!("{}-held-go", w.cluster.id()));
    let _ = std::fs::remove_file(&go);
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", HELD_CLIENT, &w.server.ipv4.to_string(), "8080"])
        .arg(&go);
    let held = w.cluster.spawn_in_pod(&w.remote, cmd)?;
    held.wait_for_line(WAIT, |l| l == "one")?;

    w.shop("")?;
    wait_mesh_path(&w.cluster, &w.agents, &w.frontend, w.server(8080, false))?;
    // New plaintext from the same pod is now steered through the proxy (once node a has seen
    // the pod enrolled: a working mesh path does not prove that, the frontend's node may still
    // pass its connection through as plain TCP).
    wait_until(WAIT, "new plaintext from the remote pod to be steered", || {
        let ok = w
            .exchange(&Source::Pod(&w.remote), w.server(8080, false))
            .map_err(|e| format!("{e:#}"))?;
        let steered = w
            .metric("mesh_bpf_events_total", &[("event", "plain_steered")])
            .map_err(|e| format!("{e:#}"))?;
        (ok && steered >= 1.0)
            .then_some(())
            .ok_or(format!("exchange ok={ok}, plain_steered {steered}"))
    })?;

    std::fs::write(&go, b"")?;
    let result = held.wait_for_line(WAIT, |l| l == "two" || l.starts_with("error"));
    std::fs::remove_file(&go)?;
    ensure!(
        result.as_deref().is_ok_and(|l| l == "two"),
        "the connection made before the pod was meshed still works: {result:?}"
    );
    Ok(())
}

/// Connects to `argv[1]:argv[2]`, echoes `one`, waits for the file `argv[3]`, echoes `two`.
const HELD_CLIENT: &str = "import os,socket,sys,time\n\
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10)\n\
def echo(m):\n    s.sendall(m)\n    b=b''\n    while len(b)<len(m):\n        d=s.recv(64)\n        if not d: raise EOFError('closed')\n        b+=d\n    print(b.decode(),flush=True)\n\
echo(b'one')\n\
while not os.path.exists(sys.argv[3]): time.sleep(0.02)\n\
try:\n    echo(b'two')\nexcept Exception as e:\n    print('error',e,flush=True)\n";

#[test]
fn a_syn_hidden_behind_many_ipv6_extension_headers_does_not_reach_the_pod() -> Result<()> {
    let w = world("permissive-ext", false, true)?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    wait_mesh_path(&w.cluster, &w.agents, &w.frontend, w.server(8080, true))?;
    // What reaches the pod from node b, as the pod sees it.
    let mut dump = std::process::Command::new("tcpdump");
    dump.args(["-i", "eth0", "-n", "-l"])
        .arg(format!("ip6 and src host {}", w.b.ipv6));
    let dump = w.cluster.spawn_in_pod(&w.server, dump)?;
    dump.wait_for_line(WAIT, |l| l.contains("listening on"))?;

    // A SYN behind more IPv6 extension headers than the kernel programs follow, then a ping
    // on the same path as a barrier: once the ping is seen, the SYN would have been.
    let mut syn = std::process::Command::new("/usr/bin/python3");
    syn.args([
        "-c",
        EXT_HEADER_SYN,
        &w.b.ipv6.to_string(),
        &w.server.ipv6.to_string(),
        "8080",
    ]);
    w.cluster.exec_on_node(&w.b, syn)?.success()?;
    let mut ping = std::process::Command::new("ping");
    ping.args(["-6", "-c", "1", "-W", "5", &w.server.ipv6.to_string()]);
    w.cluster.exec_on_node(&w.b, ping)?.success()?;
    dump.wait_for_line(WAIT, |l| l.contains("ICMP6, echo request"))?;
    let before_ping: Vec<String> = dump
        .lines()
        .into_iter()
        .map(|(_, l)| l)
        .take_while(|l| !l.contains("ICMP6, echo request"))
        .filter(|l| l.contains(&w.b.ipv6.to_string()))
        .collect();
    ensure!(
        before_ping.is_empty(),
        "the hidden SYN reached the pod around the proxy: {before_ping:?}"
    );
    Ok(())
}

/// Sends from `argv[1]` to `argv[2]` port `argv[3]` a TCP SYN behind seven IPv6 destination
/// options headers, through a raw socket.
const EXT_HEADER_SYN: &str = "import socket,struct,sys\n\
src,dst,port=sys.argv[1],sys.argv[2],int(sys.argv[3])\n\
a=lambda x: socket.inet_pton(socket.AF_INET6,x)\n\
tcp=bytearray(struct.pack('!HHIIBBHHH',40000,port,1,0,5<<4,2,65535,0,0))\n\
b=a(src)+a(dst)+struct.pack('!I3xB',len(tcp),6)+bytes(tcp)\n\
t=sum(struct.unpack('!%dH'%(len(b)//2),b))\n\
while t>>16: t=(t&0xffff)+(t>>16)\n\
tcp[16:18]=struct.pack('!H',~t&0xffff)\n\
ext=b''.join(bytes([60 if i<6 else 6,0,1,4,0,0,0,0]) for i in range(7))\n\
body=ext+bytes(tcp)\n\
pkt=struct.pack('!IHBB',6<<28,len(body),60,64)+a(src)+a(dst)+body\n\
s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW)\n\
s.sendto(pkt,(dst,0))\n";
