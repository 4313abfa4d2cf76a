//! The loader on real-looking manifests: what it keeps, and what it reports and skips.

use std::net::IpAddr;

use mesh_api::{Action, Protocol};

use super::*;
use crate::cluster::TargetPort;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    mesh.dev/enroll: "true"
    mesh.dev/mtls: strict
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: 0b3c7e0e-1111-4c8a-9c1e-000000000001
  labels: {app: web}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: web, image: nginx}]
status:
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}, {ip: "fd00::5"}]
---
apiVersion: v1
kind: Pod
metadata: {name: agent, namespace: shop, uid: host-1}
spec: {nodeName: node-a, hostNetwork: true}
status: {podIP: 192.0.2.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.0.5]
  conditions: {ready: false}
  targetRef: {kind: Pod, name: web-1, uid: 0b3c7e0e-1111-4c8a-9c1e-000000000001}
- addresses: [10.0.0.6]
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-cart, namespace: shop}
spec:
  selector:
    matchLabels: {app: web}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/cart", "spiffe://cluster.local/ns/shop/sa/admin"]
    - source: {namespaces: [ops]}
    to:
    - operation: {ports: ["8080", 9090]}
"#;

fn load(files: &[(&str, &str)]) -> (ClusterState, Vec<Problem>) {
    let mut loader = Loader::default();
    for (name, text) in files {
        loader.add_file(name, text);
    }
    loader.finish()
}

#[test]
fn reads_every_kind() {
    let (state, problems) = load(&[("cluster.yaml", CLUSTER)]);
    assert_eq!(problems, []);

    let ns = &state.namespaces["shop"];
    assert_eq!(ns.labels["mesh.dev/mtls"], "strict");

    assert_eq!(state.pods.len(), 1, "the host-network pod is left out");
    let pod = &state.pods["0b3c7e0e-1111-4c8a-9c1e-000000000001"];
    assert_eq!(
        (pod.name.as_str(), pod.namespace.as_str(), pod.node.as_str()),
        ("web-1", "shop", "node-a")
    );
    assert_eq!(pod.service_account.as_deref(), Some("web"));
    let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
    assert_eq!(pod.ips, ips);
    assert_eq!(pod.labels["app"], "web");

    let svc = &state.services[&NamespacedName::new("shop", "web")];
    assert_eq!(svc.cluster_ips, ["10.96.0.20".parse::<IpAddr>().unwrap()]);
    assert_eq!(svc.ports[0].target_port, TargetPort::Name("http".into()));
    assert_eq!(
        (svc.ports[1].target_port.clone(), svc.ports[1].protocol),
        (TargetPort::Number(5353), Protocol::Udp)
    );

    let slice = &state.endpoint_slices[&NamespacedName::new("shop", "web-abc")];
    assert_eq!(slice.service, "web");
    assert_eq!(slice.ports[0].port, 8080);
    assert!(!slice.endpoints[0].ready);
    assert_eq!(
        slice.endpoints[0].pod_uid.as_deref(),
        Some("0b3c7e0e-1111-4c8a-9c1e-000000000001")
    );
    assert!(slice.endpoints[1].ready, "unknown readiness counts as ready");
    assert_eq!(slice.endpoints[1].pod_uid, None);

    let policy = &state.policies[&NamespacedName::new("shop", "web-from-cart")];
    assert_eq!(policy.action, Action::Allow);
    assert_eq!(policy.selector["app"], "web");
    let rule = &policy.rules[0];
    let principals: Vec<String> = rule.from[0].principals.iter().map(ToString::to_string).collect();
    assert_eq!(
        principals,
        [
            "spiffe://cluster.local/ns/shop/sa/cart",
            "spiffe://cluster.local/ns/shop/sa/admin"
        ]
    );
    assert_eq!(rule.from[1].namespaces, ["ops"]);
    assert_eq!(rule.to[0].ports, [8080, 9090]);
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop, uid: u1}\n";

#[test]
fn problems_name_the_field() {
    let pod = |rest: &str| format!("{POD}{rest}");
    let placed = "spec: {nodeName: n}\nstatus: {podIP: 10.0.0.1}\n";
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        ("kind: Pod\napiVersion: v1\nmetadata: {name: [\n".into(), None, "line 4"),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n".into(), Some("kind"), "unsupported kind"),
        (pod("spec: {nodeName: n}\n"), Some("status.podIP"), "no address"),
        (pod("status: {podIP: 10.0.0.1}\n"), Some("spec.nodeName"), "not scheduled"),
        (pod("spec: {nodeName: n}\nstatus: {podIPs: [{ip: 10.0.0.300}]}\n"), Some("status.podIPs[0].ip"), "IP"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: n}\nstatus: {podIP: 10.0.0.1}\n".into(),
            Some("metadata.uid"),
            "missing",
        ),
        (
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, uid: u1, labels: {{mesh.dev/enroll: true}}}}\n{placed}"),
            Some("metadata.labels.mesh.dev/enroll"),
            "string",
        ),
        (pod(&placed.replace("nodeName: n", "nodeName: n, serviceAccountName: a/b")), Some("spec.serviceAccountName"), "'/'"),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}\n".into(),
            Some("spec.ports[0].port"),
            "invalid value",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, protocol: HTTP}]}\n".into(),
            Some("spec.ports[0].protocol"),
            "HTTP",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: nope}\n".into(),
            Some("spec.clusterIP[0]"),
            "not an IP",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4\n".into(),
            Some("metadata.labels.kubernetes.io/service-name"),
            "missing",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: FQDN\n".into(),
            Some("addressType"),
            "FQDN",
        ),
        (
            "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: AUDIT}\n".into(),
            Some("spec.action"),
            "AUDIT",
        ),
        (
            "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{when: []}]}\n".into(),
            Some("spec.rules[0].when"),
            "unknown field `when`",
        ),
        (
            "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{from: [{source: {principals: ['*']}}]}]}\n".into(),
            Some("spec.rules[0].from[0].source.principals[0]"),
            "wildcards",
        ),
        (
            "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{to: [{operation: {ports: ['http']}}]}]}\n".into(),
            Some("spec.rules[0].to[0].operation.ports[0]"),
            "not a port",
        ),
        (
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p, uid: u}, spec: {nodeName: n}}\n".into(),
            Some("items[0].status.podIP"),
            "no address",
        ),
    ];
    for (yaml, field, message) in cases {
        let (state, problems) = load(&[("f.yaml", &yaml)]);
        assert_eq!(problems.len(), 1, "{yaml}: {problems:?}");
        let problem = &problems[0];
        assert_eq!(problem.field.as_deref(), field, "{yaml}: {problem}");
        assert!(problem.message.contains(message), "{yaml}: {problem}");
        assert_eq!(problem.file, "f.yaml");
        assert!(state.pods.is_empty() && state.services.is_empty(), "{yaml}");
        // A policy is never left out: its fail-closed stand-in takes its place.
        let is_policy = yaml.contains("kind: AuthorizationPolicy");
        assert_eq!(state.policies.len(), usize::from(is_policy), "{yaml}");
        assert_eq!(problem.fail_closed.is_some(), is_policy, "{yaml}");
    }
}

#[test]
fn a_bad_document_spoils_only_itself() {
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\nkind: [broken\n---\n{POD}spec: {{nodeName: n}}\nstatus: {{podIP: 10.0.0.1}}\n"
    );
    let (state, problems) = load(&[("a.yaml", &text), ("b.yaml", &text.replace("u1", "u2"))]);
    assert_eq!(state.namespaces.len(), 1);
    assert_eq!(state.pods.keys().collect::<Vec<_>>(), ["u1", "u2"]);
    // The broken documents, and b.yaml's namespace that repeats a.yaml's.
    let found: Vec<String> = problems
        .iter()
        .map(|p| format!("{}:{} {:?}", p.file, p.line, p.object))
        .collect();
    assert_eq!(
        found,
        [
            "a.yaml:4 None",
            "b.yaml:1 Some(\"Namespace shop\")",
            "b.yaml:4 None"
        ]
    );
    assert!(problems[0].message.contains("line 6"), "{}", problems[0]);
    assert!(problems[1].message.contains("same key"));
    assert!(problems[1]
        .to_string()
        .starts_with("b.yaml:1: Namespace shop: another object"));
}

#[test]
fn a_policy_that_does_not_convert_is_enforced_fail_closed() {
    let deny = "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-ops, namespace: shop}\nspec:\n  action: DENY\n  selector: {matchLabels: {app: web}}\n  rules: [{to: [{operation: {ports: ['8080', 'http']}}]}]\n";
    let allow = "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: cart-only, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules: [{from: [{source: {principals: ['*']}}]}]\n";
    let bad_selector = "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad-key, namespace: shop}\nspec: {action: DENY, selector: {matchLabels: {-app: web}}}\n";
    let (state, problems) = load(&[
        ("deny.yaml", deny),
        ("allow.yaml", allow),
        ("key.yaml", bad_selector),
    ]);

    let deny = &state.policies[&NamespacedName::new("shop", "no-ops")];
    assert_eq!(deny.action, Action::Deny);
    assert_eq!(deny.selector, [("app".to_owned(), "web".to_owned())].into());
    assert_eq!(
        deny.rules,
        [mesh_api::Rule::default()],
        "one rule that matches every connection"
    );
    let allow = &state.policies[&NamespacedName::new("shop", "cart-only")];
    assert_eq!(
        (allow.action, allow.rules.len()),
        (Action::Allow, 0),
        "allows nothing"
    );
    let bad_key = &state.policies[&NamespacedName::new("shop", "bad-key")];
    assert!(bad_key.selector.is_empty(), "the whole namespace");
    assert_eq!(bad_key.action, Action::Deny);

    let said: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(said.len(), 3, "{said:?}");
    assert!(
        said[0].starts_with(
            "deny.yaml:1: AuthorizationPolicy shop/no-ops: spec.rules[0].to[0].operation.ports[1]: "
        ) && said[0].ends_with("the workloads it selects refuse every connection"),
        "{}",
        said[0]
    );
    assert!(
        said[1].contains("spec.rules[0].from[0].source.principals[0]") && said[1].contains("default-deny")
    );
    assert!(said[2].contains("spec.selector.matchLabels.-app"));
}
