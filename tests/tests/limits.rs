//! Bounded resources, end to end: thousands of idle sockets held against a real agent's
//! metrics and HBONE listeners cost it a bounded number of descriptors and bytes, and neither
//! scrapes nor mesh traffic stop; the sockets it holds have keepalive; a silent carried
//! connection is closed at the idle timeout; the admin API changes the log filter only over
//! its socket.
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use mesh_harness::agent::Agent;
use mesh_harness::app::{client, echo_server, wait_mesh_path};
use mesh_harness::controller::{namespace_yaml, pod_yaml, Controller};
use mesh_harness::{Cluster, Node, Pod, Proc};

/// Idle sockets held against each listener.
const IDLE: usize = 5_000;
/// What the idle sockets may cost the agent, over its count before them: the caps' worth
/// (32 per peer on :15020, 512 per peer on :15008) and slack, far below one per socket.
const MAX_EXTRA_FDS: usize = 1_000;
const MAX_EXTRA_RSS_KIB: u64 = 48 * 1024;

/// Opens N connections to HOST:PORT, a batch at a time without waiting on each (so that all
/// are open well within the server's timeouts), then holds them without a byte sent; prints one
/// JSON line once all are tried. A connection the server closes stays held here.
const HOLDER: &str = r#"
import errno, json, os, resource, select, signal, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + 100:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 100), hard))
held, failed, error, began = [], 0, None, time.monotonic()
for start in range(0, n, 500):
    pending, poll = {}, select.poll()
    for _ in range(min(500, n - start)):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex((host, port))
        if rc in (0, errno.EINPROGRESS):
            pending[s.fileno()] = s
            poll.register(s, select.POLLOUT)
        else:
            failed, error = failed + 1, os.strerror(rc)
            s.close()
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        for fd, _ in poll.poll(500):
            s = pending.pop(fd)
            poll.unregister(fd)
            rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if rc == 0:
                held.append(s)
            else:
                failed, error = failed + 1, os.strerror(rc)
                s.close()
    for s in pending.values():
        failed, error = failed + 1, "connect timed out"
        s.close()
took = time.monotonic() - began
print(json.dumps({"event": "holding", "held": len(held), "failed": failed, "error": error, "seconds": took}), flush=True)
while True:
    signal.pause()
"#;

/// The descriptors and resident memory of process `pid`, from /proc.
fn usage(pid: u32) -> Result<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok((fds, rss))
}

/// The holders and the test need a descriptor per socket: the soft limit goes up to the
/// hard one (children inherit it).
fn raise_open_files_limit(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        ensure!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0, "getrlimit");
        if lim.rlim_cur < want {
            lim.rlim_cur = want.max(lim.rlim_cur);
            lim.rlim_max = lim.rlim_max.max(want);
            ensure!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0,
                "setrlimit to {want}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Holds `n` idle connections from `pod` to `dst` (see [`HOLDER`]).
fn hold(cluster: &Cluster, pod: &Pod, dst: SocketAddr, n: usize) -> Result<Proc> {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args([
        "-c",
        HOLDER,
        &dst.ip().to_string(),
        &dst.port().to_string(),
        &n.to_string(),
    ]);
    cluster.spawn_in_pod(pod, cmd)
}

fn held(holder: &Proc) -> Result<Value> {
    let line = holder.wait_for_line(Duration::from_secs(40), |l| l.contains(r#""event": "holding""#))?;
    Ok(serde_json::from_str(&line)?)
}

/// Nodes a and b; enrolled `server` (an echo server on 8080) on a and `client` on b, meshed;
/// `intruder` on b is not in the mesh (the controller never hears of it).
struct World {
    cluster: Cluster,
    _controller: Controller,
    agents: Vec<Agent>,
    a: Node,
    server: Pod,
    client: Pod,
    intruder: Pod,
    _echo: Proc,
}

fn world(name: &str, agent_args: &[&str]) -> Result<World> {
    let cluster = Cluster::new(name)?;
    let a = cluster.add_node("a")?;
    cluster.add_node("b")?;
    let server = cluster.add_pod("a", "server")?;
    let client = cluster.add_pod("b", "client")?;
    let intruder = cluster.add_pod("b", "intruder")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let mut agent = Agent::new(&node, &controller, agent_args)?;
        agent.set_log_filter("info");
        agent.start(&cluster)?;
        agents.push(agent);
    }
    let mut yaml = namespace_yaml("shop", &[("mesh.dev/enroll", "true")]);
    for pod in [&server, &client] {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
    }
    controller.apply("shop", &yaml)?;
    let echo = echo_server(&cluster, &server, &[8080])?;
    let w = World {
        cluster,
        _controller: controller,
        agents,
        a,
        server,
        client,
        intruder,
        _echo: echo,
    };
    wait_mesh_path(&w.cluster, &w.agents, &w.client, w.echo())?;
    Ok(w)
}

impl World {
    fn echo(&self) -> SocketAddr {
        SocketAddr::new(self.server.ipv4.into(), 8080)
    }
}

#[test]
fn idle_sockets_on_metrics_and_hbone_stop_neither_and_cost_little() -> Result<()> {
    raise_open_files_limit(4 * IDLE as u64)?;
    let w = world("limits-idle", &[])?;
    let (cluster, agents, a, server, client_pod, intruder) =
        (&w.cluster, &w.agents, &w.a, &w.server, &w.client, &w.intruder);
    let dst = w.echo();

    // The sockets the agent holds for a peer probe it: keepalive is on. (ss shows one timer per
    // socket, so only idle ones show it: one from the intruder to each port, looked at at once,
    // well within the request and handshake timeouts that will close them.)
    let metrics_addr = SocketAddr::new(a.ipv4.into(), 15020);
    let hbone_addr = SocketAddr::new(server.ipv4.into(), 15008);
    let probes = [
        hold(cluster, intruder, metrics_addr, 1)?,
        hold(cluster, intruder, hbone_addr, 1)?,
    ];
    for probe in &probes {
        held(probe)?;
    }
    let from_intruder = format!(" {}:", intruder.ipv4);
    for port in [15020, 15008] {
        let mut ss = Command::new("ss");
        ss.args(["-tnoH", "state", "established", "sport", "=", &format!(":{port}")]);
        let out = cluster.exec_on_node(a, ss)?.success()?.stdout;
        let lines: Vec<&str> = out.lines().filter(|l| l.contains(&from_intruder)).collect();
        ensure!(
            !lines.is_empty(),
            "no established socket from the intruder on :{port}"
        );
        let bare: Vec<&&str> = lines.iter().filter(|l| !l.contains("timer:(keepalive")).collect();
        ensure!(
            bare.is_empty(),
            "{} of {} sockets on :{port} without keepalive, e.g. {:?}",
            bare.len(),
            lines.len(),
            &bare[..bare.len().min(3)]
        );
    }

    drop(probes);

    let agent = &agents[0];
    let pid = agent.proc()?.pid();
    let (fds_before, rss_before) = usage(pid)?;
    let started = Instant::now();
    let on_metrics = hold(cluster, intruder, metrics_addr, IDLE)?;
    let on_hbone = hold(cluster, intruder, hbone_addr, IDLE)?;
    let (metrics_held, hbone_held) = (held(&on_metrics)?, held(&on_hbone)?);
    let opened = started.elapsed();
    let (fds_during, rss_during) = usage(pid)?;
    eprintln!(
        "agent on a: {fds_before} fds, {rss_before} KiB before; {fds_during} fds, {rss_during} KiB \
         with the idle sockets held (metrics: {metrics_held}, hbone: {hbone_held}, opened in {opened:?})"
    );
    let bounded = |fds: usize, rss: u64| -> Result<()> {
        ensure!(
            fds < fds_before + MAX_EXTRA_FDS,
            "the agent's descriptors went from {fds_before} to {fds} for {} idle sockets",
            2 * IDLE
        );
        ensure!(
            rss < rss_before + MAX_EXTRA_RSS_KIB,
            "the agent's RSS went from {rss_before} KiB to {rss} KiB"
        );
        Ok(())
    };
    bounded(fds_during, rss_during)?;
    for (what, h) in [("metrics", &metrics_held), ("hbone", &hbone_held)] {
        ensure!(
            h["held"].as_u64().unwrap_or(0) + h["failed"].as_u64().unwrap_or(0) == IDLE as u64,
            "the {what} holder did not try every socket: {h}"
        );
    }

    // Scrapes and mesh traffic go on while the sockets are held.
    let refused = |listener: &str| {
        agent.metric_sum(
            cluster,
            "mesh_listener_refused_total",
            &[("listener", listener), ("reason", "max_connections_per_peer")],
        )
    };
    let (metrics_refused, hbone_refused) = (refused("metrics")?, refused("hbone")?);
    client(cluster, client_pod, dst, 64 * 1024).context("mesh traffic while the sockets are held")?;
    let (fds_after, rss_after) = usage(pid)?;
    eprintln!(
        "refused over the per-peer caps: metrics {metrics_refused}, hbone {hbone_refused}; \
         agent after a scrape and a mesh connection: {fds_after} fds, {rss_after} KiB"
    );
    bounded(fds_after, rss_after)?;
    ensure!(
        metrics_refused > 0.0 && hbone_refused > 0.0,
        "refusals not counted: metrics {metrics_refused}, hbone {hbone_refused}"
    );
    Ok(())
}

/// `curl` on the node with the answer's status on a last line: (status, body).
fn curl(cluster: &Cluster, node: &Node, args: &[&str]) -> Result<(u16, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args);
    let out = cluster.exec_on_node(node, cmd)?.success()?;
    let (body, code) = out.stdout.trim_end().rsplit_once('\n').context("no status")?;
    Ok((code.parse()?, body.to_owned()))
}

#[test]
fn the_log_filter_changes_only_over_the_root_socket() -> Result<()> {
    let cluster = Cluster::new("limits-admin")?;
    let node = cluster.add_node("a")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agent = Agent::new(&node, &controller, &[])?;
    agent.start(&cluster)?;
    let body = r#"{"filter":"debug"}"#;
    let put = [
        "-X",
        "PUT",
        "-H",
        "content-type: application/json",
        "--data",
        body,
    ];

    let mut tcp: Vec<&str> = put.to_vec();
    tcp.push("http://127.0.0.1:15000/v1/log-level");
    let (status, answer) = curl(&cluster, &node, &tcp)?;
    ensure!(
        status == 403 && answer.contains("read-only"),
        "PUT over TCP: {status} {answer}"
    );
    let now = agent.admin_get(&cluster, "/v1/log-level")?;
    ensure!(now["filter"] != "debug", "the TCP PUT changed the filter: {now}");

    let set = agent.admin_unix(&cluster, "PUT", "/v1/log-level", Some(body))?;
    ensure!(set["filter"] == "debug", "PUT over the socket: {set}");
    let now = agent.admin_get(&cluster, "/v1/log-level")?;
    ensure!(
        now["filter"] == "debug",
        "GET over TCP after the socket's PUT: {now}"
    );

    let socket = agent.admin_socket();
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::symlink_metadata(&socket)?) & 0o7777;
    ensure!(mode == 0o600, "{} has mode {mode:o}", socket.display());
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let staged: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".admin"))
        .collect();
    ensure!(staged.is_empty(), "staging left in {}: {staged:?}", dir.display());
    Ok(())
}

/// Sends a few bytes through the mesh, reads their echo, then waits silently for the proxy to
/// close the connection; prints what it saw.
const SILENT: &str = r#"
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"ping")
echo = s.recv(4).decode()
quiet = time.monotonic()
s.settimeout(30)
try:
    end, error = s.recv(1).decode(), None
except OSError as e:
    end, error = None, str(e)
print(json.dumps({"echo": echo, "closed_after": time.monotonic() - quiet, "end": end, "error": error}))
"#;

#[test]
fn a_silent_carried_connection_is_closed_at_the_idle_timeout() -> Result<()> {
    let w = world("limits-silent", &["--idle-timeout", "2s"])?;
    let dst = w.echo();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", SILENT, &dst.ip().to_string(), &dst.port().to_string()]);
    let out = w.cluster.exec_in_pod(&w.client, cmd)?.success()?;
    let seen: Value = serde_json::from_str(out.stdout.trim()).with_context(|| out.stdout.clone())?;
    eprintln!("a silent mesh connection with --idle-timeout 2s: {seen}");
    let after = seen["closed_after"].as_f64().unwrap_or(f64::MAX);
    ensure!(seen["echo"] == "ping", "the connection did not carry: {seen}");
    ensure!(
        seen["end"] == "" || seen["error"].is_string(),
        "something other than a close arrived: {seen}"
    );
    ensure!(
        (1.9..15.0).contains(&after),
        "closed after {after} s of silence, not about 2: {seen}"
    );
    Ok(())
}
