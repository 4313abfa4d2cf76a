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
//! The server is a minimal HTTP/1.1 responder (one request per connection, bounded request
//! head and time), enough for kubelet probes and curl.
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::control::{ConnectionStatus, ControlHandle, NodeState};

pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15021));
pub const READY_PATH: &str = "/healthz/ready";
pub const STALE_HEADER: &str = "x-mesh-config-stale-since";

const MAX_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

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

/// Serves probes on `listener` until `stop`.
pub async fn serve(listener: TcpListener, readiness: Readiness, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "health listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit, the connection is closed at once rather than queued.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &readiness)).await;
            drop(permit);
        });
    }
}

async fn handle(mut stream: TcpStream, readiness: &Readiness) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(&mut stream, 431, "request head too large\n", None, true).await;
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let with_body = method != "HEAD";
    match (method, path) {
        ("GET" | "HEAD", READY_PATH) => {
            let v = readiness.verdict();
            let stale = v
                .stale_since
                .map(|t| humantime::format_rfc3339_seconds(t).to_string());
            respond(
                &mut stream,
                v.status,
                &(v.body + "\n"),
                stale.as_deref(),
                with_body,
            )
            .await
        }
        (_, READY_PATH) => respond(&mut stream, 405, "only GET and HEAD\n", None, true).await,
        ("", _) => respond(&mut stream, 400, "bad request\n", None, true).await,
        _ => {
            respond(
                &mut stream,
                404,
                "not found; try /healthz/ready\n",
                None,
                with_body,
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    body: &str,
    stale_since: Option<&str>,
    with_body: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(since) = stale_since {
        response.push_str(&format!("{STALE_HEADER}: {since}\r\n"));
    }
    response.push_str("\r\n");
    if with_body {
        response.push_str(body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use mesh_api::Version;

    use super::*;
    use crate::control::ControlError;

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
        let server = tokio::spawn(serve(listener, readiness.clone(), stop.clone()));

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
