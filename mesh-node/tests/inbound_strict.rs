//! Inbound capture and STRICT mode against the real kernel, on the netns harness: the tc
//! programs (TCX links), the capture routing (rtnetlink), the transparent HBONE listener and the
//! proxy's marked upstream connect, driven through mesh-node's API exactly as the agent will.
//!
//! The "agent" is this test process: every call that names interfaces, and every socket that
//! stands for the proxy or for an app, is made on a short-lived thread that `setns`es into the
//! node's or pod's network namespace (a socket stays in the namespace it was created in; the
//! TCX links are pinned, so they outlive the thread). No test binary or app binary is needed.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN), kernel BTF, cgroup v2, bpffs, iproute2.
//! Each test builds its own cluster (unique names), so they run in parallel; everything is
//! removed on drop, also when a test fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use mesh_harness::{frames, wait_until, Cluster, Node, Pod};
use mesh_node::{
    ebpf::{self, Datapath, DatapathConfig, Keep, Marks, Mode, TcKind},
    netlink::{self, CaptureConfig, CaptureRouting},
    pod_veth,
    proxy::{listener::bind_transparent, upstream::connect_marked},
};
use socket2::{Domain, Protocol, Socket, Type};

const HBONE: u16 = 15008;
const APP: u16 = 8080;
/// How long a connection that must fail (its SYN dropped) is given.
const REFUSED_WITHIN: Duration = Duration::from_millis(1000);
const OK_WITHIN: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Namespaces and sockets.

/// Runs `f` on a fresh thread inside network namespace `netns` and returns its result (a panic
/// in `f` is re-raised here).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let ns = File::open(Path::new("/run/netns").join(netns)).unwrap_or_else(|e| panic!("netns {netns}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall; only this short-lived thread changes namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns into {netns}: {}", io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A long-lived process for a pod's or node's cgroup (a pod's sandbox, as far as the lookup cares).
fn sleeper() -> Command {
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    cmd
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Waits for a connection on `listener` (non-blocking) until `timeout`, with poll(2).
fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok(c) => return Some(c),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 50) as libc::c_int) };
    }
}

/// Echoes a connection's bytes back until the peer's FIN, then half-closes.
fn echo(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(OK_WITHIN));
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// Sends a payload on `conn`, half-closes, and checks the echo.
fn exchange_on(mut conn: TcpStream) -> io::Result<usize> {
    conn.set_read_timeout(Some(OK_WITHIN))?;
    conn.set_write_timeout(Some(OK_WITHIN))?;
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    conn.write_all(&payload)?;
    conn.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    conn.read_to_end(&mut back)?;
    if back != payload {
        return Err(io::Error::other(format!(
            "echo differs: {} of {} bytes",
            back.len(),
            payload.len()
        )));
    }
    Ok(back.len())
}

/// A plain TCP connection from network namespace `netns` to `dst` (optionally with `SO_MARK`),
/// with an echo exchange. Returns the connection's local address.
fn exchange(
    netns: &str,
    dst: SocketAddr,
    mark: Option<u32>,
    connect_within: Duration,
) -> io::Result<SocketAddr> {
    let conn = in_netns(netns, || -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        socket.connect_timeout(&dst.into(), connect_within)?;
        Ok(socket.into())
    })?;
    let local = conn.local_addr()?;
    exchange_on(conn)?;
    Ok(local)
}

/// Like the proxy: `connect_marked` from the node's netns, then an echo exchange.
fn proxy_exchange(node: &Node, dst: SocketAddr, mark: u32) -> io::Result<SocketAddr> {
    let conn = in_netns(&node.netns, || {
        tokio_rt().block_on(async {
            match tokio::time::timeout(OK_WITHIN, connect_marked(dst, None, mark, Default::default())).await {
                Ok(r) => r.and_then(|s| s.into_std()),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connect_marked timed out",
                )),
            }
        })
    })?;
    conn.set_nonblocking(false)?;
    let local = conn.local_addr()?;
    exchange_on(conn)?;
    Ok(local)
}

/// An echo server on v4 and v6 wildcard addresses of `port` in a pod's netns, recording every
/// accepted connection's (local, peer) address.
struct EchoServer {
    accepts: Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    fn start(pod: &Pod, ports: &[u16]) -> EchoServer {
        let listeners: Vec<TcpListener> = in_netns(&pod.netns, || {
            ports
                .iter()
                .flat_map(|p| {
                    [
                        SocketAddr::from(([0u8; 4], *p)),
                        SocketAddr::from(([0u16; 8], *p)),
                    ]
                })
                .map(|addr| {
                    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
                    if addr.is_ipv6() {
                        socket.set_only_v6(true).unwrap();
                    }
                    socket.set_reuse_address(true).unwrap();
                    socket
                        .bind(&addr.into())
                        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                    socket.listen(128).unwrap();
                    socket.set_nonblocking(true).unwrap();
                    socket.into()
                })
                .collect()
        });
        let accepts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = listeners
            .into_iter()
            .map(|l| {
                let (accepts, stop) = (accepts.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some((conn, peer)) = accept_within(&l, Duration::from_millis(50)) {
                            accepts.lock().unwrap().push((conn.local_addr().unwrap(), peer));
                            std::thread::spawn(move || echo(conn));
                        }
                    }
                })
            })
            .collect();
        EchoServer {
            accepts,
            stop,
            threads,
        }
    }

    fn accepts(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.accepts.lock().unwrap().clone()
    }

    fn accepted_on(&self, port: u16) -> Vec<(SocketAddr, SocketAddr)> {
        self.accepts()
            .into_iter()
            .filter(|(l, _)| l.port() == port)
            .collect()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's side.

/// The datapath of one node, started on the node's cgroups and pin dir. Dropped, it uninstalls
/// (tc links, cgroup links, pins) and removes the capture routing, also when a test fails.
struct Agent {
    node: Node,
    dp: Option<Datapath>,
}

impl Agent {
    fn config(node: &Node) -> DatapathConfig {
        DatapathConfig {
            pin_dir: node.pin_dir.clone(),
            pods_cgroup: node.pods_cgroup.clone(),
            proxy_cgroup: node.agent_cgroup.clone(),
            proxy_ipv4: Some(node.ipv4),
            proxy_ipv6: Some(node.ipv6),
            outbound_port: 15001,
            exclude_ports: vec![],
            exclude_cidrs: vec![],
            inbound_plain_port: 15006,
        }
    }

    fn start(node: &Node) -> Agent {
        let dp = in_netns(&node.netns, || Datapath::start(&Agent::config(node))).expect("Datapath::start");
        let mut agent = Agent {
            node: node.clone(),
            dp: Some(dp),
        };
        agent.dp().set_marks(Marks::default()).expect("set_marks");
        agent
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath")
    }

    /// The agent's routing: `CaptureConfig::default()` resolved on the node's IPs (so the uplink
    /// is found as the interface holding them).
    fn routing(&self) -> CaptureRouting {
        let ips = [IpAddr::from(self.node.ipv4), IpAddr::from(self.node.ipv6)];
        let routing = in_netns(&self.node.netns, || CaptureConfig::default().resolve(&ips)).expect("resolve");
        assert_eq!(routing.uplink, self.node.uplink, "uplink found by the node IP");
        routing
    }

    fn ensure_routing(&self) -> netlink::RoutingDiff {
        let routing = self.routing();
        in_netns(&self.node.netns, || netlink::ensure_capture_routing(&routing))
            .expect("ensure_capture_routing")
    }

    fn set_inbound(&mut self, uplink: &str, pods: &[&Pod]) -> ebpf::InboundDiff {
        // HBONE capture only: plaintext steering (PERMISSIVE) is tested end to end.
        let ips: BTreeMap<IpAddr, Mode> = pods
            .iter()
            .flat_map(|p| [(p.ipv4.into(), Mode::Strict), (p.ipv6.into(), Mode::Strict)])
            .collect();
        let netns = self.node.netns.clone();
        let dp = self.dp();
        in_netns(&netns, || dp.set_inbound(uplink, &ips)).expect("set_inbound")
    }

    /// STRICT on exactly the veths of `strict`.
    fn set_strict(&mut self, strict: &[&Pod]) -> ebpf::StrictDiff {
        self.set_strict_keeping(strict, &Keep::Only(BTreeSet::new()))
    }

    fn set_strict_keeping(&mut self, strict: &[&Pod], keep: &Keep) -> ebpf::StrictDiff {
        let netns = self.node.netns.clone();
        let dp = self.dp();
        in_netns(&netns, || {
            let veths: BTreeSet<u32> = strict.iter().map(|p| ifindex(&p.host_veth)).collect();
            dp.set_strict(&veths, keep)
        })
        .expect("set_strict")
    }

    fn counter(&self, name: &str) -> u64 {
        let dp = self.dp.as_ref().expect("datapath");
        dp.counters()
            .expect("counters")
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// Transparent HBONE listeners (0.0.0.0:15008 and [::]:15008) in the node's netns, as the
    /// proxy binds them; returned as std listeners (non-blocking).
    fn hbone_listeners(&self) -> (TcpListener, TcpListener) {
        in_netns(&self.node.netns, || {
            let rt = tokio_rt();
            let bind = |addr: &str| {
                rt.block_on(async { bind_transparent(addr.parse().unwrap()).and_then(|l| l.into_std()) })
                    .unwrap_or_else(|e| panic!("bind_transparent {addr}: {e}"))
            };
            (bind("0.0.0.0:15008"), bind("[::]:15008"))
        })
    }

    fn uninstall(&mut self) {
        self.dp = None;
        let node = self.node.clone();
        in_netns(&node.netns, || {
            ebpf::uninstall(&node.pin_dir).expect("uninstall");
            netlink::remove_capture_routing().expect("remove_capture_routing");
        });
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.dp = None;
        let node = self.node.clone();
        if Path::new("/run/netns").join(&node.netns).exists() {
            in_netns(&node.netns, || {
                if let Err(e) = ebpf::uninstall(&node.pin_dir) {
                    eprintln!("cleanup: uninstall {}: {e}", node.pin_dir.display());
                }
                if let Err(e) = netlink::remove_capture_routing() {
                    eprintln!("cleanup: capture routing in {}: {e}", node.netns);
                }
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evidence from the kernel, through tools and queries that do not go through our pins.

/// `ip <args>` in the node's netns, the lines of its output.
fn ip(cluster: &Cluster, node: &Node, args: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = cluster
        .exec_on_node(node, cmd)
        .and_then(|o| o.success())
        .expect("ip");
    out.stdout
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The capture rules of one family (`-4`/`-6`), as `ip rule` prints them.
fn capture_rules(cluster: &Cluster, node: &Node, family: &str) -> Vec<String> {
    ip(cluster, node, &[family, "rule", "show"])
        .into_iter()
        .filter(|l| l.contains(&format!("lookup {}", netlink::DEFAULT_CAPTURE_TABLE)))
        .collect()
}

fn capture_routes(cluster: &Cluster, node: &Node, family: &str) -> Vec<String> {
    let table = netlink::DEFAULT_CAPTURE_TABLE.to_string();
    ip(cluster, node, &[family, "route", "show", "table", &table])
}

/// The names of the programs on a TCX hook of `ifname` in the node's netns (BPF_PROG_QUERY).
fn tcx_progs(node: &Node, ifname: &str, attach: TcAttachType) -> Vec<String> {
    in_netns(&node.netns, || {
        let (_revision, progs) =
            SchedClassifier::query_tcx(ifname, attach).unwrap_or_else(|e| panic!("query_tcx {ifname}: {e}"));
        progs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_string())
            .collect()
    })
}

/// Our TCX links as `bpftool link show` lists them: (link id, prog id) of every `tcx` link
/// running one of `prog_ids`.
fn bpftool_tcx_links(cluster: &Cluster, node: &Node, prog_ids: &BTreeSet<u32>) -> BTreeSet<(u64, u64)> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "link", "show"]);
    let out = cluster
        .exec_on_node(node, cmd)
        .and_then(|o| o.success())
        .expect("bpftool link show (apt-get install bpftool)");
    let json: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("bpftool JSON");
    json.as_array()
        .into_iter()
        .flatten()
        .filter(|l| {
            l["prog_id"]
                .as_u64()
                .is_some_and(|p| prog_ids.contains(&(p as u32)))
        })
        .map(|l| (l["id"].as_u64().unwrap(), l["prog_id"].as_u64().unwrap()))
        .collect()
}

fn our_prog_ids(dp: &Datapath) -> BTreeSet<u32> {
    dp.tc_links().unwrap().iter().filter_map(|l| l.prog_id).collect()
}

/// The index of interface `name` in the calling thread's network namespace.
fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index
}

/// The names of interfaces, as a diff reports them.
fn names(ifaces: &[ebpf::Iface]) -> Vec<String> {
    ifaces
        .iter()
        .map(|i| i.name.clone().unwrap_or_default())
        .collect()
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

// ---------------------------------------------------------------------------------------------

/// (1) A client in a pod on node b dials a pod on node a at IP:15008: the connection lands on
/// the transparent listener in node a's netns (not in the pod), whose accepted socket's local
/// address is the pod's IP:15008. IPv4 and IPv6. The pod's other ports are not captured.
#[test]
fn inbound_hbone_is_captured_by_the_transparent_listener() {
    let cluster = Cluster::new("inbound_capture").unwrap();
    let (na, _nb) = (cluster.add_node("a").unwrap(), cluster.add_node("b").unwrap());
    let (a1, b1) = (
        cluster.add_pod("a", "a1").unwrap(),
        cluster.add_pod("b", "b1").unwrap(),
    );
    let pod_server = EchoServer::start(&a1, &[HBONE, APP]);

    let mut agent = Agent::start(&na);
    let routing = agent.ensure_routing();
    assert_eq!(
        routing.added.len(),
        6,
        "two rules (capture, reply) and one route per family: {routing:?}"
    );
    let inbound = agent.set_inbound(&na.uplink, &[&a1]);
    assert!(inbound.attached);
    assert_eq!(
        inbound.ips_added,
        vec![IpAddr::from(a1.ipv4), IpAddr::from(a1.ipv6)]
    );
    let (l4, l6) = agent.hbone_listeners();

    for (listener, dst, client_ip) in [
        (&l4, sock(a1.ipv4, HBONE), IpAddr::from(b1.ipv4)),
        (&l6, sock(a1.ipv6, HBONE), IpAddr::from(b1.ipv6)),
    ] {
        let marked_before = agent.counter("inbound_marked");
        let (client, proxied) = std::thread::scope(|s| {
            let proxy = s.spawn(|| {
                let (conn, peer) = accept_within(listener, OK_WITHIN)?;
                let local = conn.local_addr().unwrap();
                echo(conn);
                Some((local, peer))
            });
            let client = exchange(&b1.netns, dst, None, OK_WITHIN);
            (client, proxy.join().unwrap())
        });
        let client_local = client.unwrap_or_else(|e| panic!("{dst}: client in b1: {e}"));
        let (local, peer) = proxied.unwrap_or_else(|| panic!("{dst}: nothing reached the proxy listener"));
        assert_eq!(local, dst, "the accepted socket's local address names the pod");
        assert_eq!(peer, client_local, "the proxy sees the client as it is");
        assert_eq!(peer.ip(), client_ip);
        assert!(
            agent.counter("inbound_marked") > marked_before,
            "{dst}: the uplink program marked the flow"
        );
    }
    assert_eq!(
        pod_server.accepted_on(HBONE),
        vec![],
        "the pod never saw its HBONE port"
    );

    // The pod's other ports are not captured: the pod itself answers, IPv4 and IPv6.
    for dst in [sock(a1.ipv4, APP), sock(a1.ipv6, APP)] {
        let local = exchange(&b1.netns, dst, None, OK_WITHIN).unwrap_or_else(|e| panic!("{dst}: {e}"));
        let seen = wait_until(OK_WITHIN, "the pod's accept", || {
            pod_server
                .accepted_on(APP)
                .into_iter()
                .find(|(_, peer)| *peer == local)
                .ok_or_else(|| format!("{:?}", pod_server.accepts()))
        })
        .unwrap();
        assert_eq!(seen.0, dst);
    }
    // Nothing else queued on the proxy listeners.
    assert!(accept_within(&l4, Duration::ZERO).is_none());
    assert!(accept_within(&l6, Duration::ZERO).is_none());
}

/// (2) STRICT: a plain SYN from another pod (remote and same-node, IPv4 and IPv6) into a STRICT
/// pod is dropped (the connect times out, the pod sees nothing, the drop counter counts), while
/// the proxy's marked connect from the node netns gets through; a STRICT pod's own outgoing
/// connections work; a PERMISSIVE pod takes plain connections; switching back to PERMISSIVE
/// lets plain connections in again.
#[test]
fn strict_drops_plain_syns_and_admits_the_proxy() {
    let cluster = Cluster::new("strict").unwrap();
    let (na, _nb) = (cluster.add_node("a").unwrap(), cluster.add_node("b").unwrap());
    let a1 = cluster.add_pod("a", "a1").unwrap();
    let a2 = cluster.add_pod("a", "a2").unwrap();
    let b1 = cluster.add_pod("b", "b1").unwrap();
    let (s1, s2, sb) = (
        EchoServer::start(&a1, &[APP]),
        EchoServer::start(&a2, &[APP]),
        EchoServer::start(&b1, &[APP]),
    );

    let mut agent = Agent::start(&na);
    let diff = agent.set_strict(&[&a1]);
    assert_eq!(names(&diff.attached), vec![a1.host_veth.clone()]);
    assert!(diff.unresolved.is_empty() && diff.detached.is_empty(), "{diff:?}");
    assert_eq!(
        tcx_progs(&na, &a1.host_veth, TcAttachType::Egress),
        vec!["mesh_tc_strict"]
    );
    assert_eq!(
        tcx_progs(&na, &a2.host_veth, TcAttachType::Egress),
        Vec::<String>::new()
    );

    // Plain SYNs into the STRICT pod: from a remote pod (IPv4), a same-node pod (IPv6), and the
    // node itself without the mark.
    for (from, dst) in [
        (&b1.netns, sock(a1.ipv4, APP)),
        (&a2.netns, sock(a1.ipv6, APP)),
        (&na.netns, sock(a1.ipv4, APP)),
    ] {
        let dropped_before = agent.counter("strict_dropped");
        let err =
            exchange(from, dst, None, REFUSED_WITHIN).expect_err("a plain connection into a STRICT pod");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{from} → {dst}: {err}");
        assert!(
            agent.counter("strict_dropped") > dropped_before,
            "{from} → {dst}: the drop was counted"
        );
    }
    assert_eq!(s1.accepts(), vec![], "nothing reached the STRICT pod");

    // The proxy (node netns, SO_MARK = proxy mark): admitted, IPv4 and IPv6.
    let proxy_mark = Marks::default().proxy;
    for dst in [sock(a1.ipv4, APP), sock(a1.ipv6, APP)] {
        let allowed_before = agent.counter("strict_allowed_proxy");
        let local = proxy_exchange(&na, dst, proxy_mark).unwrap_or_else(|e| panic!("proxy → {dst}: {e}"));
        assert!(agent.counter("strict_allowed_proxy") > allowed_before);
        wait_until(OK_WITHIN, "the STRICT pod's accept of the proxy", || {
            s1.accepts()
                .into_iter()
                .find(|(l, peer)| *l == dst && *peer == local)
                .ok_or_else(|| format!("{:?}", s1.accepts()))
        })
        .unwrap();
    }
    // The STRICT pod's veth, found from inside the pod through a process of its cgroup, IPv4
    // and IPv6; a pod without a process cannot be looked into; a process in the node's own
    // namespace has no veth of its own.
    let _sandbox = cluster
        .spawn_in_pod(&a1, sleeper())
        .expect("a process in the pod's cgroup");
    let host_veth = in_netns(&na.netns, || ifindex(&a1.host_veth));
    let lookups = BTreeMap::from([
        (
            "v4",
            pod_veth::Pod {
                cgroup: a1.cgroup.clone(),
                ip: a1.ipv4.into(),
            },
        ),
        (
            "v6",
            pod_veth::Pod {
                cgroup: a1.cgroup.clone(),
                ip: a1.ipv6.into(),
            },
        ),
        (
            "empty",
            pod_veth::Pod {
                cgroup: a2.cgroup.clone(),
                ip: a2.ipv4.into(),
            },
        ),
        (
            "node",
            pod_veth::Pod {
                cgroup: na.agent_cgroup.clone(),
                ip: na.ipv4.into(),
            },
        ),
    ]);
    let _on_node = cluster
        .spawn_on_node(&na, sleeper())
        .expect("a process on the node");
    let found = in_netns(&na.netns, || pod_veth::host_veths(&lookups));
    assert_eq!(found["v4"].as_ref().ok(), Some(&host_veth), "{found:?}");
    assert_eq!(found["v6"].as_ref().ok(), Some(&host_veth), "{found:?}");
    assert!(
        matches!(found["empty"], Err(pod_veth::VethError::NoProcess(_))),
        "{found:?}"
    );
    assert!(
        matches!(found["node"], Err(pod_veth::VethError::NodeNamespace)),
        "{found:?}"
    );

    // Another mark bit is not the proxy's.
    let err = exchange(
        &na.netns,
        sock(a1.ipv4, APP),
        Some(Marks::default().capture),
        REFUSED_WITHIN,
    )
    .expect_err("a connection with the capture mark only");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);

    // The STRICT pod's own outgoing connections (their SYN-ACKs pass the program).
    exchange(&a1.netns, sock(b1.ipv4, APP), None, OK_WITHIN).expect("STRICT pod → remote pod");
    exchange(&a1.netns, sock(a2.ipv6, APP), None, OK_WITHIN).expect("STRICT pod → same-node pod");
    assert_eq!(sb.accepts().len(), 1);

    // PERMISSIVE: plain connections work.
    exchange(&b1.netns, sock(a2.ipv4, APP), None, OK_WITHIN).expect("remote pod → PERMISSIVE pod");
    exchange(&b1.netns, sock(a2.ipv6, APP), None, OK_WITHIN).expect("remote pod → PERMISSIVE pod (IPv6)");
    assert_eq!(s2.accepts().len(), 3);

    // A STRICT pod not found keeps its link: by its last interface, or all links when that is
    // unknown.
    for keep in [Keep::Only(BTreeSet::from([host_veth])), Keep::All] {
        let diff = agent.set_strict_keeping(&[], &keep);
        assert_eq!(names(&diff.kept), vec![a1.host_veth.clone()], "{keep:?}");
        assert!(diff.detached.is_empty(), "{keep:?}: {diff:?}");
    }
    let err = exchange(&b1.netns, sock(a1.ipv4, APP), None, REFUSED_WITHIN).expect_err("still STRICT");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);

    // Back to PERMISSIVE: the link goes, plain connections get in.
    let diff = agent.set_strict(&[]);
    assert!(diff.attached.is_empty());
    assert_eq!(names(&diff.detached), vec![a1.host_veth.clone()]);
    assert_eq!(
        tcx_progs(&na, &a1.host_veth, TcAttachType::Egress),
        Vec::<String>::new()
    );
    exchange(&b1.netns, sock(a1.ipv4, APP), None, OK_WITHIN).expect("remote pod → no longer STRICT pod");
}

/// (3)(4)(5) Applying twice creates one rule, route and link each; a restarted agent re-uses the
/// pinned links (no second attach); uninstall removes rules, routes and links.
#[test]
fn idempotent_restart_reuses_links_uninstall_removes_everything() {
    let cluster = Cluster::new("idempotent").unwrap();
    let na = cluster.add_node("a").unwrap();
    let a1 = cluster.add_pod("a", "a1").unwrap();
    let a2 = cluster.add_pod("a", "a2").unwrap();
    let s1 = EchoServer::start(&a1, &[APP]);

    let mut agent = Agent::start(&na);
    let modes = [&a1];
    for round in 0..2 {
        let routing = agent.ensure_routing();
        let inbound = agent.set_inbound(&na.uplink, &[&a1, &a2]);
        let strict = agent.set_strict(&modes);
        if round == 1 {
            assert!(routing.is_empty(), "second apply changed routing: {routing:?}");
            assert_eq!(inbound, ebpf::InboundDiff::default(), "second set_inbound");
            assert!(
                strict.attached.is_empty() && strict.detached.is_empty(),
                "{strict:?}"
            );
        }
    }
    let expect_applied = |what: &str| {
        let rules4 = capture_rules(&cluster, &na, "-4");
        let rules6 = capture_rules(&cluster, &na, "-6");
        assert_eq!(rules4.len(), 2, "{what}: IPv4 rules {rules4:?}");
        assert_eq!(rules6.len(), 2, "{what}: IPv6 rules {rules6:?}");
        for rule in rules4.iter().chain(&rules6) {
            assert!(rule.starts_with("80:"), "{what}: priority: {rule}");
            // Inbound capture from the uplink only; pods' replies to the proxy's transparent
            // sockets from wherever they come in.
            let capture = rule.contains("iif eth0") && rule.contains("fwmark 0x1000/0x1000");
            let reply = !rule.contains("iif") && rule.contains("fwmark 0x40/0x40");
            assert!(capture || reply, "{what}: {rule}");
        }
        let routes4 = capture_routes(&cluster, &na, "-4");
        let routes6 = capture_routes(&cluster, &na, "-6");
        assert_eq!(routes4.len(), 1, "{what}: {routes4:?}");
        assert_eq!(routes6.len(), 1, "{what}: {routes6:?}");
        assert!(
            routes4[0].starts_with("local default dev lo"),
            "{what}: {routes4:?}"
        );
        assert!(
            routes6[0].starts_with("local default dev lo"),
            "{what}: {routes6:?}"
        );
        assert_eq!(
            tcx_progs(&na, "eth0", TcAttachType::Ingress),
            vec!["mesh_tc_inbound"],
            "{what}"
        );
        assert_eq!(
            tcx_progs(&na, &a1.host_veth, TcAttachType::Egress),
            vec!["mesh_tc_strict"],
            "{what}"
        );
        assert_eq!(
            tcx_progs(&na, &a1.host_veth, TcAttachType::Ingress),
            vec!["mesh_tc_reply"],
            "{what}"
        );
        assert!(
            tcx_progs(&na, &a2.host_veth, TcAttachType::Egress).is_empty(),
            "{what}"
        );
        assert!(tcx_progs(&na, "eth0", TcAttachType::Egress).is_empty(), "{what}");
    };
    expect_applied("applied twice");

    let dp = agent.dp.as_ref().unwrap();
    // Interface names are resolved in the calling thread's netns.
    let links_before = in_netns(&na.netns, || dp.tc_links()).unwrap();
    assert_eq!(
        links_before
            .iter()
            .map(|l| (l.kind, l.name.clone()))
            .collect::<Vec<_>>(),
        vec![
            (TcKind::Inbound, Some("eth0".to_string())),
            (TcKind::Reply, Some(a1.host_veth.clone())),
            (TcKind::Strict, Some(a1.host_veth.clone()))
        ]
    );
    let prog_ids = our_prog_ids(dp);
    let bpftool_before = bpftool_tcx_links(&cluster, &na, &prog_ids);
    assert_eq!(bpftool_before.len(), 3, "bpftool link show: {bpftool_before:?}");

    // Restart: the old handle goes, a new start on the same pins.
    agent.dp = None;
    let dp = in_netns(&na.netns, || Datapath::start(&Agent::config(&na))).expect("restart");
    assert!(dp.reused_pins());
    assert_eq!(dp.links_attached(), 0);
    assert_eq!(dp.tc_links_carried(), 0);
    assert_eq!(
        dp.marks(),
        Some(Marks::default()),
        "the marks survive in the pinned map"
    );
    assert_eq!(
        in_netns(&na.netns, || dp.tc_links()).unwrap(),
        links_before,
        "same links, same ids"
    );
    agent.dp = Some(dp);
    agent.dp().set_marks(Marks::default()).unwrap();
    assert!(!agent.set_inbound(&na.uplink, &[&a1, &a2]).attached);
    assert!(agent.set_strict(&modes).attached.is_empty());
    assert!(agent.ensure_routing().is_empty());
    expect_applied("after a restart");
    assert_eq!(
        bpftool_tcx_links(&cluster, &na, &prog_ids),
        bpftool_before,
        "bpftool: no new link"
    );
    // STRICT still enforced by the re-used link.
    let err = exchange(&a2.netns, sock(a1.ipv4, APP), None, REFUSED_WITHIN).expect_err("plain SYN");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);

    // The uplink moves (e.g. a new --uplink): the inbound link follows, the old one goes.
    let moved = agent.set_inbound(&na.bridge, &[&a1, &a2]);
    assert!(moved.attached);
    assert_eq!(
        moved
            .detached
            .iter()
            .map(|i| i.name.as_deref())
            .collect::<Vec<_>>(),
        vec![Some("eth0")]
    );
    assert!(tcx_progs(&na, "eth0", TcAttachType::Ingress).is_empty());
    assert_eq!(
        tcx_progs(&na, &na.bridge, TcAttachType::Ingress),
        vec!["mesh_tc_inbound"]
    );

    // Uninstall: rules, routes, links and pins gone; the STRICT pod takes plain connections.
    agent.uninstall();
    assert!(capture_rules(&cluster, &na, "-4").is_empty());
    assert!(capture_rules(&cluster, &na, "-6").is_empty());
    assert!(capture_routes(&cluster, &na, "-4").is_empty());
    assert!(capture_routes(&cluster, &na, "-6").is_empty());
    assert!(tcx_progs(&na, &na.bridge, TcAttachType::Ingress).is_empty());
    assert!(tcx_progs(&na, &a1.host_veth, TcAttachType::Egress).is_empty());
    assert!(tcx_progs(&na, &a1.host_veth, TcAttachType::Ingress).is_empty());
    assert!(bpftool_tcx_links(&cluster, &na, &prog_ids).is_empty());
    assert!(!na.pin_dir.exists());
    exchange(&a2.netns, sock(a1.ipv4, APP), None, OK_WITHIN).expect("plain connection after uninstall");
    assert_eq!(s1.accepts().len(), 1);
    // Removing again is a no-op.
    let again = in_netns(&na.netns, netlink::remove_capture_routing).unwrap();
    assert!(again.is_empty());
}

/// A set from another build (a stale ABI dir): the new set attaches its own tc programs to the
/// same interfaces, with the old marks and pod addresses, before the old links go.
#[test]
fn a_replaced_set_carries_tc_links_marks_and_addresses() {
    let cluster = Cluster::new("tc_replace").unwrap();
    let na = cluster.add_node("a").unwrap();
    let a1 = cluster.add_pod("a", "a1").unwrap();
    let a2 = cluster.add_pod("a", "a2").unwrap();

    let marks = Marks {
        capture: 0x10_0000,
        proxy: 0x20_0000,
        reply: 0x40_0000,
    };
    let mut agent = Agent::start(&na);
    agent.dp().set_marks(marks).unwrap();
    agent.set_inbound(&na.uplink, &[&a1]);
    agent.set_strict(&[&a1]);
    let abi = agent.dp.as_ref().unwrap().abi().to_string();
    let old_links = agent.dp.as_ref().unwrap().tc_links().unwrap();
    agent.dp = None;
    std::fs::rename(na.pin_dir.join(&abi), na.pin_dir.join("00000000deadbeef")).unwrap();

    let dp = in_netns(&na.netns, || Datapath::start(&Agent::config(&na))).expect("start over a stale set");
    assert!(!dp.reused_pins());
    assert_eq!(dp.tc_links_carried(), 3);
    assert_eq!(dp.marks(), Some(marks), "marks carried over");
    assert_eq!(
        dp.local_ips().unwrap(),
        BTreeSet::from([IpAddr::from(a1.ipv4), IpAddr::from(a1.ipv6)]),
        "addresses carried over"
    );
    assert!(!na.pin_dir.join("00000000deadbeef").exists(), "stale set removed");
    let new_links = dp.tc_links().unwrap();
    assert_eq!(new_links.len(), 3);
    for (old, new) in old_links.iter().zip(&new_links) {
        assert_eq!((old.kind, old.ifindex), (new.kind, new.ifindex));
        assert_ne!(old.link_id, new.link_id, "a new link with the new set's program");
        assert!(new.link_id.is_some());
    }
    // Exactly one program per hook: the old links were detached.
    assert_eq!(
        tcx_progs(&na, "eth0", TcAttachType::Ingress),
        vec!["mesh_tc_inbound"]
    );
    assert_eq!(
        tcx_progs(&na, &a1.host_veth, TcAttachType::Egress),
        vec!["mesh_tc_strict"]
    );
    assert_eq!(
        tcx_progs(&na, &a1.host_veth, TcAttachType::Ingress),
        vec!["mesh_tc_reply"]
    );
    agent.dp = Some(dp);
    // And it enforces with the carried marks: the old proxy mark passes, the default one not.
    // No server yet: refused by the pod (so the SYN got in), not dropped.
    let err = proxy_exchange(&na, sock(a1.ipv4, APP), marks.proxy).expect_err("no server yet");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    let _s1 = EchoServer::start(&a1, &[APP]);
    proxy_exchange(&na, sock(a1.ipv4, APP), marks.proxy).expect("carried proxy mark admitted");
    let err = exchange(&a2.netns, sock(a1.ipv4, APP), None, REFUSED_WITHIN).expect_err("plain SYN");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
}

/// Errors name what failed.
#[test]
fn errors_name_the_interface_and_the_missing_marks() {
    let cluster = Cluster::new("tc_errors").unwrap();
    let na = cluster.add_node("a").unwrap();
    let a1 = cluster.add_pod("a", "a1").unwrap();
    let mut agent = Agent::start(&na);

    let netns = na.netns.clone();
    let dp = agent.dp();
    let err = in_netns(&netns, || dp.set_inbound("nosuch0", &BTreeMap::new())).unwrap_err();
    assert!(err.to_string().contains("nosuch0"), "{err}");
    let gone = 99_999;
    let diff = in_netns(&netns, || {
        dp.set_strict(
            &BTreeSet::from([gone, ifindex(&a1.host_veth)]),
            &Keep::Only(BTreeSet::new()),
        )
    })
    .unwrap();
    assert_eq!(names(&diff.attached), vec![a1.host_veth.clone()]);
    assert_eq!(diff.unresolved.keys().collect::<Vec<_>>(), vec![&gone]);
    let err = dp
        .set_marks(Marks {
            capture: 0x3000,
            proxy: 0x2000,
            reply: 0x40,
        })
        .unwrap_err();
    assert!(err.to_string().contains("disjoint"), "{err}");

    let cfg = CaptureConfig {
        uplink: Some("nosuch0".into()),
        ..CaptureConfig::default()
    };
    let err = in_netns(&netns, || cfg.resolve(&[])).unwrap_err();
    assert!(err.to_string().contains("nosuch0"), "{err}");
    let err = in_netns(&netns, || {
        CaptureConfig::default().resolve(&["192.0.2.1".parse().unwrap()])
    })
    .unwrap_err();
    assert!(err.to_string().contains("--uplink"), "{err}");

    // A fresh set's tc programs do nothing until the marks are set.
    agent.dp = None;
    let dir = na.pin_dir.clone();
    in_netns(&netns, || ebpf::uninstall(&dir)).unwrap();
    let mut dp = in_netns(&netns, || Datapath::start(&Agent::config(&na))).unwrap();
    assert_eq!(dp.marks(), None);
    let err = in_netns(&netns, || dp.set_inbound("eth0", &BTreeMap::new())).unwrap_err();
    assert!(matches!(err, ebpf::EbpfError::MarksNotSet), "{err}");
    agent.dp = Some(dp);
}

// ---------------------------------------------------------------------------------------------
// STRICT fails closed.

/// Sends `syn` from `attacker`'s eth0 and reports whether the destination pod's TCP stack
/// answered it (a SYN-ACK back on the attacker's link).
fn syn_answered(attacker: &Pod, syn: &frames::Syn) -> bool {
    let raw = frames::RawSocket::open(&attacker.netns, &attacker.ifname).expect("AF_PACKET socket");
    raw.send(&syn.frame()).expect("send the SYN");
    raw.recv_matching(REFUSED_WITHIN, |f| syn.is_answered_by(f))
        .expect("sniff")
        .is_some()
}

/// A co-located pod hand-crafts SYNs to a STRICT pod behind 802.1Q/802.1ad tags with VLAN id 0,
/// which the pod's kernel strips and accepts. Before STRICT the pod answers each of them (so
/// the frames are ones a pod takes); with STRICT none is answered and the drops are counted.
#[test]
fn strict_drops_vlan_tagged_syns() {
    let cluster = Cluster::new("strict_vlan").unwrap();
    let na = cluster.add_node("a").unwrap();
    let s = cluster.add_pod("a", "s").unwrap();
    let m = cluster.add_pod("a", "m").unwrap();
    let _server = EchoServer::start(&s, &[APP]);
    let (s_mac, m_mac) = (
        frames::mac_of(&s.netns, &s.ifname).unwrap(),
        frames::mac_of(&m.netns, &m.ifname).unwrap(),
    );
    let variants: [(&str, Vec<(u16, u16)>); 4] = [
        ("untagged", vec![]),
        ("802.1Q", vec![(frames::ETH_P_8021Q, 0)]),
        (
            "802.1Q in 802.1Q",
            vec![(frames::ETH_P_8021Q, 0), (frames::ETH_P_8021Q, 0)],
        ),
        (
            "802.1Q in 802.1ad",
            vec![(frames::ETH_P_8021AD, 0), (frames::ETH_P_8021Q, 0)],
        ),
    ];
    let syn = |i: usize, tags: &[(u16, u16)]| frames::Syn {
        dst_mac: s_mac,
        src_mac: m_mac,
        tags: tags.to_vec(),
        src: m.ipv4,
        dst: s.ipv4,
        src_port: 41000 + i as u16,
        dst_port: APP,
    };
    for (i, (what, tags)) in variants.iter().enumerate() {
        assert!(
            syn_answered(&m, &syn(i, tags)),
            "{what}: without STRICT the pod answers the crafted SYN"
        );
    }

    let mut agent = Agent::start(&na);
    agent.set_strict(&[&s]);
    for (i, (what, tags)) in variants.iter().enumerate() {
        let dropped_before = agent.counter("strict_dropped");
        assert!(
            !syn_answered(&m, &syn(10 + i, tags)),
            "{what}: a crafted SYN reached the STRICT pod"
        );
        assert!(
            agent.counter("strict_dropped") > dropped_before,
            "{what}: the drop was counted"
        );
    }
    // ARP still passes (the pod stays reachable): the node resolves the pod and talks to it.
    proxy_exchange(&na, sock(s.ipv4, APP), Marks::default().proxy).expect("the proxy reaches the STRICT pod");
}

/// With its configuration gone from `mesh_tc_config` (a map cleared, a set half-made), the
/// STRICT program drops every SYN, the proxy's included, instead of letting them all in; what
/// a pod needs to live (ARP, established flows) still passes.
#[test]
fn strict_without_config_drops() {
    let cluster = Cluster::new("strict_noconf").unwrap();
    let na = cluster.add_node("a").unwrap();
    let s = cluster.add_pod("a", "s").unwrap();
    let c = cluster.add_pod("a", "c").unwrap();
    let server = EchoServer::start(&s, &[APP]);
    let mut agent = Agent::start(&na);
    agent.set_strict(&[&s]);
    let established = in_netns(&na.netns, || {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_mark(Marks::default().proxy).unwrap();
        socket
            .connect_timeout(&sock(s.ipv4, APP).into(), OK_WITHIN)
            .expect("the proxy's connection before the config is cleared");
        TcpStream::from(socket)
    });

    let pin = agent
        .dp
        .as_ref()
        .unwrap()
        .pin_path()
        .join(mesh_common::MAP_TC_CONFIG);
    let out = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&pin)
        .args(["key", "0", "0", "0", "0", "value"])
        .args(vec!["0"; std::mem::size_of::<mesh_common::TcConfig>()])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let unconfigured_before = agent.counter("tc_no_config");
    for (from, mark) in [(&c.netns, None), (&na.netns, Some(Marks::default().proxy))] {
        let err = exchange(from, sock(s.ipv4, APP), mark, REFUSED_WITHIN)
            .expect_err("a SYN into an unconfigured STRICT pod");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{from}: {err}");
    }
    assert!(agent.counter("tc_no_config") > unconfigured_before);
    assert_eq!(
        server.accepted_on(APP).len(),
        1,
        "only the connection made before"
    );
    exchange_on(established).expect("an established connection keeps working");
}
