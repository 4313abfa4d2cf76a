//! `GET /v1/connections`: what the proxy carries right now.
use std::sync::atomic::Ordering;

use mesh_api::admin::ConnectionInfo;

use crate::connections::Connections;
use crate::metrics::labels::{Peer, UNKNOWN};

pub fn list(conns: &Connections) -> Vec<ConnectionInfo> {
    let known = |p: &Peer| (p.principal != UNKNOWN).then(|| p.principal.clone());
    conns
        .snapshot()
        .iter()
        .map(|c| ConnectionInfo {
            id: c.id,
            direction: c.meta.direction.as_str().into(),
            source: c.meta.src_addr.to_string(),
            destination: c.meta.dst_addr.to_string(),
            source_identity: known(&c.meta.source),
            destination_identity: known(&c.meta.destination),
            service: c.meta.service.clone(),
            route: c.meta.route.into(),
            bytes_sent: c.request_bytes.load(Ordering::Relaxed),
            bytes_received: c.response_bytes.load(Ordering::Relaxed),
            age_seconds: c.started.elapsed().as_secs_f64(),
        })
        .collect()
}
