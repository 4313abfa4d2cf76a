//! The `NodeConfig.Watch` client: one long-lived stream to the controller, re-opened with
//! backoff whenever it ends, resuming from the last applied version.
//!
//! Every update is applied with the pure [`apply_message`] and published as a new
//! `Arc<NodeState>`, then ACKed; one that cannot be applied is NACKed with the reason and
//! the previous state stays. While the controller is unreachable the last state stays
//! published with `stale_since` set; the first update of the next stream clears it.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_api::client::node_config_client;
use mesh_api::{pb, NodeMessage};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::backoff::Backoff;
use super::endpoint::{ControlError, ControllerEndpoint};
use super::state::{apply_message, NodeState};

/// Reconnect backoff: 0.25-0.5 s after a stream that was working, doubling up to 15-30 s.
pub const DEFAULT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// The connection as the rest of the agent (health, admin API, logs) sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// A stream is open and has delivered at least one applied update.
    pub connected: bool,
    /// Attempts that failed since the last stream that delivered an update.
    pub consecutive_failures: u32,
    /// Why the last stream or attempt ended; kept after a reconnect for inspection.
    pub last_error: Option<ControlError>,
    pub last_error_at: Option<SystemTime>,
    /// Versions applied since the agent started, and how many of them were snapshots (the
    /// rest were deltas; a reconnect that resumed costs no snapshot).
    pub applied: u64,
    pub snapshots: u64,
    /// Versions NACKed since the agent started, and the reason of the last one.
    pub nacked: u64,
    pub last_nack: Option<String>,
}

/// Runs the stream; create with [`ControlClient::new`], then spawn [`ControlClient::run`].
pub struct ControlClient {
    endpoint: ControllerEndpoint,
    backoff: Backoff,
    state: watch::Sender<Arc<NodeState>>,
    status: watch::Sender<ConnectionStatus>,
}

/// Read side, cheap to clone: the applied state and the connection status.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    state: watch::Receiver<Arc<NodeState>>,
    status: watch::Receiver<ConnectionStatus>,
}

impl ControlHandle {
    /// The state applied last (empty, with `version: None`, until the first snapshot).
    pub fn state(&self) -> Arc<NodeState> {
        self.state.borrow().clone()
    }

    /// Notified on every applied version and staleness change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<NodeState>> {
        self.state.clone()
    }

    pub fn status(&self) -> ConnectionStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe_status(&self) -> watch::Receiver<ConnectionStatus> {
        self.status.clone()
    }
}

impl ControlClient {
    pub fn new(endpoint: ControllerEndpoint) -> (ControlClient, ControlHandle) {
        let (state, state_rx) = watch::channel(Arc::new(NodeState::new(endpoint.node.clone())));
        let (status, status_rx) = watch::channel(ConnectionStatus::default());
        let client = ControlClient {
            endpoint,
            backoff: DEFAULT_BACKOFF,
            state,
            status,
        };
        let handle = ControlHandle {
            state: state_rx,
            status: status_rx,
        };
        (client, handle)
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Streams until `stop`; never gives up on the controller.
    pub async fn run(self, stop: CancellationToken) {
        info!(controller = %self.endpoint, "connecting to the controller");
        let mut failures = 0u32;
        loop {
            let mut progressed = false;
            let error = tokio::select! {
                _ = stop.cancelled() => return,
                error = self.session(&mut progressed) => error,
            };
            if progressed {
                failures = 0;
            }
            self.lost(&error);
            let delay = self.backoff.delay(failures, fastrand::f64());
            failures = failures.saturating_add(1);
            if error.needs_operator() {
                error!(controller = %self.endpoint, error = %error, retry_in = ?delay, "controller connection refused");
            } else {
                warn!(controller = %self.endpoint, error = %error, retry_in = ?delay, "controller connection lost");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(&self, progressed: &mut bool) -> ControlError {
        match self.stream(progressed).await {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }

    async fn stream(&self, progressed: &mut bool) -> Result<Infallible, ControlError> {
        let channel = self.endpoint.connect().await?;
        let credentials = self.endpoint.credentials().await?;
        let mut client = node_config_client(channel, credentials);
        let (tx, rx) = mpsc::channel::<pb::WatchRequest>(8);
        let last_applied = self.state.borrow().version.clone();
        let hello = NodeMessage::Hello {
            node: self.endpoint.node.clone(),
            last_applied: last_applied.clone(),
        };
        tx.try_send(hello.into())
            .map_err(|_| ControlError::Protocol("cannot queue the hello".into()))?;
        let mut responses = client
            .watch(ReceiverStream::new(rx))
            .await
            .map_err(|s| ControlError::from_status(&s))?
            .into_inner();
        debug!(last_applied = ?last_applied.as_ref().map(ToString::to_string), "config stream open");
        loop {
            let message = responses
                .message()
                .await
                .map_err(|s| ControlError::from_status(&s))?
                .ok_or(ControlError::StreamEnded)?;
            let reply = self.on_message(message, progressed)?;
            if tx.send(reply.into()).await.is_err() {
                return Err(ControlError::StreamEnded);
            }
        }
    }

    /// Applies one message and says what to answer.
    fn on_message(
        &self,
        message: pb::WatchResponse,
        progressed: &mut bool,
    ) -> Result<NodeMessage, ControlError> {
        let current = self.state.borrow().clone();
        let is_snapshot = matches!(message.kind, Some(pb::watch_response::Kind::Snapshot(_)));
        match apply_message(&current, message) {
            Ok(mut next) => {
                let was_stale = next.stale_since.take();
                next.updated_at = Some(SystemTime::now());
                let version = next
                    .version
                    .clone()
                    .ok_or_else(|| ControlError::Protocol("applied update without a version".into()))?;
                let summary = (
                    next.local.len(),
                    next.remote.len(),
                    next.services.len(),
                    next.policies.len(),
                );
                // Status first: whoever sees the new state sees the status that goes with it.
                self.status.send_modify(|s| {
                    s.connected = true;
                    s.consecutive_failures = 0;
                    s.applied += 1;
                    s.snapshots += u64::from(is_snapshot);
                });
                self.state.send_replace(Arc::new(next));
                *progressed = true;
                let (local, remote, services, policies) = summary;
                if is_snapshot || was_stale.is_some() {
                    info!(%version, local, remote, services, policies, snapshot = is_snapshot, "config applied");
                } else {
                    debug!(%version, local, remote, services, policies, "config delta applied");
                }
                Ok(NodeMessage::Ack(version))
            }
            Err(rejection) => {
                let reason = rejection.error.to_string();
                warn!(
                    version = ?rejection.version.as_ref().map(ToString::to_string),
                    %reason,
                    "config rejected; keeping the previous version"
                );
                self.status.send_modify(|s| {
                    s.nacked += 1;
                    s.last_nack = Some(reason.clone());
                });
                let version = rejection.version.ok_or(ControlError::Protocol(reason.clone()))?;
                Ok(NodeMessage::Nack { version, reason })
            }
        }
    }

    /// The stream is gone: keep the state, mark it stale, record why.
    fn lost(&self, error: &ControlError) {
        let now = SystemTime::now();
        // Status first, as in `on_message`.
        self.status.send_modify(|s| {
            s.connected = false;
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            s.last_error = Some(error.clone());
            s.last_error_at = Some(now);
        });
        self.state.send_if_modified(|state| {
            if state.has_config() && state.stale_since.is_none() {
                Arc::make_mut(state).stale_since = Some(now);
                true
            } else {
                false
            }
        });
    }
}
