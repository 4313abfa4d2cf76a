//! Prometheus metrics on :15020 (DESIGN.md §5). Connection metrics carry Istio's label names
//! (see [`labels`]); every label value is bounded: workloads, identities, services, reasons,
//! policy names — never addresses, ports or connection ids.
pub mod labels;
mod node;

pub use node::observe_node;

use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::httpd::{self, Request, Router};

pub const DEFAULT_ADDR: &str = "0.0.0.0:15020";

/// Connection durations: from a short RPC to a long-lived stream.
const DURATION_BUCKETS: &[f64] = &[0.005, 0.05, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0];
/// HBONE handshakes (TCP connect + mTLS + HTTP/2): sub-millisecond on a node, up to timeouts.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Work done just before each scrape, to bring gauges read from elsewhere up to date.
type Refresh = Box<dyn Fn(&Metrics) + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    process: Registry,
    refreshers: Mutex<Vec<Refresh>>,
    /// Captured outbound connections by route: hbone, local, passthrough, no_endpoint.
    pub outbound: IntCounterVec,
    /// Inbound HBONE refused, by reason: connections (TLS failure, garbage, not a local pod,
    /// no certificate yet) and streams answered 400 (not a CONNECT, bad authority).
    pub inbound_rejected: IntCounterVec,
    /// Connections or streams refused by authorization policy, by policy (`ns/name` or
    /// `default-deny`).
    pub policy_denials: IntCounterVec,
    /// The connection metrics, by [`labels::NAMES`].
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    /// Bytes the destination sent back (response direction), as Istio counts them.
    pub tcp_sent_bytes: IntCounterVec,
    /// Bytes the source sent (request direction).
    pub tcp_received_bytes: IntCounterVec,
    pub tcp_duration: HistogramVec,
    /// HBONE connection set-up time by direction (client, server).
    pub handshake_duration: HistogramVec,
    pub handshake_failures: IntCounterVec,
    pub cert_expiration: GaugeVec,
    pub pool_connections: IntGauge,
    pub pool_streams: IntGauge,
    /// Parsed keys and TLS configs built rather than reused, by kind (key, client, server).
    pub tls_builds: IntCounterVec,
    /// The eBPF programs' counters, copied from the kernel's map at scrape time.
    pub bpf_events: IntCounterVec,
    /// Connections a listener closed at once, by listener and reason (over a cap, not local).
    pub listener_refused: IntCounterVec,
    /// Reconcile rounds done, and how long the last one took.
    pub reconcile_rounds: IntCounter,
    pub reconcile_duration: Gauge,
    /// STRICT pods whose host-side interface the last round could not find (their last
    /// attachment is kept).
    pub strict_unresolved: IntGauge,
    /// Mesh destinations the last round could not fit in the kernel map (connects to them are
    /// not captured).
    pub destinations_left_out: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("mesh".into()), None)?;
        fn add<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> Result<C, prometheus::Error> {
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            add(&registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            add(&registry, HistogramVec::new(opts, labels)?)
        };
        let tcp = &labels::NAMES;
        let build = add(
            &registry,
            IntGaugeVec::new(
                Opts::new("build_info", "The running mesh-node's version."),
                &["version"],
            )?,
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // The standard `process_` metrics, in a registry of their own: ours adds `mesh_`.
        let process = Registry::new();
        process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            outbound: counter(
                "outbound_connections_total",
                "Captured outbound connections by route.",
                &["route"],
            )?,
            inbound_rejected: counter(
                "hbone_inbound_rejected_total",
                "Inbound HBONE connections and streams refused before reaching a pod, by reason.",
                &["reason"],
            )?,
            policy_denials: counter(
                "policy_denials_total",
                "Refusals by authorization policy.",
                &["policy"],
            )?,
            tcp_opened: counter("tcp_connections_opened_total", "TCP connections opened.", tcp)?,
            tcp_closed: counter("tcp_connections_closed_total", "TCP connections closed.", tcp)?,
            tcp_sent_bytes: counter(
                "tcp_sent_bytes_total",
                "Bytes sent by the destination back to the source (response direction).",
                tcp,
            )?,
            tcp_received_bytes: counter(
                "tcp_received_bytes_total",
                "Bytes received from the source for the destination (request direction).",
                tcp,
            )?,
            tcp_duration: histogram(
                "tcp_connection_duration_seconds",
                "How long TCP connections were open.",
                tcp,
                DURATION_BUCKETS,
            )?,
            handshake_duration: histogram(
                "hbone_handshake_duration_seconds",
                "HBONE connection set-up (TCP, mTLS, HTTP/2) by direction.",
                &["direction"],
                HANDSHAKE_BUCKETS,
            )?,
            handshake_failures: counter(
                "hbone_handshake_failures_total",
                "HBONE connections that failed to set up, by direction and reason.",
                &["direction", "reason"],
            )?,
            cert_expiration: add(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "certificate_expiration_timestamp_seconds",
                        "When each identity's certificate expires (Unix time).",
                    ),
                    &["identity"],
                )?,
            )?,
            pool_connections: add(
                &registry,
                IntGauge::new("pool_connections", "Pooled outbound HBONE connections.")?,
            )?,
            pool_streams: add(
                &registry,
                IntGauge::new("pool_streams", "Open streams over pooled HBONE connections.")?,
            )?,
            tls_builds: counter(
                "tls_config_builds_total",
                "Keys parsed and TLS configs built rather than reused from the cache, by kind.",
                &["kind"],
            )?,
            bpf_events: counter(
                "bpf_events_total",
                "Decisions of the kernel programs (redirected, skipped and why, STRICT drops).",
                &["event"],
            )?,
            listener_refused: counter(
                "listener_refused_total",
                "Connections a listener closed as soon as it accepted them, by listener and reason.",
                &["listener", "reason"],
            )?,
            reconcile_rounds: add(
                &registry,
                IntCounter::new(
                    "reconcile_rounds_total",
                    "Rounds of the kernel-state reconcile loop.",
                )?,
            )?,
            reconcile_duration: add(
                &registry,
                Gauge::new(
                    "reconcile_last_duration_seconds",
                    "How long the last reconcile round took.",
                )?,
            )?,
            strict_unresolved: add(
                &registry,
                IntGauge::new(
                    "strict_unresolved_pods",
                    "Enrolled pods whose host-side interface was not found in the last round; their last attachment is kept.",
                )?,
            )?,
            destinations_left_out: add(
                &registry,
                IntGauge::new(
                    "destinations_left_out",
                    "Mesh destinations (Service VIPs, enrolled pod addresses) that did not fit in the kernel map in the last round; connects to them are not captured.",
                )?,
            )?,
            registry,
            process,
            refreshers: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f` before each scrape (gauges and counters whose truth lives elsewhere).
    pub fn on_scrape(&self, f: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.refreshers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
    }

    /// One HBONE set-up by `direction` (client, server): its time, or why it failed.
    pub fn handshake(&self, direction: &str, result: Result<std::time::Duration, &str>) {
        match result {
            Ok(d) => self
                .handshake_duration
                .with_label_values(&[direction])
                .observe(d.as_secs_f64()),
            Err(reason) => self
                .handshake_failures
                .with_label_values(&[direction, reason])
                .inc(),
        }
    }

    /// Brings a kernel counter up to `value`; a smaller value means the maps were recreated,
    /// which Prometheus reads as a counter reset.
    pub fn set_bpf_event(&self, event: &str, value: u64) {
        let c = self.bpf_events.with_label_values(&[event]);
        let now = c.get();
        if value < now {
            c.reset();
            c.inc_by(value);
        } else {
            c.inc_by(value - now);
        }
    }

    /// The text exposition format: ours, then the process metrics.
    pub fn encode(&self) -> Vec<u8> {
        for f in self.refreshers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            f(self);
        }
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&families, &mut out);
        out
    }

    pub fn router(self: Arc<Self>) -> Router {
        Arc::new(move |req| route(&self, req))
    }
}

fn route(metrics: &Metrics, req: &Request) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            httpd::respond(StatusCode::OK, "text/plain; version=0.0.4", metrics.encode())
        }
        _ => httpd::respond(StatusCode::NOT_FOUND, "text/plain", b"try /metrics\n".to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::labels::{Peer, Reporter, ResponseFlags, TcpLabels};
    use super::*;

    #[test]
    fn counts_show_in_the_exposition() {
        let m = Metrics::new().unwrap();
        m.outbound.with_label_values(&["passthrough"]).inc();
        m.policy_denials.with_label_values(&["shop/deny-all"]).inc_by(2);
        let (src, dst) = (Peer::unknown(), Peer::principal_only("spiffe://td/ns/a/sa/b"));
        let l = TcpLabels {
            reporter: Reporter::Destination,
            source: &src,
            destination: &dst,
            service: "unknown",
            flags: ResponseFlags::None,
        };
        m.tcp_opened.with_label_values(&l.values()).inc();
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains(r#"mesh_outbound_connections_total{route="passthrough"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_policy_denials_total{policy="shop/deny-all"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"destination_principal="spiffe://td/ns/a/sa/b""#),
            "{text}"
        );
        assert!(text.contains("mesh_build_info{version="), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn kernel_counters_follow_the_map_and_its_resets() {
        let m = Metrics::new().unwrap();
        m.set_bpf_event("redirected_v4", 5);
        m.set_bpf_event("redirected_v4", 9);
        assert_eq!(m.bpf_events.with_label_values(&["redirected_v4"]).get(), 9);
        m.set_bpf_event("redirected_v4", 2);
        assert_eq!(m.bpf_events.with_label_values(&["redirected_v4"]).get(), 2);
    }
}
