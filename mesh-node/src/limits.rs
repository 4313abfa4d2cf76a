//! Bounds on what a peer can hold of the agent: connection caps per listener and per peer
//! address, keepalive on every socket a peer holds, and an accept loop that waits out a full
//! descriptor table instead of spinning on it.
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounterVec;
use socket2::{SockRef, TcpKeepalive};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Keepalive probes and `TCP_USER_TIMEOUT`: a peer that vanishes (powered off, partitioned)
/// frees its socket within minutes instead of the kernel's two hours plus retransmissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe; then a probe every quarter of it, four in all.
    pub time: Duration,
    /// How long sent data may stay unacknowledged before the connection is dropped; zero
    /// leaves the kernel's default.
    pub user_timeout: Duration,
}

/// Probes after this many unanswered.
const KEEPALIVE_PROBES: u32 = 4;

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            time: Duration::from_secs(60),
            user_timeout: Duration::from_secs(120),
        }
    }
}

impl Keepalive {
    pub fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        let interval = (self.time / 4).max(Duration::from_secs(1));
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(self.time)
                .with_interval(interval)
                .with_retries(KEEPALIVE_PROBES),
        )?;
        if !self.user_timeout.is_zero() {
            socket.set_tcp_user_timeout(Some(self.user_timeout))?;
        }
        Ok(())
    }
}

/// The agent's caps and timeouts (`--http-*`, `--hbone-*`, `--idle-timeout`, `--tcp-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Each of the metrics, admin and readiness servers.
    pub http: crate::httpd::Limits,
    /// Inbound HBONE connections in their TLS and HTTP/2 set-up at once.
    pub hbone_max_handshakes: usize,
    /// Inbound HBONE connections from one address.
    pub hbone_max_connections_per_peer: usize,
    /// Bound on an inbound HBONE connection's TLS handshake and HTTP/2 preface together.
    pub hbone_handshake_timeout: Duration,
    pub carried: Carried,
}

/// How long a carried connection may stay silent both ways: Envoy's TCP proxy default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// What the proxy applies to every connection it carries, in every direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    pub keepalive: Keepalive,
    /// A carried connection with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Carried {
    fn default() -> Self {
        Carried {
            keepalive: Keepalive::default(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds its maximum of connections (or handshakes).
    Full,
    /// This peer address holds its maximum of the listener's connections.
    PeerFull,
}

/// Caps the connections a listener holds, in all and per peer address. Over a cap, a new
/// connection is closed at once rather than queued: a queue is just another thing to fill.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    listener: &'static str,
    /// The `reason` labels of [`Refused::Full`] and [`Refused::PeerFull`].
    reasons: [&'static str; 2],
    max: usize,
    per_peer: usize,
    held: Mutex<Held>,
    refused: Option<IntCounterVec>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// A connection's place under the caps; dropping it frees the place.
#[must_use]
pub struct Admitted {
    inner: Arc<Inner>,
    peer: Option<IpAddr>,
}

impl Admission {
    /// At most `max` connections, `per_peer` of them from one address. `refused` (labels
    /// `listener`, `reason`: `max_connections`, `max_connections_per_peer`) counts refusals.
    pub fn new(listener: &'static str, max: usize, per_peer: usize, refused: Option<IntCounterVec>) -> Self {
        Self::with_reasons(
            listener,
            ["max_connections", "max_connections_per_peer"],
            max,
            per_peer,
            refused,
        )
    }

    /// At most `max` handshakes in progress (reason `max_handshakes`).
    pub fn handshakes(listener: &'static str, max: usize, refused: Option<IntCounterVec>) -> Self {
        Self::with_reasons(listener, ["max_handshakes", ""], max, usize::MAX, refused)
    }

    fn with_reasons(
        listener: &'static str,
        reasons: [&'static str; 2],
        max: usize,
        per_peer: usize,
        refused: Option<IntCounterVec>,
    ) -> Self {
        Admission {
            inner: Arc::new(Inner {
                listener,
                reasons,
                max,
                per_peer,
                held: Mutex::new(Held::default()),
                refused,
            }),
        }
    }

    /// Takes a place for a connection from `peer` (`None`: a peer without an address, such as
    /// a Unix socket's, counted only in the total).
    pub fn admit(&self, peer: Option<IpAddr>) -> Result<Admitted, Refused> {
        let peer = peer.map(|p| p.to_canonical());
        let mut held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        let verdict = if held.total >= self.inner.max {
            Err(Refused::Full)
        } else if peer.is_some_and(|p| held.by_peer.get(&p).copied().unwrap_or(0) >= self.inner.per_peer) {
            Err(Refused::PeerFull)
        } else {
            held.total += 1;
            if let Some(p) = peer {
                *held.by_peer.entry(p).or_default() += 1;
            }
            Ok(Admitted {
                inner: self.inner.clone(),
                peer,
            })
        };
        drop(held);
        if let (Err(r), Some(c)) = (&verdict, &self.inner.refused) {
            let reason = self.inner.reasons[usize::from(*r == Refused::PeerFull)];
            c.with_label_values(&[self.inner.listener, reason]).inc();
        }
        verdict
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total -= 1;
        if let Some(p) = self.peer {
            if let Some(n) = held.by_peer.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    held.by_peer.remove(&p);
                }
            }
        }
    }
}

/// Something to accept connections from: a TCP or Unix listener (or, in tests, a stand-in).
pub trait Accept {
    type Conn;
    type Peer;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, Self::Peer)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, Self::Peer)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, Self::Peer)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// The first wait after a failed accept, doubled on each failure in a row up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts from `listener` until `stop`, handing each connection to `on_conn`. A failed accept
/// that is about the listener or the process (EMFILE, ENFILE, ENOBUFS, ENOMEM) would fail again
/// at once: the loop waits, longer each time, so that a full descriptor table does not become a
/// spinning core as well.
pub async fn accept_loop<L: Accept>(
    name: &'static str,
    listener: &L,
    stop: &CancellationToken,
    mut on_conn: impl FnMut(L::Conn, L::Peer),
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((conn, peer)) => {
                backoff = MIN_BACKOFF;
                on_conn(conn, peer);
            }
            // The peer gave up between the handshake and accept(): nothing wrong here.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => {
                warn!(listener = name, error = %e, wait = ?backoff, "accept failed; waiting");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn caps_in_all_and_per_peer() {
        let counter = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["listener", "reason"]).unwrap();
        let a = Admission::new("test", 3, 2, Some(counter.clone()));
        let p1: IpAddr = "10.0.0.1".parse().unwrap();
        let p1_mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let p2: IpAddr = "10.0.0.2".parse().unwrap();
        let first = a.admit(Some(p1)).unwrap();
        let _second = a.admit(Some(p1_mapped)).unwrap();
        assert_eq!(a.admit(Some(p1)).err(), Some(Refused::PeerFull));
        let _third = a.admit(Some(p2)).unwrap();
        assert_eq!(a.admit(Some(p2)).err(), Some(Refused::Full));
        assert_eq!(a.admit(None).err(), Some(Refused::Full));
        drop(first);
        assert_eq!(a.held(), 2);
        let _again = a.admit(Some(p1)).unwrap();
        let refused = |reason| counter.with_label_values(&["test", reason]).get();
        assert_eq!(
            (refused("max_connections"), refused("max_connections_per_peer")),
            (2, 1)
        );
        let h = Admission::handshakes("test", 1, Some(counter.clone()));
        let _one = h.admit(Some(p1)).unwrap();
        assert_eq!(h.admit(Some(p2)).err(), Some(Refused::Full));
        assert_eq!(refused("max_handshakes"), 1);
    }

    #[test]
    fn keepalive_and_user_timeout_are_set() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let k = Keepalive {
            time: Duration::from_secs(40),
            user_timeout: Duration::from_secs(90),
        };
        k.apply(SockRef::from(&conn)).unwrap();
        let s = SockRef::from(&conn);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(40));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(90)));
    }

    /// A listener whose process is out of descriptors: every accept fails with EMFILE.
    struct Exhausted(AtomicUsize);

    impl Accept for Exhausted {
        type Conn = ();
        type Peer = ();
        fn accept(&self) -> impl Future<Output = io::Result<((), ())>> + Send {
            self.0.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Err(io::Error::from_raw_os_error(libc::EMFILE)))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn emfile_backs_off_instead_of_spinning() {
        let listener = Exhausted(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let window = Duration::from_millis(500);
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            stopper.cancel();
        });
        accept_loop("test", &listener, &stop, |(), ()| {}).await;
        // 5 + 10 + 20 + … ms: at most 8 tries fit in half a second; a spinning loop makes
        // millions.
        let tries = listener.0.load(Ordering::Relaxed);
        assert!((2..=10).contains(&tries), "{tries} accepts in {window:?}");
    }
}
