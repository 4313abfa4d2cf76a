//! Readiness for the DaemonSet probe (DESIGN.md §5, port 15021): `GET /healthz/ready`.
//!
//! - 503 until capture is active (the eBPF programs attached and the listeners bound).
//! - 503 while a controller is configured and no config has arrived yet ("no config yet",
//!   with the last connection error).
//! - 200 otherwise. A **stale** config (the controller unreachable after a config was
//!   applied) is still 200: the node keeps carrying traffic on its last config and
//!   certificates (DESIGN.md §3), and failing every node's probe during a controller outage
//!   would only make a rolling update stall or take healthy nodes out of service. The body
//!   says `stale config since <RFC 3339>` and the header `x-mesh-config-stale-since` carries
//!   the time, for monitoring to alert on.
//!
//! The server is the agent's one HTTP server ([`httpd`]), with its bounds.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONNECTION};
use hyper::{Method, Response, StatusCode};

use crate::control::{ConnectionStatus, ControlHandle, NodeState};
use crate::httpd::{self, Router};

pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15021));
pub const READY_PATH: &str = "/healthz/ready";
pub const STALE_HEADER: &str = "x-mesh-config-stale-since";

/// The answer to a readiness probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// 200 or 503.
    pub status: u16,
    /// One line of text for humans.
    pub body: String,
    pub stale_since: Option<SystemTime>,
}

/// Pure readiness decision. `config` is `None` when the agent runs without a controller.
pub fn readiness(
    capture_active: bool,
    config: Option<(&NodeState, &ConnectionStatus)>,
    now: SystemTime,
) -> Verdict {
    let verdict = |status, body: String, stale_since| Verdict {
        status,
        body,
        stale_since,
    };
    if !capture_active {
        return verdict(503, "not ready: capture is not active yet".into(), None);
    }
    let Some((state, status)) = config else {
        return verdict(200, "ready (no controller configured)".into(), None);
    };
    let last_error = status
        .last_error
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    let Some(version) = &state.version else {
        return verdict(503, format!("not ready: no config yet{last_error}"), None);
    };
    match state.stale_since {
        Some(since) => {
            let ago = now.duration_since(since).unwrap_or_default();
            let ago = humantime::format_duration(Duration::from_secs(ago.as_secs()));
            verdict(
                200,
                format!(
                    "ready: stale config since {} ({ago} ago), version {version}; controller unreachable{last_error}",
                    humantime::format_rfc3339_seconds(since)
                ),
                Some(since),
            )
        }
        None => verdict(200, format!("ready: config version {version}"), None),
    }
}

/// What the probe reads: whether capture is active, and the control plane's state.
#[derive(Debug, Clone)]
pub struct Readiness {
    capture: Arc<AtomicBool>,
    control: Option<ControlHandle>,
}

impl Readiness {
    /// `control` is `None` when the agent runs without a controller.
    pub fn new(control: Option<ControlHandle>) -> Self {
        Readiness {
            capture: Arc::new(AtomicBool::new(false)),
            control,
        }
    }

    pub fn set_capture_active(&self, active: bool) {
        self.capture.store(active, Ordering::Relaxed);
    }

    pub fn verdict(&self) -> Verdict {
        let control = self.control.as_ref().map(|c| (c.state(), c.status()));
        readiness(
            self.capture.load(Ordering::Relaxed),
            control.as_ref().map(|(s, st)| (&**s, st)),
            SystemTime::now(),
        )
    }
}

/// The probe's HTTP face: `GET`/`HEAD` on [`READY_PATH`], one request per connection (kubelet
/// opens a new one for each probe anyway), served by [`httpd::Server`].
pub fn router(readiness: Readiness) -> Router {
    Arc::new(move |req| {
        let with_stale = |v: &Verdict, mut resp: Response<Full<Bytes>>| {
            if let Some(since) = v.stale_since {
                let since = humantime::format_rfc3339_seconds(since).to_string();
                if let Ok(value) = HeaderValue::from_str(&since) {
                    resp.headers_mut().insert(STALE_HEADER, value);
                }
            }
            resp
        };
        let mut resp = match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, READY_PATH) => {
                let v = readiness.verdict();
                let status = StatusCode::from_u16(v.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                with_stale(&v, text(status, format!("{}\n", v.body)))
            }
            (_, READY_PATH) => text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into()),
            _ => text(StatusCode::NOT_FOUND, "not found; try /healthz/ready\n".into()),
        };
        let headers = resp.headers_mut();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        resp
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    httpd::respond(status, "text/plain; charset=utf-8", body.into_bytes())
}

#[cfg(test)]
mod tests {
    use mesh_api::Version;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::control::ControlError;
    use crate::httpd::{Limits, Server};

    fn state(version: Option<u64>, stale_since: Option<SystemTime>) -> NodeState {
        let mut state = NodeState::new("a");
        state.version = version.map(|number| Version {
            epoch: "e".into(),
            number,
        });
        state.stale_since = stale_since;
        state
    }

    #[test]
    fn verdicts() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let down = ConnectionStatus {
            last_error: Some(ControlError::Unavailable("connection refused".into())),
            ..ConnectionStatus::default()
        };
        let ok = ConnectionStatus::default();
        let since = now - Duration::from_secs(90);
        let cases = [
            (
                false,
                Some((state(Some(1), None), ok.clone())),
                503,
                "capture is not active",
            ),
            (true, None, 200, "no controller configured"),
            (true, Some((state(None, None), ok.clone())), 503, "no config yet"),
            (
                true,
                Some((state(None, None), down.clone())),
                503,
                "no config yet: the controller is unavailable: connection refused",
            ),
            (
                true,
                Some((state(Some(7), None), ok.clone())),
                200,
                "config version e/7",
            ),
            (
                true,
                Some((state(Some(7), Some(since)), down.clone())),
                200,
                "stale config since 2023-11-14T22:11:50Z (1m 30s ago)",
            ),
        ];
        for (capture, config, status, text) in cases {
            let v = readiness(capture, config.as_ref().map(|(s, c)| (s, c)), now);
            assert_eq!(v.status, status, "{}", v.body);
            assert!(v.body.contains(text), "{:?} does not contain {text:?}", v.body);
        }
        let stale = readiness(true, Some((&state(Some(7), Some(since)), &down)), now);
        assert_eq!(stale.stale_since, Some(since));
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Readiness::new(None);
        let stop = CancellationToken::new();
        let server = Server::new("readiness", router(readiness.clone()), Limits::default(), None);
        let server = tokio::spawn(server.serve(listener, false, stop.clone()));

        let probe = "GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n";
        let r = get(addr, probe).await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.ends_with("not ready: capture is not active yet\n"), "{r}");
        readiness.set_capture_active(true);
        let r = get(addr, probe).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("content-length: 33\r\n"), "{r}");
        let r = get(addr, "HEAD /healthz/ready HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\n"), "{r}");
        let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(addr, "POST /healthz/ready HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");

        stop.cancel();
        server.await.unwrap();
    }
}
