//! The cluster: namespaces, links, addresses, cgroups and pin dirs, and their teardown.

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proc::{finish, spawn_placed, Proc, ProcShared};
use crate::sys::{self, ip_batch, log};

/// The address of the cluster network's own bridge (in [`Cluster::link_netns`]), reachable from
/// every node: a place for something that is on no node (e.g. the controller).
pub const LINK_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
/// See [`LINK_IPV4`]: `fd00::254`.
pub const LINK_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x254);

/// How long a short command run by `exec_*` may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long teardown waits for killed processes to leave their cgroups.
const CGROUP_DRAIN: Duration = Duration::from_secs(10);

/// A node: a network namespace with an uplink to the cluster network and a bridge for its pods.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// 1, 2, … in the order nodes were added; the `N` in its addresses.
    pub index: u8,
    /// The network namespace's name (in /run/netns).
    pub netns: String,
    /// `10.0.0.N` on the uplink.
    pub ipv4: Ipv4Addr,
    /// `fd00::N` on the uplink.
    pub ipv6: Ipv6Addr,
    /// The uplink's name in the node netns: `eth0`.
    pub uplink: String,
    /// The uplink's peer, a port of the bridge in [`Cluster::link_netns`]: `n<N>`.
    pub link_veth: String,
    /// The pod bridge in the node netns: `br0`.
    pub bridge: String,
    /// `10.1.N.1`, the pods' IPv4 gateway.
    pub bridge_ipv4: Ipv4Addr,
    /// `fd00:1:N::1`, the pods' IPv6 gateway.
    pub bridge_ipv6: Ipv6Addr,
    /// `10.1.N.0/24`.
    pub pod_cidr4: String,
    /// `fd00:1:N::/64`.
    pub pod_cidr6: String,
    /// `<cgroup2>/<cluster id>/<node>`.
    pub cgroup: PathBuf,
    /// `<node cgroup>/pods`: the pods' cgroup root, where the agent attaches its cgroup programs.
    pub pods_cgroup: PathBuf,
    pub pods_cgroup_id: u64,
    /// `<node cgroup>/agent`: the node agent's own cgroup ([`Cluster::spawn_on_node`] uses it).
    pub agent_cgroup: PathBuf,
    pub agent_cgroup_id: u64,
    /// `/sys/fs/bpf/<cluster id>/<node>`: not created (the agent does), removed on teardown.
    pub pin_dir: PathBuf,
}

/// A pod: a network namespace behind a veth on its node's bridge, and a cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// A UUID, as the API server gives every pod; the cgroup is named after it.
    pub uid: String,
    /// The node's name.
    pub node: String,
    pub netns: String,
    /// `10.1.N.(10+i)`, the i-th pod added on node N.
    pub ipv4: Ipv4Addr,
    /// `fd00:1:N::(10+i)` (the same digits as the IPv4 address, read as hex).
    pub ipv6: Ipv6Addr,
    /// `<node pods cgroup>/pod<uid>`, as the kubelet's cgroupfs driver names it.
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The pod-side interface: `eth0`.
    pub ifname: String,
    /// The host-side veth in the node netns (a port of the node's `br0`): `v<pod>` when that
    /// fits in 15 characters, else `v_<k>`.
    pub host_veth: String,
}

/// A fresh version-4-shaped UUID, unique on this machine (pid, time and a counter).
fn pod_uid() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        (n >> 12) & 0xffff,
        n & 0xfff,
        (nanos >> 48) & 0xfff,
        nanos & 0xffff_ffff_ffff
    )
}

/// The output of a short command run by an `exec_*` method.
#[derive(Debug)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    /// `self` if the command exited 0, else an error with its output.
    pub fn success(self) -> Result<Self> {
        if !self.status.success() {
            bail!(
                "command failed ({}):\nstdout: {}\nstderr: {}",
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// A cluster of nodes and pods inside the kernel. Torn down on drop.
pub struct Cluster {
    shared: Arc<Shared>,
}

struct Shared {
    test_name: String,
    /// `mt<pid>x<counter>`: the cgroup and bpffs directory name, and (with `-`) the netns prefix.
    id: String,
    prefix: String,
    link_netns: String,
    cgroup_root: PathBuf,
    pin_root: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    nodes: Vec<NodeState>,
    pods: Vec<Pod>,
    procs: Vec<Weak<ProcShared>>,
    veth_counter: u32,
    torn_down: bool,
}

struct NodeState {
    node: Node,
    next_pod: u16,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());
static HANDLER: Once = Once::new();

/// Tears down every live cluster of this process. The harness calls it from its SIGINT/SIGTERM
/// handler; a program that installs its own handler (before the first `Cluster::new`) calls it
/// from there.
pub fn teardown_all() {
    let live: Vec<Arc<Shared>> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for shared in live {
        shared.teardown();
    }
}

fn install_signal_handler() {
    HANDLER.call_once(|| {
        // Fails if the program has its own handler; then that one is to call `teardown_all`.
        let _ = ctrlc::set_handler(|| {
            log("signal received: tearing the clusters down");
            teardown_all();
            std::process::exit(130);
        });
    });
}

fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !ok {
        bail!("bad {kind} name {name:?}: use 1-40 of [a-z0-9-], not starting with '-'");
    }
    if name == "net" {
        bail!("{kind} name \"net\" is reserved for the cluster network");
    }
    Ok(())
}

/// The IPv6 group written with the same digits as `n` in decimal (10 → 0x10).
fn same_digits(n: u16) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("at most 3 decimal digits")
}

impl Cluster {
    /// Creates an empty cluster (the cluster network only), after removing leftovers of dead
    /// runs. Needs root. `test_name` only labels log lines.
    pub fn new(test_name: &str) -> Result<Cluster> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the netns harness needs root (network namespaces, cgroups, bpffs)");
        }
        let cgroup2 = sys::cgroup2_root()?;
        let bpffs = sys::bpffs_root()?;
        install_signal_handler();
        sys::clean_leftovers(&cgroup2, &bpffs);

        let id = format!(
            "mt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let prefix = format!("{id}-");
        let shared = Arc::new(Shared {
            test_name: test_name.to_string(),
            link_netns: format!("{prefix}net"),
            cgroup_root: cgroup2.join(&id),
            pin_root: bpffs.join(&id),
            id,
            prefix,
            state: Mutex::new(State::default()),
        });
        {
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|w| w.strong_count() > 0);
            live.push(Arc::downgrade(&shared));
        }
        // From here on, dropping `cluster` (also on an error below) tears everything down.
        let cluster = Cluster { shared };
        cluster
            .setup()
            .with_context(|| format!("creating cluster {} for {test_name}", cluster.shared.id))?;
        Ok(cluster)
    }

    fn setup(&self) -> Result<()> {
        let s = &self.shared;
        fs::create_dir(&s.cgroup_root).with_context(|| format!("creating {}", s.cgroup_root.display()))?;
        fs::create_dir(&s.pin_root).with_context(|| format!("creating {}", s.pin_root.display()))?;
        sys::netns_add(&s.link_netns)?;
        sys::sysctls_in_netns(&s.link_netns, &dad_off())?;
        ip_batch(
            Some(&s.link_netns),
            &[
                "link set lo up".into(),
                "link add br0 type bridge mcast_snooping 0".into(),
                format!("addr add {LINK_IPV4}/24 dev br0"),
                format!("addr add {LINK_IPV6}/64 dev br0 nodad"),
                "link set br0 up".into(),
            ],
        )
    }

    /// The run id `mt<pid>x<counter>` (names the cgroup and bpffs directories).
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// `<id>-`: every network namespace of this cluster is named with it.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// The cluster network's namespace (`<prefix>net`): its `br0` joins the nodes' uplinks through
    /// ports `n<N>` ([`Node::link_veth`]); capture there to read the bytes between nodes.
    pub fn link_netns(&self) -> &str {
        &self.shared.link_netns
    }

    /// `<cgroup2>/<id>`.
    pub fn cgroup_root(&self) -> &Path {
        &self.shared.cgroup_root
    }

    /// `/sys/fs/bpf/<id>`.
    pub fn pin_root(&self) -> &Path {
        &self.shared.pin_root
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    /// Adds node `name` (the next index N): netns, uplink, pod bridge, routes to and from every
    /// other node's pods, cgroups.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        validate_name("node", name)?;
        let mut st = self.state();
        if st.torn_down {
            bail!("cluster {} is torn down", self.shared.id);
        }
        if st.nodes.iter().any(|n| n.node.name == name) || st.pods.iter().any(|p| p.name == name) {
            bail!("a node or pod named {name:?} already exists");
        }
        let index = u8::try_from(st.nodes.len() + 1)
            .ok()
            .filter(|i| *i < 254)
            .context("too many nodes")?;
        let n = index as u16;
        let s = &self.shared;
        let cgroup = s.cgroup_root.join(name);
        let pods_cgroup = cgroup.join("pods");
        let agent_cgroup = cgroup.join("agent");
        for dir in [&cgroup, &pods_cgroup, &agent_cgroup] {
            fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        let node = Node {
            name: name.to_string(),
            index,
            netns: format!("{}{name}", s.prefix),
            ipv4: Ipv4Addr::new(10, 0, 0, index),
            ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, same_digits(n)),
            uplink: "eth0".into(),
            link_veth: format!("n{index}"),
            bridge: "br0".into(),
            bridge_ipv4: Ipv4Addr::new(10, 1, index, 1),
            bridge_ipv6: Ipv6Addr::new(0xfd00, 1, same_digits(n), 0, 0, 0, 0, 1),
            pod_cidr4: format!("10.1.{index}.0/24"),
            pod_cidr6: format!("fd00:1:{:x}::/64", same_digits(n)),
            pods_cgroup_id: sys::cgroup_id(&pods_cgroup)?,
            agent_cgroup_id: sys::cgroup_id(&agent_cgroup)?,
            cgroup,
            pods_cgroup,
            agent_cgroup,
            pin_dir: s.pin_root.join(name),
        };
        sys::netns_add(&node.netns)?;
        let mut settings = dad_off();
        settings.extend([
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ]);
        sys::sysctls_in_netns(&node.netns, &settings)?;
        ip_batch(
            Some(&s.link_netns),
            &[
                format!(
                    "link add {} type veth peer name eth0 netns {}",
                    node.link_veth, node.netns
                ),
                format!("link set {} master br0 up", node.link_veth),
            ],
        )?;
        let mut cmds = vec![
            "link set lo up".to_string(),
            format!("addr add {}/24 dev eth0", node.ipv4),
            format!("addr add {}/64 dev eth0 nodad", node.ipv6),
            "link set eth0 up".into(),
            "link add br0 type bridge mcast_snooping 0".into(),
            format!("addr add {}/24 dev br0", node.bridge_ipv4),
            format!("addr add {}/64 dev br0 nodad", node.bridge_ipv6),
            "link set br0 up".into(),
        ];
        for other in &st.nodes {
            cmds.extend(routes_to(&other.node));
        }
        ip_batch(Some(&node.netns), &cmds)?;
        for other in &st.nodes {
            ip_batch(Some(&other.node.netns), &routes_to(&node))?;
        }
        st.nodes.push(NodeState {
            node: node.clone(),
            next_pod: 0,
        });
        Ok(node)
    }

    /// Adds pod `name` on node `node`: netns, veth onto the node's bridge, addresses, default
    /// routes, cgroup.
    pub fn add_pod(&self, node: &str, name: &str) -> Result<Pod> {
        validate_name("pod", name)?;
        let mut st = self.state();
        if st.torn_down {
            bail!("cluster {} is torn down", self.shared.id);
        }
        if st.nodes.iter().any(|n| n.node.name == name) || st.pods.iter().any(|p| p.name == name) {
            bail!("a node or pod named {name:?} already exists");
        }
        st.veth_counter += 1;
        let veth_counter = st.veth_counter;
        let ns = st
            .nodes
            .iter_mut()
            .find(|n| n.node.name == node)
            .with_context(|| format!("no node {node:?}"))?;
        let host = 10 + ns.next_pod;
        if host > 254 {
            bail!("node {node} has no pod addresses left");
        }
        ns.next_pod += 1;
        let n = &ns.node;
        let uid = pod_uid();
        let cgroup = n.pods_cgroup.join(format!("pod{uid}"));
        fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let host_veth = if name.len() <= 14 {
            format!("v{name}")
        } else {
            format!("v_{veth_counter}")
        };
        let pod = Pod {
            name: name.to_string(),
            uid,
            node: node.to_string(),
            netns: format!("{}{name}", self.shared.prefix),
            ipv4: Ipv4Addr::new(10, 1, n.index, host as u8),
            ipv6: Ipv6Addr::new(
                0xfd00,
                1,
                same_digits(n.index as u16),
                0,
                0,
                0,
                0,
                same_digits(host),
            ),
            cgroup_id: sys::cgroup_id(&cgroup)?,
            cgroup,
            ifname: "eth0".into(),
            host_veth,
        };
        let node_netns = n.netns.clone();
        let (gw4, gw6) = (n.bridge_ipv4, n.bridge_ipv6);
        // Recorded before anything in the kernel exists, so teardown covers a half-made pod.
        st.pods.push(pod.clone());
        sys::netns_add(&pod.netns)?;
        sys::sysctls_in_netns(&pod.netns, &dad_off())?;
        ip_batch(
            Some(&node_netns),
            &[
                format!(
                    "link add {} type veth peer name eth0 netns {}",
                    pod.host_veth, pod.netns
                ),
                format!("link set {} master br0 up", pod.host_veth),
            ],
        )?;
        ip_batch(
            Some(&pod.netns),
            &[
                "link set lo up".into(),
                format!("addr add {}/24 dev eth0", pod.ipv4),
                format!("addr add {}/64 dev eth0 nodad", pod.ipv6),
                "link set eth0 up".into(),
                format!("route add 0.0.0.0/0 via {gw4}"),
                format!("route add ::/0 via {gw6}"),
            ],
        )?;
        Ok(pod)
    }

    /// Removes pod `name`: kills its processes, deletes its veth, netns and cgroup.
    pub fn remove_pod(&self, name: &str) -> Result<()> {
        let mut st = self.state();
        let i = st
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name:?}"))?;
        let pod = st.pods.remove(i);
        let procs: Vec<Arc<ProcShared>> = st
            .procs
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|p| p.pod.as_deref() == Some(name))
            .collect();
        let node_netns = st
            .nodes
            .iter()
            .find(|n| n.node.name == pod.node)
            .map(|n| n.node.netns.clone());
        drop(st);
        sys::cgroup_kill(&pod.cgroup)?;
        for p in procs {
            p.stop(Duration::ZERO);
        }
        if let Some(node_netns) = node_netns {
            // Deleting the netns would take the veth along, but only once the kernel gets to it.
            if let Err(e) = ip_batch(Some(&node_netns), &[format!("link del {}", pod.host_veth)]) {
                let exists = ip_batch(Some(&node_netns), &[format!("link show dev {}", pod.host_veth)]);
                if exists.is_ok() {
                    return Err(e.context(format!("deleting veth {}", pod.host_veth)));
                }
            }
        }
        sys::netns_del_all(std::slice::from_ref(&pod.netns));
        if Path::new(sys::NETNS_DIR).join(&pod.netns).exists() {
            bail!("network namespace {} still exists", pod.netns);
        }
        sys::remove_cgroup_tree(&pod.cgroup, CGROUP_DRAIN)
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.state()
            .nodes
            .iter()
            .find(|n| n.node.name == name)
            .map(|n| n.node.clone())
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.state().pods.iter().find(|p| p.name == name).cloned()
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.state().nodes.iter().map(|n| n.node.clone()).collect()
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.state().pods.clone()
    }

    /// Runs `cmd` in the pod's netns and cgroup. Spawn from a thread that outlives the process:
    /// the child gets SIGKILL when the spawning thread exits.
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: Command) -> Result<Proc> {
        self.check_pod(pod)?;
        let label = format!("pod/{}", pod.name);
        self.register(spawn_placed(
            &label,
            cmd,
            Some(&pod.netns),
            Some(&pod.cgroup),
            Some(pod.name.clone()),
        )?)
    }

    /// Runs `cmd` in the node's netns and its `agent` cgroup (same caveat as
    /// [`Cluster::spawn_in_pod`]).
    pub fn spawn_on_node(&self, node: &Node, cmd: Command) -> Result<Proc> {
        self.check_node(node)?;
        let label = format!("node/{}", node.name);
        self.register(spawn_placed(
            &label,
            cmd,
            Some(&node.netns),
            Some(&node.agent_cgroup),
            None,
        )?)
    }

    /// Runs `cmd` in the node's netns and in `<node cgroup>/<cgroup>` (created if absent), so
    /// that what it and its children use can be read from that cgroup alone (same caveat as
    /// [`Cluster::spawn_in_pod`]).
    pub fn spawn_in_node_cgroup(&self, node: &Node, cgroup: &str, cmd: Command) -> Result<Proc> {
        self.check_node(node)?;
        validate_name("cgroup", cgroup)?;
        if matches!(cgroup, "agent" | "pods") {
            bail!("cgroup {cgroup:?} of node {} is the harness's own", node.name);
        }
        let dir = node.cgroup.join(cgroup);
        if !dir.is_dir() {
            fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        let label = format!("node/{}/{cgroup}", node.name);
        self.register(spawn_placed(&label, cmd, Some(&node.netns), Some(&dir), None)?)
    }

    /// Runs `cmd` in network namespace `netns` of this cluster (e.g. [`Cluster::link_netns`]),
    /// in the caller's cgroup.
    pub fn spawn_in_net(&self, netns: &str, cmd: Command) -> Result<Proc> {
        self.check_netns(netns)?;
        self.register(spawn_placed(
            &format!("net/{netns}"),
            cmd,
            Some(netns),
            None,
            None,
        )?)
    }

    /// Runs a short command in the pod (as [`Cluster::spawn_in_pod`]) and waits for it (60 s at
    /// most).
    pub fn exec_in_pod(&self, pod: &Pod, cmd: Command) -> Result<ExecOutput> {
        exec(self.spawn_in_pod(pod, cmd)?)
    }

    /// Runs a short command on the node (as [`Cluster::spawn_on_node`]) and waits for it.
    pub fn exec_on_node(&self, node: &Node, cmd: Command) -> Result<ExecOutput> {
        exec(self.spawn_on_node(node, cmd)?)
    }

    /// Runs a short command in network namespace `netns` of this cluster and waits for it.
    pub fn exec_in_net(&self, netns: &str, cmd: Command) -> Result<ExecOutput> {
        exec(self.spawn_in_net(netns, cmd)?)
    }

    fn check_pod(&self, pod: &Pod) -> Result<()> {
        let st = self.state();
        if st.torn_down || !st.pods.iter().any(|p| p.name == pod.name && p.netns == pod.netns) {
            bail!("pod {} is not in cluster {}", pod.name, self.shared.id);
        }
        Ok(())
    }

    fn check_node(&self, node: &Node) -> Result<()> {
        let st = self.state();
        if st.torn_down || !st.nodes.iter().any(|n| n.node.netns == node.netns) {
            bail!("node {} is not in cluster {}", node.name, self.shared.id);
        }
        Ok(())
    }

    fn check_netns(&self, netns: &str) -> Result<()> {
        let st = self.state();
        let known = netns == self.shared.link_netns
            || st.nodes.iter().any(|n| n.node.netns == netns)
            || st.pods.iter().any(|p| p.netns == netns);
        if st.torn_down || !known {
            bail!("{netns} is not a network namespace of cluster {}", self.shared.id);
        }
        Ok(())
    }

    fn register(&self, shared: Arc<ProcShared>) -> Result<Proc> {
        let mut st = self.state();
        st.procs.retain(|w| w.strong_count() > 0);
        st.procs.push(Arc::downgrade(&shared));
        Ok(Proc { shared })
    }
}

fn exec(proc: Proc) -> Result<ExecOutput> {
    let (status, stdout, stderr) = finish(&proc.shared, EXEC_TIMEOUT)?;
    Ok(ExecOutput {
        status,
        stdout,
        stderr,
    })
}

fn dad_off() -> Vec<(&'static str, &'static str)> {
    vec![
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ]
}

fn routes_to(node: &Node) -> [String; 2] {
    [
        format!("route replace {} via {}", node.pod_cidr4, node.ipv4),
        format!("route replace {} via {}", node.pod_cidr6, node.ipv6),
    ]
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kills processes, deletes namespaces, removes cgroups (deepest first) and the pin dir.
    /// Idempotent; never panics; logs problems.
    fn teardown(&self) {
        let mut st = self.state();
        if st.torn_down {
            return;
        }
        st.torn_down = true;
        let start = Instant::now();
        if let Err(e) = sys::cgroup_kill(&self.cgroup_root) {
            log(&format!("{}: {e:#}", self.id));
        }
        for p in st.procs.drain(..).filter_map(|w| w.upgrade()) {
            p.stop(Duration::ZERO);
        }
        // Everything named with the prefix, also what a failed step left unrecorded.
        let mut netns = sys::netns_with_prefix(&self.prefix);
        netns.sort_by_key(|n| n == &self.link_netns); // the cluster network last
        sys::netns_del_all(&netns);
        if let Err(e) = sys::remove_cgroup_tree(&self.cgroup_root, CGROUP_DRAIN) {
            log(&format!("{}: {e:#}", self.id));
        }
        if let Err(e) = sys::remove_pin_tree(&self.pin_root) {
            log(&format!("{}: {e:#}", self.id));
        }
        let took = start.elapsed();
        if took > Duration::from_secs(2) {
            log(&format!(
                "tearing down {} ({}) took {took:?}",
                self.id, self.test_name
            ));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shared.teardown();
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.shared)));
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.shared.id)
            .field("test", &self.shared.test_name)
            .finish()
    }
}
