//! Keeps the kernel's enrolled-cgroups map equal to the desired state — this node's enrolled
//! pods as the controller describes them, found by pod UID under the pods cgroup root — on
//! start, whenever the config changes, and periodically, so that drift (a vanished cgroup, a
//! pod whose cgroup appears after its config, a map edited by hand) is repaired unasked.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use mesh_api::MtlsMode;

use crate::cgroups;
use crate::control::NodeState;
use crate::ebpf::{self, Datapath, Mode};
use crate::netlink::{self, CaptureRouting};

/// An enrolled pod of this node and its cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalWorkload {
    pub namespace: String,
    pub name: String,
    /// The pod's cgroup v2 directory; processes in it or below it are captured.
    pub cgroup: PathBuf,
}

/// What the kernel should hold, and the workloads that cannot be enrolled right now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub cgroups: BTreeMap<u64, String>,
    /// `namespace/name` → why it is left out (its cgroup is gone or not yet created).
    pub unresolved: BTreeMap<String, String>,
}

pub fn desired<E: std::fmt::Display>(
    workloads: &[LocalWorkload],
    cgroup_id: impl Fn(&Path) -> Result<u64, E>,
) -> Desired {
    let mut d = Desired::default();
    for w in workloads {
        let key = format!("{}/{}", w.namespace, w.name);
        match cgroup_id(&w.cgroup) {
            Ok(id) => {
                d.cgroups.insert(id, key);
            }
            Err(e) => {
                d.unresolved.insert(key, e.to_string());
            }
        }
    }
    d
}

/// What the last round found, for the admin API: workloads by `namespace/name`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// The cgroup directory of each local pod found.
    pub cgroups: BTreeMap<String, PathBuf>,
    /// The pods whose cgroup is in the enrolled map.
    pub captured: BTreeSet<String>,
    /// What could not be done, by workload or component.
    pub problems: BTreeMap<String, String>,
}

/// Where this node's kernel state lives besides the maps: the pods' cgroup root, and the
/// uplink and routing that capture inbound HBONE.
pub struct Kernel {
    pub pods_root: PathBuf,
    pub routing: CaptureRouting,
}

/// Reconciles until `stop`, publishing each round's [`Report`] on `report`. The datapath is
/// shared with the admin API, which reads it between rounds.
pub async fn run(
    datapath: Arc<Mutex<Datapath>>,
    mut config: watch::Receiver<Arc<NodeState>>,
    kernel: Kernel,
    interval: Duration,
    report: watch::Sender<Arc<Report>>,
    stop: CancellationToken,
) {
    // Problems are logged when they change, not on every round.
    let mut last_problems = BTreeMap::new();
    loop {
        let state = config.borrow_and_update().clone();
        // Before the first config, the kernel's pinned state is the best knowledge there is
        // (a restarted agent's); reconciling against nothing would stop capture.
        if state.has_config() {
            let round = {
                let mut dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
                reconcile(&mut dp, &state, &kernel)
            };
            for (what, reason) in &round.problems {
                if last_problems.get(what) != Some(reason) {
                    warn!(%what, %reason, "not fully captured yet");
                }
            }
            last_problems = round.problems.clone();
            report.send_replace(Arc::new(round));
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval), if state.has_config() => {}
            changed = config.changed() => if changed.is_err() {
                // The control client is gone (shutdown); keep reconciling the last state.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            },
        }
    }
}

/// One round: enrolled cgroups, inbound pod addresses, STRICT veths, capture routing. Reports
/// what it found and what could not be done (by workload or component), to retry next round.
fn reconcile(datapath: &mut Datapath, state: &NodeState, kernel: &Kernel) -> Report {
    let mut problems = BTreeMap::new();
    let workloads = match cgroups::resolve_enrolled(state, &kernel.pods_root) {
        Ok(r) => {
            for pod in r.missing {
                problems.insert(pod, "no cgroup directory (yet)".to_owned());
            }
            r.workloads
        }
        Err(e) => {
            let root = kernel.pods_root.display().to_string();
            problems.insert(root, format!("scanning the pods cgroup: {e}"));
            Vec::new()
        }
    };
    let want = desired(&workloads, ebpf::cgroup_id);
    problems.extend(want.unresolved);
    let ids: BTreeSet<u64> = want.cgroups.keys().copied().collect();
    let mut captured = BTreeSet::new();
    match datapath.set_enrolled(&ids) {
        Ok(diff) => {
            captured = want.cgroups.values().cloned().collect();
            for id in &diff.added {
                info!(
                    cgroup_id = id,
                    workload = want.cgroups.get(id).map(String::as_str),
                    "enrolled"
                );
            }
            for id in &diff.removed {
                info!(cgroup_id = id, "unenrolled");
            }
        }
        Err(e) => {
            problems.insert("enrolled-cgroups map".into(), e.to_string());
        }
    }

    let ips: BTreeMap<IpAddr, Mode> = state
        .enrolled_local()
        .flat_map(|w| w.ips.iter().map(|ip| (*ip, mode(w.mtls_mode))))
        .collect();
    match datapath.set_inbound(&kernel.routing.uplink, &ips) {
        Ok(diff) if !diff.ips_added.is_empty() || !diff.ips_removed.is_empty() => {
            info!(added = ?diff.ips_added, removed = ?diff.ips_removed, "inbound capture updated");
        }
        Ok(_) => {}
        Err(e) => {
            problems.insert("inbound capture".into(), e.to_string());
        }
    }

    let mut veths = BTreeMap::new();
    for w in state.enrolled_local() {
        let key = format!("{}/{}", w.namespace, w.name);
        match w.ips.first().map(|ip| netlink::host_interface_of(*ip)) {
            Some(Ok(Some(veth))) => {
                veths.insert(veth, mode(w.mtls_mode));
            }
            Some(Ok(None)) => {
                // On a bridged pod network the veth is found through the bridge's neighbour
                // and forwarding tables, which know a pod only once the node has talked to it.
                if let Some(ip) = w.ips.first() {
                    prime_neighbour(*ip);
                }
                problems.insert(key, "host-side interface not found (yet)".into());
            }
            None => {
                problems.insert(key, "pod has no address".into());
            }
            Some(Err(e)) => {
                problems.insert(key, e.to_string());
            }
        }
    }
    match datapath.set_strict(&veths) {
        Ok(diff) => {
            if !diff.attached.is_empty() || !diff.detached.is_empty() {
                info!(strict = ?diff.attached, permissive = ?diff.detached, "STRICT enforcement updated");
            }
            problems.extend(diff.unresolved);
        }
        Err(e) => {
            problems.insert("STRICT".into(), e.to_string());
        }
    }
    if let Err(e) = netlink::ensure_capture_routing(&kernel.routing) {
        problems.insert("capture routing".into(), e.to_string());
    }
    Report {
        cgroups: workloads
            .into_iter()
            .map(|w| (format!("{}/{}", w.namespace, w.name), w.cgroup))
            .collect(),
        captured,
        problems,
    }
}

/// One empty datagram to the discard port makes the kernel resolve the pod's address, so the
/// next round finds its veth. UDP passes STRICT, and a lost datagram is retried next round.
fn prime_neighbour(ip: IpAddr) {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    if let Ok(socket) = std::net::UdpSocket::bind(bind) {
        let _ = socket.send_to(&[], (ip, DISCARD_PORT));
    }
}

const DISCARD_PORT: u16 = 9;

fn mode(mtls: MtlsMode) -> Mode {
    match mtls {
        MtlsMode::Strict => Mode::Strict,
        MtlsMode::Permissive => Mode::Permissive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn w(name: &str, cgroup: &str) -> LocalWorkload {
        LocalWorkload {
            namespace: "ns".into(),
            name: name.into(),
            cgroup: PathBuf::from(cgroup),
        }
    }

    #[test]
    fn resolves_present_cgroups_and_reports_missing_ones() {
        let resolve = |p: &Path| match p.to_str() {
            Some("/cg/a") => Ok(11),
            Some("/cg/b") => Ok(12),
            _ => Err("no such cgroup"),
        };
        let d = desired(
            &[w("a", "/cg/a"), w("b", "/cg/b"), w("gone", "/cg/gone")],
            resolve,
        );
        assert_eq!(d.cgroups.keys().copied().collect::<Vec<_>>(), vec![11, 12]);
        assert_eq!(d.cgroups[&11], "ns/a");
        assert_eq!(
            d.unresolved.get("ns/gone").map(String::as_str),
            Some("no such cgroup")
        );
    }

    #[test]
    fn nothing_desired_from_nothing() {
        assert_eq!(desired::<&str>(&[], |_| Ok(1)), Desired::default());
    }
}
