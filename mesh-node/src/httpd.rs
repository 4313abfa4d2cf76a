//! The one HTTP/1.1 server of the agent's own endpoints (admin API, metrics, readiness): one
//! router function from request to response, on TCP (optionally refusing clients that are not
//! local) or on a Unix socket, with every connection bounded: a cap in all and per peer
//! address, a deadline on each request's head and body, and keepalive on the socket.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntCounterVec;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::limits::{accept_loop, Admission, Admitted, Keepalive};

/// A request with its body read (bounded by [`MAX_BODY`]).
pub type Request = hyper::Request<Bytes>;
pub type Router = Arc<dyn Fn(&Request) -> Response<Full<Bytes>> + Send + Sync>;

/// These endpoints take small JSON documents at most.
const MAX_BODY: usize = 64 * 1024;
/// The read buffer, which bounds a request head (hyper answers 431 past it).
const MAX_HEAD: usize = 16 * 1024;

/// The bounds on each of these servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections held at once from one peer address.
    pub max_connections_per_peer: usize,
    /// How long a client may take to send a request's head (from the connection's start or
    /// the previous response), and then its body; an idle keep-alive connection ends with it.
    pub request_timeout: Duration,
    pub keepalive: Keepalive,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_peer: 32,
            request_timeout: Duration::from_secs(10),
            keepalive: Keepalive::default(),
        }
    }
}

/// One server: its name (the `listener` label of refusals), router and bounds.
pub struct Server {
    name: &'static str,
    router: Router,
    limits: Limits,
    admission: Admission,
    refused: Option<IntCounterVec>,
}

impl Server {
    /// `refused` (labels `listener`, `reason`) counts the connections this server refuses.
    pub fn new(name: &'static str, router: Router, limits: Limits, refused: Option<IntCounterVec>) -> Self {
        let admission = Admission::new(
            name,
            limits.max_connections,
            limits.max_connections_per_peer,
            refused.clone(),
        );
        Server {
            name,
            router,
            limits,
            admission,
            refused,
        }
    }

    /// Serves on `listener` until `stop`; with `local_only`, non-loopback clients are closed
    /// unanswered.
    pub async fn serve(self, listener: TcpListener, local_only: bool, stop: CancellationToken) {
        accept_loop(self.name, &listener, &stop, |conn, peer| {
            if local_only && !peer.ip().to_canonical().is_loopback() {
                debug!(server = self.name, %peer, "refused a non-local client");
                self.count_refused("not_local");
                return;
            }
            let Ok(admitted) = self.admission.admit(Some(peer.ip())) else {
                debug!(server = self.name, %peer, "refused a client over the connection caps");
                return;
            };
            if let Err(e) = self.limits.keepalive.apply(SockRef::from(&conn)) {
                debug!(server = self.name, error = %e, "setting keepalive failed");
            }
            tokio::spawn(serve_conn(conn, self.router.clone(), self.limits, admitted));
        })
        .await
    }

    /// Serves on a Unix socket until `stop`. Who may connect is the socket file's mode.
    pub async fn serve_unix(self, listener: UnixListener, stop: CancellationToken) {
        accept_loop(self.name, &listener, &stop, |conn, _| {
            if let Ok(admitted) = self.admission.admit(None) {
                tokio::spawn(serve_conn(conn, self.router.clone(), self.limits, admitted));
            }
        })
        .await
    }

    fn count_refused(&self, reason: &str) {
        if let Some(c) = &self.refused {
            c.with_label_values(&[self.name, reason]).inc();
        }
    }
}

async fn serve_conn<IO>(conn: IO, router: Router, limits: Limits, admitted: Admitted)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = limits.request_timeout;
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        async move {
            let (parts, body) = req.into_parts();
            let resp = match tokio::time::timeout(timeout, Limited::new(body, MAX_BODY).collect()).await {
                Ok(Ok(body)) => router(&hyper::Request::from_parts(parts, body.to_bytes())),
                Ok(Err(e)) => respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    format!("reading the request body: {e}\n").into_bytes(),
                ),
                Err(_) => respond(
                    StatusCode::REQUEST_TIMEOUT,
                    "text/plain",
                    format!("the request body did not arrive within {timeout:?}\n").into_bytes(),
                ),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(conn), service)
        .await;
    drop(admitted);
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start(limits: Limits) -> (SocketAddr, IntCounterVec, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["listener", "reason"]).unwrap();
        let router: Router = Arc::new(|_| respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()));
        let stop = CancellationToken::new();
        let server = Server::new("test", router, limits, Some(refused.clone()));
        tokio::spawn(server.serve(listener, false, stop.clone()));
        (addr, refused, stop)
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_off_at_the_request_timeout() {
        let limits = Limits {
            request_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _, stop) = start(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("the server kept a silent connection open")
            .unwrap_or(0);
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(250), "closed after {elapsed:?}");
        // hyper may answer 408 before closing; either way nothing but that is sent.
        assert!(n == 0 || buf.starts_with(b"HTTP/1.1 408"), "{:?}", &buf[..n]);
        stop.cancel();
    }

    #[tokio::test]
    async fn over_the_caps_connections_are_closed_and_counted() {
        let limits = Limits {
            max_connections: 4,
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let (addr, refused, stop) = start(limits).await;
        let _idle: Vec<TcpStream> = {
            let mut v = Vec::new();
            for _ in 0..2 {
                v.push(TcpStream::connect(addr).await.unwrap());
            }
            v
        };
        let r = get(addr).await;
        assert_eq!(r, "", "a third connection from the same address was served");
        let count = || {
            refused
                .with_label_values(&["test", "max_connections_per_peer"])
                .get()
        };
        assert_eq!(count(), 1);
        drop(_idle);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = get(addr).await;
            if r.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            assert!(Instant::now() < deadline, "never served again; last answer {r:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
    }
}
