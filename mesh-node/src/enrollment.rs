//! Keeps the kernel's enrolled-cgroups map equal to the desired state — this node's enrolled
//! pods as the controller describes them, found by pod UID under the pods cgroup root — on
//! start, whenever the config changes, and periodically, so that drift (a vanished cgroup, a
//! pod whose cgroup appears after its config, a map edited by hand) is repaired unasked. The same
//! rounds keep inbound capture, STRICT enforcement and the capture routing in place.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use mesh_api::MtlsMode;

use crate::cgroups;
use crate::control::NodeState;
use crate::ebpf::{self, Datapath, Keep};
use crate::netlink::{self, CaptureRouting};
use crate::pod_veth;

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

/// What the last round found, for the admin API and the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// The cgroup directory of each local pod found.
    pub cgroups: BTreeMap<String, PathBuf>,
    /// The pods whose cgroup is in the enrolled map.
    pub captured: BTreeSet<String>,
    /// What could not be done, by workload or component.
    pub problems: BTreeMap<String, String>,
    /// STRICT pods whose host-side interface was not found → why. Their last attachment stays.
    pub strict_unresolved: BTreeMap<String, String>,
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
    let mut strict = StrictMemory::default();
    let mut rounds = 0;
    loop {
        let state = config.borrow_and_update().clone();
        // Before the first config, the kernel's pinned state is the best knowledge there is
        // (a restarted agent's); reconciling against nothing would stop capture.
        if state.has_config() {
            let started = Instant::now();
            let mut round = reconcile(&mut datapath, &state, &kernel, &mut strict);
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

/// One round: enrolled cgroups, inbound pod addresses, STRICT veths, capture routing. Reports
/// what it found and what could not be done (by workload or component), to retry next round.
fn reconcile(
    datapath: &mut Datapath,
    state: &NodeState,
    kernel: &Kernel,
    strict: &mut StrictMemory,
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

    let ips: BTreeSet<IpAddr> = state
        .enrolled_local()
        .flat_map(|w| w.ips.iter().copied())
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
    let strict_unresolved = enforce_strict(datapath, state, &cgroup_dirs, strict, &mut problems);
    if let Err(e) = netlink::ensure_capture_routing(&kernel.routing) {
        problems.insert("capture routing".into(), e.to_string());
    }
    Report {
        cgroups: cgroup_dirs,
        captured,
        problems,
        strict_unresolved,
        ..Report::default()
    }
}

/// Finds the STRICT pods' host-side veths from their own network namespaces and attaches the
/// STRICT program to them, keeping the last attachment of any pod not found. Returns the STRICT
/// pods not found, → why.
fn enforce_strict(
    datapath: &mut Datapath,
    state: &NodeState,
    cgroup_dirs: &BTreeMap<String, PathBuf>,
    memory: &mut StrictMemory,
    problems: &mut BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut outcomes = BTreeMap::new();
    let mut lookups = BTreeMap::new();
    for w in state.enrolled_local().filter(|w| w.mtls_mode == MtlsMode::Strict) {
        let key = format!("{}/{}", w.namespace, w.name);
        match (cgroup_dirs.get(&key), w.ips.first()) {
            (Some(cgroup), Some(ip)) => {
                lookups.insert(
                    key,
                    pod_veth::Pod {
                        cgroup: cgroup.clone(),
                        ip: *ip,
                    },
                );
            }
            (None, _) => {
                outcomes.insert(key, Lookup::Absent("no cgroup directory (yet)".into()));
            }
            (_, None) => {
                outcomes.insert(key, Lookup::Absent("pod has no address".into()));
            }
        }
    }
    for (key, found) in pod_veth::host_veths(&lookups) {
        let outcome = match found {
            Ok(ifindex) => Lookup::Found(ifindex),
            // A pod in the node's own namespace has no veth: nothing to keep for it.
            Err(e @ pod_veth::VethError::NodeNamespace) => Lookup::Absent(e.to_string()),
            Err(e) => Lookup::NotFound(e.to_string()),
        };
        outcomes.insert(key, outcome);
    }
    let plan = memory.plan(&outcomes);
    for (key, reason) in &plan.unresolved {
        let kept = match (&plan.keep, memory.last.get(key)) {
            (_, Some(ifindex)) => format!("if{ifindex}"),
            (Keep::All, None) => "every STRICT link".into(),
            (Keep::Only(_), None) => "none (never attached)".into(),
        };
        if memory.reported.get(key) != Some(reason) {
            warn!(workload = %key, %reason, %kept, "STRICT pod's host-side interface not found; keeping its last attachment");
        }
        problems.insert(key.clone(), format!("STRICT interface not found: {reason}"));
    }
    memory.reported = plan.unresolved.clone();
    match datapath.set_strict(&plan.attach, &plan.keep) {
        Ok(diff) => {
            if !diff.attached.is_empty() || !diff.detached.is_empty() {
                info!(strict = ?diff.attached, detached = ?diff.detached, kept = ?diff.kept, "STRICT enforcement updated");
            }
            for (ifindex, reason) in diff.unresolved {
                problems.insert(format!("STRICT if{ifindex}"), reason);
            }
        }
        Err(e) => {
            problems.insert("STRICT".into(), e.to_string());
        }
    }
    plan.unresolved
}

/// Where a STRICT pod's host-side veth was looked for, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lookup {
    /// Its ifindex in the node's namespace.
    Found(u32),
    /// The pod is there but its interface could not be found (why).
    NotFound(String),
    /// The pod has no veth here (yet): no cgroup, no address, or the node's own namespace.
    Absent(String),
}

/// What STRICT enforcement should hold this round.
#[derive(Debug, PartialEq, Eq)]
struct StrictPlan {
    attach: BTreeSet<u32>,
    keep: Keep,
    /// STRICT pods not found → why.
    unresolved: BTreeMap<String, String>,
}

/// The last interface each STRICT pod was found on, so that a pod not found this round keeps
/// its attachment (and only its own, when it is known).
#[derive(Debug, Default)]
struct StrictMemory {
    last: BTreeMap<String, u32>,
    /// The unresolved pods last warned about, to warn on changes only.
    reported: BTreeMap<String, String>,
}

impl StrictMemory {
    /// Links go only where the kernel can be told for sure: a pod found elsewhere, no longer
    /// STRICT, or gone. A pod that is there but not found keeps its last link, or — when that
    /// is unknown, as after a restart — every STRICT link stays.
    fn plan(&mut self, outcomes: &BTreeMap<String, Lookup>) -> StrictPlan {
        self.last.retain(|pod, _| outcomes.contains_key(pod));
        let mut attach = BTreeSet::new();
        let mut kept = BTreeSet::new();
        let mut keep_all = false;
        let mut unresolved = BTreeMap::new();
        for (pod, outcome) in outcomes {
            match outcome {
                Lookup::Found(ifindex) => {
                    attach.insert(*ifindex);
                    self.last.insert(pod.clone(), *ifindex);
                }
                Lookup::NotFound(reason) | Lookup::Absent(reason) => {
                    unresolved.insert(pod.clone(), reason.clone());
                    match self.last.get(pod) {
                        Some(ifindex) => {
                            kept.insert(*ifindex);
                        }
                        None => keep_all |= matches!(outcome, Lookup::NotFound(_)),
                    }
                }
            }
        }
        StrictPlan {
            attach,
            keep: if keep_all { Keep::All } else { Keep::Only(kept) },
            unresolved,
        }
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

    fn outcomes(list: &[(&str, Lookup)]) -> BTreeMap<String, Lookup> {
        list.iter().map(|(k, l)| (k.to_string(), l.clone())).collect()
    }

    #[test]
    fn strict_links_go_only_where_the_pod_is_known_not_to_be() {
        let mut memory = StrictMemory::default();
        let found = outcomes(&[("ns/a", Lookup::Found(7)), ("ns/b", Lookup::Found(8))]);
        let plan = memory.plan(&found);
        assert_eq!(plan.attach, BTreeSet::from([7, 8]));
        assert_eq!(plan.keep, Keep::Only(BTreeSet::new()));
        assert!(plan.unresolved.is_empty());

        // b is not found (its neighbour spoofed, its process gone): its own link stays, a's
        // attachment is unchanged.
        let lost = outcomes(&[
            ("ns/a", Lookup::Found(7)),
            ("ns/b", Lookup::NotFound("no process".into())),
        ]);
        let plan = memory.plan(&lost);
        assert_eq!(plan.attach, BTreeSet::from([7]));
        assert_eq!(plan.keep, Keep::Only(BTreeSet::from([8])));
        assert_eq!(plan.unresolved["ns/b"], "no process");

        // b moved (a new sandbox, a new veth): the new one is attached, the old one may go.
        let plan = memory.plan(&outcomes(&[
            ("ns/a", Lookup::Found(7)),
            ("ns/b", Lookup::Found(9)),
        ]));
        assert_eq!(plan.attach, BTreeSet::from([7, 9]));
        assert_eq!(plan.keep, Keep::Only(BTreeSet::new()));

        // b is no longer STRICT, a's cgroup is gone: b is forgotten, a keeps its link.
        let plan = memory.plan(&outcomes(&[("ns/a", Lookup::Absent("no cgroup".into()))]));
        assert!(plan.attach.is_empty());
        assert_eq!(plan.keep, Keep::Only(BTreeSet::from([7])));
        assert_eq!(memory.last.keys().collect::<Vec<_>>(), ["ns/a"]);
    }

    #[test]
    fn after_a_restart_a_pod_not_found_keeps_every_strict_link() {
        let mut memory = StrictMemory::default();
        let plan = memory.plan(&outcomes(&[
            ("ns/a", Lookup::Found(7)),
            ("ns/b", Lookup::NotFound("no process".into())),
        ]));
        assert_eq!(plan.attach, BTreeSet::from([7]));
        assert_eq!(plan.keep, Keep::All);
        // A pod that is not on the node yet had no link to keep.
        let plan = StrictMemory::default().plan(&outcomes(&[("ns/c", Lookup::Absent("no cgroup".into()))]));
        assert_eq!(plan.keep, Keep::Only(BTreeSet::new()));
        assert_eq!(plan.unresolved["ns/c"], "no cgroup");
    }

    #[test]
    fn nothing_desired_from_nothing() {
        assert_eq!(desired::<&str>(&[], |_| Ok(1)), Desired::default());
    }
}
