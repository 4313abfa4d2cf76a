//! The node proxy, one module per direction (DESIGN.md §5): `outbound` carries captured
//! connections of local pods, `inbound` terminates HBONE for them; both read `mesh` and move
//! bytes with `copy`.
mod copy;
pub mod hbone;
pub mod inbound;
pub mod listener;
pub mod local_addrs;
pub mod mesh;
pub mod orig_dst;
pub mod outbound;
pub mod route;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Accepts on `listeners` until `stop` is cancelled; every connection runs `handle` as a task
/// on `tracker`, so the caller can drain them.
pub async fn serve<F, Fut>(
    name: &'static str,
    listeners: Vec<TcpListener>,
    tracker: TaskTracker,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let accepts = listeners.into_iter().map(|l| {
        let (tracker, stop, handle) = (tracker.clone(), stop.clone(), handle.clone());
        tokio::spawn(async move {
            loop {
                let (conn, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = l.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // EMFILE and friends: back off briefly instead of spinning.
                            warn!(listener = name, error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                tracker.spawn(handle(conn, peer));
            }
        })
    });
    for task in accepts.collect::<Vec<_>>() {
        if let Err(e) = task.await {
            warn!(listener = name, error = %e, "accept loop ended abnormally");
        }
    }
    info!(listener = name, "listeners closed");
}
