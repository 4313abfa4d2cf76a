//! The real `mesh-controller --source kubernetes` binary against the fake API server served
//! over HTTP on loopback (a kubeconfig points it there), and a node that connects with a
//! token the fake's TokenReview vouches for: the wiring of main.rs, end to end.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_api::client::{self, NodeCredentials, Target};
use mesh_api::{pb, NodeMessage, Update, UpdateKind};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::fake::FakeApi;
use crate::*;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

#[tokio::test]
async fn the_binary_serves_a_node_that_proves_itself_by_token_review() {
    let fake = FakeApi::new();
    fake.apply("namespaces", namespace("shop", true));
    fake.apply("pods", pod("shop", "web-1", "node-a", "10.0.0.5"));
    fake.apply(
        "authorizationpolicies",
        policy(
            "shop",
            "p",
            json!({ "rules": [{ "from": [{ "source": { "namespaces": ["ops"] } }] }] }),
        ),
    );
    fake.apply(
        "pods",
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "mesh-node-abcde", "namespace": "mesh-system", "uid": "agent-uid" },
            "spec": { "nodeName": "node-a", "hostNetwork": true, "containers": [{ "name": "agent" }] },
            "status": { "phase": "Running", "podIP": "192.0.2.10" },
        }),
    );
    fake.token(
        "projected-token",
        json!({
            "authenticated": true, "audiences": ["mesh-controller"],
            "user": { "username": "system:serviceaccount:mesh-system:mesh-node",
                      "extra": { "authentication.kubernetes.io/pod-name": ["mesh-node-abcde"],
                                 "authentication.kubernetes.io/pod-uid": ["agent-uid"] } },
        }),
    );
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = api.local_addr().unwrap();
    tokio::spawn(fake.clone().serve_http(api));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://{api_addr}'}}}}]\n\
             users: [{{name: fake, user: {{token: controller-token}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        ),
    )
    .unwrap();
    let (grpc, health) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-controller"))
        .args(["--source", "kubernetes", "--listen", &grpc.to_string()])
        .args(["--health-listen", &health.to_string()])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", "mesh-system")
        .env("POD_NAME", "mesh-controller-0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Killed(child);

    // The root: created in the Secret, published in the trust bundle ConfigMap.
    eventually(WAIT, "the trust bundle", || async {
        fake.get("configmaps", "mesh-system", "mesh-root-ca").is_some()
    })
    .await;
    let root_pem = fake.get("configmaps", "mesh-system", "mesh-root-ca").unwrap()["data"]["root.pem"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = fake.get("secrets", "mesh-system", "mesh-ca").unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    eventually(WAIT, "ready", || async {
        get(health, "/healthz/ready")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    eventually(WAIT, "the lease and the policy status", || async {
        fake.get("leases", "mesh-system", "mesh-controller")
            .is_some_and(|l| l["spec"]["holderIdentity"] == "mesh-controller-0")
            && fake
                .get("authorizationpolicies", "shop", "p")
                .is_some_and(|p| p["status"]["conditions"][0]["status"] == "True")
    })
    .await;

    // A node agent: TLS pinned to the published root, the projected token as bearer.
    let channel = client::connect(&Target::Tcp(grpc.to_string()), root_pem.as_bytes())
        .await
        .unwrap();
    let watch = |creds: NodeCredentials, node: &'static str| {
        let channel = channel.clone();
        async move {
            let (tx, rx) = mpsc::channel::<pb::WatchRequest>(4);
            tx.send(
                NodeMessage::Hello {
                    node: node.into(),
                    last_applied: None,
                }
                .into(),
            )
            .await
            .unwrap();
            let mut c = client::node_config_client(channel, creds);
            let mut stream = c.watch(ReceiverStream::new(rx)).await?.into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("an update")?
                .expect("a message");
            drop(tx);
            Ok::<Update, tonic::Status>(Update::try_from(first).unwrap())
        }
    };
    let update = watch(
        NodeCredentials::new("node-a", "projected-token").unwrap(),
        "node-a",
    )
    .await
    .unwrap();
    let UpdateKind::Snapshot(view) = update.kind else {
        panic!("a snapshot first")
    };
    assert_eq!(
        view.workloads
            .values()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>(),
        ["web-1"]
    );
    assert_eq!(view.policies.len(), 1);

    // The token proves node-a only; a wrong token proves nothing.
    let err = watch(
        NodeCredentials::new("node-b", "projected-token").unwrap(),
        "node-b",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = watch(NodeCredentials::new("node-a", "stolen").unwrap(), "node-a")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
}
