//! The admin (inspection) API of DESIGN.md §5 on 127.0.0.1:15000, for meshctl and tests:
//! versioned JSON paths, read-only, reachable only from the node itself.
mod certs;

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use crate::httpd::{self, Router};
use crate::identity::CertStore;

pub const DEFAULT_ADDR: &str = "127.0.0.1:15000";

/// What the admin API reads from.
#[derive(Clone)]
pub struct Admin {
    pub certs: CertStore,
}

impl Admin {
    pub fn router(self) -> Router {
        Arc::new(move |req| route(&self, req))
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
    httpd::respond(
        status,
        "application/json",
        serde_json::to_vec_pretty(body).unwrap_or_default(),
    )
}
