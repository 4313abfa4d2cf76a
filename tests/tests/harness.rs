//! Self-tests of the netns harness (root, real kernel).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_harness::{bin_path, wait_until, Cluster, Pod, Proc};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

fn testapp() -> Command {
    Command::new(bin_path("mesh-testapp").expect("mesh-testapp is built with the tests"))
}

fn echo_server(cluster: &Cluster, pod: &Pod, port: u16) -> Result<Proc> {
    let mut cmd = testapp();
    cmd.args([
        "echo-server",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--listen",
        &format!("[::]:{port}"),
    ]);
    let server = cluster.spawn_in_pod(pod, cmd)?;
    server.wait_for_line(T, |l| l.contains(r#""event":"listening""#))?;
    Ok(server)
}

/// Runs the test app's client in `pod` against `addr`; returns its JSON report.
fn client(cluster: &Cluster, pod: &Pod, addr: SocketAddr, bytes: u64) -> Result<Value> {
    let mut cmd = testapp();
    cmd.args([
        "client",
        "--connect",
        &addr.to_string(),
        "--bytes",
        &bytes.to_string(),
    ]);
    let out = cluster.exec_in_pod(pod, cmd)?;
    let report: Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("client output: {:?} / {:?}", out.stdout, out.stderr))?;
    Ok(report)
}

/// Every `Cluster::new` removes leftovers of dead runs, so one running while
/// `leftovers_of_a_dead_run_are_removed` plants its fake leftovers could take them half-made.
static PLANTING: RwLock<()> = RwLock::new(());

fn new_cluster(test_name: &str) -> Result<Cluster> {
    let _g = PLANTING.read().unwrap_or_else(|e| e.into_inner());
    Cluster::new(test_name)
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn pods_on_two_nodes_talk_over_ipv4_and_ipv6() -> Result<()> {
    let start = Instant::now();
    let cluster = new_cluster("pods_on_two_nodes_talk_over_ipv4_and_ipv6")?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let client_pod = cluster.add_pod("a", "client")?;
    let server_pod = cluster.add_pod("b", "server")?;
    eprintln!("cluster with 2 nodes and 2 pods set up in {:?}", start.elapsed());

    assert_eq!(a.ipv4.to_string(), "10.0.0.1");
    assert_eq!(b.ipv6.to_string(), "fd00::2");
    assert_eq!(client_pod.ipv4.to_string(), "10.1.1.10");
    assert_eq!(server_pod.ipv6.to_string(), "fd00:1:2::10");
    assert_eq!(b.pod_cidr6, "fd00:1:2::/64");
    assert_eq!(client_pod.host_veth, "vclient");

    let server = echo_server(&cluster, &server_pod, 8080)?;
    for addr in [
        SocketAddr::new(server_pod.ipv4.into(), 8080),
        SocketAddr::new(server_pod.ipv6.into(), 8080),
    ] {
        let report = client(&cluster, &client_pod, addr, 300_000)?;
        ensure!(report["ok"] == true, "client to {addr}: {report}");
        ensure!(report["received"] == 300_000, "{report}");
        // Routed, not NATed: the server sees the client pod's own address.
        let local: SocketAddr = report["local"].as_str().unwrap_or_default().parse()?;
        ensure!(local.ip() == std::net::IpAddr::from(client_pod.ipv4) || local.ip() == client_pod.ipv6);
        server.wait_for_line(T, |l| {
            l.contains(r#""event":"accept""#) && l.contains(&local.to_string())
        })?;
    }

    // A pod's processes are in its cgroup, a node's in the agent cgroup.
    let cg = cluster
        .exec_in_pod(&client_pod, Command::new("cat").tap_arg("/proc/self/cgroup"))?
        .success()?;
    let rel = client_pod
        .cgroup
        .strip_prefix(cluster.cgroup_root().parent().unwrap())?;
    ensure!(
        cg.stdout.contains(&format!("0::/{}", rel.display())),
        "pod cgroup: {}",
        cg.stdout
    );
    let cg = cluster
        .exec_on_node(&a, Command::new("cat").tap_arg("/proc/self/cgroup"))?
        .success()?;
    ensure!(
        cg.stdout.trim_end().ends_with("/a/agent"),
        "node cgroup: {}",
        cg.stdout
    );
    ensure!(client_pod.cgroup_id != 0 && a.pods_cgroup_id != a.agent_cgroup_id);

    // The host-side veth is a port of the node's bridge.
    let link = cluster
        .exec_on_node(
            &a,
            Command::new("ip").tap_args(&["-o", "link", "show", "vclient"]),
        )?
        .success()?;
    ensure!(link.stdout.contains("master br0"), "{}", link.stdout);

    // The node reaches the cluster network's own address and the other node: a closed port
    // answers with a reset ("refused"), not a timeout or "unreachable".
    for addr in [
        SocketAddr::new(mesh_harness::LINK_IPV4.into(), 9),
        SocketAddr::new(b.ipv6.into(), 9),
    ] {
        let mut cmd = testapp();
        cmd.args([
            "client",
            "--connect",
            &addr.to_string(),
            "--bytes",
            "1",
            "--timeout-ms",
            "5000",
        ]);
        let out = cluster.exec_on_node(&a, cmd)?;
        ensure!(out.stdout.contains("refused"), "node a to {addr}: {}", out.stdout);
    }

    // Removing a pod takes its processes, netns, veth and cgroup.
    let server_pid = server.pid();
    cluster.remove_pod("server")?;
    ensure!(!netns_exists(&server_pod.netns));
    ensure!(!server_pod.cgroup.exists());
    ensure!(server.try_wait()?.is_some(), "server {server_pid} still running");
    let gone = cluster.exec_on_node(&b, Command::new("ip").tap_args(&["link", "show", "vserver"]))?;
    ensure!(!gone.status.success(), "veth still there: {}", gone.stdout);
    let mut cmd = testapp();
    let gone_addr = SocketAddr::new(server_pod.ipv4.into(), 8080).to_string();
    cmd.args([
        "client",
        "--connect",
        &gone_addr,
        "--bytes",
        "10",
        "--timeout-ms",
        "300",
    ]);
    let out = cluster.exec_in_pod(&client_pod, cmd)?;
    ensure!(!out.status.success(), "a removed pod answered: {}", out.stdout);
    Ok(())
}

#[test]
fn a_dropped_cluster_leaves_nothing() -> Result<()> {
    let (netns, cgroup_root, pin_root, pid) = {
        let cluster = new_cluster("a_dropped_cluster_leaves_nothing")?;
        let node = cluster.add_node("n")?;
        let pod = cluster.add_pod("n", "p")?;
        // What an agent would do: create its pin dir and pin something (a plain dir stands in).
        std::fs::create_dir_all(node.pin_dir.join("maps"))?;
        let mut sleep = Command::new("sleep");
        sleep.arg("1000");
        let proc = cluster.spawn_in_pod(&pod, sleep)?;
        let pid = proc.pid();
        std::mem::forget(proc); // only the cluster's teardown is left to stop it
        let netns = vec![
            cluster.link_netns().to_string(),
            node.netns.clone(),
            pod.netns.clone(),
        ];
        for n in &netns {
            ensure!(netns_exists(n), "{n} missing");
        }
        (
            netns,
            cluster.cgroup_root().to_path_buf(),
            cluster.pin_root().to_path_buf(),
            pid,
        )
    };
    for n in &netns {
        ensure!(!netns_exists(n), "{n} left behind");
    }
    ensure!(!cgroup_root.exists(), "{} left behind", cgroup_root.display());
    ensure!(!pin_root.exists(), "{} left behind", pin_root.display());
    // Killed by cgroup.kill; a zombie until reaped since the guard was forgotten.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    ensure!(
        state.is_empty() || state.contains(") Z "),
        "process {pid} survived: {state}"
    );
    Ok(())
}

#[test]
fn two_clusters_in_parallel_do_not_interfere() -> Result<()> {
    let run = |port: u16, other_port: u16| -> Result<String> {
        let cluster = new_cluster("two_clusters_in_parallel_do_not_interfere")?;
        cluster.add_node("a")?;
        cluster.add_node("b")?;
        let c = cluster.add_pod("a", "c")?;
        let s = cluster.add_pod("b", "s")?;
        let _server = echo_server(&cluster, &s, port)?;
        for _ in 0..3 {
            let report = client(&cluster, &c, SocketAddr::new(s.ipv4.into(), port), 50_000)?;
            ensure!(report["ok"] == true, "{report}");
            let report = client(&cluster, &c, SocketAddr::new(s.ipv6.into(), port), 50_000)?;
            ensure!(report["ok"] == true, "{report}");
        }
        // The same address, the other cluster's port: nothing listens here.
        let report = client(&cluster, &c, SocketAddr::new(s.ipv4.into(), other_port), 10)?;
        ensure!(
            report["error"].as_str().unwrap_or("").contains("refused"),
            "{report}"
        );
        Ok(cluster.prefix().to_string())
    };
    let (p1, p2) = std::thread::scope(|scope| {
        let one = scope.spawn(|| run(9001, 9002));
        let two = scope.spawn(|| run(9002, 9001));
        (one.join().expect("no panic"), two.join().expect("no panic"))
    });
    let (p1, p2) = (p1?, p2?);
    ensure!(p1 != p2);
    Ok(())
}

#[test]
fn leftovers_of_a_dead_run_are_removed() -> Result<()> {
    let cg2 = cgroup2_root()?;
    let bpffs = Path::new("/sys/fs/bpf");
    // Plants a run's objects: a netns, a cgroup tree, a pin dir. Another test process's
    // `Cluster::new` may clean a dead run's objects up while they are planted; that is fine
    // (they are gone either way), so planting errors are only reported.
    let plant = |id: &str| -> String {
        let netns = format!("{id}-net");
        let steps = || -> Result<()> {
            let out = Command::new("ip").args(["netns", "add", &netns]).output()?;
            ensure!(out.status.success(), "ip netns add {netns}: {out:?}");
            std::fs::create_dir_all(cg2.join(id).join("n").join("pods").join("p"))?;
            std::fs::create_dir_all(bpffs.join(id).join("n"))?;
            Ok(())
        };
        if let Err(e) = steps() {
            eprintln!("planting {id} (raced with another clean-up?): {e:#}");
        }
        netns
    };
    let remove = |id: &str, netns: &str| {
        let _ = Command::new("ip").args(["netns", "del", netns]).output();
        let _ = std::fs::remove_dir_all(bpffs.join(id));
        for d in ["n/pods/p", "n/pods", "n", ""] {
            let _ = std::fs::remove_dir(cg2.join(id).join(d));
        }
    };

    let planting = PLANTING.write().unwrap_or_else(|e| e.into_inner());
    // A PID that is no longer alive: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn()?;
    let dead_id = format!("mt{}x0", child.id());
    child.wait()?;
    let dead_netns = plant(&dead_id);
    // A live run's objects (this very process, a counter no cluster uses) must stay.
    let live_id = format!("mt{}x999999", std::process::id());
    let live_netns = plant(&live_id);
    drop(planting);

    let checked = (|| -> Result<()> {
        let _cluster = new_cluster("leftovers_of_a_dead_run_are_removed")?;
        ensure!(!netns_exists(&dead_netns), "dead run's netns survived");
        ensure!(!cg2.join(&dead_id).exists(), "dead run's cgroups survived");
        ensure!(!bpffs.join(&dead_id).exists(), "dead run's pins survived");
        ensure!(netns_exists(&live_netns), "a live run's netns was removed");
        ensure!(
            cg2.join(&live_id).join("n/pods/p").exists(),
            "a live run's cgroups were removed"
        );
        ensure!(
            bpffs.join(&live_id).join("n").exists(),
            "a live run's pin dir was removed"
        );
        Ok(())
    })();
    remove(&live_id, &live_netns);
    remove(&dead_id, &dead_netns);
    checked
}

fn cgroup2_root() -> Result<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split(' ').nth(4).map(Into::into))?
        })
        .context("no cgroup2 mount")
}

/// Child half of `ctrl_c_tears_everything_down`, which starts it with
/// `MESH_HARNESS_CTRLC_CHILD` set; run any other way, it fails rather than pass having
/// tested nothing.
#[test]
#[ignore = "started by ctrl_c_tears_everything_down"]
fn ctrl_c_child() -> Result<()> {
    ensure!(
        std::env::var_os("MESH_HARNESS_CTRLC_CHILD").is_some(),
        "MESH_HARNESS_CTRLC_CHILD is not set: this is the child half of \
         ctrl_c_tears_everything_down, which runs it"
    );
    let cluster = new_cluster("ctrl_c_child")?;
    let node = cluster.add_node("n")?;
    let pod = cluster.add_pod("n", "p")?;
    std::fs::create_dir_all(&node.pin_dir)?;
    let mut sleep = Command::new("sleep");
    sleep.arg("1000");
    let _proc = cluster.spawn_in_pod(&pod, sleep)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nREADY {} {}",
        cluster.id(),
        cluster.cgroup_root().display()
    )?;
    out.flush()?;
    drop(out);
    // The parent interrupts us now; the harness's handler tears down and exits 130.
    wait_until(T, "SIGINT from the parent", || {
        Err::<(), _>("not yet".to_string())
    })?;
    Ok(())
}

#[test]
fn ctrl_c_tears_everything_down() -> Result<()> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "--exact",
        "ctrl_c_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd.env("MESH_HARNESS_CTRLC_CHILD", "1");
    let child = Proc::spawn("ctrl-c-child", cmd)?;
    let ready = child.wait_for_line(T, |l| l.starts_with("READY "))?;
    let mut words = ready.split(' ').skip(1);
    let (id, cgroup_root) = (words.next().context("id")?, words.next().context("cgroup")?);
    child.kill(libc::SIGINT)?;
    let status = child.wait_exit(T)?;
    ensure!(
        status.code() == Some(130),
        "child exit: {status}\n{}",
        child.stderr()
    );
    let left: Vec<String> = std::fs::read_dir("/run/netns")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{id}-")))
        .collect();
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    ensure!(!Path::new(cgroup_root).exists(), "cgroups left");
    ensure!(!Path::new("/sys/fs/bpf").join(id).exists(), "pin dir left");
    Ok(())
}

/// `Command` builder helpers that return the command (for one-liners).
trait Tap {
    fn tap_arg(self, a: &str) -> Self;
    fn tap_args(self, a: &[&str]) -> Self;
}

impl Tap for Command {
    fn tap_arg(mut self, a: &str) -> Self {
        self.arg(a);
        self
    }
    fn tap_args(mut self, a: &[&str]) -> Self {
        self.args(a);
        self
    }
}
