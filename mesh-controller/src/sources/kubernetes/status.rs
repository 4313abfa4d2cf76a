//! AuthorizationPolicy status: `Accepted=True` for a policy in force, `Accepted=False` with
//! reason `Invalid`, the field at fault and what the nodes enforce instead (its fail-closed
//! stand-in) for one refused whole, both with the generation they describe. Written only by the leader, only when it differs from what the object
//! already says, through the status subresource (JSON merge patch).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use mesh_api::NamespacedName;
use tokio::sync::watch;

use super::convert::PolicyObject;
use crate::crd::{AuthorizationPolicyStatus, ACCEPTED_CONDITION};
use crate::kubeapi::{status_code, ApiError};

/// How often the leader re-checks every policy even when nothing changed (a failed write,
/// a status someone else edited).
const RESYNC: Duration = Duration::from_secs(60);

pub const REASON_ACCEPTED: &str = "Accepted";
pub const REASON_INVALID: &str = "Invalid";

/// The status `object` should carry, or `None` when it already does. `now` stamps a
/// condition whose status changes.
pub fn wanted(object: &PolicyObject, now: Timestamp) -> Option<AuthorizationPolicyStatus> {
    let (status, reason, message) = match (&object.read.invalid, object.read.effect()) {
        (Some(invalid), Some(effect)) => ("False", REASON_INVALID, format!("{invalid}; {effect}")),
        _ => ("True", REASON_ACCEPTED, "the policy is in force".to_owned()),
    };
    let current = object.status.clone().unwrap_or_default();
    let previous = current.accepted();
    let unchanged = previous.is_some_and(|c| {
        c.status == status
            && c.reason == reason
            && c.message == message
            && c.observed_generation == object.generation
    }) && current.observed_generation == object.generation;
    if unchanged {
        return None;
    }
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let mut conditions: Vec<Condition> = current
        .conditions
        .into_iter()
        .filter(|c| c.type_ != ACCEPTED_CONDITION)
        .collect();
    conditions.push(Condition {
        type_: ACCEPTED_CONDITION.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: object.generation,
        last_transition_time,
    });
    Some(AuthorizationPolicyStatus {
        conditions,
        observed_generation: object.generation,
    })
}

pub type Policies = Arc<BTreeMap<NamespacedName, PolicyObject>>;

/// Writes the status of `policies` while `leading` says so, until the sender goes away.
pub async fn run_writer(
    client: Client,
    resource: ApiResource,
    mut policies: watch::Receiver<Policies>,
    mut leading: watch::Receiver<bool>,
) {
    // What this replica last wrote, so a write is not repeated before its watch event
    // arrives: by key, (uid, generation, accepted).
    let mut written: HashMap<NamespacedName, (Option<String>, Option<i64>, bool)> = HashMap::new();
    loop {
        if *leading.borrow_and_update() {
            let snapshot = policies.borrow_and_update().clone();
            written.retain(|key, _| snapshot.contains_key(key));
            for (key, object) in snapshot.iter() {
                let Some(status) = wanted(object, Timestamp::now()) else {
                    written.remove(key);
                    continue;
                };
                let memo = (
                    object.uid.clone(),
                    object.generation,
                    object.read.invalid.is_none(),
                );
                if written.get(key) == Some(&memo) {
                    continue;
                }
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.namespace, &resource);
                let patch = serde_json::json!({ "status": status });
                match api
                    .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(policy = %key, accepted = object.read.invalid.is_none(), "wrote policy status");
                        written.insert(key.clone(), memo);
                    }
                    // Deleted meanwhile: its watch event is on the way.
                    Err(e) if status_code(&e) == Some(404) => {}
                    Err(e) => {
                        let e = ApiError::new("patch", format!("authorizationpolicies/status {key}"), e);
                        if e.is_forbidden() {
                            tracing::error!(verb = "patch", resource = "authorizationpolicies/status", "{e}");
                        } else {
                            tracing::warn!(error = %e, "cannot write policy status; retrying later");
                        }
                    }
                }
            }
        } else {
            written.clear();
        }
        tokio::select! {
            changed = policies.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RESYNC) => written.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::{Action, Policy};

    use super::*;
    use crate::cluster::Invalid;
    use crate::sources::objects::PolicyRead;

    fn object(
        policy: Result<Policy, Invalid>,
        generation: i64,
        status: Option<AuthorizationPolicyStatus>,
    ) -> PolicyObject {
        let read = match policy {
            Ok(policy) => PolicyRead {
                enforced: policy,
                invalid: None,
            },
            Err(why) => PolicyRead::refused("shop", "p", &serde_json::json!({"action": "DENY"}), why),
        };
        PolicyObject {
            uid: Some("u".into()),
            generation: Some(generation),
            read,
            status,
        }
    }

    fn good() -> Result<Policy, Invalid> {
        Ok(Policy {
            namespace: "shop".into(),
            name: "p".into(),
            selector: Default::default(),
            action: Action::Allow,
            rules: vec![],
        })
    }

    #[test]
    fn writes_only_what_changed_and_keeps_transition_times() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let first = wanted(&object(good(), 1, None), t0).unwrap();
        assert_eq!(first.observed_generation, Some(1));
        let c = first.accepted().unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_ACCEPTED));
        assert_eq!(c.last_transition_time, Time(t0));

        assert_eq!(
            wanted(&object(good(), 1, Some(first.clone())), t1),
            None,
            "already says so"
        );

        let second = wanted(&object(good(), 2, Some(first.clone())), t1).unwrap();
        let c = second.accepted().unwrap();
        assert_eq!(c.observed_generation, Some(2));
        assert_eq!(
            c.last_transition_time,
            Time(t0),
            "still True: the transition time stays"
        );

        let refused = wanted(
            &object(
                Err(Invalid::new("spec.selector.matchLabels.-x", "bad key")),
                3,
                Some(second),
            ),
            t1,
        )
        .unwrap();
        let c = refused.accepted().unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON_INVALID));
        assert!(
            c.message
                .starts_with("spec.selector.matchLabels.-x: bad key; until it is fixed")
                && c.message.contains("refuse every connection"),
            "{}",
            c.message
        );
        assert_eq!(c.last_transition_time, Time(t1));
        assert_eq!(refused.conditions.len(), 1);
    }
}
