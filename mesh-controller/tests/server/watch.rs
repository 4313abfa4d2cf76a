//! NodeConfig.Watch: snapshot, deltas on file changes, ACK/NACK, resume.

use std::time::{Duration, Instant};

use mesh_api::{Delta, MtlsMode, NamespacedName, NodeMessage, NodeView, Update, UpdateKind, Version};

use crate::harness::*;

/// A second web pod on node-a, which also becomes an endpoint of service shop/web.
const WEB_A2: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-a2, namespace: shop, uid: uid-web-a2, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.1.0.4}
"#;

fn snapshot(update: Update) -> (Version, NodeView) {
    match update.kind {
        UpdateKind::Snapshot(view) => (update.version, view),
        UpdateKind::Delta { .. } => panic!("want a snapshot, got {update:?}"),
    }
}

fn delta(update: Update) -> (Version, Version, Delta) {
    match update.kind {
        UpdateKind::Delta { base, delta } => (update.version, base, delta),
        UpdateKind::Snapshot(_) => panic!("want a delta, got {update:?}"),
    }
}

fn keys<K: ToString, V>(map: &std::collections::BTreeMap<K, V>) -> Vec<String> {
    map.keys().map(ToString::to_string).collect()
}

async fn open(h: &Harness, last: Option<Version>) -> Watch {
    let channel = h.channel(&h.tcp_target()).await;
    Watch::open(channel, credentials("node-a", "token-a"), "node-a", last)
        .await
        .unwrap()
}

#[tokio::test]
async fn snapshot_then_delta_after_a_file_change() {
    let h = Harness::start().await;
    let mut watch = open(&h, None).await;
    let (v1, view) = snapshot(watch.next().await);
    assert_eq!(keys(&view.workloads), ["uid-cart-b", "uid-db-a", "uid-web-a"]);
    assert_eq!(keys(&view.services), ["shop/web"]);
    assert_eq!(keys(&view.policies), ["shop/web"]);
    let web = &view.workloads["uid-web-a"];
    assert!(web.enrolled);
    assert_eq!(web.mtls_mode, MtlsMode::Strict);
    assert_eq!(web.identity.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    assert!(!view.workloads["uid-db-a"].enrolled);
    assert!(
        view.workloads["uid-cart-b"].labels.is_empty(),
        "remote workloads come without labels"
    );
    watch.send(NodeMessage::Ack(v1.clone())).await;

    let written = Instant::now();
    h.write("web-a2.yaml", WEB_A2);
    let update = watch.next().await;
    let propagation = written.elapsed();
    println!("propagation: manifest written -> delta received in {propagation:?}");

    let (v2, base, delta) = delta(update);
    assert_eq!(base, v1);
    assert_eq!(v2.epoch, v1.epoch);
    assert!(v2.number > v1.number);
    assert_eq!(keys(&delta.upserted.workloads), ["uid-web-a2"]);
    assert_eq!(
        keys(&delta.upserted.services),
        ["shop/web"],
        "its endpoints changed"
    );
    assert_eq!(
        delta.upserted.services[&NamespacedName::new("shop", "web")]
            .endpoints
            .len(),
        2
    );
    assert!(delta.removed.workloads.is_empty());
    watch.send(NodeMessage::Ack(v2)).await;
    assert!(
        propagation < Duration::from_secs(1),
        "propagation took {propagation:?}"
    );
}

#[tokio::test]
async fn a_nacked_delta_is_followed_by_a_snapshot() {
    let h = Harness::start().await;
    let mut watch = open(&h, None).await;
    let (v1, _) = snapshot(watch.next().await);
    watch.send(NodeMessage::Ack(v1)).await;
    h.write("web-a2.yaml", WEB_A2);
    let (v2, _, _) = delta(watch.next().await);
    watch
        .send(NodeMessage::Nack {
            version: v2.clone(),
            reason: "cannot apply".into(),
        })
        .await;
    let (v3, view) = snapshot(watch.next().await);
    assert_eq!(v3, v2, "the same state, whole");
    assert!(view.workloads.contains_key("uid-web-a2"));
}

#[tokio::test]
async fn a_reconnecting_node_resumes_without_duplicates() {
    let h = Harness::start().await;
    let mut first = open(&h, None).await;
    let (mut version, mut view) = snapshot(first.next().await);
    first.send(NodeMessage::Ack(version.clone())).await;
    drop(first);

    h.write("web-a2.yaml", WEB_A2);
    let mut again = open(&h, Some(version.clone())).await;
    // The first update answers the resume; the change may come with it or right after.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (next, base, delta) = delta(again.next().await);
        assert_eq!(base, version, "each delta builds on the last one");
        view.apply(delta);
        version = next;
        if view.workloads.contains_key("uid-web-a2") {
            break;
        }
        assert!(Instant::now() < deadline, "the change never arrived");
    }

    let (fresh_version, fresh) = snapshot(open(&h, None).await.next().await);
    assert_eq!(fresh_version, version);
    assert_eq!(view, fresh, "resumed view equals a fresh snapshot");

    // A version of another controller instance cannot be resumed from.
    let stale = Version {
        epoch: "another-instance".into(),
        number: version.number,
    };
    let (_, view) = snapshot(open(&h, Some(stale)).await.next().await);
    assert_eq!(view, fresh);
}

#[tokio::test]
async fn the_unix_socket_serves_the_same_over_tls() {
    let h = Harness::start().await;
    let channel = h.channel(&h.unix_target()).await;
    let mut watch = Watch::open(channel.clone(), credentials("node-b", "token-b"), "node-b", None)
        .await
        .unwrap();
    let (_, view) = snapshot(watch.next().await);
    assert_eq!(keys(&view.workloads), ["uid-cart-b", "uid-web-a"]);
    assert!(view.policies.is_empty(), "no policy selects cart");

    let mut ca = mesh_api::client::ca_client(channel, credentials("node-b", "token-b"));
    let identity = "spiffe://cluster.local/ns/shop/sa/cart";
    let request = mesh_api::pb::SignRequest {
        csr: csr(&[identity], vec![]),
        identity: identity.into(),
    };
    let chain = ca.sign(request).await.unwrap().into_inner().cert_chain;
    assert_eq!(chain.len(), 2);
}
