//! Access logs: one structured line per connection (tracing target `access`, in the agent's
//! log format, text or JSON), with identities, addresses, service, bytes each way, duration and
//! result. Successful connections are sampled; failures are always written.
use std::sync::atomic::Ordering;

use tracing::info;

use super::{ConnMeta, Live};
use crate::metrics::labels::ResponseFlags;

#[derive(Debug, Clone, Copy)]
pub struct AccessLog {
    /// The share of successful connections logged, 0.0 to 1.0.
    sample_rate: f64,
}

impl AccessLog {
    pub fn new(sample_rate: f64) -> AccessLog {
        AccessLog {
            sample_rate: sample_rate.clamp(0.0, 1.0),
        }
    }

    fn sampled(&self) -> bool {
        self.sample_rate >= 1.0 || (self.sample_rate > 0.0 && fastrand::f64() < self.sample_rate)
    }

    pub(super) fn closed(&self, live: &Live) {
        if self.sampled() {
            let (req, resp) = (
                live.request_bytes.load(Ordering::Relaxed),
                live.response_bytes.load(Ordering::Relaxed),
            );
            let ms = live.started.elapsed().as_millis() as u64;
            write(&live.meta, req, resp, ms, ResponseFlags::None, None);
        }
    }

    pub(super) fn failed(&self, meta: &ConnMeta, flags: ResponseFlags, error: &str) {
        write(meta, 0, 0, 0, flags, Some(error));
    }
}

fn write(
    m: &ConnMeta,
    sent: u64,
    received: u64,
    duration_ms: u64,
    flags: ResponseFlags,
    error: Option<&str>,
) {
    info!(
        target: "access",
        direction = m.direction.as_str(),
        route = m.route,
        src.addr = %m.src_addr,
        src.forwarded_for = m.forwarded_for.map(tracing::field::display),
        src.workload = %m.source.workload,
        src.namespace = %m.source.namespace,
        src.identity = %m.source.principal,
        dst.addr = %m.dst_addr,
        dst.workload = %m.destination.workload,
        dst.namespace = %m.destination.namespace,
        dst.identity = %m.destination.principal,
        dst.service = m.service.as_deref().unwrap_or("-"),
        bytes_sent = sent,
        bytes_received = received,
        duration_ms,
        result = flags.as_str(),
        error,
        "connection"
    );
}
