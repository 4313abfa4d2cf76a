//! What the controller streams to one node: versioned snapshots and deltas of its view.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::objects::{NamespacedName, Policy, Service, Workload};

/// A config version. Numbers only compare within one epoch; a new epoch means a restarted
/// controller whose numbers have nothing to do with the old ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    pub epoch: String,
    pub number: u64,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.epoch, self.number)
    }
}

/// Everything one node is told: its own workloads in full, the remote workloads it may
/// route to, services with their endpoints, and the policies selecting its workloads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// By workload uid.
    pub workloads: BTreeMap<String, Workload>,
    pub services: BTreeMap<NamespacedName, Service>,
    pub policies: BTreeMap<NamespacedName, Policy>,
}

impl NodeView {
    pub fn insert_workload(&mut self, workload: Workload) {
        self.workloads.insert(workload.uid.clone(), workload);
    }

    pub fn insert_service(&mut self, service: Service) {
        self.services.insert(service.key(), service);
    }

    pub fn insert_policy(&mut self, policy: Policy) {
        self.policies.insert(policy.key(), policy);
    }

    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty() && self.services.is_empty() && self.policies.is_empty()
    }

    /// Applies a delta that was computed against this view.
    pub fn apply(&mut self, delta: Delta) {
        for uid in &delta.removed.workloads {
            self.workloads.remove(uid);
        }
        for key in &delta.removed.services {
            self.services.remove(key);
        }
        for key in &delta.removed.policies {
            self.policies.remove(key);
        }
        self.workloads.extend(delta.upserted.workloads);
        self.services.extend(delta.upserted.services);
        self.policies.extend(delta.upserted.policies);
    }
}

/// Keys of objects that left a view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    pub workloads: BTreeSet<String>,
    pub services: BTreeSet<NamespacedName>,
    pub policies: BTreeSet<NamespacedName>,
}

/// The difference between two views: objects added or changed (complete), keys removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub upserted: NodeView,
    pub removed: Removed,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty()
            && self.removed.workloads.is_empty()
            && self.removed.services.is_empty()
            && self.removed.policies.is_empty()
    }
}

/// One message of the controller's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub version: Version,
    pub kind: UpdateKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateKind {
    /// Replaces the node's view.
    Snapshot(NodeView),
    /// Applies only on top of the view at `base`.
    Delta { base: Version, delta: Delta },
}

/// One message of the node's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeMessage {
    /// Opens the stream; `last_applied` asks to resume from that version.
    Hello {
        node: String,
        last_applied: Option<Version>,
    },
    Ack(Version),
    Nack {
        version: Version,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{policy, service, workload};

    #[test]
    fn apply_removes_then_upserts() {
        let mut view = NodeView::default();
        view.insert_workload(workload("a", "n1"));
        view.insert_workload(workload("b", "n1"));
        view.insert_policy(policy());

        let mut changed = workload("b", "n1");
        changed.enrolled = false;
        let mut delta = Delta::default();
        delta.upserted.insert_workload(changed.clone());
        delta.upserted.insert_service(service());
        delta.removed.workloads.insert("a".into());
        delta.removed.policies.insert(policy().key());
        assert!(!delta.is_empty());
        view.apply(delta);

        let mut want = NodeView::default();
        want.insert_workload(changed);
        want.insert_service(service());
        assert_eq!(view, want);
        assert!(Delta::default().is_empty());
    }
}
