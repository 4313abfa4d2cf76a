//! What both directions of the proxy read: the node's config from the controller, its pods'
//! certificates, the TLS configs built from them, the HBONE pool, the node's own addresses and
//! the proxy's socket mark.
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::{Identity, Workload};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::hbone::Pool;
use super::local_addrs::LocalAddrs;
use crate::connections::Connections;
use crate::control::{ControlHandle, NodeState};
use crate::identity::CertStore;
use crate::metrics::Metrics;
use crate::policy::{self, Decision};
use crate::tls::{self, ConfigCache};

pub struct Mesh {
    pub config: ControlHandle,
    pub certs: CertStore,
    pub tls: ConfigCache,
    pub pool: Pool,
    /// SO_MARK on every connection the proxy makes to a pod: STRICT pods admit only these.
    pub proxy_mark: u32,
    pub connect_timeout: Duration,
    /// The live connections and their telemetry.
    pub connections: Connections,
    /// The node's own addresses, which no captured connection is carried to.
    pub local_addrs: LocalAddrs,
    round_robin: AtomicUsize,
}

/// How often the node's addresses are read again.
const LOCAL_ADDRS_REFRESH: Duration = Duration::from_secs(5);

impl Mesh {
    pub fn new(
        config: ControlHandle,
        certs: CertStore,
        tls: ConfigCache,
        pool: Pool,
        proxy_mark: u32,
        connect_timeout: Duration,
        connections: Connections,
    ) -> Self {
        let (local_addrs, read) = LocalAddrs::new();
        if let Err(e) = read {
            warn!(error = %e, "reading the node's addresses failed; retrying");
        }
        let observer = connections.metrics().clone();
        pool.observe_dials(Box::new(move |r| observer.handshake("client", r)));
        let observer = connections.metrics().clone();
        tls.observe_builds(Box::new(move |b| {
            observer.tls_builds.with_label_values(&[b.as_str()]).inc()
        }));
        Mesh {
            config,
            certs,
            tls,
            pool,
            proxy_mark,
            connect_timeout,
            connections,
            local_addrs,
            round_robin: AtomicUsize::new(0),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        self.connections.metrics()
    }

    /// The next of `n` choices, in turn (endpoint selection).
    pub fn next(&self, n: usize) -> usize {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % n.max(1)
    }

    /// An enrolled pod of this node with address `ip`.
    pub fn local_workload(state: &NodeState, ip: IpAddr) -> Option<Workload> {
        state
            .workload_by_ip(ip)
            .filter(|w| w.enrolled && w.node == state.node)
            .cloned()
    }

    /// The certificate of a local identity as TLS material; `None` until it is issued. Its key
    /// is parsed once per certificate, not per connection.
    pub fn svid(&self, identity: &Identity) -> Option<tls::Svid> {
        let cert = self.certs.get(identity)?;
        let load = || tls::Svid::from_key(cert.chain().to_vec(), &cert.private_key());
        match self.tls.svid(&identity.to_string(), cert.serial(), load) {
            Ok(svid) => Some(svid),
            Err(e) => {
                warn!(%identity, error = %e, "the certificate cannot be used for TLS");
                None
            }
        }
    }

    /// Keeps what the proxy derives from the node up to date until `stop`: the TLS cache in
    /// step with the node's certificates (what was built for an identity that left the node, or
    /// for a certificate since renewed, is dropped), and the node's addresses.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let mut changes = self.certs.subscribe();
        let mut refresh = tokio::time::interval(LOCAL_ADDRS_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.forget_departed_certificates();
                }
                _ = refresh.tick() => {
                    let mesh = self.clone();
                    match tokio::task::spawn_blocking(move || mesh.local_addrs.refresh()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "reading the node's addresses failed"),
                        Err(e) => warn!(error = %e, "reading the node's addresses failed"),
                    }
                }
            }
        }
    }

    fn forget_departed_certificates(&self) {
        let current = self.certs.all();
        self.tls.retain(|identity, serial| {
            current
                .iter()
                .any(|(id, cert)| cert.serial() == serial && id.to_string() == identity)
        });
    }

    /// May `source` reach `dst` on `port`, by the policies that select `dst`? Denials are
    /// counted by policy.
    pub fn authorize(&self, state: &NodeState, dst: &Workload, source: &Identity, port: u16) -> Decision {
        let decision = policy::authorize(state.policies.values(), dst, source, port);
        if let Decision::Deny { policy } = &decision {
            self.metrics()
                .policy_denials
                .with_label_values(&[policy.as_str()])
                .inc();
        }
        decision
    }
}
