//! The admin (inspection) API of DESIGN.md §5 on 127.0.0.1:15000, for meshctl and tests:
//! versioned JSON paths, read-only, reachable only from the node itself.
mod certs;

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::identity::CertStore;

pub const DEFAULT_ADDR: &str = "127.0.0.1:15000";

/// What the admin API reads from.
#[derive(Clone)]
pub struct Admin {
    pub certs: CertStore,
}

/// Serves until `stop`; refuses connections that do not come from loopback.
pub async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    loop {
        let (conn, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        if !peer.ip().is_loopback() {
            debug!(%peer, "admin: refused a non-local client");
            continue;
        }
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .await;
        });
    }
}

fn route(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/certs") => json(StatusCode::OK, &certs::list(&admin.certs)),
        (&Method::GET, _) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "no such path"}),
        ),
        _ => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "read-only API"}),
        ),
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
