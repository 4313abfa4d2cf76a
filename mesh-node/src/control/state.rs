//! The node's applied config: what the controller last told this node, as plain values, and
//! the pure function that moves it from one version to the next.
//!
//! [`apply`] never touches the clock or the network: it takes the current state and one
//! update and returns the next state, or why the update cannot be applied (the caller NACKs
//! it and keeps the state it had).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::SystemTime;

use mesh_api::{
    pb, Identity, NamespacedName, NodeView, Policy, Service, Update, UpdateKind, Version, WireError, Workload,
};

/// What this node knows of the cluster, published to the rest of the agent after every
/// applied version. Cheap to read through an `Arc`; never mutated in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The node this state is for: workloads with this `node` are local.
    pub node: String,
    /// The last applied version; `None` until the first snapshot.
    pub version: Option<Version>,
    /// Pods scheduled on this node, complete (labels included), enrolled or not, by pod UID.
    pub local: BTreeMap<String, Workload>,
    /// Enrolled pods on other nodes (address and identity, no labels), by pod UID.
    pub remote: BTreeMap<String, Workload>,
    pub services: BTreeMap<NamespacedName, Service>,
    /// Policies selecting at least one local enrolled pod.
    pub policies: BTreeMap<NamespacedName, Policy>,
    /// When the last version was applied (set by the client, not by [`apply`]).
    pub updated_at: Option<SystemTime>,
    /// Set while the controller is unreachable: since when this state may be outdated. The
    /// agent keeps running on it; the first update of a new stream clears it.
    pub stale_since: Option<SystemTime>,
    /// Derived from the maps above by [`NodeState::reindex`].
    by_ip: HashMap<IpAddr, String>,
    by_vip: HashMap<IpAddr, NamespacedName>,
}

/// Why an update was not applied; the text is the NACK's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(#[from] WireError),
    #[error("delta is based on {base} but this node holds {}", have.as_ref().map_or("nothing".to_owned(), ToString::to_string))]
    WrongBase { base: Version, have: Option<Version> },
}

/// An update that could not be applied, with the version to NACK when it was readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub version: Option<Version>,
    pub error: ApplyError,
}

impl NodeState {
    /// The empty state of `node`, before any config.
    pub fn new(node: impl Into<String>) -> Self {
        NodeState {
            node: node.into(),
            ..NodeState::default()
        }
    }

    /// Whether a config has been applied at all.
    pub fn has_config(&self) -> bool {
        self.version.is_some()
    }

    /// Local pods the mesh carries: the ones to capture and hold certificates for.
    pub fn enrolled_local(&self) -> impl Iterator<Item = &Workload> {
        self.local.values().filter(|w| w.enrolled)
    }

    /// The identities this node needs certificates for: those of its enrolled pods.
    pub fn local_identities(&self) -> BTreeSet<Identity> {
        self.enrolled_local().map(|w| w.identity.clone()).collect()
    }

    /// Any known workload (local or remote) by pod UID.
    pub fn workload(&self, uid: &str) -> Option<&Workload> {
        self.local.get(uid).or_else(|| self.remote.get(uid))
    }

    /// The workload (local or remote) that has `ip` among its addresses.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).and_then(|uid| self.workload(uid))
    }

    /// The service with `vip` among its cluster IPs.
    pub fn service_by_vip(&self, vip: IpAddr) -> Option<&Service> {
        self.by_vip.get(&vip).and_then(|key| self.services.get(key))
    }

    /// Every cluster IP of every service, both families.
    pub fn service_vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.by_vip.keys().copied()
    }

    /// Every address of an enrolled workload, local or remote, as [`NodeState::workload_by_ip`]
    /// resolves it (an address claimed by an enrolled and a non-enrolled pod goes to the one
    /// that lookup picks).
    pub fn enrolled_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.by_ip
            .iter()
            .filter(|(_, uid)| self.workload(uid).is_some_and(|w| w.enrolled))
            .map(|(ip, _)| *ip)
    }

    fn insert_workload(&mut self, workload: Workload) {
        self.local.remove(&workload.uid);
        self.remote.remove(&workload.uid);
        if workload.node == self.node {
            self.local.insert(workload.uid.clone(), workload);
        } else {
            self.remote.insert(workload.uid.clone(), workload);
        }
    }

    fn extend(&mut self, view: NodeView) {
        view.workloads.into_values().for_each(|w| self.insert_workload(w));
        self.services.extend(view.services);
        self.policies.extend(view.policies);
    }

    /// Rebuilds the address indexes. Where two objects claim one address (a pod IP reused
    /// while the old pod is still listed), local workloads win over remote ones and then the
    /// smaller key wins, so the choice is deterministic.
    fn reindex(&mut self) {
        self.by_ip.clear();
        for w in self.remote.values().rev().chain(self.local.values().rev()) {
            for ip in &w.ips {
                self.by_ip.insert(*ip, w.uid.clone());
            }
        }
        self.by_vip.clear();
        for (key, s) in self.services.iter().rev() {
            for vip in &s.vips {
                self.by_vip.insert(*vip, key.clone());
            }
        }
    }
}

/// Applies one update to `state`: a snapshot replaces it, a delta applies only on top of
/// the version it names as its base. The result carries the update's version; the
/// timestamps are left as they were.
pub fn apply(state: &NodeState, update: Update) -> Result<NodeState, ApplyError> {
    let mut next = NodeState {
        node: state.node.clone(),
        version: Some(update.version),
        updated_at: state.updated_at,
        stale_since: state.stale_since,
        ..NodeState::default()
    };
    match update.kind {
        UpdateKind::Snapshot(view) => next.extend(view),
        UpdateKind::Delta { base, delta } => {
            if state.version.as_ref() != Some(&base) {
                return Err(ApplyError::WrongBase {
                    base,
                    have: state.version.clone(),
                });
            }
            next.local = state.local.clone();
            next.remote = state.remote.clone();
            next.services = state.services.clone();
            next.policies = state.policies.clone();
            for uid in &delta.removed.workloads {
                next.local.remove(uid);
                next.remote.remove(uid);
            }
            for key in &delta.removed.services {
                next.services.remove(key);
            }
            for key in &delta.removed.policies {
                next.policies.remove(key);
            }
            next.extend(delta.upserted);
        }
    }
    next.reindex();
    Ok(next)
}

/// Decodes a message off the wire and applies it; a rejection names the version to NACK
/// when the message had a readable one.
pub fn apply_message(state: &NodeState, message: pb::WatchResponse) -> Result<NodeState, Rejection> {
    let version = message.version.clone().and_then(|v| Version::try_from(v).ok());
    let reject = |error| Rejection {
        version: version.clone(),
        error,
    };
    let update = Update::try_from(message).map_err(|e| reject(e.into()))?;
    apply(state, update).map_err(reject)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::{Delta, MtlsMode, Protocol, ServicePort};

    use super::*;

    fn v(number: u64) -> Version {
        Version {
            epoch: "e1".into(),
            number,
        }
    }

    fn workload(uid: &str, node: &str, sa: &str, ip: &str, enrolled: bool) -> Workload {
        Workload {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "shop".into(),
            node: node.into(),
            service_account: sa.into(),
            identity: format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap(),
            ips: vec![ip.parse().unwrap()],
            enrolled,
            mtls_mode: MtlsMode::Strict,
            labels: BTreeMap::new(),
        }
    }

    fn service(name: &str, vip: &str) -> Service {
        Service {
            namespace: "shop".into(),
            name: name.into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                protocol: Protocol::Tcp,
            }],
            endpoints: vec![],
        }
    }

    fn view(workloads: Vec<Workload>, services: Vec<Service>) -> NodeView {
        let mut view = NodeView::default();
        workloads.into_iter().for_each(|w| view.insert_workload(w));
        services.into_iter().for_each(|s| view.insert_service(s));
        view
    }

    fn snapshot(number: u64, view: NodeView) -> Update {
        Update {
            version: v(number),
            kind: UpdateKind::Snapshot(view),
        }
    }

    fn delta(number: u64, base: u64, delta: Delta) -> Update {
        Update {
            version: v(number),
            kind: UpdateKind::Delta { base: v(base), delta },
        }
    }

    fn uids(map: &BTreeMap<String, Workload>) -> Vec<&str> {
        map.keys().map(String::as_str).collect()
    }

    fn first() -> NodeState {
        let s = NodeState::new("a");
        apply(
            &s,
            snapshot(
                1,
                view(
                    vec![
                        workload("w1", "a", "web", "10.0.0.1", true),
                        workload("w2", "a", "db", "10.0.0.2", false),
                        workload("c1", "b", "cart", "10.0.1.1", true),
                    ],
                    vec![service("web", "10.96.0.1")],
                ),
            ),
        )
        .unwrap()
    }

    #[test]
    fn snapshot_splits_local_and_remote_and_indexes_addresses() {
        let s = first();
        assert_eq!(s.version, Some(v(1)));
        assert_eq!(uids(&s.local), ["w1", "w2"]);
        assert_eq!(uids(&s.remote), ["c1"]);
        assert_eq!(
            s.local_identities()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["spiffe://cluster.local/ns/shop/sa/web"]
        );
        assert_eq!(
            s.workload_by_ip("10.0.1.1".parse().unwrap())
                .map(|w| w.uid.as_str()),
            Some("c1")
        );
        assert_eq!(
            s.service_by_vip("10.96.0.1".parse().unwrap())
                .map(|s| s.name.as_str()),
            Some("web")
        );
        assert!(s.workload_by_ip("10.9.9.9".parse().unwrap()).is_none());
    }

    #[test]
    fn mesh_addresses_are_vips_and_enrolled_pods_anywhere() {
        let s = first();
        let ips = |it: &mut dyn Iterator<Item = IpAddr>| {
            let mut v: Vec<String> = it.map(|ip| ip.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(ips(&mut s.service_vips()), ["10.96.0.1"]);
        // w2 (10.0.0.2) is not enrolled.
        assert_eq!(ips(&mut s.enrolled_ips()), ["10.0.0.1", "10.0.1.1"]);
    }

    #[test]
    fn snapshot_replaces_everything() {
        let s = apply(
            &first(),
            snapshot(7, view(vec![workload("x", "a", "x", "10.0.0.9", true)], vec![])),
        )
        .unwrap();
        assert_eq!(uids(&s.local), ["x"]);
        assert!(s.remote.is_empty() && s.services.is_empty());
        assert!(s.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(s.service_by_vip("10.96.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn delta_removes_then_upserts_on_its_base() {
        let mut d = Delta::default();
        d.removed.workloads.insert("w2".into());
        d.removed.workloads.insert("c1".into());
        d.removed.services.insert(NamespacedName::new("shop", "web"));
        d.upserted
            .insert_workload(workload("w3", "a", "api", "10.0.0.3", true));
        d.upserted
            .insert_workload(workload("c2", "b", "cart", "10.0.1.2", true));
        // A changed object comes complete and replaces the old one.
        d.upserted
            .insert_workload(workload("w1", "a", "web", "10.0.0.11", true));
        d.upserted.insert_service(service("api", "10.96.0.2"));
        let s = apply(&first(), delta(2, 1, d)).unwrap();
        assert_eq!(s.version, Some(v(2)));
        assert_eq!(uids(&s.local), ["w1", "w3"]);
        assert_eq!(uids(&s.remote), ["c2"]);
        assert_eq!(s.local_identities().len(), 2);
        assert!(s.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(s.workload_by_ip("10.0.0.11".parse().unwrap()).is_some());
        assert!(s.service_by_vip("10.96.0.1".parse().unwrap()).is_none());
        assert!(s.service_by_vip("10.96.0.2".parse().unwrap()).is_some());
    }

    #[test]
    fn delta_on_another_base_is_refused() {
        let s = first();
        let err = apply(&s, delta(3, 2, Delta::default())).unwrap_err();
        assert_eq!(
            err,
            ApplyError::WrongBase {
                base: v(2),
                have: Some(v(1))
            }
        );
        assert_eq!(err.to_string(), "delta is based on e1/2 but this node holds e1/1");
        let other_epoch = Update {
            version: Version {
                epoch: "e2".into(),
                number: 2,
            },
            kind: UpdateKind::Delta {
                base: Version {
                    epoch: "e2".into(),
                    number: 1,
                },
                delta: Delta::default(),
            },
        };
        assert!(apply(&s, other_epoch).is_err());
        let fresh = NodeState::new("a");
        let err = apply(&fresh, delta(2, 1, Delta::default())).unwrap_err();
        assert!(err.to_string().ends_with("holds nothing"), "{err}");
    }

    #[test]
    fn empty_delta_on_the_same_version_confirms_it() {
        // What a resuming node gets when nothing changed while it was away.
        let s = first();
        let next = apply(&s, delta(1, 1, Delta::default())).unwrap();
        assert_eq!(next, s);
    }

    #[test]
    fn apply_keeps_timestamps_for_the_caller() {
        let mut s = first();
        s.stale_since = Some(SystemTime::UNIX_EPOCH);
        let next = apply(&s, delta(2, 1, Delta::default())).unwrap();
        assert_eq!(next.stale_since, s.stale_since);
    }

    #[test]
    fn wire_messages_decode_or_name_the_version_to_nack() {
        let s = first();
        let good = pb::WatchResponse::from(snapshot(
            5,
            view(vec![workload("w1", "a", "web", "10.0.0.1", true)], vec![]),
        ));
        assert_eq!(apply_message(&s, good).unwrap().version, Some(v(5)));

        let mut bad = pb::WatchResponse::from(snapshot(
            6,
            view(vec![workload("w1", "a", "web", "10.0.0.1", true)], vec![]),
        ));
        if let Some(pb::watch_response::Kind::Snapshot(r)) = &mut bad.kind {
            r.workloads[0].ips = vec![vec![1, 2, 3]];
        }
        let rejection = apply_message(&s, bad).unwrap_err();
        assert_eq!(rejection.version, Some(v(6)));
        assert!(
            rejection
                .error
                .to_string()
                .contains("snapshot.workloads[0].ips[0]"),
            "{}",
            rejection.error
        );

        let no_version = pb::WatchResponse {
            version: None,
            kind: None,
        };
        assert_eq!(apply_message(&s, no_version).unwrap_err().version, None);

        let wrong_base = pb::WatchResponse::from(delta(9, 8, Delta::default()));
        let rejection = apply_message(&s, wrong_base).unwrap_err();
        assert_eq!(rejection.version, Some(v(9)));
        assert!(matches!(rejection.error, ApplyError::WrongBase { .. }));
    }

    #[test]
    fn reused_address_resolves_deterministically_to_the_local_pod() {
        let s = apply(
            &NodeState::new("a"),
            snapshot(
                1,
                view(
                    vec![
                        workload("r", "b", "cart", "10.0.0.1", true),
                        workload("l", "a", "web", "10.0.0.1", true),
                    ],
                    vec![],
                ),
            ),
        )
        .unwrap();
        assert_eq!(
            s.workload_by_ip("10.0.0.1".parse().unwrap())
                .map(|w| w.uid.as_str()),
            Some("l")
        );
    }
}
