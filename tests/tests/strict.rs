//! STRICT fails closed, end to end with the real agent: a neighbour's forged ARP does not move or
//! remove the STRICT program, and the program holds across an agent restart. The evidence is
//! the kernel's own TCX link ids (a link that was detached and attached again has a new id) and
//! plaintext that stays dropped.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{echo_server, testapp};
use mesh_harness::controller::{namespace_yaml, pod_yaml, Controller};
use mesh_harness::frames::{self, RawSocket};
use mesh_harness::{wait_until, Cluster, Node, Pod, Proc};

const WAIT: Duration = Duration::from_secs(20);
const APP: u16 = 8080;

/// One node: `server` in the STRICT namespace `shop`; `client` and `attacker` in `plain`, not
/// enrolled. The server runs an echo server on 8080, and STRICT already drops the client's
/// plaintext.
struct World {
    cluster: Cluster,
    _controller: Controller,
    node: Node,
    server: Pod,
    client: Pod,
    attacker: Pod,
    agent: Agent,
    _echo: Proc,
}

fn world(name: &str) -> Result<World> {
    let cluster = Cluster::new(name)?;
    let node = cluster.add_node("a")?;
    let server = cluster.add_pod("a", "server")?;
    let client = cluster.add_pod("a", "client")?;
    let attacker = cluster.add_pod("a", "attacker")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agent = Agent::new(&node, &controller, &[])?;
    agent.start(&cluster)?;
    let echo = echo_server(&cluster, &server, &[APP])?;
    let mut yaml = namespace_yaml(
        "shop",
        &[("mesh.dev/enroll", "true"), ("mesh.dev/mtls", "strict")],
    );
    yaml.push_str("---\n");
    yaml.push_str(&pod_yaml(&server, "shop", "server", &[("app", "server")]));
    yaml.push_str("---\n");
    yaml.push_str(&namespace_yaml("plain", &[]));
    for pod in [&client, &attacker] {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "plain", "default", &[]));
    }
    controller.apply("world", &yaml)?;
    let w = World {
        cluster,
        _controller: controller,
        node,
        server,
        client,
        attacker,
        agent,
        _echo: echo,
    };
    wait_until(WAIT, "STRICT to drop the client's plaintext", || {
        match w.plaintext_gets_through() {
            Ok(false) => Ok(()),
            Ok(true) => Err("plaintext still gets through".into()),
            Err(e) => Err(format!("{e:#}")),
        }
    })?;
    Ok(w)
}

impl World {
    fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.server.ipv4.into(), APP)
    }

    /// Whether a plain connection from the client reaches the server (a dropped SYN times out).
    fn plaintext_gets_through(&self) -> Result<bool> {
        let mut cmd = testapp()?;
        cmd.args([
            "client",
            "--connect",
            &self.dst().to_string(),
            "--bytes",
            "64",
            "--timeout-ms",
            "1500",
        ]);
        Ok(self.cluster.exec_in_pod(&self.client, cmd)?.status.success())
    }

    /// `ip <args>` in the node's netns, successful.
    fn ip_on_node(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(args);
        Ok(self.cluster.exec_on_node(&self.node, cmd)?.success()?.stdout)
    }

    /// The agent's STRICT links: interface index (from the pin's name) → the kernel's link id
    /// (bpftool on the pin). A link detached and attached again has a new id.
    fn strict_links(&self) -> Result<BTreeMap<u64, u64>> {
        let dir = self.node.pin_dir.join("current");
        let mut links = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(ifindex) = name.strip_prefix("tcx_strict_if") else {
                continue;
            };
            let out = Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(entry.path())
                .output()
                .context("running bpftool")?;
            ensure!(
                out.status.success(),
                "bpftool link show pinned {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let link: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
            links.insert(ifindex.parse()?, link["id"].as_u64().context("a link id")?);
        }
        Ok(links)
    }

    /// The server's host-side veth index in the node's netns.
    fn server_veth(&self) -> Result<u64> {
        let out = self.ip_on_node(&["-j", "link", "show", "dev", &self.server.host_veth])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        json[0]["ifindex"].as_u64().context("no ifindex")
    }

    /// The agent's reconcile rounds so far.
    fn rounds(&self) -> Result<f64> {
        self.agent.metric(&self.cluster, "mesh_reconcile_rounds_total")
    }

    /// Waits until the agent has done `n` more rounds, or the STRICT links differ from `links`
    /// (which the caller then reports).
    fn wait_rounds_or_change(&self, n: f64, links: &BTreeMap<u64, u64>) -> Result<()> {
        let start = self.rounds()?;
        wait_until(WAIT, &format!("{n} more reconcile rounds"), || {
            let now = self.rounds().map_err(|e| format!("{e:#}"))?;
            let current = self.strict_links().map_err(|e| format!("{e:#}"))?;
            if now >= start + n || &current != links {
                Ok(())
            } else {
                Err(format!("rounds {start} → {now}, links {current:?}"))
            }
        })
    }

    /// The only STRICT link is on the server's veth; returns it.
    fn only_server_link(&self) -> Result<BTreeMap<u64, u64>> {
        let links = self.strict_links()?;
        let veth = self.server_veth()?;
        ensure!(
            links.len() == 1 && links.contains_key(&veth),
            "one STRICT link, on the server's veth (if{veth}): {links:?}"
        );
        Ok(links)
    }
}

/// Sends gratuitous ARP from the attacker, "the server's IPv4 is at my MAC", every 50 ms until
/// dropped.
struct ArpSpoofer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl ArpSpoofer {
    fn start(attacker: &Pod, victim: &Pod) -> Result<ArpSpoofer> {
        let raw = RawSocket::open(&attacker.netns, &attacker.ifname)?;
        let frame = frames::gratuitous_arp(frames::mac_of(&attacker.netns, &attacker.ifname)?, victim.ipv4);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<()> {
            while !flag.load(Ordering::Relaxed) {
                raw.send(&frame)?;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        });
        Ok(ArpSpoofer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ArpSpoofer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A co-located pod claims the STRICT pod's address with gratuitous ARP, so that the node's
/// neighbour table (and the bridge's forwarding table) point at the attacker's veth. The STRICT
/// program stays where it is — the same link — and the client's plaintext is still dropped.
#[test]
fn spoofed_arp_neither_moves_nor_removes_strict() -> Result<()> {
    let w = world("strict-arp")?;
    let links = w.only_server_link()?;
    // The client keeps the server's real MAC, so its frames still go to the server's veth.
    let server_mac = frames::mac_of(&w.server.netns, &w.server.ifname)?;
    let mac_text = server_mac.map(|b| format!("{b:02x}")).join(":");
    let mut pin = Command::new("ip");
    pin.args([
        "neigh",
        "replace",
        &w.server.ipv4.to_string(),
        "lladdr",
        &mac_text,
        "dev",
        &w.client.ifname,
        "nud",
        "permanent",
    ]);
    w.cluster.exec_in_pod(&w.client, pin)?.success()?;
    // The node has a neighbour entry for the server (the forgery overwrites it).
    let mut ping = Command::new("ping");
    ping.args(["-c", "1", "-W", "2", &w.server.ipv4.to_string()]);
    w.cluster.exec_on_node(&w.node, ping)?.success()?;

    let attacker_mac = frames::mac_of(&w.attacker.netns, &w.attacker.ifname)?;
    let attacker_text = attacker_mac.map(|b| format!("{b:02x}")).join(":");
    let _spoofer = ArpSpoofer::start(&w.attacker, &w.server)?;
    wait_until(WAIT, "the node's neighbour entry to be forged", || {
        let out = w
            .ip_on_node(&["neigh", "show", &w.server.ipv4.to_string()])
            .map_err(|e| format!("{e:#}"))?;
        out.contains(&attacker_text)
            .then_some(())
            .ok_or(format!("neighbour entry: {out}"))
    })?;

    w.wait_rounds_or_change(3.0, &links)?;
    let after = w.strict_links()?;
    ensure!(
        after == links,
        "the STRICT link stayed on the server's veth, the same link: before {links:?}, after {after:?}"
    );
    ensure!(
        !w.plaintext_gets_through()?,
        "the client's plaintext is still dropped"
    );
    Ok(())
}

/// The agent is killed: STRICT holds while it is down. The node's neighbour entries are gone
/// when it comes back (aged out, or a flush): the new agent still finds the STRICT pod's veth
/// and keeps the very same link.
#[test]
fn strict_holds_across_an_agent_restart() -> Result<()> {
    let mut w = world("strict-restart")?;
    let links = w.only_server_link()?;

    let agent = w.agent.take().context("a running agent")?;
    agent.kill(libc::SIGKILL)?;
    agent.wait_exit(WAIT)?;
    ensure!(
        !w.plaintext_gets_through()?,
        "plaintext is dropped while the agent is down"
    );
    ensure!(w.strict_links()? == links, "the link outlives the agent");
    w.ip_on_node(&["neigh", "flush", "dev", &w.node.bridge])?;

    w.agent.start(&w.cluster)?;
    w.wait_rounds_or_change(3.0, &links)?;
    let after = w.strict_links()?;
    if after != links {
        bail!("the restarted agent moved or re-made the STRICT link: before {links:?}, after {after:?}");
    }
    ensure!(
        !w.plaintext_gets_through()?,
        "plaintext is dropped after the restart"
    );
    Ok(())
}
