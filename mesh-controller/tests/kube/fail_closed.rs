//! A policy the controller cannot convert, from the Kubernetes source: its fail-closed
//! stand-in is what nodes get, the object says so (`Accepted=False`), and the log names
//! the field.

use mesh_api::{Action, NamespacedName, Rule, TrustDomain};
use mesh_controller::translate;
use serde_json::json;

use crate::fake::FakeApi;
use crate::source::{accepted, seed, start};
use crate::*;

#[tokio::test]
async fn a_broken_deny_policy_denies_everything_it_selects_until_fixed() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let fake = FakeApi::new();
    seed(&fake);
    // Admitted by a schema that does not know the port's name, refused by the controller.
    fake.apply(
        "authorizationpolicies",
        policy(
            "shop",
            "no-admin",
            json!({
                "action": "DENY",
                "selector": { "matchLabels": { "app": "web" } },
                "rules": [{ "to": [{ "operation": { "ports": ["9090", "admin"] } }] }],
            }),
        ),
    );
    let run = start(&fake, "a", true);
    let key = NamespacedName::new("shop", "no-admin");
    eventually(WAIT, "the status written and the state published", || async {
        accepted(&fake, "no-admin").is_some() && run.store.latest().is_some()
    })
    .await;

    let (status, reason, message, _) = accepted(&fake, "no-admin").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
    assert!(
        message.starts_with("spec.rules[0].to[0].operation.ports[1]: ")
            && message.contains("refuse every connection"),
        "{message}"
    );
    let text = logs.text();
    assert!(
        text.contains("AuthorizationPolicy shop/no-admin")
            && text.contains("field=spec.rules[0].to[0].operation.ports[1]"),
        "{text}"
    );

    // node-a runs web-1, which the policy selects: it gets a DENY of every connection.
    let state = run.store.latest().unwrap().state;
    let view = translate::node_view(&state, "node-a", &TrustDomain::default());
    let stand_in = &view.policies[&key];
    assert_eq!(stand_in.action, Action::Deny);
    assert_eq!(stand_in.selector["app"], "web");
    assert_eq!(stand_in.rules, [Rule::default()]);

    // Fixed: accepted, and the policy as written replaces the stand-in.
    let mut fixed = fake.get("authorizationpolicies", "shop", "no-admin").unwrap();
    fixed["spec"]["rules"][0]["to"][0]["operation"]["ports"] = json!(["9090"]);
    fake.apply("authorizationpolicies", fixed);
    eventually(WAIT, "the fixed policy accepted and applied", || async {
        accepted(&fake, "no-admin").is_some_and(|a| a.0 == "True")
            && run
                .store
                .latest()
                .is_some_and(|g| g.state.policies[&key].rules[0].to[0].ports == [9090])
    })
    .await;
}
