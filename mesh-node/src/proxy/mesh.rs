//! What both directions of the proxy read: the node's config from the controller, its pods'
//! certificates, the TLS configs built from them, the HBONE pool and the proxy's socket mark.
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_api::{Identity, Workload};

use super::hbone::Pool;
use crate::connections::Connections;
use crate::control::{ControlHandle, NodeState};
use crate::identity::CertStore;
use crate::limits::Carried;
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
    round_robin: AtomicUsize,
    /// Keepalive and idle timeout of every carried connection.
    pub carried: Carried,
}

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
        let observer = connections.metrics().clone();
        pool.observe_dials(Box::new(move |r| observer.handshake("client", r)));
        Mesh {
            config,
            certs,
            tls,
            pool,
            proxy_mark,
            connect_timeout,
            connections,
            round_robin: AtomicUsize::new(0),
            carried: Carried::default(),
        }
    }

    /// The same, with `carried` in place of the defaults.
    pub fn with_carried(self, carried: Carried) -> Self {
        Mesh { carried, ..self }
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

    /// The certificate of a local identity as TLS material; `None` until it is issued.
    pub fn svid(&self, identity: &Identity) -> Option<tls::Svid> {
        let svid = self.certs.get(identity)?;
        tls::Svid::new(svid.chain().to_vec(), svid.private_key().clone_key()).ok()
    }

    /// May `source` reach `dst` on `port`, by the policies that select `dst`? Denials are
    /// counted by policy.
    pub fn authorize(&self, state: &NodeState, dst: &Workload, source: &Identity, port: u16) -> Decision {
        self.counted(policy::authorize(state.policies.values(), dst, source, port))
    }

    /// May plaintext from outside the mesh (no principal) reach `dst` on `port`? Denials are
    /// counted by policy.
    pub fn authorize_plaintext(&self, state: &NodeState, dst: &Workload, port: u16) -> Decision {
        self.counted(policy::authorize_plaintext(state.policies.values(), dst, port))
    }

    fn counted(&self, decision: Decision) -> Decision {
        if let Decision::Deny { policy } = &decision {
            self.metrics()
                .policy_denials
                .with_label_values(&[policy.as_str()])
                .inc();
        }
        decision
    }
}
