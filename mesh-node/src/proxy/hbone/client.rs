//! The outbound side of HBONE: a pool of mTLS HTTP/2 connections that carry one `CONNECT` stream
//! per proxied TCP connection.
//!
//! Connections are keyed by [`PoolKey`] (source identity, destination identity, HBONE address).
//! A connection carries at most [`PoolConfig::max_streams_per_connection`] streams (and never more
//! than the server allows); when all are full another is dialled. Callers that arrive while a
//! connection for their key is being dialled wait for that dial instead of starting their own
//! (up to the per-connection stream cap), so a burst costs one handshake per `cap` streams. A
//! connection without streams for [`PoolConfig::idle_timeout`] is closed; a broken one is dropped
//! from the pool at once, and the next call dials again.
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Empty;
use hyper::client::conn::http2::{Connection, SendRequest};
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::NamespacedName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, trace};

use super::baggage::{Baggage, BAGGAGE};
use super::wire::{forwarded_value, FORWARDED};
use super::{H2Settings, HboneError};
use crate::tls::{self, TlsError};

/// Which connections may carry a stream: the same source and destination identities, from the
/// same source address, to the same HBONE address (the destination pod's IP on 15008, whose
/// certificate the server picks by that address).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: String,
    pub dst_identity: String,
    /// The address to connect from: the source pod's own (`--preserve-source`), so the peer and
    /// everything on the way see the pod; `None`: the node's.
    pub src: Option<IpAddr>,
    /// Where to dial: `<destination pod ip>:15008`.
    pub dst: SocketAddr,
}

/// What a `CONNECT` tells the destination about the connection besides its target: the
/// original source (`forwarded: for=`), the service it dialled (`forwarded: ...;host=`) and the
/// source workload (`baggage`), as ztunnel sends them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub src: SocketAddr,
    pub service: Option<NamespacedName>,
    pub baggage: Option<Baggage>,
}

impl From<SocketAddr> for Origin {
    fn from(src: SocketAddr) -> Origin {
        Origin {
            src,
            service: None,
            baggage: None,
        }
    }
}

/// Limits of the pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Streams per connection before another connection is dialled (the server's
    /// SETTINGS_MAX_CONCURRENT_STREAMS caps it too).
    pub max_streams_per_connection: usize,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on dialling: TCP connect, TLS handshake and the HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// Bound on waiting for the answer to a CONNECT.
    pub response_timeout: Duration,
    pub h2: H2Settings,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            h2: H2Settings::default(),
        }
    }
}

/// Counters of a pool, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Live pooled connections.
    pub connections: usize,
    /// Dials in progress.
    pub dialing: usize,
    /// Callers waiting for a dial in progress (the one that started it included).
    pub waiting: usize,
    /// Open streams over all connections.
    pub active_streams: usize,
    /// Dials started since the pool was made (one TCP connect + TLS handshake each).
    pub dials: u64,
}

/// How the pool opens the TCP connection to an HBONE peer, from a source address (the key's
/// `src`) to a destination. The node proxy supplies one that sets SO_MARK (so capture leaves
/// the proxy's own traffic alone) and binds the source transparently.
pub type Dialer = Arc<
    dyn Fn(Option<IpAddr>, SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>
        + Send
        + Sync,
>;

/// A pool of HBONE connections. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// Told of every dial: how long the connection took to set up (TCP, mTLS, HTTP/2), or the
/// short reason it failed.
pub type DialObserver = Box<dyn Fn(Result<Duration, &'static str>) + Send + Sync>;

struct Inner {
    cfg: PoolConfig,
    dialer: Dialer,
    observer: OnceLock<DialObserver>,
    state: Mutex<HashMap<PoolKey, Entry>>,
    next_id: AtomicU64,
    dials: AtomicU64,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    pending: Vec<Arc<PendingDial>>,
}

type DialOutcome = Option<Result<Arc<Conn>, HboneError>>;

struct PendingDial {
    id: u64,
    /// Callers waiting on this dial (each expects a stream on the connection it makes).
    waiters: AtomicUsize,
    done: watch::Receiver<DialOutcome>,
}

/// A pooled connection: the request handle and its shared state.
struct Conn {
    id: u64,
    send: SendRequest<Empty<Bytes>>,
    state: Arc<ConnState>,
    cap: usize,
}

/// What the connection's driver task and the streams share.
struct ConnState {
    /// Open streams; [`EVICTED`] once idle eviction claimed the connection.
    active: AtomicUsize,
    last_used: Mutex<Instant>,
    closed: AtomicBool,
    /// Why the connection ended, when it failed.
    failure: OnceLock<HboneError>,
    /// A stream got an answer on this connection (so it worked once).
    proven: AtomicBool,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS, as last seen by the driver.
    peer_max_streams: AtomicUsize,
}

const EVICTED: usize = usize::MAX / 2;

impl ConnState {
    fn try_acquire(&self, cap: usize) -> bool {
        let mut cur = self.active.load(Ordering::Acquire);
        loop {
            if cur >= cap || self.closed.load(Ordering::Acquire) {
                return false;
            }
            match self
                .active
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    *lock(&self.last_used) = Instant::now();
                    return true;
                }
                Err(v) => cur = v,
            }
        }
    }

    fn release(&self) {
        *lock(&self.last_used) = Instant::now();
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// When this connection becomes evictable, if it stays unused.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.active.load(Ordering::Acquire) > 0 {
            Instant::now() + idle
        } else {
            *lock(&self.last_used) + idle
        }
    }

    /// Claims an unused connection whose idle time ran out; no stream can start on it after.
    fn try_evict(&self, idle: Duration) -> bool {
        if *lock(&self.last_used) + idle > Instant::now() {
            return false;
        }
        if self
            .active
            .compare_exchange(0, EVICTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.closed.store(true, Ordering::Release);
            return true;
        }
        false
    }
}

impl Conn {
    fn usable(&self) -> bool {
        !self.state.closed.load(Ordering::Acquire) && !self.send.is_closed()
    }

    /// The stream cap: ours, and never above what the server currently allows.
    fn cap(&self) -> usize {
        self.cap
            .min(self.state.peer_max_streams.load(Ordering::Relaxed).max(1))
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        (self.usable() && self.state.try_acquire(self.cap())).then(|| Slot { conn: self.clone() })
    }

    fn failure(&self) -> Option<HboneError> {
        self.state.failure.get().cloned()
    }
}

/// One stream's claim on a connection; released on drop.
struct Slot {
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conn.state.release();
    }
}

/// The client's end of one HBONE stream: the tunnelled TCP connection. Shutting down the write
/// side ends the stream in that direction (END_STREAM); reading returns EOF when the peer did.
pub struct HboneStream {
    io: TokioIo<Upgraded>,
    _slot: Slot,
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream")
            .field("connection", &self._slot.conn.id)
            .finish()
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The TLS config, fetched at most once per call and only if the call has to dial.
struct TlsSource<F> {
    make: Option<F>,
    config: Option<Arc<tls::ClientConfig>>,
}

impl<F> TlsSource<F>
where
    F: FnOnce() -> Result<Arc<tls::ClientConfig>, TlsError>,
{
    fn get(&mut self) -> Result<Arc<tls::ClientConfig>, TlsError> {
        if let Some(c) = &self.config {
            return Ok(c.clone());
        }
        let make = self
            .make
            .take()
            .ok_or_else(|| TlsError::InvalidMaterial("no TLS config".into()))?;
        let c = make()?;
        self.config = Some(c.clone());
        Ok(c)
    }
}

enum Next {
    Wait(watch::Receiver<DialOutcome>),
    Dial(u64, watch::Sender<DialOutcome>, watch::Receiver<DialOutcome>),
}

impl Pool {
    pub fn new(cfg: PoolConfig) -> Pool {
        let dialer: Dialer = Arc::new(|_, addr| {
            Box::pin(async move {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(s)
            })
        });
        Pool::with_dialer(cfg, dialer)
    }

    /// A pool whose TCP connections are opened by `dialer` (to set SO_MARK, bind a source, ...).
    pub fn with_dialer(cfg: PoolConfig, dialer: Dialer) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                cfg,
                dialer,
                observer: OnceLock::new(),
                state: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                dials: AtomicU64::new(0),
            }),
        }
    }

    /// Sets the dial observer (metrics); only the first call takes effect.
    pub fn observe_dials(&self, observer: DialObserver) {
        let _ = self.inner.observer.set(observer);
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    /// Opens an HBONE stream to `target` (the `:authority`, the destination's `ip:port`) over a
    /// pooled connection for `key`, announcing `origin` (at least the original source). `tls` is
    /// called only if a connection has to be dialled; it returns the client config of
    /// (`key.src_identity` → `key.dst_identity`), typically from
    /// [`ConfigCache::client`](crate::tls::ConfigCache::client). Any answer but 200 is an error
    /// carrying the status ([`HboneError::Denied`], [`HboneError::UpstreamRefused`], ...).
    pub async fn connect<F>(
        &self,
        key: &PoolKey,
        tls: F,
        target: SocketAddr,
        origin: impl Into<Origin>,
    ) -> Result<HboneStream, HboneError>
    where
        F: FnOnce() -> Result<Arc<tls::ClientConfig>, TlsError>,
    {
        let origin = origin.into();
        let mut tls = TlsSource {
            make: Some(tls),
            config: None,
        };
        let mut retried = false;
        loop {
            let slot = self.checkout(key, &mut tls).await?;
            match self.open_stream(&slot.conn, target, &origin).await {
                Ok(upgraded) => {
                    return Ok(HboneStream {
                        io: TokioIo::new(upgraded),
                        _slot: slot,
                    })
                }
                Err(e) => {
                    if !retried && retryable(&e, &slot.conn) {
                        debug!(dst = %key.dst, error = %e, "HBONE connection went away; retrying on a new one");
                        slot.conn.state.closed.store(true, Ordering::Release);
                        retried = true;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Counters over all keys.
    pub fn stats(&self) -> PoolStats {
        let st = lock(&self.inner.state);
        let mut s = PoolStats {
            dials: self.inner.dials.load(Ordering::Relaxed),
            ..Default::default()
        };
        for e in st.values() {
            for c in &e.conns {
                if c.usable() {
                    s.connections += 1;
                    s.active_streams += c.state.active.load(Ordering::Relaxed).min(EVICTED - 1);
                }
            }
            s.dialing += e.pending.len();
            s.waiting += e
                .pending
                .iter()
                .map(|p| p.waiters.load(Ordering::Relaxed))
                .sum::<usize>();
        }
        s
    }

    /// Live connections of one key.
    pub fn connections(&self, key: &PoolKey) -> usize {
        lock(&self.inner.state)
            .get(key)
            .map_or(0, |e| e.conns.iter().filter(|c| c.usable()).count())
    }

    /// Finds a connection with a free stream, waiting on or starting a dial if none has one.
    async fn checkout<F>(&self, key: &PoolKey, tls: &mut TlsSource<F>) -> Result<Slot, HboneError>
    where
        F: FnOnce() -> Result<Arc<tls::ClientConfig>, TlsError>,
    {
        let cap = self.inner.cfg.max_streams_per_connection.max(1);
        loop {
            let next = {
                let mut st = lock(&self.inner.state);
                let entry = st.entry(key.clone()).or_default();
                entry.conns.retain(|c| c.usable());
                if let Some(slot) = entry.conns.iter().find_map(|c| c.try_acquire()) {
                    return Ok(slot);
                }
                if let Some(p) = entry
                    .pending
                    .iter()
                    .find(|p| p.waiters.load(Ordering::Acquire) < cap)
                {
                    p.waiters.fetch_add(1, Ordering::AcqRel);
                    Next::Wait(p.done.clone())
                } else {
                    let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    entry.pending.push(Arc::new(PendingDial {
                        id,
                        waiters: AtomicUsize::new(1),
                        done: rx.clone(),
                    }));
                    Next::Dial(id, tx, rx)
                }
            };
            let mut rx = match next {
                Next::Wait(rx) => rx,
                Next::Dial(id, tx, rx) => {
                    // From here the guard owns the pending entry: however the dial ends (done,
                    // failed, its task cancelled or panicking), the entry goes and the waiters
                    // hear of it.
                    let guard = PendingGuard {
                        inner: self.inner.clone(),
                        key: key.clone(),
                        id,
                        tx: Some(tx),
                    };
                    match tls.get() {
                        Ok(config) => {
                            self.inner.dials.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(dial(guard, config));
                        }
                        Err(e) => guard.finish(Err(HboneError::Tls(e))),
                    }
                    rx
                }
            };
            let outcome = match rx.wait_for(|v| v.is_some()).await {
                Ok(v) => v.clone(),
                Err(_) => None, // the dial task is gone: look again
            };
            match outcome {
                Some(Ok(conn)) => {
                    if let Some(slot) = conn.try_acquire() {
                        return Ok(slot);
                    }
                    if !conn.usable() {
                        // It died right away (the server refused our certificate, say).
                        return Err(conn.failure().unwrap_or(HboneError::Io(Arc::new(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "HBONE connection closed right after it was established",
                        )))));
                    }
                    // Full already (others took its streams): look again.
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
    }

    async fn open_stream(
        &self,
        conn: &Arc<Conn>,
        target: SocketAddr,
        origin: &Origin,
    ) -> Result<Upgraded, HboneError> {
        let mut req = http::Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(FORWARDED, forwarded_value(origin.src, origin.service.as_ref()));
        if let Some(baggage) = origin
            .baggage
            .as_ref()
            .map(Baggage::to_string)
            .filter(|b| !b.is_empty())
        {
            req = req.header(BAGGAGE, baggage);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| HboneError::Io(Arc::new(io::Error::new(io::ErrorKind::InvalidInput, e))))?;
        let mut send = conn.send.clone();
        let resp = match tokio::time::timeout(self.inner.cfg.response_timeout, send.send_request(req)).await {
            Err(_) => return Err(HboneError::Timeout("waiting for the CONNECT answer")),
            Ok(Err(e)) => {
                // Prefer the connection's own failure (a TLS refusal noted by the tap).
                return Err(match conn.failure() {
                    Some(f @ HboneError::Tls(_)) => f,
                    _ => HboneError::from_hyper(e),
                });
            }
            Ok(Ok(r)) => r,
        };
        conn.state.proven.store(true, Ordering::Release);
        if let Some(e) = HboneError::from_status(resp.status()) {
            return Err(e);
        }
        hyper::upgrade::on(resp).await.map_err(HboneError::from_hyper)
    }
}

/// Whether a failed CONNECT may be sent again on another connection: the peer never acted on it
/// (hyper never sent it because the connection had closed, or the peer refused the stream or
/// went away before it), or a connection that had worked broke before the answer came.
fn retryable(e: &HboneError, conn: &Conn) -> bool {
    let proven = conn.state.proven.load(Ordering::Acquire);
    match e {
        HboneError::Http(h) => {
            let source = std::error::Error::source(&**h);
            // A stream refused, or cut by a GOAWAY whose last stream id is below it: the peer
            // never processed it (RFC 9113 §6.8, §8.7).
            let refused = source
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .is_some_and(|h2| h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
            // The transport under a connection that had worked failed.
            let transport = source.is_some_and(|s| s.is::<io::Error>());
            h.is_canceled() || refused || (proven && (transport || !conn.usable()))
        }
        HboneError::Io(_) => proven,
        _ => false,
    }
}

/// Dials one connection and hands it to the waiters of `guard`'s dial.
async fn dial(guard: PendingGuard, config: Arc<tls::ClientConfig>) {
    let (inner, key) = (&guard.inner, &guard.key);
    let timeout = inner.cfg.connect_timeout;
    let started = Instant::now();
    let res = match tokio::time::timeout(timeout, establish(inner, key, config)).await {
        Ok(r) => r,
        Err(_) => Err(HboneError::Timeout("dialling the HBONE peer")),
    };
    if let Some(observe) = inner.observer.get() {
        observe(
            res.as_ref()
                .map(|_| started.elapsed())
                .map_err(HboneError::reason),
        );
    }
    if let Err(e) = &res {
        debug!(dst = %key.dst, dst_identity = %key.dst_identity, error = %e, "HBONE dial failed");
    }
    guard.finish(res);
}

/// A dial in progress, as the pool lists it. Finishing it removes the pending entry (keeping
/// the connection, if one was made) and wakes the waiters; dropping it unfinished, because the
/// task dialling was cancelled or panicked, does the same with [`HboneError::Cancelled`], so no
/// caller waits on a dial that will never end and the key's entry does not outlive it.
struct PendingGuard {
    inner: Arc<Inner>,
    key: PoolKey,
    id: u64,
    tx: Option<watch::Sender<DialOutcome>>,
}

impl PendingGuard {
    fn finish(mut self, res: Result<Arc<Conn>, HboneError>) {
        self.complete(res);
    }

    fn complete(&mut self, res: Result<Arc<Conn>, HboneError>) {
        let Some(tx) = self.tx.take() else { return };
        {
            let mut st = lock(&self.inner.state);
            if let Some(entry) = st.get_mut(&self.key) {
                entry.pending.retain(|p| p.id != self.id);
                if let Ok(conn) = &res {
                    entry.conns.push(conn.clone());
                }
                if entry.conns.is_empty() && entry.pending.is_empty() {
                    st.remove(&self.key);
                }
            }
        }
        let _ = tx.send(Some(res));
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.tx.is_some() {
            debug!(dst = %self.key.dst, "HBONE dial ended before it finished");
            self.complete(Err(HboneError::Cancelled));
        }
    }
}

async fn establish(
    inner: &Arc<Inner>,
    key: &PoolKey,
    config: Arc<tls::ClientConfig>,
) -> Result<Arc<Conn>, HboneError> {
    let tcp = (inner.dialer)(key.src, key.dst)
        .await
        .map_err(|e| HboneError::Connect {
            addr: key.dst,
            source: Arc::new(e),
        })?;
    // The outer connect_timeout bounds the whole dial; this one only has to be no shorter.
    let stream = tls::connect(tcp, config, key.dst.ip(), inner.cfg.connect_timeout).await?;
    let state = Arc::new(ConnState {
        active: AtomicUsize::new(0),
        last_used: Mutex::new(Instant::now()),
        closed: AtomicBool::new(false),
        failure: OnceLock::new(),
        proven: AtomicBool::new(false),
        peer_max_streams: AtomicUsize::new(usize::MAX),
    });
    let h2 = &inner.cfg.h2;
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame_size)
        .keep_alive_interval(h2.keepalive_interval)
        .keep_alive_timeout(h2.keepalive_timeout)
        .keep_alive_while_idle(true);
    let io = TokioIo::new(TlsTap {
        io: stream,
        state: state.clone(),
    });
    let (send, connection) = builder.handshake(io).await.map_err(HboneError::from_hyper)?;
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(drive(
        Arc::downgrade(inner),
        key.clone(),
        id,
        state.clone(),
        connection,
    ));
    trace!(dst = %key.dst, id, "HBONE connection established");
    Ok(Arc::new(Conn {
        id,
        send,
        state,
        cap: inner.cfg.max_streams_per_connection.max(1),
    }))
}

/// Notes the TLS failure behind an I/O error before HTTP/2 sees it: h2 keeps only the text of
/// an I/O error, and in TLS 1.3 the server's refusal of our certificate arrives as an alert
/// after the client's handshake is done, on the first read.
struct TlsTap<IO> {
    io: IO,
    state: Arc<ConnState>,
}

impl<IO> TlsTap<IO> {
    fn note<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            if let Some(t) = TlsError::find(e) {
                let _ = self.state.failure.set(HboneError::Tls(t));
            }
        }
        r
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for TlsTap<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.note(r)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TlsTap<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.note(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

type H2Connection =
    Connection<TokioIo<TlsTap<tokio_rustls::client::TlsStream<TcpStream>>>, Empty<Bytes>, TokioExecutor>;

/// Drives one connection; removes it from the pool when it fails or has been idle too long.
async fn drive(inner: Weak<Inner>, key: PoolKey, id: u64, state: Arc<ConnState>, connection: H2Connection) {
    let idle = match inner.upgrade() {
        Some(i) => i.cfg.idle_timeout,
        None => return,
    };
    let mut connection = pin!(connection);
    loop {
        let deadline = state.idle_deadline(idle);
        // Poll the connection, noting the server's stream limit as its SETTINGS arrive.
        let run = std::future::poll_fn(|cx| {
            let r = connection.as_mut().poll(cx);
            state
                .peer_max_streams
                .store(connection.current_max_send_streams(), Ordering::Relaxed);
            r
        });
        tokio::select! {
            res = run => {
                state.closed.store(true, Ordering::Release);
                if let Err(e) = res {
                    debug!(dst = %key.dst, error = %e, "HBONE connection failed");
                    let _ = state.failure.set(HboneError::from_hyper(e));
                }
                remove(&inner, &key, id);
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                if state.try_evict(idle) {
                    trace!(dst = %key.dst, id, "HBONE connection idle; closing");
                    remove(&inner, &key, id);
                    // With every request handle gone, hyper closes the connection.
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection.as_mut()).await;
                    return;
                }
            }
        }
    }
}

fn remove(inner: &Weak<Inner>, key: &PoolKey, id: u64) {
    let Some(inner) = inner.upgrade() else { return };
    let mut st = lock(&inner.state);
    if let Some(entry) = st.get_mut(key) {
        entry.conns.retain(|c| c.id != id);
        if entry.conns.is_empty() && entry.pending.is_empty() {
            st.remove(key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
