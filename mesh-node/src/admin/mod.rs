//! The admin (inspection) API of DESIGN.md §5, for meshctl and tests: versioned JSON paths
//! (`mesh_api::admin`), on 127.0.0.1:15000 and a Unix socket, refused to anyone not local.
//! Read-only but for the log filter, which only the Unix socket (root's) may change: any local
//! process reaches the TCP port, and turning on debug logs is both a disclosure (per-connection
//! records) and a cost (log volume).
mod bpf;
mod certs;
mod connections;
mod state;

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
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

/// What a listener of the admin API may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The TCP listener: reads only.
    ReadOnly,
    /// The Unix socket, whose mode admits only root: reads and `PUT /v1/log-level`.
    ReadWrite,
}

impl Admin {
    pub fn router(self, access: Access) -> Router {
        Arc::new(move |req| {
            let mut resp = match refusal(access, req) {
                Some(refused) => refused,
                None => route(&self, req),
            };
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

/// The answer to a change asked of a read-only listener; `None` when `access` allows `req`.
fn refusal(access: Access, req: &Request) -> Option<Response<Full<Bytes>>> {
    let change = !matches!(*req.method(), Method::GET | Method::HEAD);
    (access == Access::ReadOnly && change && req.uri().path() == paths::LOG_LEVEL).then(|| {
        error(
            StatusCode::FORBIDDEN,
            format!(
                "{} {}: the TCP admin API is read-only; change the log filter over the node's Unix \
                 socket (meshctl node log-level FILTER --socket {DEFAULT_SOCKET}, as root)",
                req.method(),
                paths::LOG_LEVEL
            ),
        )
    })
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

/// Binds the admin Unix socket at `path`, root-only (0600) from the moment it exists there: the
/// socket is bound in a private (0700) directory next to `path`, made 0600 there, then renamed
/// into place, so there is no window in which the process umask's mode is reachable (umask
/// is process-wide, so setting it here would race every other file the agent creates). A
/// socket file left by an agent that is gone is replaced; one that still answers belongs to a
/// running agent and is an error.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        let why = if !existing.file_type().is_socket() {
            "something other than a socket is there"
        } else if std::os::unix::net::UnixStream::connect(path).is_ok() {
            "another agent serves this socket"
        } else {
            ""
        };
        if !why.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, why));
        }
    }
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the socket path has no file name",
        )
    })?;
    let private = dir.join(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let bound = (|| {
        let staged = private.join("s");
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use hyper::Uri;

    use super::*;

    fn request(method: Method, path: &str) -> Request {
        let mut req = Request::new(Bytes::from_static(br#"{"filter":"debug"}"#));
        *req.method_mut() = method;
        *req.uri_mut() = Uri::try_from(path).unwrap();
        req
    }

    #[test]
    fn only_the_socket_may_change_the_log_filter() {
        let put = request(Method::PUT, paths::LOG_LEVEL);
        let refused = refusal(Access::ReadOnly, &put).expect("a PUT over TCP was let through");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refusal(Access::ReadWrite, &put).is_none());
        for access in [Access::ReadOnly, Access::ReadWrite] {
            assert!(refusal(access, &request(Method::GET, paths::LOG_LEVEL)).is_none());
            assert!(refusal(access, &request(Method::GET, paths::STATUS)).is_none());
        }
    }

    #[tokio::test]
    async fn the_socket_is_root_only_and_replaces_a_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/admin.sock");
        let first = bind_socket(&path).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&path), 0o600);
        let err = bind_socket(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        drop(first);
        let _second = bind_socket(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("admin.sock")],
            "staging left behind"
        );
    }
}
