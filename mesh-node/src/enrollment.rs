//! Keeps the kernel's enrolled-cgroups map equal to the desired state — this node's enrolled
//! pods as the controller describes them, found by pod UID under the pods cgroup root — on
//! start, whenever the config changes, and periodically, so that drift (a vanished cgroup, a
//! pod whose cgroup appears after its config, a map edited by hand) is repaired unasked. The same
//! rounds keep the mesh destinations (what outbound capture is limited to), inbound capture,
//! STRICT enforcement and the capture routing in place.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use mesh_api::{MtlsMode, Workload};

use crate::cgroups;
use crate::control::NodeState;
use crate::ebpf::{self, Datapath, DestKind, Mode};
use crate::netlink::{self, CaptureRouting};
use crate::strict::{self, StrictMemory};

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

/// The destinations the mesh serves, in this node's view: every Service VIP (both families)
/// and every enrolled pod's address, on any node. An enrolled pod's connect is captured only
/// to these; everything else leaves the pod untouched.
pub fn destinations(state: &NodeState) -> BTreeMap<IpAddr, DestKind> {
    let mut out: BTreeMap<IpAddr, DestKind> = BTreeMap::new();
    for ip in state.service_vips() {
        out.entry(ip.to_canonical()).or_default().service_vip = true;
    }
    for ip in state.enrolled_ips() {
        out.entry(ip.to_canonical()).or_default().workload = true;
    }
    out
}

/// What the last round found, for the admin API and the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// The cgroup directory of each local pod found.
    pub cgroups: BTreeMap<String, PathBuf>,
    /// The pods whose cgroup is in the enrolled map.
    pub captured: BTreeSet<String>,
    /// What could not be done, by workload or component.
    pub problems: BTreeMap<String, String>,
    /// Enrolled pods whose host-side interface was not found → why. Their last attachment stays.
    pub strict_unresolved: BTreeMap<String, String>,
    /// Enrolled pods' addresses whose veth programs are attached (`strict::Enforced::ready`).
    pub veths_ready: BTreeSet<IpAddr>,
    /// Mesh destinations that did not fit in the kernel map (not captured).
    pub destinations_left_out: usize,
    /// Rounds done since the agent started (this one included).
    pub round: u64,
    /// How long this round took.
    pub duration: Duration,
}

/// Where this node's kernel state lives besides the maps: the pods' cgroup root, and the
/// uplink and routing that capture inbound HBONE.
pub struct Kernel {
    pub pods_root: PathBuf,
    pub routing: CaptureRouting,
}

/// Reconciles until `stop`, publishing each round's [`Report`] on `report`. Blocking: the rounds
/// read files, walk cgroups and talk to the kernel, so this runs on a thread of its own
/// (`tokio::task::spawn_blocking`), never on the proxy's async workers. It owns the datapath;
/// readers (metrics, admin API) use their own handle ([`Datapath::reopen`]), so none of them
/// ever waits for a round.
pub fn run(
    mut datapath: Datapath,
    mut config: watch::Receiver<Arc<NodeState>>,
    kernel: Kernel,
    interval: Duration,
    report: watch::Sender<Arc<Report>>,
    stop: CancellationToken,
) {
    let runtime = tokio::runtime::Handle::current();
    // Problems are logged when they change, not on every round.
    let mut last_problems = BTreeMap::new();
    let mut memory = StrictMemory::default();
    let mut rounds = 0;
    loop {
        let state = config.borrow_and_update().clone();
        // Before the first config, the kernel's pinned state is the best knowledge there is
        // (a restarted agent's); reconciling against nothing would stop capture.
        if state.has_config() {
            let started = Instant::now();
            let mut round = reconcile(&mut datapath, &state, &kernel, &mut memory);
            rounds += 1;
            round.round = rounds;
            round.duration = started.elapsed();
            for (what, reason) in &round.problems {
                if last_problems.get(what) != Some(reason) {
                    warn!(%what, %reason, "not fully captured yet");
                }
            }
            last_problems = round.problems.clone();
            report.send_replace(Arc::new(round));
        }
        let go_on = runtime.block_on(async {
            tokio::select! {
                _ = stop.cancelled() => false,
                _ = tokio::time::sleep(interval), if state.has_config() => true,
                changed = config.changed() => {
                    if changed.is_err() {
                        // The control client is gone (shutdown); keep reconciling the last state.
                        tokio::select! {
                            _ = stop.cancelled() => return false,
                            _ = tokio::time::sleep(interval) => {}
                        }
                    }
                    true
                }
            }
        });
        if !go_on {
            return;
        }
    }
}

/// One round: enrolled cgroups, inbound pod addresses, pod veths, capture routing. Reports
/// what it found and what could not be done (by workload or component), to retry next round.
fn reconcile(
    datapath: &mut Datapath,
    state: &NodeState,
    kernel: &Kernel,
    memory: &mut StrictMemory,
) -> Report {
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

    let mut destinations_left_out = 0;
    match datapath.set_destinations(&destinations(state)) {
        Ok(diff) => {
            if !diff.added.is_empty() || !diff.removed.is_empty() {
                // Cluster-wide, so possibly many: counted at info, listed at debug.
                info!(
                    added = diff.added.len(),
                    removed = diff.removed.len(),
                    "mesh destinations updated"
                );
                debug!(added = ?diff.added, removed = ?diff.removed, "mesh destinations changed");
            }
            if diff.left_out > 0 {
                destinations_left_out = diff.left_out;
                problems.insert(
                    "mesh destinations map".into(),
                    format!(
                        "full: {} addresses do not fit (at most {}); connects to them are not captured",
                        diff.left_out,
                        ebpf::DESTINATIONS_MAX_ENTRIES
                    ),
                );
            }
        }
        Err(e) => {
            problems.insert("mesh destinations map".into(), e.to_string());
        }
    }

    let ips: BTreeMap<IpAddr, Mode> = state
        .enrolled_local()
        .flat_map(|w| w.ips.iter().map(|ip| (*ip, mode(state, w))))
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

    let cgroup_dirs: BTreeMap<String, PathBuf> = workloads
        .into_iter()
        .map(|w| (format!("{}/{}", w.namespace, w.name), w.cgroup))
        .collect();
    let enforced = strict::enforce(datapath, state, &cgroup_dirs, memory, &mut problems);
    if let Err(e) = netlink::ensure_capture_routing(&kernel.routing) {
        problems.insert("capture routing".into(), e.to_string());
    }
    Report {
        cgroups: cgroup_dirs,
        captured,
        problems,
        strict_unresolved: enforced.unresolved,
        veths_ready: enforced.ready,
        destinations_left_out,
        ..Report::default()
    }
}

/// The kernel's view of a local enrolled pod's mode.
fn mode(state: &NodeState, w: &Workload) -> Mode {
    match w.mtls_mode {
        MtlsMode::Strict => Mode::Strict,
        MtlsMode::Permissive => Mode::Permissive {
            policed: state
                .policies
                .values()
                .any(|p| p.selects(&w.namespace, &w.labels)),
        },
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
    fn destinations_are_vips_and_enrolled_pods_in_canonical_form() {
        use mesh_api::{NodeView, Service, Update, UpdateKind, Version};
        let pod = |uid: &str, node: &str, ips: &[&str], enrolled: bool| Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            node: node.into(),
            service_account: "sa".into(),
            identity: "spiffe://cluster.local/ns/ns/sa/sa".parse().unwrap(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            enrolled,
            mtls_mode: MtlsMode::Strict,
            labels: BTreeMap::new(),
        };
        let mut view = NodeView::default();
        view.insert_workload(pod("here", "a", &["10.1.1.10", "fd00:1:1::10"], true));
        view.insert_workload(pod("there", "b", &["::ffff:10.1.2.10"], true));
        view.insert_workload(pod("outside", "b", &["10.1.2.11"], false));
        view.insert_service(Service {
            namespace: "ns".into(),
            name: "svc".into(),
            vips: vec!["10.96.0.1".parse().unwrap(), "fd00:96::1".parse().unwrap()],
            ports: vec![],
            endpoints: vec![],
        });
        let update = Update {
            version: Version {
                epoch: "e".into(),
                number: 1,
            },
            kind: UpdateKind::Snapshot(view),
        };
        let state = crate::control::apply(&NodeState::new("a"), update).unwrap();
        let got: Vec<(String, DestKind)> = destinations(&state)
            .into_iter()
            .map(|(ip, k)| (ip.to_string(), k))
            .collect();
        let vip = DestKind {
            service_vip: true,
            workload: false,
        };
        let pod = DestKind {
            service_vip: false,
            workload: true,
        };
        assert_eq!(
            got,
            [
                ("10.1.1.10".to_owned(), pod),
                ("10.1.2.10".to_owned(), pod),
                ("10.96.0.1".to_owned(), vip),
                ("fd00:1:1::10".to_owned(), pod),
                ("fd00:96::1".to_owned(), vip),
            ]
        );
    }

    #[test]
    fn nothing_desired_from_nothing() {
        assert_eq!(desired::<&str>(&[], |_| Ok(1)), Desired::default());
    }
}
