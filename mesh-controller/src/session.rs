//! One node's Watch stream as a state machine over values: what to send when the node says
//! hello, when the cluster changes, and when the node NACKs. The server feeds it; it does
//! no I/O.
//!
//! Every delta names as its base the version sent just before it on the same stream. A NACK
//! of the latest delta means the node is not at its base any more, so the same state is
//! sent again as a snapshot; a NACKed snapshot is not resent (it would fail the same way)
//! and the next change brings the next update.

use mesh_api::{NodeView, TrustDomain, Update, UpdateKind, Version};

use crate::cluster::ClusterState;
use crate::diff::diff;
use crate::translate::node_view;

pub struct Session {
    node: String,
    trust_domain: TrustDomain,
    sent: Option<Sent>,
}

struct Sent {
    version: Version,
    view: NodeView,
    was_delta: bool,
}

impl Session {
    pub fn new(node: String, trust_domain: TrustDomain) -> Self {
        Session {
            node,
            trust_domain,
            sent: None,
        }
    }

    /// The first update: a delta from `resume` (the node's last version and the state it was
    /// made from) when the controller still has it, else a snapshot.
    pub fn start(
        &mut self,
        version: Version,
        state: &ClusterState,
        resume: Option<(Version, &ClusterState)>,
    ) -> Update {
        let view = node_view(state, &self.node, &self.trust_domain);
        match resume {
            Some((base, old_state)) => {
                let old_view = node_view(old_state, &self.node, &self.trust_domain);
                self.delta(version, base, &old_view, view)
            }
            None => self.snapshot(version, view),
        }
    }

    /// The update for a new cluster state, if the node's view changed.
    pub fn on_change(&mut self, version: Version, state: &ClusterState) -> Option<Update> {
        let view = node_view(state, &self.node, &self.trust_domain);
        let sent = self.sent.take_if(|sent| sent.view != view)?;
        Some(self.delta(version, sent.version, &sent.view, view))
    }

    /// The resync after a NACK, when one is due.
    pub fn on_nack(&mut self, nacked: &Version) -> Option<Update> {
        let sent = self.sent.take_if(|s| s.was_delta && s.version == *nacked)?;
        Some(self.snapshot(sent.version, sent.view))
    }

    fn snapshot(&mut self, version: Version, view: NodeView) -> Update {
        self.sent = Some(Sent {
            version: version.clone(),
            view: view.clone(),
            was_delta: false,
        });
        Update {
            version,
            kind: UpdateKind::Snapshot(view),
        }
    }

    fn delta(&mut self, version: Version, base: Version, old: &NodeView, view: NodeView) -> Update {
        let delta = diff(old, &view);
        self.sent = Some(Sent {
            version: version.clone(),
            view,
            was_delta: true,
        });
        Update {
            version,
            kind: UpdateKind::Delta { base, delta },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cluster::{Namespace, Pod};
    use crate::translate::ENROLL_LABEL;

    fn v(number: u64) -> Version {
        Version {
            epoch: "e".into(),
            number,
        }
    }

    /// An enrolled namespace with pods `uids` on node `n`.
    fn state(uids: &[&str]) -> ClusterState {
        let mut s = ClusterState::default();
        let labels = BTreeMap::from([(ENROLL_LABEL.to_owned(), "true".to_owned())]);
        s.namespaces.insert(
            "shop".into(),
            Namespace {
                name: "shop".into(),
                labels,
            },
        );
        for uid in uids {
            let pod = Pod {
                uid: uid.to_string(),
                name: uid.to_string(),
                namespace: "shop".into(),
                node: "n".into(),
                service_account: None,
                ips: vec![[10, 0, 0, uid.as_bytes()[0]].into()],
                labels: BTreeMap::new(),
            };
            s.pods.insert(pod.uid.clone(), pod);
        }
        s
    }

    fn session() -> Session {
        Session::new("n".into(), TrustDomain::default())
    }

    fn uids(view: &NodeView) -> Vec<&str> {
        view.workloads.keys().map(String::as_str).collect()
    }

    #[test]
    fn fresh_start_is_a_snapshot() {
        let update = session().start(v(3), &state(&["a"]), None);
        assert_eq!(update.version, v(3));
        let UpdateKind::Snapshot(view) = update.kind else {
            panic!("want snapshot")
        };
        assert_eq!(uids(&view), ["a"]);
    }

    #[test]
    fn resume_is_a_delta_from_the_nodes_version() {
        let old = state(&["a", "b"]);
        let update = session().start(v(5), &state(&["a", "c"]), Some((v(2), &old)));
        let UpdateKind::Delta { base, delta } = update.kind else {
            panic!("want delta")
        };
        assert_eq!(base, v(2));
        assert_eq!(uids(&delta.upserted), ["c"]);
        assert_eq!(delta.removed.workloads.iter().collect::<Vec<_>>(), ["b"]);

        // Nothing changed while away: an empty delta tells the node it is current.
        let same = state(&["a"]);
        let update = session().start(v(5), &same, Some((v(4), &same)));
        assert!(matches!(update.kind, UpdateKind::Delta { delta, .. } if delta.is_empty()));
    }

    #[test]
    fn changes_become_deltas_chained_by_base() {
        let mut s = session();
        s.start(v(1), &state(&["a"]), None);
        assert!(s.on_change(v(2), &state(&["a"])).is_none(), "view unchanged");
        let update = s.on_change(v(3), &state(&["a", "b"])).unwrap();
        assert!(matches!(&update.kind, UpdateKind::Delta { base, .. } if *base == v(1)));
        let update = s.on_change(v(4), &state(&["b"])).unwrap();
        let UpdateKind::Delta { base, delta } = update.kind else {
            panic!("want delta")
        };
        assert_eq!(base, v(3));
        assert!(delta.upserted.is_empty());
        assert_eq!(delta.removed.workloads.len(), 1);
    }

    #[test]
    fn nack_of_latest_delta_resends_a_snapshot_once() {
        let mut s = session();
        s.start(v(1), &state(&["a"]), None);
        assert!(s.on_nack(&v(1)).is_none(), "a NACKed snapshot is not resent");
        s.on_change(v(2), &state(&["a", "b"]));
        s.on_change(v(3), &state(&["b"]));
        assert!(s.on_nack(&v(2)).is_none(), "an older NACK: v3 is on its way");
        let update = s.on_nack(&v(3)).unwrap();
        assert_eq!(update.version, v(3));
        let UpdateKind::Snapshot(view) = update.kind else {
            panic!("want snapshot")
        };
        assert_eq!(uids(&view), ["b"]);
        assert!(s.on_nack(&v(3)).is_none());
        // And later changes are deltas from that snapshot.
        let update = s.on_change(v(4), &state(&[])).unwrap();
        assert!(matches!(update.kind, UpdateKind::Delta { base, .. } if base == v(3)));
    }
}
