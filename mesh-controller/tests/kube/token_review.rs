//! TokenReview node authentication on the fake API server.

use mesh_controller::server::auth::{AuthError, Credentials, NodeAuthenticator};
use mesh_controller::server::token_review::{TokenReviewAuth, TokenReviewConfig};
use serde_json::{json, Value};

use crate::fake::{FakeApi, Verb};

const AGENT: &str = "system:serviceaccount:mesh-system:mesh-node";

fn review(user: &str, audiences: &[&str], extra: Value) -> Value {
    json!({
        "authenticated": true,
        "audiences": audiences,
        "user": { "username": user, "uid": "sa-uid", "groups": ["system:serviceaccounts"], "extra": extra },
    })
}

fn bound(pod: &str, uid: &str) -> Value {
    json!({
        "authentication.kubernetes.io/pod-name": [pod],
        "authentication.kubernetes.io/pod-uid": [uid],
    })
}

fn agent_pod(name: &str, uid: &str, node: Option<&str>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "mesh-system", "uid": uid },
        "spec": { "nodeName": node, "serviceAccountName": "mesh-node", "containers": [{ "name": "agent" }] },
    })
}

fn auth(fake: &FakeApi) -> TokenReviewAuth {
    TokenReviewAuth::new(
        fake.client("controller"),
        TokenReviewConfig {
            audience: "mesh-controller".into(),
            namespace: "mesh-system".into(),
            service_account: "mesh-node".into(),
        },
    )
}

fn creds(token: &str, node: Option<&str>) -> Credentials {
    Credentials {
        node: node.map(Into::into),
        token: Some(token.into()),
    }
}

fn reviews(fake: &FakeApi) -> usize {
    fake.calls()
        .iter()
        .filter(|c| c.path.ends_with("/tokenreviews"))
        .count()
}

#[tokio::test]
async fn allows_the_agent_on_its_node_and_refuses_everything_else() {
    let fake = FakeApi::new();
    fake.apply("pods", agent_pod("mesh-node-a", "uid-a", Some("node-a")));
    fake.apply("pods", agent_pod("mesh-node-x", "uid-x", None));
    fake.token(
        "good",
        review(AGENT, &["mesh-controller"], bound("mesh-node-a", "uid-a")),
    );
    fake.token(
        "good-1.32",
        review(
            AGENT,
            &["mesh-controller"],
            json!({
                "authentication.kubernetes.io/pod-name": ["mesh-node-a"],
                "authentication.kubernetes.io/pod-uid": ["uid-a"],
                "authentication.kubernetes.io/node-name": ["node-a"],
            }),
        ),
    );
    fake.token(
        "node-mismatch",
        review(
            AGENT,
            &["mesh-controller"],
            json!({
                "authentication.kubernetes.io/pod-name": ["mesh-node-a"],
                "authentication.kubernetes.io/node-name": ["node-b"],
            }),
        ),
    );
    fake.token(
        "kube-audience",
        review(
            AGENT,
            &["https://kubernetes.default.svc"],
            bound("mesh-node-a", "uid-a"),
        ),
    );
    fake.token(
        "other-sa",
        review(
            "system:serviceaccount:shop:web",
            &["mesh-controller"],
            bound("mesh-node-a", "uid-a"),
        ),
    );
    fake.token(
        "other-ns",
        review(
            "system:serviceaccount:evil:mesh-node",
            &["mesh-controller"],
            bound("mesh-node-a", "uid-a"),
        ),
    );
    fake.token("unbound", review(AGENT, &["mesh-controller"], json!({})));
    fake.token(
        "gone-pod",
        review(AGENT, &["mesh-controller"], bound("mesh-node-gone", "uid-g")),
    );
    fake.token(
        "old-pod",
        review(AGENT, &["mesh-controller"], bound("mesh-node-a", "uid-old")),
    );
    fake.token(
        "unscheduled",
        review(AGENT, &["mesh-controller"], bound("mesh-node-x", "uid-x")),
    );
    fake.token(
        "expired",
        json!({ "authenticated": false, "error": "token has expired" }),
    );

    let auth = auth(&fake);
    assert_eq!(auth.authenticate(creds("good", None)).await, Ok("node-a".into()));
    assert_eq!(
        auth.authenticate(creds("good", Some("node-a"))).await,
        Ok("node-a".into())
    );
    assert_eq!(
        auth.authenticate(creds("good-1.32", Some("node-a"))).await,
        Ok("node-a".into())
    );

    let refusals = [
        (creds("good", Some("node-b")), "names node-b"),
        (creds("node-mismatch", None), "names node node-b"),
        (creds("kube-audience", None), "audience"),
        (creds("other-sa", None), "system:serviceaccount:shop:web"),
        (creds("other-ns", None), "system:serviceaccount:evil:mesh-node"),
        (creds("unbound", None), "not bound to a pod"),
        (creds("gone-pod", None), "does not exist"),
        (creds("old-pod", None), "not the pod the token was issued to"),
        (creds("unscheduled", None), "not scheduled"),
        (creds("expired", None), "token has expired"),
        (creds("never-issued", None), "invalid bearer token"),
    ];
    for (credentials, want) in refusals {
        let what = format!("{credentials:?}");
        match auth.authenticate(credentials).await {
            Err(AuthError::Rejected(message)) => assert!(message.contains(want), "{what}: {message}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    let missing = Credentials {
        node: Some("node-a".into()),
        token: None,
    };
    assert_eq!(auth.authenticate(missing).await, Err(AuthError::Missing));
}

#[tokio::test]
async fn caches_positive_answers_only() {
    let fake = FakeApi::new();
    fake.apply("pods", agent_pod("mesh-node-a", "uid-a", Some("node-a")));
    fake.token(
        "good",
        review(AGENT, &["mesh-controller"], bound("mesh-node-a", "uid-a")),
    );
    let auth = auth(&fake);
    for _ in 0..5 {
        assert_eq!(auth.authenticate(creds("good", None)).await, Ok("node-a".into()));
    }
    assert_eq!(reviews(&fake), 1, "cached");
    // A cached answer still checks the node the request names.
    assert!(auth.authenticate(creds("good", Some("node-b"))).await.is_err());
    for _ in 0..3 {
        assert!(auth.authenticate(creds("bad", None)).await.is_err());
    }
    assert_eq!(reviews(&fake), 1 + 3, "refusals are not cached");
}

#[tokio::test]
async fn rbac_refusals_are_unavailable_not_unauthenticated() {
    let fake = FakeApi::new();
    fake.apply("pods", agent_pod("mesh-node-a", "uid-a", Some("node-a")));
    fake.token(
        "good",
        review(AGENT, &["mesh-controller"], bound("mesh-node-a", "uid-a")),
    );
    fake.forbid(Verb::Create, "tokenreviews");
    let auth = auth(&fake);
    match auth.authenticate(creds("good", None)).await {
        Err(AuthError::Unavailable(m)) => {
            assert!(
                m.contains("create tokenreviews.authentication.k8s.io") && m.contains("forbidden"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    fake.allow_all();
    fake.forbid(Verb::Get, "pods");
    match auth.authenticate(creds("good", None)).await {
        Err(AuthError::Unavailable(m)) => assert!(m.contains("get pods mesh-system/mesh-node-a"), "{m}"),
        other => panic!("{other:?}"),
    }
    fake.allow_all();
    assert_eq!(auth.authenticate(creds("good", None)).await, Ok("node-a".into()));
}
