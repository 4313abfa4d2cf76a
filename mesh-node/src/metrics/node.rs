//! The metrics whose truth lives outside the proxy — the kernel programs' counters and the
//! certificates' expiry — read at scrape time.
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use tracing::debug;

use super::Metrics;
use crate::ebpf::Datapath;
use crate::identity::CertStore;

pub fn observe_node(metrics: &Metrics, datapath: Arc<Mutex<Datapath>>, certs: CertStore) {
    metrics.on_scrape(move |m| {
        let counters = datapath.lock().unwrap_or_else(|p| p.into_inner()).counters();
        match counters {
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
    });
}
