//! The inbound side of HBONE: an HTTP/2 server over an accepted mTLS connection, one `CONNECT`
//! stream per proxied TCP connection.
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::NamespacedName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};

use super::baggage::{Baggage, BAGGAGE};
use super::wire::{
    parse_authority, parse_forwarded_for, parse_forwarded_host, parse_service_hostname, same_ip, FORWARDED,
};
use super::{H2Settings, HboneError};
use crate::proxy::copy;
use crate::tls;

/// One tunnelled connection as the server sees it, for authorization and the upstream connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The client's SPIFFE ID, from its certificate.
    pub source_identity: String,
    /// The original source from the `forwarded` header (port 0 if it carried only an address).
    pub forwarded_for: Option<SocketAddr>,
    /// The destination from `:authority`.
    pub dst: SocketAddr,
    /// The local address of the accepted HBONE connection (the destination pod's IP on 15008).
    pub local_addr: SocketAddr,
    /// The service the source says it dialled (`forwarded: ...;host=`): its claim, to be
    /// checked against the node's state before it names anything.
    pub service: Option<NamespacedName>,
    /// The source workload as the peer describes it (`baggage`); empty when it sent none or
    /// garbage. The peer's word: for metrics, never for policy.
    pub baggage: Baggage,
}

/// A policy denial: the stream is answered 403.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deny {
    /// The policy that denied (for logs and metrics).
    pub policy: String,
}

/// What the node proxy plugs into the HBONE server.
pub trait Handler: Send + Sync + 'static {
    /// The upstream connection (a `TcpStream` with SO_MARK set, in the node proxy).
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Decides whether the stream may proceed; `Err` answers 403.
    fn authorize(&self, req: &Request) -> Result<(), Deny>;

    /// Connects to `req.dst`; an error (refused, unreachable) answers 503. Bounded by
    /// [`ServerSettings::upstream_connect_timeout`].
    fn connect(&self, req: &Request) -> impl Future<Output = io::Result<Self::Upstream>> + Send;

    /// Called once a tunnelled connection is over, with the bytes copied (client → upstream,
    /// upstream → client) or the error that ended it.
    fn finished(&self, _req: &Request, _result: &io::Result<(u64, u64)>) {}

    /// Called when a stream is answered 400 before it reaches the handler (not a CONNECT, or a
    /// bad `:authority`), with a short reason, for metrics.
    fn bad_request(&self, _reason: &'static str) {}

    /// Called once per accepted connection with how long the mTLS handshake took, or the
    /// reason it failed, for metrics.
    fn handshake(&self, _result: Result<Duration, &'static str>) {}
}

/// Limits and knobs of the HBONE server.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub h2: H2Settings,
    /// Bound on the whole set-up of an accepted connection: the TLS handshake and then the
    /// HTTP/2 client preface.
    pub tls_handshake_timeout: Duration,
    /// Bound on receiving the HTTP/2 client preface after the handshake (within the above).
    pub preface_timeout: Duration,
    /// Bound on [`Handler::connect`]; past it the stream is answered 503.
    pub upstream_connect_timeout: Duration,
    /// Answer 400 when `:authority`'s IP is not the connection's local IP (ztunnel does).
    pub require_authority_matches_local_ip: bool,
    /// A tunnelled connection with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            h2: H2Settings::default(),
            tls_handshake_timeout: Duration::from_secs(10),
            preface_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(10),
            require_authority_matches_local_ip: true,
            idle_timeout: crate::limits::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Accepts the mTLS handshake on `tcp` with `tls` (the server config of the destination
/// identity, picked by the caller from `tcp.local_addr()`), then serves HBONE on it until the
/// client is done or `shutdown` is cancelled (then GOAWAY, and in-flight streams continue: bound
/// the drain by dropping this future). A failed handshake comes back as [`HboneError::Tls`]
/// with its reason.
pub async fn serve_tls<H: Handler>(
    tcp: TcpStream,
    tls: Arc<tls::ServerConfig>,
    handler: Arc<H>,
    settings: &ServerSettings,
    shutdown: CancellationToken,
) -> Result<(), HboneError> {
    serve_tls_holding(tcp, tls, handler, settings, shutdown, ()).await
}

/// [`serve_tls`], holding `slot` until the connection is set up (TLS handshake and HTTP/2
/// preface), not while it is served: a cap on handshakes in progress frees its place once the
/// expensive, peer-paced part is over.
pub async fn serve_tls_holding<H: Handler, S>(
    tcp: TcpStream,
    tls: Arc<tls::ServerConfig>,
    handler: Arc<H>,
    settings: &ServerSettings,
    shutdown: CancellationToken,
    slot: S,
) -> Result<(), HboneError> {
    let local_addr = tcp.local_addr().map_err(|e| HboneError::Io(Arc::new(e)))?;
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let accepted = tokio::select! {
        r = tls::accept(tcp, tls, settings.tls_handshake_timeout) => r,
        _ = shutdown.cancelled() => return Ok(()),
    };
    handler.handshake(
        accepted
            .as_ref()
            .map(|_| started.elapsed())
            .map_err(|e| e.reason()),
    );
    let (stream, peer) = accepted?;
    // The preface within its own bound and what is left of the set-up's.
    let left = settings.tls_handshake_timeout.saturating_sub(started.elapsed());
    let io = tokio::select! {
        r = read_preface(stream, settings.preface_timeout.min(left)) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    drop(slot);
    serve_h2(io, peer, local_addr, handler, settings, shutdown).await
}

/// Serves HBONE on an established mTLS connection from `peer_identity`, accepted on
/// `local_addr`. Anything that is not HTTP/2 closes this connection only.
pub async fn serve_connection<IO, H>(
    io: IO,
    peer_identity: String,
    local_addr: SocketAddr,
    handler: Arc<H>,
    settings: &ServerSettings,
    shutdown: CancellationToken,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let io = tokio::select! {
        r = read_preface(io, settings.preface_timeout) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    serve_h2(io, peer_identity, local_addr, handler, settings, shutdown).await
}

async fn serve_h2<IO, H>(
    io: Rewind<IO>,
    peer_identity: String,
    local_addr: SocketAddr,
    handler: Arc<H>,
    settings: &ServerSettings,
    shutdown: CancellationToken,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let ctx = Arc::new(Ctx {
        peer_identity,
        local_addr,
        handler,
        upstream_connect_timeout: settings.upstream_connect_timeout,
        check_authority: settings.require_authority_matches_local_ip,
        idle_timeout: settings.idle_timeout,
    });
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let h2 = &settings.h2;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame_size)
        .max_concurrent_streams(h2.max_concurrent_streams)
        .keep_alive_interval(h2.keepalive_interval)
        .keep_alive_timeout(h2.keepalive_timeout);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(io), svc));
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    res.map_err(HboneError::from_hyper)
}

struct Ctx<H> {
    peer_identity: String,
    local_addr: SocketAddr,
    handler: Arc<H>,
    upstream_connect_timeout: Duration,
    check_authority: bool,
    idle_timeout: Duration,
}

impl<H: Handler> Ctx<H> {
    async fn handle(&self, mut req: http::Request<Incoming>) -> http::Response<Empty<Bytes>> {
        if req.method() != Method::CONNECT {
            debug!(method = %req.method(), "HBONE: not a CONNECT");
            self.handler.bad_request("not_connect");
            return answer(StatusCode::BAD_REQUEST);
        }
        let Some(dst) = req.uri().authority().and_then(|a| parse_authority(a.as_str())) else {
            debug!(uri = %req.uri(), "HBONE: authority is not ip:port");
            self.handler.bad_request("bad_authority");
            return answer(StatusCode::BAD_REQUEST);
        };
        if self.check_authority && !same_ip(dst.ip(), self.local_addr.ip()) {
            debug!(%dst, local = %self.local_addr, "HBONE: authority is not the address dialled");
            self.handler.bad_request("authority_mismatch");
            return answer(StatusCode::BAD_REQUEST);
        }
        let forwarded = req.headers().get(FORWARDED).and_then(|v| v.to_str().ok());
        let baggage = Baggage::parse(req.headers().get_all(BAGGAGE).iter().map(|v| v.as_bytes()))
            .unwrap_or_else(|e| {
                debug!(src = %self.peer_identity, error = %e, "HBONE: ignoring the baggage");
                Baggage::default()
            });
        let request = Request {
            source_identity: self.peer_identity.clone(),
            forwarded_for: forwarded.and_then(parse_forwarded_for),
            dst,
            local_addr: self.local_addr,
            service: forwarded
                .and_then(parse_forwarded_host)
                .and_then(parse_service_hostname),
            baggage,
        };
        if let Err(deny) = self.handler.authorize(&request) {
            debug!(src = %request.source_identity, %dst, policy = %deny.policy, "HBONE: denied");
            return answer(StatusCode::FORBIDDEN);
        }
        let upstream =
            match tokio::time::timeout(self.upstream_connect_timeout, self.handler.connect(&request)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%dst, error = %e, "HBONE: upstream connect failed");
                    return answer(StatusCode::SERVICE_UNAVAILABLE);
                }
                Err(_) => {
                    debug!(%dst, "HBONE: upstream connect timed out");
                    return answer(StatusCode::SERVICE_UNAVAILABLE);
                }
            };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let handler = self.handler.clone();
        let idle = self.idle_timeout;
        tokio::spawn(async move {
            let mut upstream = upstream;
            let result = match on_upgrade.await {
                Ok(upgraded) => {
                    let mut downstream = TokioIo::new(upgraded);
                    copy::bidirectional(&mut downstream, &mut upstream, idle).await
                }
                Err(e) => Err(io::Error::other(e)),
            };
            trace!(dst = %request.dst, ?result, "HBONE: stream finished");
            handler.finished(&request, &result);
        });
        answer(StatusCode::OK)
    }
}

fn answer(status: StatusCode) -> http::Response<Empty<Bytes>> {
    let mut r = http::Response::new(Empty::new());
    *r.status_mut() = status;
    r
}

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads and checks the HTTP/2 client preface within `timeout`, so a silent or non-HTTP/2 peer
/// is dropped early; hyper then reads the preface again from the returned stream.
async fn read_preface<IO>(mut io: IO, timeout: Duration) -> Result<Rewind<IO>, HboneError>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = [0u8; 24];
    match tokio::time::timeout(timeout, io.read_exact(&mut buf)).await {
        Err(_) => return Err(HboneError::Timeout("waiting for the HTTP/2 preface")),
        Ok(Err(e)) => return Err(HboneError::Io(Arc::new(e))),
        Ok(Ok(_)) => {}
    }
    if &buf != PREFACE {
        return Err(HboneError::NotH2);
    }
    Ok(Rewind {
        prefix: buf,
        pos: 0,
        io,
    })
}

/// A stream that first yields the preface it was built with.
struct Rewind<IO> {
    prefix: [u8; 24],
    pos: usize,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
