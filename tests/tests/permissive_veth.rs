//! PERMISSIVE holds at the pod's veth: plaintext from outside the mesh that the steering does
//! not see — a pod's own hand-made SYN, a connection to a Service VIP that the node DNATs to
//! the pod — is dropped on its way into a PERMISSIVE pod that a policy selects, while the
//! node's own connections (the kubelet's probes) still get in; into one that no policy selects
//! it passes (there is nothing to go around). Evidence: SYN-ACKs (or their absence) on the wire, the
//! echo server's accepts, and the kernel's counters (`permissive_dropped`,
//! `permissive_allowed_node`) read from the agent's metrics.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{accept_peer, client_cmd, echo_server};
use mesh_harness::controller::{namespace_yaml, pod_yaml, Controller};
use mesh_harness::frames::{self, RawSocket, Syn};
use mesh_harness::{wait_until, Cluster, Node, Pod, Proc};

const WAIT: Duration = Duration::from_secs(20);
const APP: u16 = 8080;
/// A made-up Service VIP and port, DNAT'd by the node to the server's `APP`.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_PORT: u16 = 80;
/// A port the agent excludes from capture in [`an_enrolled_pods_excluded_port_to_a_permissive_pod_goes_through_the_plaintext_listener`].
const EXCLUDED: u16 = 9090;

/// One node: `server` (an echo server on `APP`) in `shop`, `outsider` in `plain` (never
/// enrolled).
struct World {
    cluster: Cluster,
    controller: Controller,
    node: Node,
    server: Pod,
    outsider: Pod,
    agent: Agent,
    echo: Proc,
}

fn world(name: &str) -> Result<World> {
    world_with(name, &[])
}

/// [`world`] with extra arguments for the agent.
fn world_with(name: &str, agent_args: &[&str]) -> Result<World> {
    let cluster = Cluster::new(name)?;
    let node = cluster.add_node("a")?;
    let server = cluster.add_pod("a", "server")?;
    let outsider = cluster.add_pod("a", "outsider")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agent = Agent::new(&node, &controller, agent_args)?;
    agent.start(&cluster)?;
    let echo = echo_server(&cluster, &server, &[APP, EXCLUDED])?;
    let mut plain = namespace_yaml("plain", &[]);
    plain.push_str("---\n");
    plain.push_str(&pod_yaml(&outsider, "plain", "default", &[]));
    controller.apply("plain", &plain)?;
    let w = World {
        cluster,
        controller,
        node,
        server,
        outsider,
        agent,
        echo,
    };
    w.shop(false)?;
    Ok(w)
}

impl World {
    /// (Re)writes namespace `shop` with the server and `members`, enrolled PERMISSIVE or not
    /// enrolled; `policed`: with a policy that selects the server (a DENY of a port nobody
    /// uses, so it refuses nothing here), which is what makes its veth drop unsteered plaintext.
    fn shop_with(&self, enrolled: bool, policed: bool, members: &[&Pod]) -> Result<()> {
        let labels: &[(&str, &str)] = if enrolled {
            &[("mesh.dev/enroll", "true"), ("mesh.dev/mtls", "permissive")]
        } else {
            &[]
        };
        let mut yaml = namespace_yaml("shop", labels);
        for pod in std::iter::once(&self.server).chain(members.iter().copied()) {
            yaml.push_str("---\n");
            yaml.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
        }
        if policed {
            yaml.push_str(
                "---\napiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {name: deny-port-1, namespace: shop}\n\
                 spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  \
                 rules: [{to: [{operation: {ports: [\"1\"]}}]}]\n",
            );
        }
        self.controller.apply("shop", &yaml)
    }

    fn shop(&self, enrolled: bool) -> Result<()> {
        self.shop_with(enrolled, enrolled, &[])
    }

    fn enroll(&self) -> Result<()> {
        self.enroll_as(true)
    }

    /// Enrolls `shop` (`policed`: see [`World::shop_with`]) and waits until the outsider's
    /// plaintext is steered through the proxy: the server's address is then in the kernel's map
    /// as PERMISSIVE.
    fn enroll_as(&self, policed: bool) -> Result<()> {
        self.shop_with(true, policed, &[])?;
        let before = self.event("plain_redirected")?;
        wait_until(
            WAIT,
            "the outsider's plaintext to be steered to the proxy",
            || {
                let ok = self
                    .exchange(Some(&self.outsider), self.dst())
                    .map_err(|e| format!("{e:#}"))?;
                let now = self.event("plain_redirected").map_err(|e| format!("{e:#}"))?;
                (ok && now > before)
                    .then_some(())
                    .ok_or(format!("exchange ok={ok}, plain_redirected {before} → {now}"))
            },
        )
    }

    fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.server.ipv4.into(), APP)
    }

    /// One echo exchange to `dst` from `pod`, or from the node's own netns (outside the pods'
    /// cgroup, as the kubelet is): whether it completed.
    fn exchange(&self, pod: Option<&Pod>, dst: SocketAddr) -> Result<bool> {
        let cmd = client_cmd(dst, 64, 1500)?;
        let out = match pod {
            Some(pod) => self.cluster.exec_in_pod(pod, cmd)?,
            None => self.cluster.exec_on_node(&self.node, cmd)?,
        };
        Ok(out.status.success())
    }

    /// Has the node DNAT the made-up Service `VIP:VIP_PORT` to the server's `APP`, as
    /// kube-proxy does (and, for a client on the same bridge, masquerade, so that the reply
    /// comes back through the node).
    fn dnat_vip(&self) -> Result<SocketAddr> {
        let nft = Command::new("nft").arg("--version").output();
        if !nft.as_ref().is_ok_and(|o| o.status.success()) {
            bail!("nft is missing (package nftables, installed by xtask/scripts/setup.sh): {nft:?}");
        }
        let rules = std::env::temp_dir().join(format!("{}-vip.nft", self.cluster.id()));
        std::fs::write(
            &rules,
            format!(
                "table ip mesh_test_vip {{\n\
                 chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n\
                 ip daddr {VIP} tcp dport {VIP_PORT} dnat to {server}:{APP}\n}}\n\
                 chain post {{ type nat hook postrouting priority srcnat; policy accept;\n\
                 ct status dnat ip daddr {server} tcp dport {APP} masquerade\n}}\n}}\n",
                server = self.server.ipv4
            ),
        )?;
        let mut load = Command::new("nft");
        load.arg("-f").arg(&rules);
        let loaded = self.cluster.exec_on_node(&self.node, load);
        std::fs::remove_file(&rules)?;
        loaded?.success().context("loading the VIP's DNAT rules")?;
        Ok(SocketAddr::new(VIP.into(), VIP_PORT))
    }

    /// A kernel counter of the node, from the agent's metrics.
    fn event(&self, name: &str) -> Result<f64> {
        self.agent
            .metric_sum(&self.cluster, "mesh_bpf_events_total", &[("event", name)])
    }

    /// How many connections the echo server has accepted so far.
    fn accepts(&self) -> usize {
        self.echo
            .lines()
            .iter()
            .filter(|(_, l)| l.contains(r#""event":"accept""#))
            .count()
    }
}

/// A non-enrolled pod on the same node writes its own TCP SYN to the PERMISSIVE pod on its
/// link (a raw socket, as CAP_NET_RAW allows): connect4 never sees it, and the node bridges it
/// straight to the pod. It is dropped at the pod's veth.
#[test]
fn a_hand_made_syn_from_a_same_node_pod_does_not_reach_a_permissive_pod() -> Result<()> {
    let w = world("pveth-raw")?;
    w.enroll()?;
    let raw = RawSocket::open(&w.outsider.netns, &w.outsider.ifname)?;
    let mut syn = Syn {
        dst_mac: frames::mac_of(&w.server.netns, &w.server.ifname)?,
        src_mac: frames::mac_of(&w.outsider.netns, &w.outsider.ifname)?,
        tags: Vec::new(),
        src: w.outsider.ipv4,
        dst: w.server.ipv4,
        src_port: 41000,
        dst_port: APP,
    };
    let dropped_before = w.event("permissive_dropped")?;
    wait_until(
        WAIT,
        "the hand-made SYN to be dropped at the server's veth",
        || {
            syn.src_port += 1;
            raw.send(&syn.frame()).map_err(|e| format!("{e:#}"))?;
            let answer = raw
                .recv_matching(Duration::from_secs(2), |f| syn.is_answered_by(f))
                .map_err(|e| format!("{e:#}"))?;
            if answer.is_some() {
                return Err(format!("the server answered the SYN from port {}", syn.src_port));
            }
            let dropped = w.event("permissive_dropped").map_err(|e| format!("{e:#}"))?;
            (dropped > dropped_before)
                .then_some(())
                .ok_or(format!("unanswered, but permissive_dropped is still {dropped}"))
        },
    )?;
    // Steady state: none gets through.
    for _ in 0..3 {
        syn.src_port += 1;
        raw.send(&syn.frame())?;
        let answer = raw.recv_matching(Duration::from_secs(1), |f| syn.is_answered_by(f))?;
        ensure!(
            answer.is_none(),
            "the server answered a hand-made SYN: {answer:?}"
        );
    }
    // Fail-closed parsing holds for PERMISSIVE pods too: an 802.1Q-tagged SYN is dropped whole.
    let strict_before = w.event("strict_dropped")?;
    let mut tagged = Syn {
        tags: vec![(frames::ETH_P_8021Q, 0)],
        ..syn
    };
    tagged.src_port += 1;
    raw.send(&tagged.frame())?;
    let answer = raw.recv_matching(Duration::from_secs(1), |f| tagged.is_answered_by(f))?;
    ensure!(answer.is_none(), "the server answered a tagged SYN: {answer:?}");
    wait_until(WAIT, "the tagged SYN to be counted as dropped", || {
        let now = w.event("strict_dropped").map_err(|e| format!("{e:#}"))?;
        (now > strict_before)
            .then_some(())
            .ok_or(format!("strict_dropped still {now}"))
    })?;
    // A plain TCP socket in the pod's netns but outside the pods' cgroup (no connect4 there):
    // its SYN is bridged to the server with the socket attached until it leaves the pod's
    // netns. Dropped all the same.
    let cmd = client_cmd(w.dst(), 64, 1500)?;
    let out = w.cluster.exec_in_net(&w.outsider.netns, cmd)?;
    ensure!(
        !out.status.success(),
        "a socket of the pod's netns outside its cgroup reached the server: {}",
        out.stdout
    );
    println!(
        "permissive_dropped {dropped_before} → {}",
        w.event("permissive_dropped")?
    );
    Ok(())
}

/// kube-proxy's way to a Service: the node DNATs a VIP to the PERMISSIVE pod (and, for a
/// client on the same bridge, masquerades, so that the reply comes back through the node).
/// connect4 sees the VIP, not a pod, and does not steer; the DNAT'd SYN is forwarded by the
/// node. Before the pod is meshed the VIP works; once it is meshed, the SYN is dropped at the
/// pod's veth and the app sees nothing of it (it is not steered: the VIP's connections go
/// nowhere rather than around the pod's policy).
#[test]
fn a_service_vip_dnated_by_the_node_does_not_go_around_the_proxy() -> Result<()> {
    let w = world("pveth-vip")?;
    let vip = w.dnat_vip()?;

    let accepted = w.accepts();
    ensure!(
        w.exchange(Some(&w.outsider), vip)?,
        "the VIP works before the pod is meshed"
    );
    wait_until(WAIT, "the app's accept of the VIP's connection", || {
        (w.accepts() > accepted)
            .then_some(())
            .ok_or(format!("{} accepts", w.accepts()))
    })?;

    w.enroll()?;
    let dropped_before = w.event("permissive_dropped")?;
    wait_until(
        WAIT,
        "the VIP's connection to be dropped at the server's veth",
        || {
            if w.exchange(Some(&w.outsider), vip).map_err(|e| format!("{e:#}"))? {
                return Err("the VIP's connection reached the pod".into());
            }
            let dropped = w.event("permissive_dropped").map_err(|e| format!("{e:#}"))?;
            (dropped > dropped_before)
                .then_some(())
                .ok_or(format!("refused, but permissive_dropped is still {dropped}"))
        },
    )?;
    let accepted = w.accepts();
    ensure!(
        !w.exchange(Some(&w.outsider), vip)?,
        "the VIP's connection stays refused"
    );
    ensure!(
        w.accepts() == accepted,
        "the app accepted nothing through the VIP"
    );
    println!(
        "permissive_dropped {dropped_before} → {}",
        w.event("permissive_dropped")?
    );
    Ok(())
}

/// With no policy selecting a PERMISSIVE pod there is nothing to go around, and dropping would
/// only break clients outside the mesh: a connection the node DNATs to it (kube-proxy's Service
/// VIP, from a pod of the same node) still reaches it, counted as
/// `permissive_allowed_unpoliced`. Once a policy selects the pod, the same connection is
/// dropped at its veth.
#[test]
fn a_vip_the_node_dnats_reaches_a_permissive_pod_until_a_policy_selects_it() -> Result<()> {
    let w = world("pveth-unpol")?;
    let vip = w.dnat_vip()?;
    w.enroll_as(false)?;
    let allowed_before = w.event("permissive_allowed_unpoliced")?;
    wait_until(
        WAIT,
        "the VIP's connection to pass the veth of a pod no policy selects",
        || {
            let accepted = w.accepts();
            if !w.exchange(Some(&w.outsider), vip).map_err(|e| format!("{e:#}"))? {
                return Err("the VIP's connection to the pod failed".into());
            }
            if w.accepts() <= accepted {
                return Err("the app did not accept the VIP's connection".into());
            }
            let allowed = w
                .event("permissive_allowed_unpoliced")
                .map_err(|e| format!("{e:#}"))?;
            (allowed > allowed_before)
                .then_some(())
                .ok_or(format!("permissive_allowed_unpoliced still {allowed}"))
        },
    )?;
    w.enroll_as(true)?;
    let dropped_before = w.event("permissive_dropped")?;
    wait_until(
        WAIT,
        "the VIP's connection to be dropped once a policy selects the pod",
        || {
            if w.exchange(Some(&w.outsider), vip).map_err(|e| format!("{e:#}"))? {
                return Err("the VIP's connection still reaches the pod".into());
            }
            let dropped = w.event("permissive_dropped").map_err(|e| format!("{e:#}"))?;
            (dropped > dropped_before)
                .then_some(())
                .ok_or(format!("refused, but permissive_dropped is still {dropped}"))
        },
    )?;
    Ok(())
}

/// The node's own connections (a kubelet probe, from the node's netns and outside the pods'
/// cgroup: neither steered nor marked) still reach a PERMISSIVE pod.
#[test]
fn a_connection_from_the_node_itself_reaches_a_permissive_pod() -> Result<()> {
    let w = world("pveth-probe")?;
    w.enroll()?;
    // Steering is on once `enroll` returns; the veth's link follows in the same round.
    let allowed_before = w.event("permissive_allowed_node")?;
    wait_until(
        WAIT,
        "the node's connection to pass the pod's veth as the node's own",
        || {
            let accepted = w.accepts();
            let ok = w.exchange(None, w.dst()).map_err(|e| format!("{e:#}"))?;
            if !ok {
                return Err("the node's connection to the PERMISSIVE pod failed".into());
            }
            if w.accepts() <= accepted {
                return Err("the app did not accept the node's connection".into());
            }
            let allowed = w.event("permissive_allowed_node").map_err(|e| format!("{e:#}"))?;
            (allowed > allowed_before)
                .then_some(())
                .ok_or(format!("permissive_allowed_node still {allowed}"))
        },
    )?;
    Ok(())
}

/// An enrolled pod whose connection an exclusion leaves uncaptured (`--exclude-port`) is, as
/// far as a PERMISSIVE pod of the same node is concerned, plaintext from outside the mesh: it
/// goes through the plaintext listener (as it would from another node), neither around the
/// proxy nor into the pod's veth to be dropped.
#[test]
fn an_enrolled_pods_excluded_port_to_a_permissive_pod_goes_through_the_plaintext_listener() -> Result<()> {
    let w = world_with("pveth-excl", &["--exclude-port", &EXCLUDED.to_string()])?;
    let client = w.cluster.add_pod("a", "client")?;
    w.shop_with(true, true, &[&client])?;
    w.agent.wait_enrolled(&[&w.server, &client])?;
    w.agent.wait_veth_ready(&w.cluster, &[&w.server])?;
    let dst = SocketAddr::new(w.server.ipv4.into(), EXCLUDED);
    let redirected_before = w.event("plain_redirected")?;
    wait_until(
        WAIT,
        "the excluded port's connection to pass through the proxy",
        || {
            let ok = w.exchange(Some(&client), dst).map_err(|e| format!("{e:#}"))?;
            let now = w.event("plain_redirected").map_err(|e| format!("{e:#}"))?;
            (ok && now > redirected_before).then_some(()).ok_or(format!(
                "exchange ok={ok}, plain_redirected {redirected_before} → {now}"
            ))
        },
    )?;
    // Through the plaintext listener (counted above), delivered from the client's own address.
    let peer = accept_peer(&w.echo, w.accepts())?;
    ensure!(
        peer.ip() == IpAddr::from(client.ipv4),
        "the pod sees the client pod (it saw {peer})"
    );
    Ok(())
}
