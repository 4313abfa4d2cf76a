//! Prometheus metrics on :15020 (DESIGN.md §5): what the proxy decided and refused, by labels
//! with bounded values (routes, reasons, policy names — never addresses or ports).
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};

use crate::httpd::{self, Router};

pub const DEFAULT_ADDR: &str = "0.0.0.0:15020";

pub struct Metrics {
    registry: Registry,
    /// Captured outbound connections by route: hbone, local, passthrough, no_endpoint.
    pub outbound: IntCounterVec,
    /// Inbound HBONE refused, by reason: connections (TLS failure, garbage, not a local pod,
    /// no certificate yet) and streams answered 400 (not a CONNECT, bad authority).
    pub inbound_rejected: IntCounterVec,
    /// Connections or streams refused by authorization policy, by policy (`ns/name` or
    /// `default-deny`).
    pub policy_denials: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("mesh".into()), None)?;
        let counter = |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Metrics {
            outbound: counter(
                "outbound_connections_total",
                "Captured outbound connections by route.",
                "route",
            )?,
            inbound_rejected: counter(
                "hbone_inbound_rejected_total",
                "Inbound HBONE connections and streams refused before reaching a pod, by reason.",
                "reason",
            )?,
            policy_denials: counter(
                "policy_denials_total",
                "Refusals by authorization policy.",
                "policy",
            )?,
            registry,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    pub fn router(self: Arc<Self>) -> Router {
        Arc::new(move |req| route(&self, req))
    }
}

fn route(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            httpd::respond(StatusCode::OK, "text/plain; version=0.0.4", metrics.encode())
        }
        _ => httpd::respond(StatusCode::NOT_FOUND, "text/plain", b"try /metrics\n".to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_exposition() {
        let m = Metrics::new().unwrap();
        m.outbound.with_label_values(&["passthrough"]).inc();
        m.policy_denials.with_label_values(&["shop/deny-all"]).inc_by(2);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains(r#"mesh_outbound_connections_total{route="passthrough"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_policy_denials_total{policy="shop/deny-all"} 2"#),
            "{text}"
        );
    }
}
