//! The CA root in a Secret: create-if-absent when two replicas race, never overwritten;
//! and the trust bundle ConfigMap.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use mesh_controller::ca::{publish_trust_bundle, Ca, CaError, SecretRoot, TRUST_BUNDLE_KEY};
use serde_json::{json, Value};
use tower_test::mock::{self, Handle};

use crate::fake::FakeApi;

const DAY: Duration = Duration::from_secs(24 * 3600);
const SECRET_PATH: &str = "/api/v1/namespaces/mesh-system/secrets";

type Mock = Handle<Request<kube::client::Body>, Response<Full<Bytes>>>;

fn respond(code: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

fn status(code: u16, reason: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": reason, "message": reason, "code": code })
}

/// Answers the next request of `handle`, after checking its method and path, with `code` and
/// `body` (`None`: the request's own body, as a create returns the object); returns the
/// request's body.
async fn expect(handle: &mut Mock, method: Method, path: &str, code: u16, body: Option<&Value>) -> Value {
    let (request, send) = handle.next_request().await.expect("a request");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    let sent = request.into_body().collect().await.unwrap().to_bytes();
    let sent: Value = serde_json::from_slice(&sent).unwrap_or(Value::Null);
    send.send_response(respond(code, body.unwrap_or(&sent)));
    sent
}

#[tokio::test]
async fn two_replicas_racing_end_up_with_one_root() {
    let (service_a, mut a) = mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
    let (service_b, mut b) = mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
    let root_a = SecretRoot::new(kube::Client::new(service_a, "default"), "mesh-system", "mesh-ca");
    let root_b = SecretRoot::new(kube::Client::new(service_b, "default"), "mesh-system", "mesh-ca");
    let replica_a = tokio::spawn(async move {
        Ca::from_store(&root_a, DAY)
            .await
            .map(|ca| ca.root_pem().to_owned())
    });
    let replica_b = tokio::spawn(async move {
        Ca::from_store(&root_b, DAY)
            .await
            .map(|ca| ca.root_pem().to_owned())
    });

    let named = format!("{SECRET_PATH}/mesh-ca");
    let not_found = status(404, "NotFound");
    // Both look, both find nothing, both create a root of their own; A's create lands first.
    expect(&mut a, Method::GET, &named, 404, Some(&not_found)).await;
    expect(&mut b, Method::GET, &named, 404, Some(&not_found)).await;
    let stored = expect(&mut a, Method::POST, SECRET_PATH, 201, None).await;
    assert_eq!(stored["type"], "kubernetes.io/tls");
    assert_eq!(stored["immutable"], true);
    let losing = expect(
        &mut b,
        Method::POST,
        SECRET_PATH,
        409,
        Some(&status(409, "AlreadyExists")),
    )
    .await;
    assert_ne!(
        losing["data"]["tls.key"], stored["data"]["tls.key"],
        "B made a root of its own"
    );
    // B reads the winner's root instead of replacing it.
    expect(&mut b, Method::GET, &named, 200, Some(&stored)).await;

    let root_a = replica_a.await.unwrap().unwrap();
    let root_b = replica_b.await.unwrap().unwrap();
    assert_eq!(root_a, root_b, "one root for the mesh");
    assert!(root_a.contains("BEGIN CERTIFICATE"));
}

#[tokio::test]
async fn an_existing_secret_is_used_and_never_overwritten() {
    let fake = FakeApi::new();
    let first = Ca::from_store(&SecretRoot::new(fake.client("a"), "mesh-system", "mesh-ca"), DAY)
        .await
        .unwrap();
    let again = Ca::from_store(&SecretRoot::new(fake.client("b"), "mesh-system", "mesh-ca"), DAY)
        .await
        .unwrap();
    assert_eq!(first.root_pem(), again.root_pem());
    let writes = fake
        .calls()
        .iter()
        .filter(|c| c.method != Method::GET && c.path.contains("/secrets"))
        .count();
    assert_eq!(writes, 1, "created once");

    // A Secret missing its key is an operator's problem: no new root over it.
    let mut broken = fake.get("secrets", "mesh-system", "mesh-ca").unwrap();
    broken["data"].as_object_mut().unwrap().remove("tls.key");
    fake.apply("secrets", broken);
    let err = Ca::from_store(&SecretRoot::new(fake.client("c"), "mesh-system", "mesh-ca"), DAY)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            CaError::IncompleteSecret {
                missing: "tls.key",
                ..
            }
        ),
        "{err}"
    );
    assert!(fake.get("secrets", "mesh-system", "mesh-ca").unwrap()["data"]
        .get("tls.key")
        .is_none());
}

#[tokio::test]
async fn rbac_refusal_names_the_verb_and_resource() {
    let fake = FakeApi::new();
    fake.forbid(crate::fake::Verb::Create, "secrets");
    let err = Ca::from_store(&SecretRoot::new(fake.client("a"), "mesh-system", "mesh-ca"), DAY)
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("create secrets mesh-system/mesh-ca: forbidden by RBAC"),
        "{text}"
    );
}

#[tokio::test]
async fn trust_bundle_is_published_and_kept() {
    let fake = FakeApi::new();
    let client = fake.client("a");
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    assert!(
        publish_trust_bundle(client.clone(), "mesh-system", "mesh-root-ca", pem)
            .await
            .unwrap()
    );
    let cm = fake.get("configmaps", "mesh-system", "mesh-root-ca").unwrap();
    assert_eq!(cm["data"][TRUST_BUNDLE_KEY], pem);
    assert!(
        !publish_trust_bundle(client.clone(), "mesh-system", "mesh-root-ca", pem)
            .await
            .unwrap()
    );

    // Someone edits it: it is put back.
    let mut edited = cm.clone();
    edited["data"][TRUST_BUNDLE_KEY] = json!("tampered");
    fake.apply("configmaps", edited);
    assert!(
        publish_trust_bundle(client.clone(), "mesh-system", "mesh-root-ca", pem)
            .await
            .unwrap()
    );
    assert_eq!(
        fake.get("configmaps", "mesh-system", "mesh-root-ca").unwrap()["data"][TRUST_BUNDLE_KEY],
        pem
    );
}
