//! Pod-veth enforcement for one reconcile round: every enrolled pod's host-side veth, found from
//! inside the pod's own network namespace (`crate::pod_veth`), gets the pod-veth program
//! (`mesh_tc_strict`). It drops SYNs into a STRICT pod that are not the proxy's, and SYNs into
//! a PERMISSIVE pod that are neither the proxy's nor a node socket's (plaintext from outside
//! the mesh that went around the steering, e.g. through the node's DNAT or a raw socket); the
//! program reads each pod's mode from `mesh_local_ips`. It fails closed: a pod whose veth is
//! not found keeps its last attachment — every pod-veth link, when that is unknown (after a
//! restart) — and is reported (a warning, the round's report, and
//! `mesh_strict_unresolved_pods`). A link goes only where its pod is known not to be.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use tracing::{info, warn};

use crate::control::NodeState;
use crate::ebpf::{Datapath, Keep};
use crate::pod_veth;

/// What a round of pod-veth enforcement achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Enforced {
    /// Enrolled pods whose veth was not found → why.
    pub unresolved: BTreeMap<String, String>,
    /// The addresses of the enrolled pods whose veth programs are attached where they were
    /// found this round: only to these does the proxy connect from a client's address, since
    /// only their replies find their way back to it.
    pub ready: BTreeSet<IpAddr>,
}

/// Finds the enrolled pods' host-side veths from their own network namespaces and attaches the
/// pod-veth programs to them, keeping the last attachment of any pod not found. Run after
/// `Datapath::set_inbound`, which writes the pods' modes the program reads.
pub fn enforce(
    datapath: &mut Datapath,
    state: &NodeState,
    cgroup_dirs: &BTreeMap<String, PathBuf>,
    memory: &mut StrictMemory,
    problems: &mut BTreeMap<String, String>,
) -> Enforced {
    let mut outcomes = BTreeMap::new();
    let mut lookups = BTreeMap::new();
    let mut ips: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for w in state.enrolled_local() {
        let key = format!("{}/{}", w.namespace, w.name);
        ips.insert(key.clone(), w.ips.iter().map(|ip| ip.to_canonical()).collect());
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
            (Keep::All, None) => "every pod-veth link".into(),
            (Keep::Only(_), None) => "none (never attached)".into(),
        };
        if memory.reported.get(key) != Some(reason) {
            warn!(workload = %key, %reason, %kept, "enrolled pod's host-side interface not found; keeping its last attachment");
        }
        problems.insert(key.clone(), format!("pod veth not found: {reason}"));
    }
    memory.reported = plan.unresolved.clone();
    let mut ready = BTreeSet::new();
    match datapath.set_strict(&plan.attach, &plan.keep) {
        Ok(diff) => {
            if !diff.attached.is_empty() || !diff.detached.is_empty() {
                info!(strict = ?diff.attached, detached = ?diff.detached, kept = ?diff.kept, "pod-veth enforcement updated");
            }
            for (key, outcome) in &outcomes {
                if matches!(outcome, Lookup::Found(ifindex) if !diff.unresolved.contains_key(ifindex)) {
                    ready.extend(ips.get(key).into_iter().flatten().copied());
                }
            }
            for (ifindex, reason) in diff.unresolved {
                problems.insert(format!("STRICT if{ifindex}"), reason);
            }
        }
        Err(e) => {
            problems.insert("STRICT".into(), e.to_string());
        }
    }
    Enforced {
        unresolved: plan.unresolved,
        ready,
    }
}

/// Where an enrolled pod's host-side veth was looked for, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lookup {
    /// Its ifindex in the node's namespace.
    Found(u32),
    /// The pod is there but its interface could not be found (why).
    NotFound(String),
    /// The pod has no veth here (yet): no cgroup, no address, or the node's own namespace.
    Absent(String),
}

/// What pod-veth enforcement should hold this round.
#[derive(Debug, PartialEq, Eq)]
struct StrictPlan {
    attach: BTreeSet<u32>,
    keep: Keep,
    /// Enrolled pods not found → why.
    unresolved: BTreeMap<String, String>,
}

/// The last interface each enrolled pod was found on, so that a pod not found this round keeps
/// its attachment (and only its own, when it is known).
#[derive(Debug, Default)]
pub struct StrictMemory {
    last: BTreeMap<String, u32>,
    /// The unresolved pods last warned about, to warn on changes only.
    reported: BTreeMap<String, String>,
}

impl StrictMemory {
    /// Links go only where the kernel can be told for sure: a pod found elsewhere, no longer
    /// enrolled, or gone. A pod that is there but not found keeps its last link, or — when that
    /// is unknown, as after a restart — every pod-veth link stays.
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
}
