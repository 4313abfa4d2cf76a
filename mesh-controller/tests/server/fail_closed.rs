//! A policy the controller cannot convert reaches the nodes as its fail-closed stand-in:
//! a DENY denies every connection to what it selects, an ALLOW allows nothing.

use mesh_api::{Action, NamespacedName, NodeMessage, Rule, UpdateKind};

use crate::harness::*;

/// Each refused by the controller: a DENY with a port that is not a number, an ALLOW with a
/// wildcard principal (not supported), both selecting web-a.
const BROKEN: &str = r#"
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin-port, namespace: shop}
spec:
  action: DENY
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {ports: ["9090", "admin"]}}]}]
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: anyone, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: ["*"]}}]}]
"#;

#[tokio::test]
async fn a_node_receives_the_fail_closed_stand_in_of_a_broken_policy() {
    let h = Harness::start().await;
    let channel = h.channel(&h.tcp_target()).await;
    let mut watch = Watch::open(channel, credentials("node-a", "token-a"), "node-a", None)
        .await
        .unwrap();
    let first = watch.next().await;
    let UpdateKind::Snapshot(view) = &first.kind else {
        panic!("want a snapshot, got {first:?}")
    };
    assert_eq!(view.policies.len(), 1, "only shop/web");
    watch.send(NodeMessage::Ack(first.version.clone())).await;

    h.write("broken.yaml", BROKEN);
    let update = watch.next().await;
    let UpdateKind::Delta { delta, .. } = &update.kind else {
        panic!("want a delta, got {update:?}")
    };
    let policies = &delta.upserted.policies;
    let deny = policies
        .get(&NamespacedName::new("shop", "no-admin-port"))
        .unwrap_or_else(|| panic!("the broken DENY is left out: {policies:?}"));
    assert_eq!(deny.action, Action::Deny);
    assert_eq!(deny.selector["app"], "web");
    assert_eq!(
        deny.rules,
        [Rule::default()],
        "one rule that matches every connection"
    );
    let allow = policies
        .get(&NamespacedName::new("shop", "anyone"))
        .unwrap_or_else(|| panic!("the broken ALLOW is left out: {policies:?}"));
    assert_eq!(allow.action, Action::Allow);
    assert!(allow.rules.is_empty(), "allows nothing: {allow:?}");
}
