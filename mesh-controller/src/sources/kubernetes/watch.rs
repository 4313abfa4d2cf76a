//! One watch per resource kind, that never ends: kube-rs's watcher (list, then watch from the
//! list's resource version; bookmarks; relist after `410 Gone`), with a backoff between
//! failed attempts, and every failure logged with the verb and the resource, so a missing
//! RBAC rule reads as what to grant.
//!
//! kube-rs relists by itself when a watch reports `410 Gone` as an event (what API servers
//! do). When the watch *request* is refused with HTTP 410 instead, its watcher would retry
//! the same stale resource version forever; this stream then starts a new watcher, which
//! relists.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use crate::kubeapi::status_code;

/// Delays between failed attempts: doubling from `min` up to `max`, back to `min` after a
/// success.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

struct Doubling {
    retry: Retry,
    next: Duration,
}

impl Iterator for Doubling {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(self.retry.max);
        Some(delay)
    }
}

impl Backoff for Doubling {
    fn reset(&mut self) {
        self.next = self.retry.min;
    }
}

/// The events of `api`'s objects, forever. `resource` names them in logs (`pods`).
pub fn events<K>(api: Api<K>, resource: &'static str, retry: Retry) -> BoxStream<'static, Event<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let start = Arc::new(move || {
        watcher(api.clone(), watcher::Config::default())
            .backoff(Doubling {
                retry,
                next: retry.min,
            })
            .boxed()
    });
    futures::stream::unfold(start(), move |mut inner| {
        let start = start.clone();
        async move {
            loop {
                match inner.next().await? {
                    Ok(event) => return Some((event, inner)),
                    Err(error) => {
                        log(resource, &error);
                        if let watcher::Error::WatchStartFailed(e) = &error {
                            if status_code(e) == Some(410) {
                                inner = start();
                            }
                        }
                    }
                }
            }
        }
    })
    .boxed()
}

fn log(resource: &str, error: &watcher::Error) {
    let (verb, api_error) = match error {
        watcher::Error::InitialListFailed(e) => ("list", Some(e)),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => ("watch", Some(e)),
        watcher::Error::WatchError(status) if status.code == 410 => {
            tracing::info!(resource, "watch expired (410 Gone): relisting");
            return;
        }
        watcher::Error::WatchError(status) if status.code == 403 => {
            tracing::error!(
                verb = "watch",
                resource,
                "forbidden by RBAC: {}; keeping the last state",
                status.message
            );
            return;
        }
        watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion => ("watch", None),
    };
    match api_error.and_then(status_code) {
        Some(403) => tracing::error!(
            verb,
            resource,
            error = %error,
            "forbidden by RBAC: grant the controller `{verb}` on {resource}; keeping the last state"
        ),
        _ => {
            tracing::warn!(verb, resource, error = %error, "API call failed; keeping the last state and retrying")
        }
    }
}
