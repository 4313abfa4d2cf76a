//! Outbound: a connection captured from an enrolled pod goes to its destination — over HBONE
//! with the pod's own identity when the destination is in the mesh, in-process (still by
//! policy) when it is on this node, and as plain TCP otherwise. The kernel captures only
//! destinations the mesh serves (Service VIPs, enrolled pods: `mesh_dests`), so plain TCP is
//! what a Service whose chosen endpoint is outside the mesh gets; other egress never reaches
//! the proxy.
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_api::{Identity, NamespacedName, Workload};
use tokio::net::TcpStream;
use tracing::{debug, info, info_span, Instrument};

use super::carry::{carry, carry_to, fail, reset};
use super::hbone::{Baggage, HboneError, Origin, PoolKey, HBONE_PORT};
use super::mesh::Mesh;
use super::orig_dst::original_dst;
use super::route::{self, Route};
use crate::config::Config;
use crate::connections::{ConnMeta, Direction};
use crate::control::NodeState;
use crate::metrics::labels::{Peer, Reporter, ResponseFlags};
use crate::policy::Decision;
use crate::tls::{self, TlsError};

pub async fn handle(cfg: Arc<Config>, mesh: Arc<Mesh>, client: TcpStream, peer: SocketAddr) {
    let span = info_span!("outbound", src = %peer);
    async move {
        let dst = match original_dst(&client) {
            Ok(dst) => dst,
            Err(e) => {
                // Not a connection the kernel redirected (someone dialled the port directly):
                // refuse it.
                debug!(error = %e, "no original destination; closing");
                mesh.metrics().outbound.with_label_values(&["not_captured"]).inc();
                reset(&client);
                return;
            }
        };
        let ports = own_ports(&cfg);
        let refused = |to: SocketAddr| match self_target(to, |ip| mesh.local_addrs.contains(ip), &ports) {
            None => false,
            Some(why) => {
                debug!(%dst, to = %to, reason = why.as_str(), "the destination is this node or proxy; refusing");
                mesh.metrics().outbound.with_label_values(&["self"]).inc();
                reset(&client);
                true
            }
        };
        if refused(dst) {
            return;
        }
        debug!(%dst, "captured");
        let _ = client.set_nodelay(true);
        let state = mesh.config.state();
        let route = route::route(&state, dst, &mut |n| mesh.next(n));
        // A service's endpoint is checked as the address dialled was.
        let upstream = match &route {
            Route::Passthrough { dst, .. } | Route::Hbone { dst, .. } => Some(*dst),
            Route::NoEndpoint { .. } => None,
        };
        if upstream.is_some_and(refused) {
            return;
        }
        let label = match &route {
            Route::Passthrough { .. } => "passthrough",
            Route::NoEndpoint { .. } => "no_endpoint",
            Route::Hbone { local: true, .. } => "local",
            Route::Hbone { local: false, .. } => "hbone",
        };
        mesh.metrics().outbound.with_label_values(&[label]).inc();
        let source = Mesh::local_workload(&state, peer.ip());
        let mut meta = ConnMeta {
            direction: Direction::Outbound,
            route: label,
            src_addr: peer,
            forwarded_for: None,
            dst_addr: dst,
            source: source.as_ref().map_or_else(Peer::unknown, Peer::of),
            destination: Peer::unknown(),
            service: None,
            reporters: &[Reporter::Source],
        };
        let result = match route {
            Route::Passthrough { dst, service, .. } => {
                meta.service = service.map(|s| s.to_string());
                // From the pod's own address, so its egress controls apply as they would without
                // the mesh; keepalive finds out when such a destination vanishes without a word.
                carry_to(&mesh, client, meta, dst).await
            }
            Route::NoEndpoint { service } => {
                meta.service = Some(service.to_string());
                let error = format!("service {service} has no ready endpoint");
                Err(fail(&mesh, &client, &meta, ResponseFlags::NoEndpoint, error))
            }
            Route::Hbone {
                dst: target,
                identity,
                local,
                workload_uid,
                service,
            } => {
                meta.dst_addr = target;
                meta.service = service.as_ref().map(ToString::to_string);
                meta.destination = state
                    .workload(&workload_uid)
                    .map_or_else(|| Peer::principal_only(&identity.to_string()), Peer::of);
                if local {
                    meta.reporters = &[Reporter::Source, Reporter::Destination];
                }
                match source {
                    None => {
                        let error = "the source is not an enrolled pod of this node";
                        Err(fail(&mesh, &client, &meta, ResponseFlags::HboneFailed, error))
                    }
                    Some(src) if local => to_local(&mesh, &state, client, &src, meta, &workload_uid).await,
                    Some(src) => via_hbone(&mesh, client, &src, service, meta, identity).await,
                }
            }
        };
        match result {
            Ok((sent, received)) => debug!(%dst, sent, received, "closed"),
            Err(e) => debug!(%dst, error = %e, "failed"),
        }
    }
    .instrument(span)
    .await
}

/// Same node: nothing crosses a wire, so no TLS; policy still decides.
async fn to_local(
    mesh: &Mesh,
    state: &NodeState,
    client: TcpStream,
    src: &Workload,
    meta: ConnMeta,
    uid: &str,
) -> io::Result<(u64, u64)> {
    let Some(dst) = state.workload(uid) else {
        let error = "destination workload vanished";
        return Err(fail(mesh, &client, &meta, ResponseFlags::ConnectFailed, error));
    };
    let target = meta.dst_addr;
    if let Decision::Deny { policy } = mesh.authorize(state, dst, &src.identity, target.port()) {
        info!(src = %src.identity, dst = %target, %policy, "denied by policy");
        let error = format!("denied by policy {policy}");
        return Err(fail(mesh, &client, &meta, ResponseFlags::Denied, error));
    }
    carry_to(mesh, client, meta, target).await
}

/// Over HBONE with the source pod's identity, telling the destination what ztunnel would: the
/// original source, the service dialled, and the source workload's baggage.
async fn via_hbone(
    mesh: &Mesh,
    client: TcpStream,
    src_workload: &Workload,
    service: Option<NamespacedName>,
    meta: ConnMeta,
    dst_identity: Identity,
) -> io::Result<(u64, u64)> {
    let src = &src_workload.identity;
    let dst_identity = dst_identity.to_string();
    let origin = Origin {
        src: meta.src_addr,
        service,
        baggage: Some(Baggage::of(src_workload)),
    };
    let key = PoolKey {
        src_identity: src.to_string(),
        dst_identity: dst_identity.clone(),
        src: mesh.source(meta.src_addr.ip()),
        dst: SocketAddr::new(meta.dst_addr.ip(), HBONE_PORT),
    };
    let stream = mesh
        .pool
        .connect(
            &key,
            || dial_config(mesh, src, &dst_identity),
            meta.dst_addr,
            origin,
        )
        .await;
    match stream {
        Ok(stream) => carry(mesh, client, meta, stream).await,
        Err(e) => {
            // Denied, refused or unreachable: the app sees its connection reset at once.
            let flags = match e {
                HboneError::Denied { .. } => ResponseFlags::Denied,
                HboneError::UpstreamRefused { .. } => ResponseFlags::ConnectFailed,
                _ => ResponseFlags::HboneFailed,
            };
            let error = format!("HBONE to {} ({}): {e}", meta.dst_addr, e.reason());
            Err(fail(mesh, &client, &meta, flags, error))
        }
    }
}

/// The TLS config for a new HBONE connection. The pool asks only when it must dial, so a warm
/// pool costs no certificate work per connection.
fn dial_config(mesh: &Mesh, src: &Identity, dst_identity: &str) -> Result<Arc<tls::ClientConfig>, TlsError> {
    let svid = mesh
        .svid(src)
        .ok_or_else(|| TlsError::InvalidMaterial(format!("no certificate for {src} yet")))?;
    mesh.tls.client(&svid, dst_identity)
}

/// The ports of this proxy's own listeners, as configured.
fn own_ports(cfg: &Config) -> [u16; 6] {
    [
        cfg.admin_addr.port(),
        cfg.datapath.outbound_port,
        cfg.datapath.inbound_plain_port,
        HBONE_PORT,
        cfg.metrics_addr.port(),
        cfg.health_addr.port(),
    ]
}

/// Why a destination is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SelfTarget {
    /// An address of this node (loopback and unspecified included).
    LocalAddress,
    /// A port of the proxy's own listeners, wherever it is.
    ProxyPort,
}

impl SelfTarget {
    fn as_str(self) -> &'static str {
        match self {
            SelfTarget::LocalAddress => "local_address",
            SelfTarget::ProxyPort => "proxy_port",
        }
    }
}

/// Whether carrying a connection to `dst` would reach this node or a mesh proxy instead of a
/// workload: a local address of the node (the proxy itself, or the node a pod can reach
/// without the mesh; a loop when it is one of the proxy's listeners), or one of the proxy's
/// own ports, which the mesh reserves on every address as Istio does its 150xx range.
fn self_target(dst: SocketAddr, is_local: impl Fn(IpAddr) -> bool, own_ports: &[u16]) -> Option<SelfTarget> {
    if is_local(dst.ip()) {
        Some(SelfTarget::LocalAddress)
    } else if own_ports.contains(&dst.port()) {
        Some(SelfTarget::ProxyPort)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: [u16; 6] = [15000, 15001, 15006, 15008, 15020, 15021];

    fn check(dst: &str) -> Option<SelfTarget> {
        let local: [IpAddr; 3] = [
            "10.0.0.1".parse().unwrap(),
            "10.1.1.1".parse().unwrap(),
            "fd00::1".parse().unwrap(),
        ];
        self_target(dst.parse().unwrap(), |ip| local.contains(&ip), &PORTS)
    }

    #[test]
    fn a_local_address_is_refused_on_any_port() {
        for dst in [
            "10.0.0.1:15001",
            "10.1.1.1:15001",
            "10.1.1.1:80",
            "[fd00::1]:8080",
        ] {
            assert_eq!(check(dst), Some(SelfTarget::LocalAddress), "{dst}");
        }
    }

    #[test]
    fn the_proxy_ports_are_refused_on_any_address() {
        for port in PORTS {
            for ip in ["10.1.2.10", "[fd00:1:2::10]"] {
                let dst = format!("{ip}:{port}");
                assert_eq!(check(&dst), Some(SelfTarget::ProxyPort), "{dst}");
            }
        }
    }

    #[test]
    fn workloads_elsewhere_are_carried() {
        for dst in [
            "10.1.2.10:8080",
            "10.96.0.10:80",
            "[fd00:1:2::10]:15002",
            "10.1.2.10:15022",
        ] {
            assert_eq!(check(dst), None, "{dst}");
        }
    }
}
