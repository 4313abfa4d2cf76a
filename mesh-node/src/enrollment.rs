//! Keeps the kernel's enrolled-cgroups map equal to the desired state: on start, whenever the
//! workloads change, and periodically, so that drift (a vanished cgroup, a map edited by hand,
//! a restart) is repaired without anyone asking.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ebpf::{self, Datapath};
use crate::workloads::{FileSource, LocalWorkload};

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
    mut source: Option<FileSource>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut workloads = Vec::new();
    let mut last_source_error = None;
    let mut last_unresolved = BTreeMap::new();
    loop {
        if let Some(src) = source.as_mut() {
            match src.poll() {
                Ok(Some(w)) => {
                    info!(workloads = w.len(), "workloads file loaded");
                    workloads = w;
                    last_source_error = None;
                }
                Ok(None) => {}
                Err(e) => {
                    let msg = e.to_string();
                    if last_source_error.as_ref() != Some(&msg) {
                        warn!(error = %msg, "workloads file rejected; keeping the last good set");
                    }
                    last_source_error = Some(msg);
                }
            }
        }
        let want = desired(&workloads, ebpf::cgroup_id);
        for (workload, reason) in &want.unresolved {
            if last_unresolved.get(workload) != Some(reason) {
                warn!(%workload, %reason, "cgroup not found; workload not enrolled");
            }
        }
        last_unresolved = want.unresolved;
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
