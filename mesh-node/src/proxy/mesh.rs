//! What both directions of the proxy read: the node's config from the controller, its pods'
//! certificates, the TLS configs built from them, the HBONE pool, the node's own addresses and
//! the proxy's socket mark.
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::{Identity, Workload};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::hbone::Pool;
use super::local_addrs::LocalAddrs;
use super::upstream::connect_marked;
use crate::connections::Connections;
use crate::control::{ControlHandle, NodeState};
use crate::enrollment::Report;
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
    /// The node's own addresses, which no captured connection is carried to.
    pub local_addrs: LocalAddrs,
    round_robin: AtomicUsize,
    /// Keepalive and idle timeout of every carried connection.
    pub carried: Carried,
    /// Connect from the client's own address (`--preserve-source`).
    pub preserve_source: bool,
    /// The reconcile loop's last round (which pods' veth programs are attached); `None`: all
    /// are taken as attached.
    kernel: Option<watch::Receiver<Arc<Report>>>,
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
            carried: Carried::default(),
            preserve_source: false,
            kernel: None,
        }
    }

    /// The same, with `carried` in place of the defaults.
    pub fn with_carried(self, carried: Carried) -> Self {
        Mesh { carried, ..self }
    }

    /// The same, connecting from clients' own addresses (`--preserve-source`).
    pub fn with_preserve_source(self, preserve_source: bool) -> Self {
        Mesh {
            preserve_source,
            ..self
        }
    }

    /// The same, told each reconcile round which local pods' veth programs are attached.
    pub fn with_kernel_report(self, report: watch::Receiver<Arc<Report>>) -> Self {
        Mesh {
            kernel: Some(report),
            ..self
        }
    }

    /// The address to connect from on behalf of a client at `client`, for a connection whose
    /// replies come in over the uplink (HBONE to another node): its own with
    /// `--preserve-source`, else the node's (`None`).
    pub fn source(&self, client: IpAddr) -> Option<IpAddr> {
        self.preserve_source.then_some(client)
    }

    /// The address to connect from on behalf of a client at `client` to `dst`, which may be a
    /// pod of this node ([`reply_source`]).
    pub fn source_to(&self, client: IpAddr, dst: IpAddr) -> Option<IpAddr> {
        if !self.preserve_source {
            return None;
        }
        let state = self.config.state();
        let report = self.kernel.as_ref().map(|k| k.borrow().clone());
        reply_source(
            client,
            dst,
            |ip| Mesh::local_pod(&state, ip).is_some(),
            |ip| {
                report
                    .as_ref()
                    .is_none_or(|r| r.veths_ready.contains(&ip.to_canonical()))
            },
        )
    }

    /// Connects to `dst` on behalf of a client at `client`, marked, with keepalive, within
    /// `--connect-timeout`.
    pub async fn connect(&self, dst: SocketAddr, client: IpAddr) -> io::Result<TcpStream> {
        let src = self.source_to(client, dst.ip());
        let connect = connect_marked(dst, src, self.proxy_mark, self.carried.keepalive);
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    }

    pub fn metrics(&self) -> &Metrics {
        self.connections.metrics()
    }

    /// The next of `n` choices, in turn (endpoint selection).
    pub fn next(&self, n: usize) -> usize {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % n.max(1)
    }

    /// An enrolled pod of this node with address `ip`.
    pub fn local_pod(state: &NodeState, ip: IpAddr) -> Option<&Workload> {
        state
            .workload_by_ip(ip)
            .filter(|w| w.enrolled && w.node == state.node)
    }

    /// [`Mesh::local_pod`], owned.
    pub fn local_workload(state: &NodeState, ip: IpAddr) -> Option<Workload> {
        Mesh::local_pod(state, ip).cloned()
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

/// The client's address to connect from, or `None` for the node's. A pod of this node replies
/// to a client's address through the tc program on its veth, which marks the replies for the
/// proxy: to a pod whose veth programs are not attached (its veth not found yet, or at all) the
/// proxy connects from the node's address instead, so the connection works, though the pod sees
/// the node. Replies from elsewhere come in over the uplink and need nothing more.
pub fn reply_source(
    client: IpAddr,
    dst: IpAddr,
    local_pod: impl Fn(IpAddr) -> bool,
    veth_ready: impl Fn(IpAddr) -> bool,
) -> Option<IpAddr> {
    (!local_pod(dst) || veth_ready(dst)).then_some(client)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::SystemTime;

    use rcgen::{CertificateParams, KeyPair, SanType};
    use zeroize::Zeroizing;

    use super::*;
    use crate::connections::AccessLog;
    use crate::control::{parse_target, ControlClient, ControllerEndpoint};
    use crate::identity::{Svid as Cert, VerifiedChain};
    use crate::proxy::hbone::PoolConfig;
    use crate::tls::CertificateDer;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    /// A certificate of `WEB` as the identity manager stores it.
    fn cert() -> Arc<Cert> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
        let leaf = params.self_signed(&key).unwrap();
        let der: CertificateDer<'static> = leaf.der().clone();
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let serial = x509.raw_serial_as_string();
        let now = SystemTime::now();
        let verified = VerifiedChain {
            chain: vec![der.clone()],
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            serial,
        };
        let id = Identity::from_str(WEB).unwrap();
        let key = Zeroizing::new(key.serialize_der());
        Arc::new(Cert::new(id, verified, key, vec![der].into(), now))
    }

    fn mesh(certs: CertStore, roots: &Cert) -> Mesh {
        let target = parse_target("unix:/nonexistent").unwrap();
        let endpoint = ControllerEndpoint::new(target, "ca".into(), "token".into(), "node");
        let (_, config) = ControlClient::new(endpoint);
        let tls = tls::ConfigCache::new(tls::roots_from_der(roots.chain()).unwrap(), "cluster.local");
        let connections = Connections::new(Arc::new(Metrics::new().unwrap()), AccessLog::new(0.0));
        let pool = Pool::new(PoolConfig::default());
        Mesh::new(config, certs, tls, pool, 0, Duration::from_secs(1), connections)
    }

    fn key_builds(mesh: &Mesh) -> u64 {
        mesh.metrics().tls_builds.with_label_values(&["key"]).get()
    }

    #[test]
    fn a_key_is_parsed_once_per_certificate_and_forgotten_when_the_identity_leaves() {
        let certs = CertStore::new();
        let web = cert();
        certs.insert(web.clone());
        let mesh = mesh(certs.clone(), &web);
        let id = web.identity().clone();
        let first = mesh.svid(&id).unwrap();
        let second = mesh.svid(&id).unwrap();
        assert_eq!(first.serial(), web.serial());
        assert_eq!(second.serial(), web.serial());
        assert_eq!(key_builds(&mesh), 1, "one parse for two connections");

        // The identity leaves the node: the cache lets go of its key.
        certs.remove(&id);
        mesh.forget_departed_certificates();
        assert!(mesh.svid(&id).is_none());
        certs.insert(web.clone());
        mesh.svid(&id).unwrap();
        assert_eq!(key_builds(&mesh), 2, "parsed again: the cache had forgotten it");

        // A renewed certificate is parsed anew.
        let renewed = cert();
        certs.insert(renewed.clone());
        mesh.forget_departed_certificates();
        assert_eq!(mesh.svid(&id).unwrap().serial(), renewed.serial());
        assert_eq!(key_builds(&mesh), 3);
    }

    #[test]
    fn the_clients_address_only_where_replies_find_the_proxy() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (client, local, found, remote) =
            (ip("10.1.1.10"), ip("10.1.1.11"), ip("10.1.1.12"), ip("10.1.2.10"));
        let local_pod = |a: IpAddr| [client, local, found].contains(&a);
        let ready = |a: IpAddr| [client, found].contains(&a);
        // Replies over the uplink, or through a ready pod's veth.
        assert_eq!(reply_source(remote, found, local_pod, ready), Some(remote));
        assert_eq!(reply_source(client, found, local_pod, ready), Some(client));
        assert_eq!(reply_source(client, remote, local_pod, ready), Some(client));
        assert_eq!(reply_source(local, found, local_pod, ready), Some(local));
        // To a pod of this node without its veth programs: the node's address.
        assert_eq!(reply_source(remote, local, local_pod, ready), None);
        assert_eq!(reply_source(found, local, local_pod, ready), None);
    }
}
