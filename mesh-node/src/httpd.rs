//! A minimal HTTP/1.1 server for the agent's own endpoints (admin API, metrics): one router
//! function from request to response, on TCP (optionally refusing clients that are not local)
//! or on a Unix socket.
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// A request with its body read (bounded by [`MAX_BODY`]).
pub type Request = hyper::Request<Bytes>;
pub type Router = Arc<dyn Fn(&Request) -> Response<Full<Bytes>> + Send + Sync>;

/// These endpoints take small JSON documents at most.
const MAX_BODY: usize = 64 * 1024;

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
        tokio::spawn(serve_conn(conn, router.clone()));
    }
}

/// Serves `router` on a Unix socket until `stop`. Who may connect is the socket file's mode.
pub async fn serve_unix(name: &'static str, listener: UnixListener, router: Router, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(e) => {
                    debug!(server = name, error = %e, "accept failed");
                    continue;
                }
            },
        };
        tokio::spawn(serve_conn(conn, router.clone()));
    }
}

async fn serve_conn<IO>(conn: IO, router: Router)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        async move {
            let (parts, body) = req.into_parts();
            let resp = match Limited::new(body, MAX_BODY).collect().await {
                Ok(body) => router(&hyper::Request::from_parts(parts, body.to_bytes())),
                Err(e) => respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    format!("reading the request body: {e}\n").into_bytes(),
                ),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(conn), service)
        .await;
}

/// A response with `body` and its content type.
pub fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}
