//! The stand-in of a policy that does not convert: never more access than the policy could
//! have given, whatever part of it is unreadable.

use mesh_api::{Action, Labels, Rule};
use serde_json::{json, Value};

use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// (action, selector, rules) of the stand-in for `spec`.
fn stand_in(spec: Value) -> (Action, Labels, Vec<Rule>) {
    let p = fail_closed("shop", "p", &spec);
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "p"));
    (p.action, p.selector, p.rules)
}

fn deny_all() -> Vec<Rule> {
    vec![Rule::default()]
}

#[test]
fn a_deny_policy_that_does_not_convert_denies_everything_it_selects() {
    let spec = json!({
        "action": "DENY",
        "selector": {"matchLabels": {"app": "web"}},
        "rules": [{"to": [{"operation": {"ports": ["8080", "http"]}}]}],
    });
    let spec_typed: Result<AuthorizationPolicySpec, _> = serde_json::from_value(spec.clone());
    assert!(
        to_policy("shop", "p", &spec_typed.unwrap()).is_err(),
        "the case must not convert"
    );
    assert_eq!(
        stand_in(spec),
        (Action::Deny, labels(&[("app", "web")]), deny_all())
    );
    // An unknown field: the same.
    assert_eq!(
        stand_in(
            json!({"action": "DENY", "selector": {"matchLabels": {"app": "web"}}, "rules": [{"when": []}]})
        ),
        (Action::Deny, labels(&[("app", "web")]), deny_all())
    );
}

#[test]
fn an_allow_policy_that_does_not_convert_allows_nothing() {
    // No rules on an ALLOW: its workloads are default-deny and nothing is allowed through it.
    for spec in [
        json!({"action": "ALLOW", "selector": {"matchLabels": {"app": "web"}}, "rules": [{"from": [{"source": {"principals": ["*"]}}]}]}),
        json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"to": [{"operation": {"ports": [0]}}]}]}),
    ] {
        assert_eq!(
            stand_in(spec.clone()),
            (Action::Allow, labels(&[("app", "web")]), vec![]),
            "{spec}"
        );
    }
}

#[test]
fn an_unreadable_action_counts_as_deny() {
    for spec in [
        json!({"action": "AUDIT"}),
        json!({"action": 7}),
        json!("garbage"),
        Value::Null,
    ] {
        let (action, _, rules) = stand_in(spec.clone());
        assert_eq!((action, rules), (Action::Deny, deny_all()), "{spec}");
    }
}

#[test]
fn an_unreadable_selector_widens_to_the_whole_namespace() {
    for selector in [
        json!({"matchLabels": {"-app": "web"}}),
        json!({"matchLabels": {"app": "web!"}}),
        json!({"matchLabels": {"app": 3}}),
        json!({"matchExpressions": []}),
        json!("app=web"),
    ] {
        let spec = json!({"action": "DENY", "selector": selector});
        assert_eq!(
            stand_in(spec.clone()),
            (Action::Deny, Labels::new(), deny_all()),
            "{spec}"
        );
    }
    assert_eq!(
        stand_in(json!({"action": "ALLOW", "selector": {"matchLabels": {"-app": "web"}}})),
        (Action::Allow, Labels::new(), vec![])
    );
}
