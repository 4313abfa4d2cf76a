//! The Kubernetes source on the fake API server.

use std::sync::Arc;
use std::time::Duration;

use mesh_api::{NamespacedName, TrustDomain};
use mesh_controller::sources::kubernetes::{KubernetesSource, Options, Retry};
use mesh_controller::sources::Source;
use mesh_controller::store::Store;
use mesh_controller::translate;
use serde_json::json;
use tokio::sync::watch;

use crate::fake::{FakeApi, Verb};
use crate::*;

pub(crate) struct Running {
    pub store: Arc<Store>,
    leading: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn start(fake: &FakeApi, replica: &str, leading: bool) -> Running {
    let store = Arc::new(Store::new(format!("epoch-{replica}")));
    let (tx, rx) = watch::channel(leading);
    let options = Options {
        batch: Duration::from_millis(20),
        retry: Retry {
            min: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
    };
    let source = KubernetesSource::new(fake.client(replica), rx, options);
    let run_store = store.clone();
    let task = tokio::spawn(async move {
        let _ = source.run(run_store).await;
    });
    Running {
        store,
        leading: tx,
        task,
    }
}

pub(crate) fn seed(fake: &FakeApi) {
    fake.apply("namespaces", namespace("shop", true));
    fake.apply("pods", pod("shop", "web-1", "node-a", "10.0.0.5"));
    fake.apply("services", service("shop", "web", "10.96.0.20"));
    fake.apply(
        "endpointslices",
        endpoint_slice("shop", "web", "10.0.0.5", "uid-web-1"),
    );
    fake.apply(
        "authorizationpolicies",
        policy(
            "shop",
            "web-from-cart",
            json!({
                "selector": { "matchLabels": { "app": "web" } },
                "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/shop/sa/cart"] } }],
                            "to": [{ "operation": { "ports": ["8080"] } }] }],
            }),
        ),
    );
}

fn pods(store: &Store) -> Vec<String> {
    store
        .latest()
        .map(|g| g.state.pods.values().map(|p| p.name.clone()).collect())
        .unwrap_or_default()
}

fn lists(fake: &FakeApi, path: &str) -> usize {
    fake.calls()
        .iter()
        .filter(|c| c.path == path && !c.is_watch() && c.method == http::Method::GET)
        .count()
}

#[tokio::test]
async fn lists_then_watches_then_relists_after_410() {
    let fake = FakeApi::new();
    seed(&fake);
    let run = start(&fake, "a", false);
    let store = run.store.clone();

    // The initial list of every kind, published once all are in.
    eventually(WAIT, "the first state", || async { store.latest().is_some() }).await;
    let state = store.latest().unwrap().state;
    assert_eq!(pods(&store), ["web-1"]);
    assert!(state.namespaces.contains_key("shop"));
    assert!(state.services.contains_key(&NamespacedName::new("shop", "web")));
    assert_eq!(state.endpoint_slices.len(), 1);
    assert!(state
        .policies
        .contains_key(&NamespacedName::new("shop", "web-from-cart")));
    // The same translate as the file source: node-a gets its pod, the service and the policy.
    let view = translate::node_view(&state, "node-a", &TrustDomain::default());
    assert_eq!(view.workloads.len(), 1);
    assert_eq!(view.policies.len(), 1);
    assert_eq!(
        view.services[&NamespacedName::new("shop", "web")].endpoints.len(),
        1
    );

    // Watch events.
    eventually(WAIT, "a pod watch", || async { fake.open_watches("pods") == 1 }).await;
    fake.apply("pods", pod("shop", "web-2", "node-b", "10.0.0.6"));
    eventually(WAIT, "web-2 added", || async {
        pods(&store) == ["web-1", "web-2"]
    })
    .await;
    fake.delete("pods", "shop", "web-1");
    eventually(WAIT, "web-1 deleted", || async { pods(&store) == ["web-2"] }).await;

    // The watch breaks with 410 Gone (the server compacted past it) while changes happened
    // that no watch saw: the relist must find them, deletions included.
    assert_eq!(lists(&fake, "/api/v1/pods"), 1);
    fake.delete_quietly("pods", "shop", "web-2");
    fake.apply_quietly("pods", pod("shop", "web-3", "node-a", "10.0.0.7"));
    fake.compact();
    fake.expire_watches("pods");
    eventually(WAIT, "the relist after 410", || async {
        pods(&store) == ["web-3"]
    })
    .await;
    assert_eq!(lists(&fake, "/api/v1/pods"), 2, "one relist");

    // A watch that ends and cannot resume (HTTP 410 on the watch request itself): the
    // source starts a new watcher, which relists.
    eventually(WAIT, "a pod watch", || async { fake.open_watches("pods") == 1 }).await;
    fake.apply_quietly("pods", pod("shop", "web-4", "node-a", "10.0.0.8"));
    fake.compact();
    fake.refuse_next_watch("pods", 410);
    fake.end_watches("pods");
    eventually(WAIT, "the relist after HTTP 410", || async {
        pods(&store) == ["web-3", "web-4"]
    })
    .await;
    assert_eq!(lists(&fake, "/api/v1/pods"), 3);

    // A watch that ends normally resumes from its resource version and replays what it
    // missed, without a relist.
    eventually(WAIT, "a pod watch", || async { fake.open_watches("pods") == 1 }).await;
    fake.end_watches("pods");
    fake.apply_quietly("pods", pod("shop", "web-5", "node-a", "10.0.0.9"));
    eventually(WAIT, "the resumed watch", || async { pods(&store).len() == 3 }).await;
    assert_eq!(lists(&fake, "/api/v1/pods"), 3, "resumed, not relisted");
}

#[tokio::test]
async fn nothing_is_published_before_every_kind_is_listed() {
    let fake = FakeApi::new();
    seed(&fake);
    fake.forbid(Verb::List, "authorizationpolicies");
    let run = start(&fake, "a", false);
    // Every other kind listed, and the policies refused three times: the source has had the
    // other lists in hand through two backoffs, time enough to publish if it were going to.
    eventually(
        WAIT,
        "the other kinds listed, the policies refused thrice",
        || async {
            [
                "/api/v1/namespaces",
                "/api/v1/pods",
                "/api/v1/services",
                "/apis/discovery.k8s.io/v1/endpointslices",
            ]
            .iter()
            .all(|path| lists(&fake, path) >= 1)
                && lists(&fake, "/apis/mesh.dev/v1alpha1/authorizationpolicies") >= 3
        },
    )
    .await;
    fake.allow_all();
    eventually(WAIT, "the first state", || async { run.store.latest().is_some() }).await;
    // Versions count every publication from 1: had a state without the policies been
    // published meanwhile, the one holding them would not be the first.
    let first = run.store.latest().unwrap();
    assert_eq!(
        (first.number, first.state.policies.len()),
        (1, 1),
        "a state without policies would drop them on the nodes"
    );
}

#[tokio::test]
async fn keeps_the_last_state_when_rbac_refuses_and_says_what_was_refused() {
    let logs = Logs::default();
    let _guard = logs.capture();

    let fake = FakeApi::new();
    seed(&fake);
    let run = start(&fake, "a", false);
    let store = run.store.clone();
    eventually(WAIT, "the first state", || async { store.latest().is_some() }).await;
    eventually(WAIT, "a pod watch", || async { fake.open_watches("pods") == 1 }).await;
    let version = store.latest().unwrap().number;

    // RBAC loses list and watch on pods; the watch breaks and a pod goes away unseen.
    fake.forbid(Verb::List, "pods");
    fake.forbid(Verb::Watch, "pods");
    fake.delete_quietly("pods", "shop", "web-1");
    fake.compact();
    fake.expire_watches("pods");
    eventually(WAIT, "the refusal logged", || async {
        logs.text().contains("forbidden by RBAC") && logs.text().contains("resource=\"pods\"")
    })
    .await;
    let text = logs.text();
    assert!(text.contains("verb=\"list\""), "{text}");
    assert_eq!(store.latest().unwrap().number, version, "the last state stays");
    assert_eq!(pods(&store), ["web-1"]);

    // RBAC is fixed: the source catches up.
    fake.allow_all();
    eventually(WAIT, "caught up", || async { pods(&store).is_empty() }).await;
}

#[tokio::test]
async fn a_slow_api_server_loses_no_event() {
    let fake = FakeApi::new();
    seed(&fake);
    let run = start(&fake, "a", false);
    let store = run.store.clone();
    eventually(WAIT, "the first state", || async { store.latest().is_some() }).await;
    eventually(WAIT, "a pod watch", || async { fake.open_watches("pods") == 1 }).await;
    fake.set_delay(Duration::from_millis(100));
    for i in 0..30 {
        fake.apply(
            "pods",
            pod("shop", &format!("burst-{i:02}"), "node-a", &format!("10.1.0.{i}")),
        );
        if i % 3 == 0 {
            fake.delete("pods", "shop", &format!("burst-{i:02}"));
        }
    }
    // The watch breaks in the middle of it all, and the relist is slow too.
    fake.end_watches("pods");
    fake.apply("pods", pod("shop", "late", "node-a", "10.2.0.1"));
    eventually(WAIT, "every change", || async {
        pods(&store).len() == 1 + 20 + 1
    })
    .await;
    let names = pods(&store);
    assert!(names.contains(&"late".to_owned()) && !names.contains(&"burst-00".to_owned()));
}

pub(crate) fn accepted(fake: &FakeApi, name: &str) -> Option<(String, String, String, i64)> {
    let object = fake.get("authorizationpolicies", "shop", name)?;
    let conditions = object["status"]["conditions"].as_array()?;
    let c = conditions.iter().find(|c| c["type"] == "Accepted")?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
        object["status"]["observedGeneration"].as_i64()?,
    ))
}

/// Every status write so far: (replica, policy name).
fn status_writes(fake: &FakeApi) -> Vec<(String, String)> {
    fake.calls()
        .iter()
        .filter_map(|c| {
            let path = c.path.strip_suffix("/status")?;
            let name = path.rsplit('/').next()?;
            (c.method == http::Method::PATCH).then(|| (c.client.clone(), name.to_owned()))
        })
        .collect()
}

fn writes(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(c, n)| (c.to_string(), n.to_string()))
        .collect()
}

#[tokio::test]
async fn only_the_leader_writes_status_and_bad_policies_are_refused_whole() {
    let fake = FakeApi::new();
    seed(&fake);
    // Admitted by the schema (map keys are beyond it), refused by the controller.
    fake.apply(
        "authorizationpolicies",
        policy(
            "shop",
            "bad-key",
            json!({
                "selector": { "matchLabels": { "-app": "web" } },
                "rules": [{ "from": [{ "source": { "namespaces": ["ops"] } }] }],
            }),
        ),
    );
    let a = start(&fake, "a", true);
    let b = start(&fake, "b", false);
    eventually(WAIT, "status on both policies, both replicas loaded", || async {
        accepted(&fake, "web-from-cart").is_some()
            && accepted(&fake, "bad-key").is_some()
            && a.store.latest().is_some()
            && b.store.latest().is_some()
    })
    .await;
    let (status, reason, _, generation) = accepted(&fake, "web-from-cart").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str(), generation),
        ("True", "Accepted", 1)
    );
    let (status, reason, message, _) = accepted(&fake, "bad-key").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
    assert!(message.contains("spec.selector.matchLabels.-app"), "{message}");
    for store in [&a.store, &b.store] {
        let state = store.latest().unwrap().state;
        assert!(state
            .policies
            .contains_key(&NamespacedName::new("shop", "web-from-cart")));
        let stand_in = &state.policies[&NamespacedName::new("shop", "bad-key")];
        assert_eq!(
            (stand_in.action, stand_in.rules.len()),
            (mesh_api::Action::Allow, 0),
            "none of it applied: its fail-closed stand-in allows nothing"
        );
    }
    // A later policy sorted after both, its status written: the leader has gone over the
    // first two again since, and written nothing more for them.
    fake.apply(
        "authorizationpolicies",
        policy("shop", "zz-marker-1", json!({"action": "DENY"})),
    );
    eventually(WAIT, "the marker's status", || async {
        accepted(&fake, "zz-marker-1").is_some()
    })
    .await;
    assert_eq!(
        status_writes(&fake),
        writes(&[("a", "bad-key"), ("a", "web-from-cart"), ("a", "zz-marker-1")]),
        "one write per policy, by the leader"
    );

    // Leadership moves to b; a new generation gets its status from b.
    a.leading.send_replace(false);
    b.leading.send_replace(true);
    let mut changed = fake
        .get("authorizationpolicies", "shop", "web-from-cart")
        .unwrap();
    changed["spec"]["action"] = json!("DENY");
    fake.apply("authorizationpolicies", changed);
    eventually(WAIT, "status of generation 2", || async {
        accepted(&fake, "web-from-cart").is_some_and(|a| a.3 == 2)
    })
    .await;
    fake.apply(
        "authorizationpolicies",
        policy("shop", "zz-marker-2", json!({"action": "DENY"})),
    );
    eventually(WAIT, "the second marker's status", || async {
        accepted(&fake, "zz-marker-2").is_some()
    })
    .await;
    // b may not have seen a's last write when it took over, and write that status again;
    // nothing else, and nothing more from a.
    let mut since = status_writes(&fake).split_off(3);
    since.retain(|w| *w != ("b".to_owned(), "zz-marker-1".to_owned()));
    assert_eq!(since, writes(&[("b", "web-from-cart"), ("b", "zz-marker-2")]));

    // The bad policy gets fixed: accepted and applied.
    let mut fixed = fake.get("authorizationpolicies", "shop", "bad-key").unwrap();
    fixed["spec"]["selector"]["matchLabels"] = json!({ "app": "web" });
    fake.apply("authorizationpolicies", fixed);
    eventually(WAIT, "the fixed policy accepted and applied", || async {
        accepted(&fake, "bad-key").is_some_and(|a| a.0 == "True")
            && b.store.latest().is_some_and(|g| {
                g.state
                    .policies
                    .contains_key(&NamespacedName::new("shop", "bad-key"))
            })
    })
    .await;
}
