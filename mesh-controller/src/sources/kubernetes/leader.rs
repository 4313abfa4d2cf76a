//! Leader election with a `coordination.k8s.io/v1` Lease, the way client-go does it: the
//! holder renews `spec.renewTime` every `retry_period`; a candidate takes the lease over
//! once it has seen the same record unchanged for `lease_duration` (measured on its own
//! clock, so clock skew between replicas does not matter); every write carries the
//! resourceVersion it read, so of two candidates only one wins (the other gets 409).
//!
//! A leader that cannot renew for `renew_deadline` (shorter than `lease_duration`) stops
//! acting as one before anyone else can take over. Only the leader writes policy status;
//! every replica serves nodes.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::kubeapi::{status_code, ApiError};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in the lease.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        LeaseConfig {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What to do with the lease as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Create,
    Renew,
    TakeOver,
    Follow,
}

/// Pure: `expired` says whether the record has been unchanged for a lease duration.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, expired: bool) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) if expired => Decision::TakeOver,
        Some(_) => Decision::Follow,
    }
}

/// The parts of a lease record whose change shows its holder is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew: Option<Timestamp>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Record {
            holder: spec.holder_identity.clone(),
            renew: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions,
        }
    }
}

/// Runs the election forever, telling `leading` whether this replica leads.
pub async fn run(client: Client, config: LeaseConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let resource = format!("leases.coordination.k8s.io {}/{}", config.namespace, config.name);
    let mut observed: Option<(Record, Instant)> = None;
    let mut last_renewed: Option<Instant> = None;
    loop {
        // Bounded, so a hanging API call cannot keep a stale leader leading past its deadline.
        let outcome =
            tokio::time::timeout(config.renew_deadline, attempt(&api, &config, &mut observed)).await;
        let now = Instant::now();
        match outcome {
            Ok(Ok(true)) => last_renewed = Some(now),
            Ok(Ok(false)) => last_renewed = None,
            Err(_) => tracing::warn!(resource = %resource, "the lease update timed out"),
            Ok(Err(e)) => {
                if e.is_forbidden() {
                    tracing::error!(verb = e.verb, resource = %resource, "{e}");
                } else {
                    tracing::warn!(verb = e.verb, resource = %resource, error = %e, "lease update failed");
                }
            }
        }
        let leads = last_renewed.is_some_and(|t| now.duration_since(t) < config.renew_deadline);
        if !leads {
            last_renewed = None;
        }
        leading.send_if_modified(|current| {
            if *current == leads {
                return false;
            }
            *current = leads;
            if leads {
                tracing::info!(identity = %config.identity, lease = %config.name, "leading: writing policy status");
            } else {
                tracing::info!(identity = %config.identity, lease = %config.name, "not leading");
            }
            true
        });
        tokio::time::sleep(config.retry_period).await;
    }
}

/// One round: `Ok(true)` when this replica holds the lease afterwards.
async fn attempt(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<(Record, Instant)>,
) -> Result<bool, ApiError> {
    let resource = || format!("leases.coordination.k8s.io {}/{}", config.namespace, config.name);
    let current = api
        .get_opt(&config.name)
        .await
        .map_err(|e| ApiError::new("get", resource(), e))?;
    let now = Instant::now();
    let spec = current.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default();
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(config.lease_duration);
    let record = Record::of(&spec);
    match observed {
        Some((seen, _)) if *seen == record => {}
        _ => *observed = Some((record, now)),
    }
    let expired = observed
        .as_ref()
        .is_some_and(|(_, since)| now.duration_since(*since) >= duration);
    let stamp = MicroTime(Timestamp::now());
    let seconds = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let decision = decide(current.as_ref().map(|_| &spec), &config.identity, expired);
    let written = match decision {
        Decision::Follow => return Ok(false),
        Decision::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(stamp.clone()),
                    renew_time: Some(stamp),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease)
                .await
                .map_err(|e| ("create", e))
        }
        Decision::Renew | Decision::TakeOver => {
            let mut lease = current.expect("a lease to renew or take over");
            let mut spec = spec;
            if decision == Decision::TakeOver {
                tracing::info!(
                    previous = spec.holder_identity.as_deref().unwrap_or(""),
                    identity = %config.identity,
                    "taking over the lease"
                );
                spec.holder_identity = Some(config.identity.clone());
                spec.acquire_time = Some(stamp.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(stamp);
            spec.lease_duration_seconds = Some(seconds);
            lease.spec = Some(spec);
            // `lease` carries the resourceVersion read above: a concurrent writer makes this 409.
            api.replace(&config.name, &PostParams::default(), &lease)
                .await
                .map_err(|e| ("update", e))
        }
    };
    match written {
        Ok(lease) => {
            if let Some(spec) = &lease.spec {
                *observed = Some((Record::of(spec), Instant::now()));
            }
            Ok(true)
        }
        // Someone else wrote first: they hold it, or will; look again next round.
        Err((_, e)) if status_code(&e) == Some(409) => Ok(false),
        Err((verb, e)) => Err(ApiError::new(verb, resource(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(Into::into),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", false), Decision::Create);
        assert_eq!(decide(Some(&held_by(Some("a"))), "a", false), Decision::Renew);
        assert_eq!(decide(Some(&held_by(Some("a"))), "a", true), Decision::Renew);
        assert_eq!(decide(Some(&held_by(Some("b"))), "a", false), Decision::Follow);
        assert_eq!(decide(Some(&held_by(Some("b"))), "a", true), Decision::TakeOver);
        assert_eq!(decide(Some(&held_by(None)), "a", false), Decision::TakeOver);
        assert_eq!(decide(Some(&held_by(Some(""))), "a", false), Decision::TakeOver);
    }
}
