//! The node proxy. One module per direction (DESIGN.md §5); this foundation has the outbound
//! capture listener, which passes connections through as plain TCP.
pub mod hbone;
pub mod listener;
pub mod orig_dst;
pub mod outbound;
pub mod route;
pub mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::Config;

/// Accepts on the outbound listeners until `stop` is cancelled; every connection runs as a
/// task on `tracker`, so the caller can drain them.
pub async fn serve_outbound(
    cfg: Arc<Config>,
    listeners: Vec<TcpListener>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let accepts = listeners.into_iter().map(|l| {
        let (cfg, tracker, stop) = (cfg.clone(), tracker.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (conn, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = l.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // EMFILE and friends: back off briefly instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                debug!(%peer, "accepted");
                tracker.spawn(outbound::handle(cfg.clone(), conn, peer));
            }
        })
    });
    for task in accepts.collect::<Vec<_>>() {
        if let Err(e) = task.await {
            warn!(error = %e, "outbound accept loop ended abnormally");
        }
    }
    info!("outbound listeners closed");
}
