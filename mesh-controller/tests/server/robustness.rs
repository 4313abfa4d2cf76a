//! Bad input ends only the connection or stream it came on.

use mesh_api::client::ca_client;
use mesh_api::pb::SignRequest;
use mesh_api::{NodeMessage, UpdateKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

use crate::harness::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// A pod on node-b, so node-b's view changes.
const CART_B2: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: cart-b2, namespace: shop, uid: uid-cart-b2, labels: {app: cart}}
spec: {nodeName: node-b, serviceAccountName: cart}
status: {podIP: 10.1.0.5}
"#;

async fn node_b_watch(h: &Harness) -> Watch {
    let channel = h.channel(&h.tcp_target()).await;
    let mut watch = Watch::open(channel, credentials("node-b", "token-b"), "node-b", None)
        .await
        .unwrap();
    assert!(matches!(watch.next().await.kind, UpdateKind::Snapshot(_)));
    watch
}

async fn sees_cart_b2(watch: &mut Watch) {
    let update = watch.next().await;
    let UpdateKind::Delta { delta, .. } = update.kind else {
        panic!("want a delta")
    };
    assert!(delta.upserted.workloads.contains_key("uid-cart-b2"));
}

#[tokio::test]
async fn garbage_on_the_tcp_port_harms_no_one() {
    let h = Harness::start().await;
    let mut bystander = node_b_watch(&h).await;

    let mut raw = TcpStream::connect(h.tcp).await.unwrap();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // The server may close while we still write: either is fine.
    let _ = raw.write_all(&garbage).await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, raw.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the server closes a connection that is not TLS");

    let mut ca = ca_client(h.channel(&h.tcp_target()).await, credentials("node-a", "token-a"));
    let request = SignRequest {
        csr: csr(&[WEB], vec![]),
        identity: WEB.into(),
    };
    assert!(ca.sign(request).await.is_ok(), "a new client is served");
    h.write("cart-b2.yaml", CART_B2);
    sees_cart_b2(&mut bystander).await;
}

#[tokio::test]
async fn oversized_messages_end_only_their_own_stream() {
    let h = Harness::start().await;
    let mut bystander = node_b_watch(&h).await;

    let channel = h.channel(&h.tcp_target()).await;
    let mut offender = Watch::open(channel.clone(), credentials("node-a", "token-a"), "node-a", None)
        .await
        .unwrap();
    let version = offender.next().await.version;
    offender
        .send(NodeMessage::Nack {
            version,
            reason: "x".repeat(100 * 1024),
        })
        .await;
    let status = offender.next_result().await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());

    let mut ca = ca_client(channel, credentials("node-a", "token-a"));
    let huge = SignRequest {
        csr: vec![0x30; 100 * 1024],
        identity: WEB.into(),
    };
    assert_eq!(ca.sign(huge).await.unwrap_err().code(), Code::OutOfRange);
    let request = SignRequest {
        csr: csr(&[WEB], vec![]),
        identity: WEB.into(),
    };
    assert!(ca.sign(request).await.is_ok(), "the same channel still works");

    h.write("cart-b2.yaml", CART_B2);
    sees_cart_b2(&mut bystander).await;
}
