//! `NodeConfig.Watch`: the stream of one node's view, driven by a [`Session`].

use std::sync::Arc;
use std::time::Duration;

use mesh_api::pb::{self, node_config_server};
use mesh_api::{NodeMessage, Update, UpdateKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{authenticate, NodeAuthenticator};
use super::Controller;
use crate::session::Session;

/// A node that connects says hello at once; one that does not is not waited for.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

type Responses = mpsc::Sender<Result<pb::WatchResponse, Status>>;

pub struct WatchService<A> {
    ctl: Arc<Controller<A>>,
}

impl<A> WatchService<A> {
    pub fn new(ctl: Arc<Controller<A>>) -> Self {
        WatchService { ctl }
    }
}

#[tonic::async_trait]
impl<A: NodeAuthenticator> node_config_server::NodeConfig for WatchService<A> {
    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let node = authenticate(&self.ctl.auth, request.metadata(), "NodeConfig.Watch").await?;
        let (tx, rx) = mpsc::channel(4);
        let ctl = self.ctl.clone();
        tokio::spawn(async move {
            match run(&ctl, &node, request.into_inner(), &tx).await {
                Ok(()) => tracing::info!(%node, "watch ended"),
                Err(status) => {
                    tracing::warn!(%node, code = ?status.code(), message = status.message(), "watch failed");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn parse(message: pb::WatchRequest) -> Result<NodeMessage, Status> {
    NodeMessage::try_from(message).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Sends one update; `false` once the node is gone.
async fn send(tx: &Responses, node: &str, update: Update) -> bool {
    let kind = match &update.kind {
        UpdateKind::Snapshot(view) => format!("snapshot of {} workloads", view.workloads.len()),
        UpdateKind::Delta { base, delta } => format!(
            "delta from {base}: {} workloads upserted, {} removed",
            delta.upserted.workloads.len(),
            delta.removed.workloads.len()
        ),
    };
    tracing::debug!(%node, version = %update.version, "sending {kind}");
    tx.send(Ok(update.into())).await.is_ok()
}

async fn run<A>(
    ctl: &Controller<A>,
    node: &str,
    mut requests: Streaming<pb::WatchRequest>,
    tx: &Responses,
) -> Result<(), Status> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, requests.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
    let Some(first) = first else { return Ok(()) };
    let NodeMessage::Hello {
        node: claimed,
        last_applied,
    } = parse(first)?
    else {
        return Err(Status::invalid_argument("the first message must be a hello"));
    };
    if claimed != node {
        return Err(Status::permission_denied(format!(
            "authenticated as node {node}, but hello names {claimed}"
        )));
    }

    let mut latest = ctl.store.subscribe();
    let mut stopping = ctl.stopping.subscribe();
    // Until the source has loaded the cluster there is nothing true to send: an empty
    // snapshot would make a node drop a config that is still right.
    let generation = tokio::select! {
        generation = async { latest.wait_for(Option::is_some).await.map(|g| g.clone()) } => {
            generation.map_err(|_| Status::unavailable("controller stopping"))?
        }
        _ = tx.closed() => return Ok(()),
    };
    let Some(generation) = generation else {
        return Ok(());
    };

    let mut session = Session::new(node.to_owned(), ctl.trust_domain.clone());
    let resume = last_applied
        .as_ref()
        .and_then(|v| ctl.store.state_at(v).map(|state| (v.clone(), state)));
    match (&last_applied, &resume) {
        (Some(v), None) => {
            tracing::info!(%node, last_applied = %v, "cannot resume from that version; sending a snapshot")
        }
        (Some(v), Some(_)) => tracing::info!(%node, last_applied = %v, "resuming"),
        (None, _) => tracing::info!(%node, "new watch"),
    }
    let version = ctl.store.version(generation.number);
    let update = session.start(
        version,
        &generation.state,
        resume.as_ref().map(|(v, s)| (v.clone(), &**s)),
    );
    if !send(tx, node, update).await {
        return Ok(());
    }

    loop {
        tokio::select! {
            changed = latest.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("controller stopping"));
                }
                let generation = latest.borrow_and_update().clone();
                let Some(generation) = generation else { continue };
                let version = ctl.store.version(generation.number);
                if let Some(update) = session.on_change(version, &generation.state) {
                    if !send(tx, node, update).await {
                        return Ok(());
                    }
                }
            }
            message = requests.message() => {
                let Some(message) = message? else { return Ok(()) };
                match parse(message)? {
                    NodeMessage::Ack(version) => tracing::debug!(%node, %version, "node applied config"),
                    NodeMessage::Nack { version, reason } => {
                        tracing::warn!(%node, %version, %reason, "node rejected config");
                        if let Some(update) = session.on_nack(&version) {
                            if !send(tx, node, update).await {
                                return Ok(());
                            }
                        }
                    }
                    NodeMessage::Hello { .. } => return Err(Status::invalid_argument("hello sent twice")),
                }
            }
            _ = tx.closed() => return Ok(()),
            // The guard `wait_for` returns must not live across the awaits above.
            _ = async { stopping.wait_for(|stop| *stop).await.map(drop) } => {
                return Err(Status::unavailable("controller shutting down"));
            }
        }
    }
}
