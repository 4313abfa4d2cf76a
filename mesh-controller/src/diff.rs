//! The delta between two views of one node: changed objects in full, plus removed keys.

use std::collections::{BTreeMap, BTreeSet};

use mesh_api::{Delta, NodeView};

/// What turns `old` into `new` under [`NodeView::apply`].
pub fn diff(old: &NodeView, new: &NodeView) -> Delta {
    let mut delta = Delta::default();
    changed(
        &old.workloads,
        &new.workloads,
        &mut delta.upserted.workloads,
        &mut delta.removed.workloads,
    );
    changed(
        &old.services,
        &new.services,
        &mut delta.upserted.services,
        &mut delta.removed.services,
    );
    changed(
        &old.policies,
        &new.policies,
        &mut delta.upserted.policies,
        &mut delta.removed.policies,
    );
    delta
}

fn changed<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    upserted: &mut BTreeMap<K, V>,
    removed: &mut BTreeSet<K>,
) {
    for (key, value) in new {
        if old.get(key) != Some(value) {
            upserted.insert(key.clone(), value.clone());
        }
    }
    removed.extend(old.keys().filter(|key| !new.contains_key(*key)).cloned());
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::{Action, MtlsMode, NamespacedName, Policy, Service, Workload};

    use super::*;

    fn workload(uid: &str, ip: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            node: "n".into(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            ips: vec![ip.parse().unwrap()],
            enrolled: true,
            mtls_mode: MtlsMode::Permissive,
            labels: BTreeMap::new(),
        }
    }

    fn service(name: &str) -> Service {
        Service {
            namespace: "shop".into(),
            name: name.into(),
            vips: vec![],
            ports: vec![],
            endpoints: vec![],
        }
    }

    fn policy(name: &str, action: Action) -> Policy {
        Policy {
            namespace: "shop".into(),
            name: name.into(),
            selector: BTreeMap::new(),
            action,
            rules: vec![],
        }
    }

    fn view(workloads: &[(&str, &str)], services: &[&str], policies: &[(&str, Action)]) -> NodeView {
        let mut v = NodeView::default();
        workloads
            .iter()
            .for_each(|(uid, ip)| v.insert_workload(workload(uid, ip)));
        services.iter().for_each(|name| v.insert_service(service(name)));
        policies
            .iter()
            .for_each(|(name, action)| v.insert_policy(policy(name, *action)));
        v
    }

    #[test]
    fn table() {
        use Action::*;
        struct Case {
            what: &'static str,
            old: NodeView,
            new: NodeView,
            upserted: NodeView,
            removed: (Vec<&'static str>, Vec<&'static str>, Vec<&'static str>),
        }
        let cases = [
            Case {
                what: "same views: empty delta",
                old: view(&[("a", "10.0.0.1")], &["s"], &[("p", Allow)]),
                new: view(&[("a", "10.0.0.1")], &["s"], &[("p", Allow)]),
                upserted: NodeView::default(),
                removed: (vec![], vec![], vec![]),
            },
            Case {
                what: "from nothing: everything upserted",
                old: NodeView::default(),
                new: view(&[("a", "10.0.0.1")], &["s"], &[("p", Allow)]),
                upserted: view(&[("a", "10.0.0.1")], &["s"], &[("p", Allow)]),
                removed: (vec![], vec![], vec![]),
            },
            Case {
                what: "to nothing: everything removed",
                old: view(&[("a", "10.0.0.1")], &["s"], &[("p", Allow)]),
                new: NodeView::default(),
                upserted: NodeView::default(),
                removed: (vec!["a"], vec!["s"], vec!["p"]),
            },
            Case {
                what: "changed objects come whole, unchanged ones not at all",
                old: view(
                    &[("a", "10.0.0.1"), ("b", "10.0.0.2")],
                    &["s", "t"],
                    &[("p", Allow)],
                ),
                new: view(
                    &[("a", "10.0.0.9"), ("b", "10.0.0.2"), ("c", "10.0.0.3")],
                    &["s"],
                    &[("p", Deny)],
                ),
                upserted: view(&[("a", "10.0.0.9"), ("c", "10.0.0.3")], &[], &[("p", Deny)]),
                removed: (vec![], vec!["t"], vec![]),
            },
        ];
        for case in cases {
            let delta = diff(&case.old, &case.new);
            assert_eq!(delta.upserted, case.upserted, "{}", case.what);
            let (workloads, services, policies) = case.removed;
            let key = |n: &&str| NamespacedName::new("shop", *n);
            assert_eq!(
                delta.removed.workloads,
                workloads.iter().map(|s| s.to_string()).collect(),
                "{}",
                case.what
            );
            assert_eq!(
                delta.removed.services,
                services.iter().map(key).collect(),
                "{}",
                case.what
            );
            assert_eq!(
                delta.removed.policies,
                policies.iter().map(key).collect(),
                "{}",
                case.what
            );
            assert_eq!(delta.is_empty(), case.what.starts_with("same"));

            // Applying the delta to the old view must give the new one.
            let mut applied = case.old.clone();
            applied.apply(delta);
            assert_eq!(applied, case.new, "{}", case.what);
        }
    }
}
