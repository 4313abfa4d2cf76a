//! `meshctl enroll|unenroll`: in a controller source directory, read back by the controller's
//! own file source; and in a cluster, the controller tests' fake API server served over HTTP
//! to the real binary through a kubeconfig.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::TrustDomain;
use mesh_controller::sources::file::FileSource;
use mesh_controller::sources::Source;
use mesh_controller::store::{Generation, Store};
use mesh_controller::translate::node_view;
use serde_json::json;

use common::{meshctl, meshctl_with, one_line};

/// The controller tests' fake API server: this crate uses a part of what it offers.
#[allow(dead_code)]
#[path = "../../mesh-controller/tests/kube/fake.rs"]
mod fake;

const WAIT: Duration = Duration::from_secs(10);

const CLUSTER: &str = "\
# Two pods of the shop on node-a.
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: uid-web-1, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.0.5}
---
# The shop itself.
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    team: blue   # who to call
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, uid: uid-api-1}
spec: {nodeName: node-a, serviceAccountName: api}
status: {podIP: 10.0.0.6}
";

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

/// The controller's file source on `dir`, as `mesh-controller --source file:DIR` runs it.
struct Controller {
    store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl Controller {
    fn start(dir: &Path) -> Controller {
        let store = Arc::new(Store::new("test".into()));
        let source = FileSource::new(dir.to_path_buf()).unwrap();
        let task = tokio::spawn({
            let store = store.clone();
            async move {
                source.run(store).await.unwrap();
            }
        });
        Controller { store, task }
    }

    /// Waits until the controller's view of node-a has the enrolled workloads `want`.
    async fn until_enrolled(&self, want: &[&str]) {
        let mut states = self.store.subscribe();
        let enrolled = |generation: &Option<Generation>| {
            generation.as_ref().map(|g| {
                let view = node_view(&g.state, "node-a", &TrustDomain::default());
                view.workloads
                    .values()
                    .filter(|w| w.enrolled)
                    .map(|w| w.name.clone())
                    .collect::<Vec<_>>()
            })
        };
        let wait = states.wait_for(|g| enrolled(g).is_some_and(|names| names == want));
        if tokio::time::timeout(WAIT, wait).await.is_err() {
            let last = enrolled(&self.store.latest());
            panic!("the controller never saw {want:?} enrolled; it sees {last:?}");
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `meshctl ARGS` without blocking the runtime the controller runs on.
async fn run(args: Vec<String>, env: Vec<(String, String)>) -> common::Out {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        meshctl_with(&args, &env)
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn enroll_and_unenroll_in_a_source_directory_the_controller_reads() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.yaml");
    std::fs::write(&cluster, CLUSTER).unwrap();
    std::fs::create_dir(dir.path().join("services")).unwrap();
    let services = dir.path().join("services/web.yaml");
    std::fs::write(&services, SERVICES).unwrap();
    let d = dir.path().display().to_string();
    let controller = Controller::start(dir.path());
    controller.until_enrolled(&[]).await;

    let out = run(args(&["enroll", "shop", "--source-dir", &d]), vec![]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        format!(
            "namespace shop enrolled (mesh.dev/enroll=true) in {}\n",
            cluster.display()
        )
    );
    controller.until_enrolled(&["api-1", "web-1"]).await;
    let text = std::fs::read_to_string(&cluster).unwrap();
    let (pods_before, _) = CLUSTER.split_once("---\n").unwrap();
    assert!(
        text.starts_with(&format!("{pods_before}---\n# The shop itself.\n")),
        "{text}"
    );
    assert!(text.ends_with(CLUSTER.rsplit_once("---\n").unwrap().1), "{text}");
    assert!(text.contains("team: blue"), "{text}");
    assert_eq!(std::fs::read_to_string(&services).unwrap(), SERVICES);
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

    let out = run(args(&["enroll", "shop", "--source-dir", &d]), vec![]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with("namespace shop is already enrolled in "),
        "{out:?}"
    );

    let out = run(args(&["unenroll", "shop", "--source-dir", &d]), vec![]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .starts_with("namespace shop unenrolled (mesh.dev/enroll removed)"),
        "{out:?}"
    );
    controller.until_enrolled(&[]).await;
    let text = std::fs::read_to_string(&cluster).unwrap();
    assert!(
        !text.contains("mesh.dev/enroll") && text.contains("team: blue"),
        "{text}"
    );
}

#[tokio::test]
async fn a_namespace_without_an_object_gets_one() {
    let dir = tempfile::tempdir().unwrap();
    let (pods, _) = CLUSTER.split_once("---\n").unwrap();
    std::fs::write(dir.path().join("pods.yaml"), pods).unwrap();
    let d = dir.path().display().to_string();
    let controller = Controller::start(dir.path());
    controller.until_enrolled(&[]).await;

    let out = run(args(&["unenroll", "shop", "--source-dir", &d]), vec![]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with("namespace shop is not enrolled"),
        "{out:?}"
    );

    let out = run(args(&["enroll", "shop", "--source-dir", &d]), vec![]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let created = dir.path().join("namespace-shop.yaml");
    assert_eq!(
        out.stdout,
        format!(
            "namespace shop enrolled (mesh.dev/enroll=true) in {}\n",
            created.display()
        )
    );
    controller.until_enrolled(&["web-1"]).await;
}

#[test]
fn a_source_directory_that_is_not_there_fails_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let out = meshctl(&["enroll", "shop", "--source-dir", &missing.display().to_string()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        one_line(&out).starts_with(&format!("meshctl: {}: ", missing.display())),
        "{out:?}"
    );
}

/// The fake API server on loopback and a kubeconfig pointing at it.
struct Cluster {
    fake: fake::FakeApi,
    kubeconfig: String,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let fake = fake::FakeApi::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(fake.clone().serve_http(listener));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
             users: [{{name: fake, user: {{token: operator-token}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        ),
    )
    .unwrap();
    Cluster {
        fake,
        kubeconfig: path.display().to_string(),
        _dir: dir,
    }
}

impl Cluster {
    async fn meshctl(&self, list: &[&str]) -> common::Out {
        run(args(list), vec![("KUBECONFIG".into(), self.kubeconfig.clone())]).await
    }

    fn labels(&self, name: &str) -> serde_json::Value {
        self.fake.get("namespaces", "", name).unwrap()["metadata"]["labels"].clone()
    }
}

#[tokio::test]
async fn enroll_and_unenroll_through_the_kubernetes_api() {
    let c = cluster().await;
    c.fake.apply(
        "namespaces",
        json!({ "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": "shop", "labels": { "team": "blue" } } }),
    );

    let out = c.meshctl(&["enroll", "shop"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "namespace shop enrolled (mesh.dev/enroll=true) in the cluster\n"
    );
    assert_eq!(
        c.labels("shop"),
        json!({ "team": "blue", "mesh.dev/enroll": "true" })
    );
    let patches: Vec<String> = c
        .fake
        .calls()
        .into_iter()
        .filter(|call| call.method == http::Method::PATCH)
        .map(|call| call.path)
        .collect();
    assert_eq!(patches, ["/api/v1/namespaces/shop"]);

    let out = c.meshctl(&["enroll", "shop"]).await;
    assert_eq!(
        out.stdout, "namespace shop is already enrolled in the cluster\n",
        "{out:?}"
    );

    let out = c.meshctl(&["unenroll", "shop"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "namespace shop unenrolled (mesh.dev/enroll removed) in the cluster\n"
    );
    assert_eq!(c.labels("shop"), json!({ "team": "blue" }));
    let patches = c
        .fake
        .calls()
        .iter()
        .filter(|call| call.method == http::Method::PATCH)
        .count();
    assert_eq!(patches, 2, "only changes are patched");
}

#[tokio::test]
async fn kubernetes_refusals_are_one_line() {
    let c = cluster().await;
    let out = c.meshctl(&["enroll", "nowhere"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        one_line(&out),
        "meshctl: namespace nowhere does not exist in the cluster"
    );

    c.fake.apply(
        "namespaces",
        json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop" } }),
    );
    c.fake.forbid(fake::Verb::Patch, "namespaces");
    let out = c.meshctl(&["enroll", "shop"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let line = one_line(&out);
    assert!(
        line.starts_with("meshctl: the Kubernetes API refused to patch namespace shop: "),
        "{line}"
    );
    assert!(
        line.ends_with("(meshctl needs get and patch on namespaces)"),
        "{line}"
    );
}

#[test]
fn no_kubernetes_configuration_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("kubeconfig").display().to_string();
    let out = meshctl_with(
        &["enroll", "shop"],
        &[
            ("KUBECONFIG", &missing),
            ("HOME", &dir.path().display().to_string()),
        ],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        one_line(&out).starts_with("meshctl: no Kubernetes configuration: "),
        "{out:?}"
    );
}
