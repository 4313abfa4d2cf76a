//! Keeps the kernel's enrolled-cgroups map equal to the desired state — this node's enrolled
//! pods as the controller describes them, found by pod UID under the pods cgroup root — on
//! start, whenever the config changes, and periodically, so that drift (a vanished cgroup, a
//! pod whose cgroup appears after its config, a map edited by hand) is repaired unasked.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cgroups;
use crate::control::NodeState;
use crate::ebpf::{self, Datapath};

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

pub async fn run(
    mut datapath: Datapath,
    mut state: watch::Receiver<Arc<NodeState>>,
    pods_root: PathBuf,
    interval: Duration,
    stop: CancellationToken,
) {
    // Problems are logged when they change, not on every round.
    let mut last_problems = BTreeMap::new();
    loop {
        let resolved = {
            let state = state.borrow_and_update();
            // Before the first config, the kernel's pinned map is the best knowledge there is
            // (a restarted agent's); reconciling against nothing would stop capture.
            state
                .has_config()
                .then(|| cgroups::resolve_enrolled(&state, &pods_root))
        };
        let Some(resolved) = resolved else {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = state.changed() => if changed.is_err() {
                    return;
                },
            }
            continue;
        };
        let mut problems = BTreeMap::new();
        let workloads = match resolved {
            Ok(r) => {
                for pod in r.missing {
                    problems.insert(pod, "no cgroup directory (yet)".to_owned());
                }
                r.workloads
            }
            Err(e) => {
                problems.insert(
                    pods_root.display().to_string(),
                    format!("scanning the pods cgroup: {e}"),
                );
                Vec::new()
            }
        };
        let want = desired(&workloads, ebpf::cgroup_id);
        problems.extend(want.unresolved);
        for (workload, reason) in &problems {
            if last_problems.get(workload) != Some(reason) {
                warn!(%workload, %reason, "enrolled pod not captured yet");
            }
        }
        last_problems = problems;
        let ids: BTreeSet<u64> = want.cgroups.keys().copied().collect();
        match datapath.set_enrolled(&ids) {
            Ok(diff) => {
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
            Err(e) => warn!(error = %e, "updating the enrolled-cgroups map failed; will retry"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            changed = state.changed() => if changed.is_err() {
                // The control client is gone (shutdown); keep reconciling the last state.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            },
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

    #[test]
    fn nothing_desired_from_nothing() {
        assert_eq!(desired::<&str>(&[], |_| Ok(1)), Desired::default());
    }
}
