//! The controller against a mock API server (kube's `tower-test` seam): the Kubernetes
//! source (list, watch, relist after 410, RBAC refusals, a slow server), policy status
//! (leader only), TokenReview node authentication, the CA Secret race and the trust bundle,
//! and Lease leader election.

mod binary;
mod ca;
mod fail_closed;
mod fake;
mod leader;
mod source;
mod token_review;

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// Polls `check` until it holds, failing after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub const WAIT: Duration = Duration::from_secs(10);

pub fn namespace(name: &str, enrolled: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name, "labels": { "mesh.dev/enroll": enrolled.to_string() } },
    })
}

pub fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": { "app": "web" } },
        "spec": { "nodeName": node, "serviceAccountName": "web", "containers": [{ "name": "c" }] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

pub fn service(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "clusterIP": ip, "clusterIPs": [ip], "selector": { "app": "web" },
                  "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" }] },
    })
}

pub fn endpoint_slice(ns: &str, service: &str, ip: &str, pod_uid: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": format!("{service}-abc"), "namespace": ns,
                      "labels": { "kubernetes.io/service-name": service } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": [{ "addresses": [ip], "conditions": { "ready": true },
                        "targetRef": { "kind": "Pod", "uid": pod_uid } }],
    })
}

pub fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "mesh.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": ns },
        "spec": spec,
    })
}

/// Collects log output for assertions.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Collects what this thread logs until the guard drops.
    pub fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
