//! The admin (inspection) API of DESIGN.md §5, for meshctl and tests: versioned JSON paths
//! (`mesh_api::admin`), on 127.0.0.1:15000 and a Unix socket, refused to anyone not local.
//! Read-only but for the log filter.
mod bpf;
mod certs;
mod connections;
mod state;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, Response, StatusCode};
use mesh_api::admin::{self, paths, ErrorBody, LogLevel, Status};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::connections::Connections;
use crate::control::ControlHandle;
use crate::ebpf::Datapath;
use crate::enrollment::Report;
use crate::health::Readiness;
use crate::httpd::{self, Request, Router};
use crate::identity::CertStore;
use crate::logging::LogControl;

pub const DEFAULT_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_SOCKET: &str = "/run/mesh/admin.sock";

/// What the admin API reads from.
#[derive(Clone)]
pub struct Admin {
    pub node: String,
    pub controller: String,
    pub started: Instant,
    pub config: ControlHandle,
    pub readiness: Readiness,
    pub certs: CertStore,
    pub connections: Connections,
    /// A reader's own handle ([`Datapath::reopen`]): the API never waits for the reconcile.
    pub datapath: Arc<Datapath>,
    pub kernel: watch::Receiver<Arc<Report>>,
    pub log: LogControl,
}

impl Admin {
    pub fn router(self) -> Router {
        Arc::new(move |req| {
            let mut resp = route(&self, req);
            resp.headers_mut()
                .insert(admin::VERSION_HEADER, HeaderValue::from(admin::API_VERSION));
            resp
        })
    }

    fn status(&self) -> Status {
        let state = self.config.state();
        let verdict = self.readiness.verdict();
        let age = |t: SystemTime| SystemTime::now().duration_since(t).unwrap_or_default();
        Status {
            api: admin::API_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
            node: self.node.clone(),
            ready: verdict.status == 200,
            readiness: verdict.body.trim().to_owned(),
            controller: self.controller.clone(),
            config_version: state.version.as_ref().map(ToString::to_string),
            config_age_seconds: state.updated_at.map(|t| age(t).as_secs_f64()),
            config_stale_since: state.stale_since.map(certs::rfc3339),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            workloads_local: state.local.len(),
            workloads_enrolled: state.enrolled_local().count(),
            connections_open: self.connections.len(),
        }
    }
}

fn route(admin: &Admin, req: &Request) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, paths::STATUS) => json(StatusCode::OK, &admin.status()),
        (&Method::GET, paths::WORKLOADS) => {
            let kernel = admin.kernel.borrow().clone();
            json(StatusCode::OK, &state::workloads(&admin.config.state(), &kernel))
        }
        (&Method::GET, paths::SERVICES) => json(StatusCode::OK, &state::services(&admin.config.state())),
        (&Method::GET, paths::POLICIES) => json(StatusCode::OK, &state::policies(&admin.config.state())),
        (&Method::GET, paths::CERTS) => json(StatusCode::OK, &certs::list(&admin.certs)),
        (&Method::GET, paths::CONNECTIONS) => json(StatusCode::OK, &connections::list(&admin.connections)),
        (&Method::GET, paths::BPF) => match bpf::info(&admin.datapath) {
            Ok(info) => json(StatusCode::OK, &info),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the pinned set: {e}"),
            ),
        },
        (&Method::GET, paths::LOG_LEVEL) => json(
            StatusCode::OK,
            &LogLevel {
                filter: admin.log.current(),
            },
        ),
        (&Method::PUT, paths::LOG_LEVEL) => match serde_json::from_slice::<LogLevel>(req.body()) {
            Err(e) => error(
                StatusCode::BAD_REQUEST,
                format!("body: {e} (want {{\"filter\": \"...\"}})"),
            ),
            Ok(level) => match admin.log.set(&level.filter) {
                Ok(()) => {
                    tracing::info!(filter = %level.filter, "log filter changed through the admin API");
                    json(
                        StatusCode::OK,
                        &LogLevel {
                            filter: admin.log.current(),
                        },
                    )
                }
                Err(e) => error(StatusCode::BAD_REQUEST, format!("filter: {e}")),
            },
        },
        (&Method::GET, _) => error(StatusCode::NOT_FOUND, format!("no such path {path}")),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} {path}: only GET (and PUT {})", req.method(), paths::LOG_LEVEL),
        ),
    }
}

fn error(status: StatusCode, error: String) -> Response<Full<Bytes>> {
    json(status, &ErrorBody { error })
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    httpd::respond(
        status,
        "application/json",
        serde_json::to_vec_pretty(body).unwrap_or_default(),
    )
}

/// Binds the admin Unix socket at `path`, root-only (0600). A socket file left by an agent that
/// is gone is replaced; one that still answers belongs to a running agent and is an error.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent serves this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
