//! The Kubernetes source: watches Namespaces, Pods, Services, EndpointSlices and mesh
//! `AuthorizationPolicies` on the API server and publishes the same [`ClusterState`] the
//! file source does, into the same store and the same pure `translate`.
//!
//! - Each kind has one kube-rs watcher ([`watch::events`]): a paginated list, then a watch
//!   from the list's resource version, relisting after `410 Gone` and after a watch that
//!   cannot resume, with backoff between failures. Its events feed a [`mirror::Mirror`]
//!   that holds the objects already converted, and swaps a relist in at its `InitDone`.
//! - Nothing is published until every kind has been listed once (a half-loaded cluster
//!   would make nodes drop config that is still right); after that, changes are batched for
//!   [`Options::batch`] and published whole.
//! - With the API server unreachable or a verb refused by RBAC, the watchers log which verb
//!   on which resource failed and retry; the store keeps the last state and nodes keep
//!   being served from it.
//! - Policies are read untyped and converted one by one: a policy that does not convert is
//!   replaced whole by its fail-closed stand-in ([`crate::crd::fail_closed`]), and the
//!   leader's status writer ([`status`]) says why, and what is enforced instead, on the object.

pub mod convert;
pub mod leader;
pub mod mirror;
pub mod status;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::Event;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch as signal;
use tokio::time::Instant;

use self::convert::PolicyObject;
use self::mirror::Mirror;
pub use self::watch::Retry;
use super::Source;
use crate::cluster::{self, ClusterState, Invalid};
use crate::crd::AuthorizationPolicy;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct Options {
    /// Changes that come within this long of the first one are published together.
    pub batch: Duration,
    /// Backoff of failed list and watch calls.
    pub retry: Retry,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch: Duration::from_millis(100),
            retry: Retry::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubernetesSourceError {
    #[error("the watches of the cluster ended")]
    Ended,
}

pub struct KubernetesSource {
    client: Client,
    leading: signal::Receiver<bool>,
    options: Options,
}

impl KubernetesSource {
    /// `leading` says when this replica may write policy status (see [`leader::run`]).
    pub fn new(client: Client, leading: signal::Receiver<bool>, options: Options) -> Self {
        KubernetesSource {
            client,
            leading,
            options,
        }
    }
}

/// One watcher event of any kind (boxed: API objects are large, and of different sizes).
enum Change {
    Namespace(Box<Event<Namespace>>),
    Pod(Box<Event<Pod>>),
    Service(Box<Event<Service>>),
    EndpointSlice(Box<Event<EndpointSlice>>),
    Policy(Box<Event<DynamicObject>>),
}

type Converted<T> = Result<Option<T>, Invalid>;

/// The converted objects of every kind.
#[derive(Default)]
struct Mirrors {
    namespaces: Mirror<Converted<cluster::Namespace>>,
    pods: Mirror<Converted<cluster::Pod>>,
    services: Mirror<Converted<cluster::Service>>,
    slices: Mirror<Converted<cluster::EndpointSlice>>,
    policies: Mirror<PolicyObject>,
}

/// Converts, and reports what does not convert when it arrives (not at every publish).
fn checked<K: ResourceExt, T>(
    kind: &'static str,
    convert: fn(&K) -> Converted<T>,
) -> impl Fn(&K) -> Converted<T> {
    move |object| {
        let converted = convert(object);
        if let Err(invalid) = &converted {
            tracing::warn!(
                object = %format!("{kind} {}/{}", object.namespace().unwrap_or_default(), object.name_any()),
                field = %invalid.field,
                "{}; left out",
                invalid.message
            );
        }
        converted
    }
}

/// Converts a policy, and says when it arrives what the nodes enforce if it does not convert.
fn checked_policy(object: &DynamicObject) -> PolicyObject {
    let converted = convert::policy(object);
    if let (Some(invalid), Some(effect)) = (&converted.read.invalid, converted.read.effect()) {
        tracing::warn!(
            object = %format!("AuthorizationPolicy {}/{}", object.namespace().unwrap_or_default(), object.name_any()),
            field = %invalid.field,
            "{}; {effect}",
            invalid.message
        );
    }
    converted
}

impl Mirrors {
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Namespace(e) => self
                .namespaces
                .apply(*e, checked("Namespace", convert::namespace)),
            Change::Pod(e) => self.pods.apply(*e, checked("Pod", convert::pod)),
            Change::Service(e) => self.services.apply(*e, checked("Service", convert::service)),
            Change::EndpointSlice(e) => self
                .slices
                .apply(*e, checked("EndpointSlice", convert::endpoint_slice)),
            Change::Policy(e) => self.policies.apply(*e, checked_policy),
        }
    }

    fn synced(&self) -> bool {
        self.namespaces.synced()
            && self.pods.synced()
            && self.services.synced()
            && self.slices.synced()
            && self.policies.synced()
    }

    fn state(&self) -> ClusterState {
        fn ok<'a, T: 'a>(
            mirror: &'a Mirror<Converted<T>>,
        ) -> impl Iterator<Item = (&'a mesh_api::NamespacedName, &'a T)> {
            mirror
                .iter()
                .filter_map(|(key, value)| value.as_ref().ok().and_then(Option::as_ref).map(|v| (key, v)))
        }
        let mut state = ClusterState::default();
        for (_, ns) in ok(&self.namespaces) {
            state.namespaces.insert(ns.name.clone(), ns.clone());
        }
        for (_, pod) in ok(&self.pods) {
            state.pods.insert(pod.uid.clone(), pod.clone());
        }
        for (key, svc) in ok(&self.services) {
            state.services.insert(key.clone(), svc.clone());
        }
        for (key, slice) in ok(&self.slices) {
            state.endpoint_slices.insert(key.clone(), slice.clone());
        }
        for (key, object) in self.policies.iter() {
            state.policies.insert(key.clone(), object.read.enforced.clone());
        }
        state
    }

    fn policies(&self) -> status::Policies {
        Arc::new(
            self.policies
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        )
    }
}

fn policy_resource() -> ApiResource {
    ApiResource::erase::<AuthorizationPolicy>(&())
}

impl Source for KubernetesSource {
    type Error = KubernetesSourceError;

    async fn run(self, store: Arc<Store>) -> Result<(), KubernetesSourceError> {
        {
            let KubernetesSource {
                client,
                leading,
                options,
            } = self;
            let retry = options.retry;
            let resource = policy_resource();
            let streams: Vec<BoxStream<'static, Change>> = vec![
                watch::events(Api::<Namespace>::all(client.clone()), "namespaces", retry)
                    .map(|e| Change::Namespace(Box::new(e)))
                    .boxed(),
                watch::events(Api::<Pod>::all(client.clone()), "pods", retry)
                    .map(|e| Change::Pod(Box::new(e)))
                    .boxed(),
                watch::events(Api::<Service>::all(client.clone()), "services", retry)
                    .map(|e| Change::Service(Box::new(e)))
                    .boxed(),
                watch::events(
                    Api::<EndpointSlice>::all(client.clone()),
                    "endpointslices.discovery.k8s.io",
                    retry,
                )
                .map(|e| Change::EndpointSlice(Box::new(e)))
                .boxed(),
                watch::events(
                    Api::<DynamicObject>::all_with(client.clone(), &resource),
                    "authorizationpolicies.mesh.dev",
                    retry,
                )
                .map(|e| Change::Policy(Box::new(e)))
                .boxed(),
            ];
            let mut changes = stream::select_all(streams);

            let (policies_tx, policies_rx) = signal::channel(status::Policies::default());
            let writer = tokio::spawn(status::run_writer(client, resource, policies_rx, leading));
            let _stop_writer = AbortOnDrop(writer);

            let mut mirrors = Mirrors::default();
            let mut due: Option<Instant> = None;
            let mut published_once = false;
            loop {
                let wait = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    change = changes.next() => {
                        let Some(change) = change else { return Err(KubernetesSourceError::Ended) };
                        if mirrors.apply(change) && due.is_none() {
                            due = Some(Instant::now() + options.batch);
                        }
                    }
                    _ = wait, if mirrors.synced() => {
                        due = None;
                        let state = mirrors.state();
                        let counts = (state.namespaces.len(), state.pods.len(), state.services.len(), state.policies.len());
                        match store.publish(state) {
                            Some(version) => tracing::info!(
                                version,
                                namespaces = counts.0,
                                pods = counts.1,
                                services = counts.2,
                                policies = counts.3,
                                "cluster state changed"
                            ),
                            None if !published_once => tracing::info!("cluster state loaded"),
                            None => {}
                        }
                        published_once = true;
                        policies_tx.send_replace(mirrors.policies());
                    }
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The group/version/kind of mesh's policies, for logs and tests.
pub fn policy_api_version() -> String {
    AuthorizationPolicy::api_version(&()).into_owned()
}
