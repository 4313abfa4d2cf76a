//! A minimal HTTP/1.1 server for the agent's own endpoints (admin API, metrics): one router
//! function from request to response, optionally refusing clients that are not local.
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub type Router = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `router` on `listener` until `stop`; with `local_only`, non-loopback clients are
/// closed unanswered.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    local_only: bool,
    router: Router,
    stop: CancellationToken,
) {
    loop {
        let (conn, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!(server = name, error = %e, "accept failed");
                    continue;
                }
            },
        };
        if local_only && !peer.ip().is_loopback() {
            debug!(server = name, %peer, "refused a non-local client");
            continue;
        }
        let router = router.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let router = router.clone();
                async move { Ok::<_, Infallible>(router(&req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .await;
        });
    }
}

/// A response with `body` and its content type.
pub fn respond(
    status: hyper::StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}
