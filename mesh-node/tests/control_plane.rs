//! The node's control-plane client and certificate manager against the REAL mesh-controller,
//! run in-process on its local-file source, over TLS on 127.0.0.1 and on a Unix socket.
//!
//! Nothing here sleeps for a fixed time to let something happen: every wait is for a
//! condition, with a deadline.
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mesh_api::client::Target;
use mesh_api::secret_files;
use mesh_api::{Identity, TrustDomain};
use mesh_controller::ca::Ca;
use mesh_controller::server::auth::TokenFiles;
use mesh_controller::server::{self, Controller, Listeners, ServerError};
use mesh_controller::sources::file::FileSource;
use mesh_controller::sources::Source;
use mesh_controller::store::{random_epoch, Store};
use mesh_node::control::{
    Backoff, ControlClient, ControlError, ControlHandle, ControllerEndpoint, NodeState,
};
use mesh_node::health::Readiness;
use mesh_node::identity::{roots_from_pem, CaSigner, CertStore, IdentityManager, SignError, Signer};
use rcgen::SanType;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;

const DEADLINE: Duration = Duration::from_secs(20);

const WEB_UID: &str = "11111111-0000-4000-8000-000000000001";
const CART_UID: &str = "11111111-0000-4000-8000-000000000002";
const LEGACY_UID: &str = "11111111-0000-4000-8000-000000000003";
const API_UID: &str = "11111111-0000-4000-8000-000000000004";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {mesh.dev/enroll: "true"}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: 11111111-0000-4000-8000-000000000001
  labels: {app: web}
spec: {nodeName: a, serviceAccountName: web}
status: {podIP: 10.1.1.10}
---
apiVersion: v1
kind: Pod
metadata:
  name: cart-1
  namespace: shop
  uid: 11111111-0000-4000-8000-000000000002
  labels: {app: cart}
spec: {nodeName: b, serviceAccountName: cart}
status: {podIP: 10.1.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: old-1, namespace: legacy, uid: 11111111-0000-4000-8000-000000000003}
spec: {nodeName: a}
status: {podIP: 10.1.1.11}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/cart]}}]}]
"#;

const API_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: api-1
  namespace: shop
  uid: 11111111-0000-4000-8000-000000000004
  labels: {app: api}
spec: {nodeName: a, serviceAccountName: api}
status: {podIP: 10.1.1.12}
"#;

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

fn id(sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap()
}

/// Files of one test: cluster manifests, CA, node tokens, sockets.
struct Dirs {
    _tmp: tempfile::TempDir,
    cluster: PathBuf,
    ca: PathBuf,
    tokens: PathBuf,
    socket: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let dirs = Dirs {
            cluster: root.join("cluster"),
            ca: root.join("ca"),
            tokens: root.join("tokens"),
            socket: root.join("controller.sock"),
            _tmp: tmp,
        };
        std::fs::create_dir_all(&dirs.cluster).unwrap();
        std::fs::create_dir_all(&dirs.tokens).unwrap();
        std::fs::write(dirs.cluster.join("cluster.yaml"), CLUSTER).unwrap();
        secret_files::create_secret(&dirs.tokens.join("a"), b"token-of-a\n").unwrap();
        secret_files::create_secret(&dirs.tokens.join("b"), b"token-of-b\n").unwrap();
        dirs
    }

    fn root_file(&self) -> PathBuf {
        self.ca.join("root.pem")
    }

    /// A node's own copy of its token.
    fn token_file(&self, name: &str, token: &str) -> PathBuf {
        let path = self.tokens.parent().unwrap().join(format!("{name}.token"));
        std::fs::write(&path, token).unwrap();
        path
    }

    /// Writes a manifest atomically (dot-files are not read), as a ConfigMap update would.
    fn add_manifest(&self, name: &str, text: &str) {
        let tmp = self.cluster.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.cluster.join(name)).unwrap();
    }

    fn endpoint(&self, target: Target, node: &str, token_file: PathBuf) -> ControllerEndpoint {
        ControllerEndpoint::new(target, self.root_file(), token_file, node)
    }
}

/// The real controller: CA, store, file source, TLS gRPC server on TCP and a Unix socket.
struct RunningController {
    addr: SocketAddr,
    epoch: String,
    store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), ServerError>>,
    source: JoinHandle<()>,
}

impl RunningController {
    /// Starts on `tcp` (port 0 for any) with certificates living `ttl`.
    async fn start(dirs: &Dirs, tcp: SocketAddr, ttl: Duration) -> RunningController {
        let ca = Ca::load_or_create(&dirs.ca, ttl).unwrap();
        let epoch = random_epoch().unwrap();
        let store = Arc::new(Store::new(epoch.clone()));
        let ctl = Arc::new(Controller::new(
            store.clone(),
            Arc::new(ca),
            TokenFiles::new(dirs.tokens.clone()).unwrap(),
            TrustDomain::default(),
        ));
        // The previous instance's listener closes once its accept loop notices: retry.
        let listener = eventually("binding the controller's TCP port", || async {
            TcpListener::bind(tcp).await.ok()
        })
        .await;
        let addr = listener.local_addr().unwrap();
        let _ = std::fs::remove_file(&dirs.socket);
        let unix = UnixListener::bind(&dirs.socket).unwrap();
        let source = FileSource::new(dirs.cluster.clone()).unwrap();
        let source = tokio::spawn({
            let store = store.clone();
            async move { source.run(store).await.unwrap() }
        });
        let (shutdown, stopped) = oneshot::channel::<()>();
        let names = vec![SanType::DnsName("mesh-controller".try_into().unwrap())];
        let serving = tokio::spawn(server::serve(
            ctl,
            Listeners {
                tcp: Some(listener),
                unix: Some(unix),
            },
            names,
            ttl,
            async move {
                let _ = stopped.await;
            },
        ));
        RunningController {
            addr,
            epoch,
            store,
            shutdown: Some(shutdown),
            serving,
            source,
        }
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let serving = tokio::time::timeout(DEADLINE, &mut self.serving).await;
        serving
            .expect("the controller stops within the deadline")
            .unwrap()
            .unwrap();
        self.source.abort();
        let _ = self.source.await;
    }
}

/// Polls `attempt` until it yields, failing the test at the deadline.
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the published state satisfies `cond`; returns it.
async fn state_where(
    handle: &ControlHandle,
    what: &str,
    cond: impl Fn(&NodeState) -> bool,
) -> Arc<NodeState> {
    let mut rx = handle.subscribe();
    let waited = tokio::time::timeout(DEADLINE, rx.wait_for(|s| cond(s))).await;
    let state = waited
        .unwrap_or_else(|_| panic!("timed out: {what}; state: {:?}", handle.state()))
        .expect("the control client is running");
    state.clone()
}

/// Waits until the certificate store satisfies `cond`.
async fn store_where(store: &CertStore, what: &str, cond: impl Fn(&CertStore) -> bool) {
    let mut changes = store.subscribe();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond(store) {
        let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
        assert!(changed.is_ok(), "timed out: {what}; store: {store:?}");
    }
}

fn uids(map: &std::collections::BTreeMap<String, mesh_api::Workload>) -> BTreeSet<&str> {
    map.keys().map(String::as_str).collect()
}

/// The URI SANs of a DER certificate.
fn sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => u.to_string(),
                    other => format!("non-URI {other}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every certificate in the store is for the identity it is filed under, and the set of
/// identities is exactly `want`.
fn assert_certs_exactly(store: &CertStore, want: &[Identity]) {
    let all = store.all();
    let have: Vec<&Identity> = all.keys().collect();
    assert_eq!(have, want.iter().collect::<Vec<_>>());
    for (identity, svid) in all.iter() {
        assert_eq!(sans(svid.leaf()), [identity.to_string()]);
        assert!(svid.is_valid_at(SystemTime::now()));
    }
}

/// A node agent's control side: config client and certificate manager.
struct Agent {
    handle: ControlHandle,
    store: CertStore,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    async fn start(endpoint: ControllerEndpoint) -> Agent {
        let stop = CancellationToken::new();
        let (client, handle) = ControlClient::new(endpoint.clone());
        let client = client.with_backoff(Backoff::new(Duration::from_millis(100), Duration::from_secs(1)));
        let roots = roots_from_pem(&std::fs::read(&endpoint.ca_file).unwrap()).unwrap();
        let store = CertStore::new();
        let manager = IdentityManager::new(CaSigner::new(endpoint), roots, store.clone());
        let tasks = vec![
            tokio::spawn(client.run(stop.clone())),
            tokio::spawn(manager.run(
                handle.subscribe(),
                |s: &Arc<NodeState>| s.local_identities(),
                stop.clone(),
            )),
        ];
        Agent {
            handle,
            store,
            stop,
            tasks,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_certificates_follow_the_controller() {
    init_logging();
    let dirs = Dirs::new();
    let hour = Duration::from_secs(3600);
    let controller = RunningController::start(&dirs, "127.0.0.1:0".parse().unwrap(), hour).await;
    let tcp = controller.addr;

    // Node a over TCP.
    let a = Agent::start(dirs.endpoint(
        Target::Tcp(tcp.to_string()),
        "a",
        dirs.token_file("a", "token-of-a"),
    ))
    .await;
    let readiness = Readiness::new(Some(a.handle.clone()));
    readiness.set_capture_active(true);

    // The snapshot.
    let started = Instant::now();
    let state = state_where(&a.handle, "the first snapshot", NodeState::has_config).await;
    println!("first snapshot after {:?}", started.elapsed());
    assert_eq!(state.version.as_ref().unwrap().epoch, controller.epoch);
    assert_eq!(uids(&state.local), BTreeSet::from([WEB_UID, LEGACY_UID]));
    assert_eq!(uids(&state.remote), BTreeSet::from([CART_UID]));
    assert!(
        !state.local[LEGACY_UID].enrolled,
        "legacy is not an enrolled namespace"
    );
    assert!(state.local[WEB_UID].enrolled);
    assert_eq!(state.local[WEB_UID].identity, id("web"));
    assert_eq!(
        state.local[WEB_UID].ips,
        ["10.1.1.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        state
            .service_by_vip("10.96.0.20".parse().unwrap())
            .map(|s| s.name.as_str()),
        Some("web")
    );
    assert_eq!(state.local_identities(), BTreeSet::from([id("web")]));
    assert_eq!(
        state.policies.keys().map(ToString::to_string).collect::<Vec<_>>(),
        ["shop/web"]
    );
    assert!(state.stale_since.is_none());
    let verdict = readiness.verdict();
    assert_eq!(verdict.status, 200, "{}", verdict.body);

    // Certificates exactly for node a's enrolled identities.
    store_where(&a.store, "web's certificate", |s| s.len() == 1).await;
    assert_certs_exactly(&a.store, &[id("web")]);

    // Node b over the Unix socket: its own view, and no way to get a's identities.
    let b_endpoint = dirs.endpoint(
        Target::Unix(dirs.socket.clone()),
        "b",
        dirs.token_file("b", "token-of-b"),
    );
    let b = Agent::start(b_endpoint.clone()).await;
    let b_state = state_where(
        &b.handle,
        "b's snapshot over the Unix socket",
        NodeState::has_config,
    )
    .await;
    assert_eq!(uids(&b_state.local), BTreeSet::from([CART_UID]));
    assert_eq!(uids(&b_state.remote), BTreeSet::from([WEB_UID]));
    store_where(&b.store, "cart's certificate", |s| s.len() == 1).await;
    assert_certs_exactly(&b.store, &[id("cart")]);
    let b_signer = CaSigner::new(b_endpoint);
    let stolen = mesh_node::identity::generate_key_and_csr(&id("web")).unwrap();
    match b_signer.sign(&id("web"), stolen.csr).await {
        Err(SignError::Refused(reason)) => assert!(reason.contains("node b"), "{reason}"),
        other => panic!("node b got web's certificate signed: {other:?}"),
    }
    b.stop().await;

    // A new pod on node a: the delta arrives; measure how fast.
    let before = a.handle.state();
    let written = Instant::now();
    dirs.add_manifest("api.yaml", API_POD);
    let state = state_where(&a.handle, "the api pod's delta", |s| {
        s.local.contains_key(API_UID)
    })
    .await;
    let propagation = written.elapsed();
    println!("propagation (manifest written -> delta applied on node a): {propagation:?}");
    assert_eq!(
        state.version.as_ref().unwrap().number,
        before.version.as_ref().unwrap().number + 1
    );
    assert_eq!(uids(&state.local), BTreeSet::from([WEB_UID, LEGACY_UID, API_UID]));
    assert_eq!(uids(&state.remote), BTreeSet::from([CART_UID]));
    store_where(&a.store, "api's certificate", |s| s.len() == 2).await;
    println!("certificate for the new pod after {:?}", written.elapsed());
    assert_certs_exactly(&a.store, &[id("api"), id("web")]);
    let web_cert = a.store.get(&id("web")).unwrap();

    // The controller goes away: the state stays, marked stale; certificates keep serving.
    let held = a.handle.state();
    controller.stop().await;
    let stale = state_where(&a.handle, "the state marked stale", |s| s.stale_since.is_some()).await;
    assert_eq!(stale.version, held.version);
    assert_eq!(stale.local, held.local);
    assert_eq!(stale.remote, held.remote);
    assert_eq!(stale.services, held.services);
    assert_eq!(stale.policies, held.policies);
    assert!(a.handle.status().last_error.is_some());
    assert_certs_exactly(&a.store, &[id("api"), id("web")]);
    assert_eq!(a.store.get(&id("web")).unwrap().serial(), web_cert.serial());
    let verdict = readiness.verdict();
    assert_eq!(verdict.status, 200, "stale config stays ready: {}", verdict.body);
    assert!(verdict.body.contains("stale config since"), "{}", verdict.body);
    println!("readiness during the outage: {}", verdict.body);

    // The controller comes back (same CA, same address, new epoch): a fresh snapshot
    // replaces the state, with nothing duplicated.
    let controller = RunningController::start(&dirs, tcp, hour).await;
    let resynced = state_where(&a.handle, "the resync", |s| {
        s.stale_since.is_none()
            && s.version
                .as_ref()
                .is_some_and(|v| v.epoch != held.version.as_ref().unwrap().epoch)
    })
    .await;
    assert_eq!(resynced.version.as_ref().unwrap().epoch, controller.epoch);
    assert_eq!(resynced.local, held.local);
    assert_eq!(resynced.remote, held.remote);
    assert_eq!(resynced.services, held.services);
    assert_eq!(resynced.policies, held.policies);
    assert_eq!(resynced.local.len() + resynced.remote.len(), 4);
    assert!(a.handle.status().connected);
    assert_certs_exactly(&a.store, &[id("api"), id("web")]);
    assert_eq!(readiness.verdict().status, 200);
    assert!(readiness.verdict().body.contains("config version"));

    a.stop().await;
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_and_never_lapse() {
    init_logging();
    let dirs = Dirs::new();
    // Renewal at half-life minus up to 10% jitter: every 3.2-4 s.
    let ttl = Duration::from_secs(8);
    let controller = RunningController::start(&dirs, "127.0.0.1:0".parse().unwrap(), ttl).await;
    dirs.add_manifest("api.yaml", API_POD);
    let a = Agent::start(dirs.endpoint(
        Target::Tcp(controller.addr.to_string()),
        "a",
        dirs.token_file("a", "token-of-a"),
    ))
    .await;
    let identities = [id("api"), id("web")];
    store_where(&a.store, "both certificates", |s| s.len() == 2).await;

    // Watch every change and sample every 20 ms: at every moment each identity has a
    // certificate that is valid now, until each has been replaced twice.
    let mut seen: Vec<Vec<(String, Vec<u8>)>> = identities
        .iter()
        .map(|i| {
            let svid = a.store.get(i).unwrap();
            vec![(svid.serial().to_owned(), svid.private_key().secret_der().to_vec())]
        })
        .collect();
    let mut changes = a.store.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let started = Instant::now();
    let mut samples = 0u64;
    while seen.iter().any(|s| s.len() < 3) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no two rotations: {seen:?}"
        );
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        samples += 1;
        let now = SystemTime::now();
        for (i, identity) in identities.iter().enumerate() {
            let svid = a
                .store
                .get(identity)
                .unwrap_or_else(|| panic!("{identity} had no certificate during rotation"));
            assert!(svid.is_valid_at(now), "{identity}: expired certificate served");
            assert_eq!(sans(svid.leaf()), [identity.to_string()]);
            if seen[i].last().unwrap().0 != svid.serial() {
                seen[i].push((svid.serial().to_owned(), svid.private_key().secret_der().to_vec()));
            }
        }
    }
    println!(
        "two rotations of each certificate in {:?} ({samples} samples, ttl {ttl:?})",
        started.elapsed()
    );
    for (identity, versions) in identities.iter().zip(&seen) {
        let keys: BTreeSet<&Vec<u8>> = versions.iter().map(|(_, k)| k).collect();
        assert_eq!(
            keys.len(),
            versions.len(),
            "{identity}: every renewal has a new key"
        );
    }
    a.stop().await;
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_reported_as_unauthenticated() {
    init_logging();
    let dirs = Dirs::new();
    let controller =
        RunningController::start(&dirs, "127.0.0.1:0".parse().unwrap(), Duration::from_secs(3600)).await;
    let token_file = dirs.token_file("a", "not-the-token");
    let endpoint = dirs.endpoint(Target::Tcp(controller.addr.to_string()), "a", token_file.clone());
    let a = Agent::start(endpoint.clone()).await;
    let readiness = Readiness::new(Some(a.handle.clone()));
    readiness.set_capture_active(true);

    let mut status = a.handle.subscribe_status();
    let status = tokio::time::timeout(DEADLINE, status.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("an error is reported")
        .unwrap()
        .clone();
    let error = status.last_error.unwrap();
    println!("reported: {error}");
    assert!(
        matches!(&error, ControlError::Unauthenticated(m) if m.contains("wrong token for node a")),
        "{error:?}"
    );
    assert!(error.to_string().contains("Unauthenticated"));
    assert!(error.needs_operator());
    assert!(!a.handle.state().has_config());
    let verdict = readiness.verdict();
    assert_eq!(verdict.status, 503);
    assert!(
        verdict.body.contains("no config yet") && verdict.body.contains("Unauthenticated"),
        "{}",
        verdict.body
    );
    let csr = mesh_node::identity::generate_key_and_csr(&id("web")).unwrap();
    assert!(matches!(
        CaSigner::new(endpoint).sign(&id("web"), csr.csr).await,
        Err(SignError::Unauthenticated(_))
    ));
    assert!(a.store.is_empty());

    // The token file is re-read on every reconnect: fixing it is enough.
    std::fs::write(&token_file, "token-of-a").unwrap();
    state_where(
        &a.handle,
        "the snapshot after the token was fixed",
        NodeState::has_config,
    )
    .await;
    store_where(&a.store, "web's certificate", |s| s.len() == 1).await;
    assert_certs_exactly(&a.store, &[id("web")]);

    a.stop().await;
    controller.stop().await;
}

/// A TCP relay in front of the controller whose connections can be cut, as a network
/// partition would, while the controller itself keeps running.
struct Relay {
    addr: SocketAddr,
    /// (accepting, generation): bumping the generation cuts the open connections.
    control: tokio::sync::watch::Sender<(bool, u64)>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let control = tokio::sync::watch::Sender::new((true, 0u64));
        let rx = control.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let (accepting, generation) = *rx.borrow();
                if !accepting {
                    continue;
                }
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|(_, g)| *g != generation) => {}
                    }
                });
            }
        });
        Relay { addr, control, task }
    }

    fn cut(&self) {
        self.control.send_modify(|(accepting, generation)| {
            *accepting = false;
            *generation += 1;
        });
    }

    fn restore(&self) {
        self.control.send_modify(|(accepting, _)| *accepting = true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_resumes_with_a_delta() {
    init_logging();
    let dirs = Dirs::new();
    let controller =
        RunningController::start(&dirs, "127.0.0.1:0".parse().unwrap(), Duration::from_secs(3600)).await;
    let relay = Relay::start(controller.addr).await;
    let a = Agent::start(dirs.endpoint(
        Target::Tcp(relay.addr.to_string()),
        "a",
        dirs.token_file("a", "token-of-a"),
    ))
    .await;
    let first = state_where(&a.handle, "the first snapshot", NodeState::has_config).await;
    store_where(&a.store, "web's certificate", |s| s.len() == 1).await;
    assert_eq!(a.handle.status().snapshots, 1);

    // The network goes; the cluster changes meanwhile.
    relay.cut();
    state_where(&a.handle, "the state marked stale", |s| s.stale_since.is_some()).await;
    let number = first.version.as_ref().unwrap().number;
    let mut versions = controller.store.subscribe();
    dirs.add_manifest("api.yaml", API_POD);
    tokio::time::timeout(
        DEADLINE,
        versions.wait_for(|g| g.as_ref().is_some_and(|g| g.number > number)),
    )
    .await
    .expect("the controller sees the new pod")
    .unwrap();
    assert!(!a.handle.state().local.contains_key(API_UID));

    // The network is back: the node resumes from its version with a delta, no snapshot.
    relay.restore();
    let resumed = state_where(&a.handle, "the resumed stream's delta", |s| {
        s.stale_since.is_none() && s.local.contains_key(API_UID)
    })
    .await;
    assert_eq!(resumed.version.as_ref().unwrap().epoch, controller.epoch);
    let status = a.handle.status();
    assert_eq!(status.snapshots, 1, "resumed without a snapshot: {status:?}");
    assert!(status.applied >= 2);
    store_where(&a.store, "api's certificate", |s| s.len() == 2).await;
    assert_certs_exactly(&a.store, &[id("api"), id("web")]);

    a.stop().await;
    relay.task.abort();
    controller.stop().await;
}
