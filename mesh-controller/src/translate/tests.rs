//! Table-driven tests of the translation rules.

use std::collections::{BTreeMap, BTreeSet};

use mesh_api::{Action, Endpoint, Labels, MtlsMode, NamespacedName, Policy, Protocol, TrustDomain};

use super::*;
use crate::cluster::*;

type Pairs<'a> = &'a [(&'a str, &'a str)];

fn labels(pairs: Pairs) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn td() -> TrustDomain {
    TrustDomain::default()
}

fn pod(uid: &str, ns: &str, node: &str, pod_labels: &[(&str, &str)]) -> Pod {
    Pod {
        uid: uid.into(),
        name: format!("pod-{uid}"),
        namespace: ns.into(),
        node: node.into(),
        service_account: Some(format!("sa-{uid}")),
        // a1 → 10.0.0.1, b2 → 10.0.1.2: distinct and easy to read back.
        ips: vec![[
            10,
            0,
            uid.as_bytes()[0] - b'a',
            uid.as_bytes()[uid.len() - 1] - b'0',
        ]
        .into()],
        labels: labels(pod_labels),
    }
}

fn state(namespaces: &[(&str, &[(&str, &str)])], pods: Vec<Pod>) -> ClusterState {
    let mut state = ClusterState::default();
    for (name, ns_labels) in namespaces {
        let ns = Namespace {
            name: name.to_string(),
            labels: labels(ns_labels),
        };
        state.namespaces.insert(ns.name.clone(), ns);
    }
    for pod in pods {
        state.pods.insert(pod.uid.clone(), pod);
    }
    state
}

fn only_workload(state: &ClusterState) -> mesh_api::Workload {
    let view = node_view(state, "n", &td());
    view.workloads.into_values().next().expect("one workload")
}

#[test]
fn enrollment() {
    let on: Pairs = &[(ENROLL_LABEL, "true")];
    let cases: [(Pairs, Pairs, bool); 7] = [
        (&[], &[], false),
        (on, &[], true),
        (on, &[(ENROLL_LABEL, "false")], false),
        (on, &[(ENROLL_LABEL, "true")], true),
        (&[(ENROLL_LABEL, "false")], &[], false),
        (&[(ENROLL_LABEL, "TRUE")], &[], false),
        (&[], &[(ENROLL_LABEL, "true")], false),
    ];
    for (i, (ns_labels, pod_labels, want)) in cases.into_iter().enumerate() {
        let s = state(&[("shop", ns_labels)], vec![pod("p", "shop", "n", pod_labels)]);
        assert_eq!(only_workload(&s).enrolled, want, "case {i}");
    }
    // A pod whose namespace object is unknown is not enrolled.
    let s = state(&[], vec![pod("p", "shop", "n", &[])]);
    assert!(!only_workload(&s).enrolled);
}

#[test]
fn mtls_mode() {
    let cases = [
        (None, MtlsMode::Permissive),
        (Some("strict"), MtlsMode::Strict),
        (Some("STRICT"), MtlsMode::Strict),
        (Some("permissive"), MtlsMode::Permissive),
        (Some("bogus"), MtlsMode::Permissive),
    ];
    for (value, want) in cases {
        let mut ns_labels = vec![(ENROLL_LABEL, "true")];
        ns_labels.extend(value.map(|v| (MTLS_LABEL, v)));
        let s = state(&[("shop", &ns_labels)], vec![pod("p", "shop", "n", &[])]);
        assert_eq!(only_workload(&s).mtls_mode, want, "{value:?}");
    }
}

#[test]
fn identity() {
    let cases = [
        (
            None,
            TrustDomain::default(),
            "spiffe://cluster.local/ns/shop/sa/default",
        ),
        (
            Some("web"),
            TrustDomain::default(),
            "spiffe://cluster.local/ns/shop/sa/web",
        ),
        (
            Some("web"),
            "example.org".parse().unwrap(),
            "spiffe://example.org/ns/shop/sa/web",
        ),
    ];
    for (sa, trust_domain, want) in cases {
        let mut p = pod("p", "shop", "n", &[]);
        p.service_account = sa.map(Into::into);
        let s = state(&[("shop", &[])], vec![p]);
        let view = node_view(&s, "n", &trust_domain);
        let w = view.workloads.values().next().unwrap();
        assert_eq!(w.identity.to_string(), want);
        assert_eq!(w.service_account, sa.unwrap_or("default"));
    }
}

fn policy(ns: &str, name: &str, selector: &[(&str, &str)]) -> Policy {
    Policy {
        namespace: ns.into(),
        name: name.into(),
        selector: labels(selector),
        action: Action::Allow,
        rules: vec![],
    }
}

/// Nodes a and b each run an enrolled and an opted-out pod; node c only an unenrolled one.
fn cluster() -> ClusterState {
    let on: Pairs = &[(ENROLL_LABEL, "true")];
    let mut s = state(
        &[("shop", on), ("plain", &[])],
        vec![
            pod("a1", "shop", "node-a", &[("app", "web")]),
            pod("a2", "shop", "node-a", &[("app", "web"), (ENROLL_LABEL, "false")]),
            pod("b1", "shop", "node-b", &[("app", "cart")]),
            pod("b2", "plain", "node-b", &[("app", "db")]),
            pod("c1", "plain", "node-c", &[("app", "db")]),
        ],
    );
    for p in [
        policy("shop", "web", &[("app", "web")]),
        policy("shop", "cart", &[("app", "cart")]),
        policy("shop", "all", &[]),
        policy("plain", "db", &[("app", "db")]),
    ] {
        s.policies.insert(p.key(), p);
    }
    let svc = Service {
        namespace: "shop".into(),
        name: "web".into(),
        cluster_ips: vec!["10.96.0.20".parse().unwrap()],
        ports: vec![],
        selector: Some(labels(&[("app", "web")])),
    };
    s.services.insert(NamespacedName::new("shop", "web"), svc);
    s
}

#[test]
fn what_each_node_gets() {
    type Keys<'a> = &'a [&'a str];
    let cases: [(&str, Keys, Keys, Keys); 4] = [
        (
            "node-a",
            &["a1", "a2", "b1"],
            &["shop/web"],
            &["shop/all", "shop/web"],
        ),
        (
            "node-b",
            &["a1", "b1", "b2"],
            &["shop/web"],
            &["shop/all", "shop/cart"],
        ),
        ("node-c", &["c1"], &[], &[]),
        ("node-x", &[], &[], &[]),
    ];
    let s = cluster();
    for (node, workloads, services, policies) in cases {
        let view = node_view(&s, node, &td());
        let uids: Vec<&String> = view.workloads.keys().collect();
        let services_got: Vec<String> = view.services.keys().map(ToString::to_string).collect();
        let policies_got: Vec<String> = view.policies.keys().map(ToString::to_string).collect();
        assert_eq!(uids, workloads, "{node} workloads");
        assert_eq!(services_got, services, "{node} services");
        assert_eq!(policies_got, policies, "{node} policies");
        for w in view.workloads.values() {
            // Local pods come with labels (policies select on them); remote ones without.
            assert_eq!(w.labels.is_empty(), w.node != node, "{node}: labels of {}", w.uid);
        }
    }
}

#[test]
fn identities_a_node_may_hold() {
    let s = cluster();
    let ids = |node| -> Vec<String> {
        local_identities(&s, node, &td())
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(ids("node-a"), ["spiffe://cluster.local/ns/shop/sa/sa-a1"]);
    assert_eq!(ids("node-b"), ["spiffe://cluster.local/ns/shop/sa/sa-b1"]);
    assert!(ids("node-c").is_empty());
    assert_eq!(local_identities(&s, "node-x", &td()), BTreeSet::new());
}

fn svc_port(name: &str, port: u16, target: TargetPort) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: target,
        protocol: Protocol::Tcp,
    }
}

fn slice(name: &str, ports: &[(&str, u16)], endpoints: Vec<SliceEndpoint>) -> EndpointSlice {
    EndpointSlice {
        namespace: "shop".into(),
        name: name.into(),
        service: "web".into(),
        ports: ports
            .iter()
            .map(|(n, p)| EndpointPort {
                name: Some(n.to_string()),
                port: *p,
                protocol: Protocol::Tcp,
            })
            .collect(),
        endpoints,
    }
}

fn slice_ep(ip: &str, ready: bool, uid: Option<&str>) -> SliceEndpoint {
    SliceEndpoint {
        addresses: vec![ip.parse().unwrap()],
        ready,
        pod_uid: uid.map(Into::into),
    }
}

fn ep(uid: Option<&str>, ip: &str, port: u16, ready: bool) -> Endpoint {
    Endpoint {
        workload_uid: uid.map(Into::into),
        ip: ip.parse().unwrap(),
        port,
        ready,
    }
}

#[test]
fn services_and_endpoints() {
    struct Case {
        what: &'static str,
        ports: Vec<ServicePort>,
        selector: Option<Labels>,
        slices: Vec<EndpointSlice>,
        want_ports: Vec<(u16, u16)>,
        want_endpoints: Vec<Endpoint>,
    }
    let web = || Some(labels(&[("app", "web")]));
    let cases = vec![
        Case {
            what: "slices give endpoints, named target ports resolve, duplicates go",
            ports: vec![svc_port("http", 80, TargetPort::Name("http".into()))],
            selector: web(),
            slices: vec![
                slice(
                    "s1",
                    &[("http", 8080)],
                    vec![slice_ep("10.0.0.1", true, Some("a1"))],
                ),
                slice(
                    "s2",
                    &[("http", 8080)],
                    vec![
                        slice_ep("10.0.0.1", true, Some("a1")),
                        slice_ep("10.0.9.9", false, None),
                    ],
                ),
            ],
            want_ports: vec![(80, 8080)],
            want_endpoints: vec![
                ep(Some("a1"), "10.0.0.1", 8080, true),
                ep(None, "10.0.9.9", 8080, false),
            ],
        },
        Case {
            what: "no slices: the selector picks pods",
            ports: vec![svc_port("http", 80, TargetPort::Number(8080))],
            selector: web(),
            slices: vec![],
            want_ports: vec![(80, 8080)],
            want_endpoints: vec![
                ep(Some("a1"), "10.0.0.1", 8080, true),
                ep(Some("a2"), "10.0.0.2", 8080, true),
            ],
        },
        Case {
            what: "no slices and no selector: no endpoints",
            ports: vec![svc_port("http", 80, TargetPort::Number(8080))],
            selector: None,
            slices: vec![],
            want_ports: vec![(80, 8080)],
            want_endpoints: vec![],
        },
        Case {
            what: "a named target port no slice resolves is left out",
            ports: vec![
                svc_port("http", 80, TargetPort::Name("http".into())),
                svc_port("admin", 81, TargetPort::Number(9000)),
            ],
            selector: web(),
            slices: vec![],
            want_ports: vec![(81, 9000)],
            want_endpoints: vec![
                ep(Some("a1"), "10.0.0.1", 9000, true),
                ep(Some("a2"), "10.0.0.2", 9000, true),
            ],
        },
    ];
    for case in cases {
        let mut s = cluster();
        let svc = s.services.get_mut(&NamespacedName::new("shop", "web")).unwrap();
        svc.ports = case.ports;
        svc.selector = case.selector;
        for sl in case.slices {
            s.endpoint_slices
                .insert(NamespacedName::new("shop", &sl.name), sl);
        }
        let view = node_view(&s, "node-a", &td());
        let got = &view.services[&NamespacedName::new("shop", "web")];
        let ports: Vec<_> = got.ports.iter().map(|p| (p.port, p.target_port)).collect();
        assert_eq!(ports, case.want_ports, "{}", case.what);
        assert_eq!(got.endpoints, case.want_endpoints, "{}", case.what);
        assert_eq!(got.vips, vec!["10.96.0.20".parse::<std::net::IpAddr>().unwrap()]);
    }
}

#[test]
fn mtls_label_values() {
    let cases = BTreeMap::from([
        ("strict", Some(MtlsMode::Strict)),
        ("Permissive", Some(MtlsMode::Permissive)),
        ("", None),
        ("off", None),
    ]);
    for (value, want) in cases {
        assert_eq!(parse_mtls_mode(value), want, "{value:?}");
    }
}

#[test]
fn a_fail_closed_stand_in_reaches_the_nodes_it_selects() {
    let mut s = cluster();
    s.policies.clear();
    let stand_in = crate::crd::fail_closed(
        "shop",
        "broken",
        &serde_json::json!({"action": "DENY", "selector": {"matchLabels": {"app": "cart"}}}),
    );
    s.policies.insert(stand_in.key(), stand_in.clone());
    let a = node_view(&s, "node-a", &td());
    let b = node_view(&s, "node-b", &td());
    assert!(a.policies.is_empty(), "selects no pod on node-a");
    assert_eq!(b.policies.values().collect::<Vec<_>>(), [&stand_in]);

    // Its selector unreadable: the whole namespace, so every node with a pod of it.
    let wide = crate::crd::fail_closed(
        "shop",
        "broken",
        &serde_json::json!({"action": "DENY", "selector": {"matchLabels": {"-app": "cart"}}}),
    );
    s.policies.insert(wide.key(), wide.clone());
    for node in ["node-a", "node-b"] {
        let view = node_view(&s, node, &td());
        assert_eq!(view.policies.values().collect::<Vec<_>>(), [&wide], "{node}");
        assert_eq!(view.policies[&wide.key()].rules, [mesh_api::Rule::default()]);
    }
}
