//! The connections the proxy carries: each one is registered while it lives (for the admin
//! API), counts its bytes into the metrics as they flow, and on close records its duration and
//! writes its access-log line. Failed connections are recorded once, at once.
mod access_log;
mod counted;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{Histogram, IntCounter};

pub use access_log::AccessLog;
pub use counted::{Counted, Orientation};

use crate::metrics::labels::{Peer, Reporter, ResponseFlags, TcpLabels, UNKNOWN};
use crate::metrics::Metrics;

/// Which way the proxy carries a connection for the local pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A local pod is the client.
    Outbound,
    /// A local pod is the server.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Who talked to whom, as far as the proxy knows.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    pub direction: Direction,
    /// `hbone`, `local` or `passthrough`.
    pub route: &'static str,
    /// The TCP peer the proxy accepted the connection from.
    pub src_addr: SocketAddr,
    /// The original source the peer claims (the HBONE `forwarded` header): the peer's word,
    /// kept apart from what the proxy saw itself.
    pub forwarded_for: Option<SocketAddr>,
    pub dst_addr: SocketAddr,
    pub source: Peer,
    pub destination: Peer,
    /// `namespace/name` when the client dialled a service address.
    pub service: Option<String>,
    /// The proxies that report it: one, or both when source and destination share this node.
    pub reporters: &'static [Reporter],
}

/// A live connection as the admin API lists it.
pub struct Live {
    pub id: u64,
    pub meta: ConnMeta,
    pub started: Instant,
    /// Bytes from the source towards the destination.
    pub request_bytes: AtomicU64,
    /// Bytes from the destination back to the source.
    pub response_bytes: AtomicU64,
}

/// Every live connection of this proxy, plus what recording one needs.
#[derive(Clone)]
pub struct Connections {
    inner: Arc<Inner>,
}

struct Inner {
    live: Mutex<HashMap<u64, Arc<Live>>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    log: AccessLog,
}

/// The metric handles of one reporter of one connection, resolved once at open so the byte
/// counting on the data path is an atomic add, not a label lookup.
struct Handles {
    closed: IntCounter,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    duration: Histogram,
}

impl Connections {
    pub fn new(metrics: Arc<Metrics>, log: AccessLog) -> Connections {
        Connections {
            inner: Arc::new(Inner {
                live: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                metrics,
                log,
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// A connection that carries bytes from now on: counted as opened, listed as live until
    /// the returned guard is dropped.
    pub fn open(&self, meta: ConnMeta) -> Tracked {
        let handles = meta
            .reporters
            .iter()
            .map(|r| {
                let labels = labels(&meta, *r, ResponseFlags::None);
                let values = labels.values();
                let m = &self.inner.metrics;
                m.tcp_opened.with_label_values(&values).inc();
                Handles {
                    closed: m.tcp_closed.with_label_values(&values),
                    request_bytes: m.tcp_received_bytes.with_label_values(&values),
                    response_bytes: m.tcp_sent_bytes.with_label_values(&values),
                    duration: m.tcp_duration.with_label_values(&values),
                }
            })
            .collect();
        let live = Arc::new(Live {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            meta,
            started: Instant::now(),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
        });
        lock(&self.inner.live).insert(live.id, live.clone());
        Tracked {
            owner: self.inner.clone(),
            live,
            handles,
        }
    }

    /// A connection that never carried a byte: opened and closed at once with `flags`, and
    /// always logged, whatever the sampling.
    pub fn failed(&self, meta: &ConnMeta, flags: ResponseFlags, error: &str) {
        let m = &self.inner.metrics;
        for r in meta.reporters {
            let labels = labels(meta, *r, flags);
            let values = labels.values();
            m.tcp_opened.with_label_values(&values).inc();
            m.tcp_closed.with_label_values(&values).inc();
            m.tcp_duration.with_label_values(&values).observe(0.0);
        }
        self.inner.log.failed(meta, flags, error);
    }

    /// The live connections, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Live>> {
        let mut all: Vec<_> = lock(&self.inner.live).values().cloned().collect();
        all.sort_by_key(|l| l.id);
        all
    }

    pub fn len(&self) -> usize {
        lock(&self.inner.live).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn labels(meta: &ConnMeta, reporter: Reporter, flags: ResponseFlags) -> TcpLabels<'_> {
    TcpLabels {
        reporter,
        source: &meta.source,
        destination: &meta.destination,
        service: meta.service.as_deref().unwrap_or(UNKNOWN),
        flags,
    }
}

/// One live connection; dropping it closes the record.
pub struct Tracked {
    owner: Arc<Inner>,
    live: Arc<Live>,
    handles: Vec<Handles>,
}

impl Tracked {
    fn add_request(&self, n: u64) {
        self.live.request_bytes.fetch_add(n, Ordering::Relaxed);
        for h in &self.handles {
            h.request_bytes.inc_by(n);
        }
    }

    fn add_response(&self, n: u64) {
        self.live.response_bytes.fetch_add(n, Ordering::Relaxed);
        for h in &self.handles {
            h.response_bytes.inc_by(n);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.owner.live).remove(&self.live.id);
        let secs = self.live.started.elapsed().as_secs_f64();
        for h in &self.handles {
            h.closed.inc();
            h.duration.observe(secs);
        }
        self.owner.log.closed(&self.live);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(reporters: &'static [Reporter]) -> ConnMeta {
        ConnMeta {
            direction: Direction::Outbound,
            route: "local",
            src_addr: "10.1.1.2:40000".parse().unwrap(),
            forwarded_for: None,
            dst_addr: "10.1.1.3:80".parse().unwrap(),
            source: Peer::unknown(),
            destination: Peer::principal_only("spiffe://td/ns/a/sa/b"),
            service: Some("a/b".into()),
            reporters,
        }
    }

    #[test]
    fn a_connection_is_live_until_dropped_and_counts_each_reporter() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let conns = Connections::new(metrics.clone(), AccessLog::new(0.0));
        let t = conns.open(meta(&[Reporter::Source, Reporter::Destination]));
        t.add_request(100);
        t.add_response(7);
        assert_eq!(conns.len(), 1);
        assert_eq!(conns.snapshot()[0].request_bytes.load(Ordering::Relaxed), 100);
        drop(t);
        assert!(conns.is_empty());
        let text = String::from_utf8(metrics.encode()).unwrap();
        for reporter in ["source", "destination"] {
            // The exposition sorts labels by name.
            let line = |name: &str, v: u64| {
                format!(
                    r#"{name}{{destination_principal="spiffe://td/ns/a/sa/b",destination_service="a/b",destination_workload="unknown",destination_workload_namespace="unknown",reporter="{reporter}",response_flags="-",source_principal="unknown",source_workload="unknown",source_workload_namespace="unknown"}} {v}"#
                )
            };
            for (name, v) in [
                ("mesh_tcp_connections_opened_total", 1),
                ("mesh_tcp_connections_closed_total", 1),
                ("mesh_tcp_received_bytes_total", 100),
                ("mesh_tcp_sent_bytes_total", 7),
            ] {
                assert!(text.contains(&line(name, v)), "{name} {reporter}: {text}");
            }
        }
    }

    #[test]
    fn a_failed_connection_is_opened_and_closed_with_its_flag() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let conns = Connections::new(metrics.clone(), AccessLog::new(1.0));
        conns.failed(&meta(&[Reporter::Source]), ResponseFlags::Denied, "policy a/deny");
        assert!(conns.is_empty());
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("mesh_tcp_connections_closed_total{")
                    && l.contains(r#"response_flags="DENIED""#)
                    && l.ends_with(" 1")),
            "{text}"
        );
    }
}
