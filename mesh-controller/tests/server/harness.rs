//! A real controller for these tests: the file source on a temp directory, the CA
//! in files, token files, and the TLS server on 127.0.0.1:0 and on a Unix socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::client::{self, NodeCredentials, Target};
use mesh_api::secret_files;
use mesh_api::{pb, NodeMessage, TrustDomain, Update, Version};
use mesh_controller::ca::Ca;
use mesh_controller::server::auth::TokenFiles;
use mesh_controller::server::{self, Controller, Listeners};
use mesh_controller::sources::file::FileSource;
use mesh_controller::sources::Source;
use mesh_controller::store::{random_epoch, Store};
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// How long anything in these tests may take before it counts as never.
pub const DEADLINE: Duration = Duration::from_secs(10);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Namespace `shop` is enrolled (strict); `plain` is not. web-a and db-a run on node-a,
/// cart-b on node-b.
pub const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {mesh.dev/enroll: "true", mesh.dev/mtls: strict}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, uid: uid-web-a, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-b, namespace: shop, uid: uid-cart-b, labels: {app: cart}}
spec: {nodeName: node-b, serviceAccountName: cart}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-a, namespace: plain, uid: uid-db-a, labels: {app: db}}
spec: {nodeName: node-a}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/cart]}}]}]
"#;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub tcp: SocketAddr,
    pub socket: PathBuf,
    pub root_pem: String,
    /// Dropping the harness drops this and so stops the server.
    _stop: oneshot::Sender<()>,
}

impl Harness {
    pub async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let cluster = dir.path().join("cluster");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&cluster).unwrap();
        std::fs::create_dir_all(&tokens).unwrap();
        secret_files::create_secret(&tokens.join("node-a"), b"token-a\n").unwrap();
        secret_files::create_secret(&tokens.join("node-b"), b"token-b\n").unwrap();
        write_manifest(&cluster, "cluster.yaml", CLUSTER);

        let store = Arc::new(Store::new(random_epoch().unwrap()));
        let ca = Ca::load_or_create(&dir.path().join("ca"), DAY).unwrap();
        let root_pem = ca.root_pem().to_owned();
        let auth = TokenFiles::new(tokens).unwrap();
        let ctl = Arc::new(Controller::new(
            store.clone(),
            Arc::new(ca),
            auth,
            TrustDomain::default(),
        ));
        tokio::spawn(FileSource::new(cluster).unwrap().run(store.clone()));
        // Ca.Sign answers UNAVAILABLE until the cluster is loaded; the tests start after.
        let mut latest = store.subscribe();
        let loaded = tokio::time::timeout(DEADLINE, latest.wait_for(Option::is_some)).await;
        assert!(matches!(loaded, Ok(Ok(_))), "the source loads the cluster");

        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let socket = dir.path().join("controller.sock");
        let unix = UnixListener::bind(&socket).unwrap();
        let listeners = Listeners {
            tcp: Some(tcp),
            unix: Some(unix),
        };
        let names = vec![SanType::DnsName(client::SERVER_NAME.try_into().unwrap())];
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server::serve(ctl, listeners, names, DAY, async {
            let _ = stopped.await;
        }));
        Harness {
            dir,
            tcp: tcp_addr,
            socket,
            root_pem,
            _stop: stop,
        }
    }

    pub fn write(&self, name: &str, text: &str) {
        write_manifest(&self.dir.path().join("cluster"), name, text);
    }

    pub fn tcp_target(&self) -> Target {
        Target::Tcp(self.tcp.to_string())
    }

    pub fn unix_target(&self) -> Target {
        Target::Unix(self.socket.clone())
    }

    pub async fn channel(&self, target: &Target) -> Channel {
        client::connect(target, self.root_pem.as_bytes()).await.unwrap()
    }
}

pub fn credentials(node: &str, token: &str) -> NodeCredentials {
    NodeCredentials::new(node, token).unwrap()
}

/// One node's end of a Watch stream.
pub struct Watch {
    tx: mpsc::Sender<pb::WatchRequest>,
    rx: Streaming<pb::WatchResponse>,
}

impl Watch {
    /// Opens a stream and says hello as `node`.
    pub async fn open(
        channel: Channel,
        creds: NodeCredentials,
        node: &str,
        last: Option<Version>,
    ) -> Result<Watch, Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(
            NodeMessage::Hello {
                node: node.into(),
                last_applied: last,
            }
            .into(),
        )
        .await
        .unwrap();
        let mut client = client::node_config_client(channel, creds);
        let rx = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Watch { tx, rx })
    }

    /// The next message, or the status the stream ended with.
    pub async fn next_result(&mut self) -> Result<Update, Status> {
        let message = tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("an update before the deadline")?;
        let message = message.ok_or_else(|| Status::aborted("stream ended"))?;
        Ok(Update::try_from(message).expect("a valid update"))
    }

    pub async fn next(&mut self) -> Update {
        self.next_result().await.expect("an update")
    }

    pub async fn send(&self, message: NodeMessage) {
        self.tx.send(message.into()).await.unwrap();
    }
}

/// A DER CSR for these URI SANs (plus `extra` SANs).
pub fn csr(uris: &[&str], extra: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.subject_alt_names.extend(extra);
    params.serialize_request(&key).unwrap().der().to_vec()
}

pub fn der_of_pem(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents
}

/// Replaces a manifest file whole (write, then rename), as a careful tool would.
fn write_manifest(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}
