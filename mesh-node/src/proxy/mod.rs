//! The node proxy, one module per direction (DESIGN.md §5): `outbound` carries captured
//! connections of local pods, `inbound` terminates HBONE for them, `inbound_plain` admits
//! plaintext from outside the mesh to PERMISSIVE ones by policy; all read `mesh` and move
//! bytes with `copy`.
mod carry;
mod claims;
mod copy;
pub mod hbone;
pub mod inbound;
pub mod inbound_plain;
pub mod listener;
pub mod local_addrs;
pub mod mesh;
pub mod orig_dst;
pub mod outbound;
pub mod route;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::limits::{accept_loop, Admission, Keepalive};

/// What a proxy listener applies to the connections it accepts.
#[derive(Clone)]
pub struct Accepting {
    pub keepalive: Keepalive,
    /// Caps on the connections held, in all and per peer address; `None`: no cap.
    pub admission: Option<Admission>,
}

/// Accepts on `listeners` until `stop` is cancelled; every connection runs `handle` as a task
/// on `tracker`, so the caller can drain them.
pub async fn serve<F, Fut>(
    name: &'static str,
    listeners: Vec<TcpListener>,
    accepting: Accepting,
    tracker: TaskTracker,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let accepts = listeners.into_iter().map(|l| {
        let (tracker, stop, handle, accepting) =
            (tracker.clone(), stop.clone(), handle.clone(), accepting.clone());
        tokio::spawn(async move {
            accept_loop(name, &l, &stop, move |conn, peer| {
                let admitted = match accepting.admission.as_ref().map(|a| a.admit(Some(peer.ip()))) {
                    Some(Err(refused)) => {
                        return debug!(listener = name, %peer, ?refused, "refused over the connection caps");
                    }
                    Some(Ok(admitted)) => Some(admitted),
                    None => None,
                };
                if let Err(e) = accepting.keepalive.apply(SockRef::from(&conn)) {
                    debug!(listener = name, error = %e, "setting keepalive failed");
                }
                let handled = handle(conn, peer);
                tracker.spawn(async move {
                    handled.await;
                    drop(admitted);
                });
            })
            .await
        })
    });
    for task in accepts.collect::<Vec<_>>() {
        if let Err(e) = task.await {
            warn!(listener = name, error = %e, "accept loop ended abnormally");
        }
    }
    info!(listener = name, "listeners closed");
}
