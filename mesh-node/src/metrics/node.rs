//! The metrics whose truth lives outside the proxy — the kernel programs' counters, the
//! certificates' expiry and the last reconcile round — read at scrape time.
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tokio::sync::watch;
use tracing::debug;

use super::Metrics;
use crate::ebpf::Datapath;
use crate::enrollment::Report;
use crate::identity::CertStore;

/// `datapath` is a reader's own handle ([`Datapath::reopen`]): a scrape never waits for the
/// reconcile loop.
pub fn observe_node(
    metrics: &Metrics,
    datapath: Arc<Datapath>,
    certs: CertStore,
    kernel: watch::Receiver<Arc<Report>>,
) {
    metrics.on_scrape(move |m| {
        match datapath.counters() {
            Ok(counters) => {
                for (event, value) in counters {
                    m.set_bpf_event(event, value);
                }
            }
            Err(e) => debug!(error = %e, "reading the kernel counters for a scrape"),
        }
        // Identities come and go with pods: only the current ones are reported.
        m.cert_expiration.reset();
        for svid in certs.all().values() {
            let expiry = svid.not_after().duration_since(UNIX_EPOCH).unwrap_or_default();
            m.cert_expiration
                .with_label_values(&[&svid.identity().to_string()])
                .set(expiry.as_secs_f64());
        }
        let report = kernel.borrow().clone();
        m.reconcile_rounds
            .inc_by(report.round.saturating_sub(m.reconcile_rounds.get()));
        m.reconcile_duration.set(report.duration.as_secs_f64());
        m.strict_unresolved
            .set(i64::try_from(report.strict_unresolved.len()).unwrap_or(i64::MAX));
        m.destinations_left_out
            .set(i64::try_from(report.destinations_left_out).unwrap_or(i64::MAX));
    });
}
