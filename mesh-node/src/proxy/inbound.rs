//! Inbound: HBONE to a local pod's IP on 15008, captured in the kernel onto the proxy's
//! transparent listener. The accepted socket's local address names the destination pod, whose
//! certificate the proxy presents; the client must present a mesh certificate, and policy
//! decides per stream before the proxy connects to the pod with its mark.
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

use super::claims::{destination_service, source_from_baggage};
use super::hbone::{self, Deny, Handler, Request, ServerSettings};
use super::mesh::Mesh;
use super::upstream::connect_marked;
use crate::connections::{ConnMeta, Counted, Direction, Orientation};
use crate::limits::Admission;
use crate::metrics::labels::{Peer, Reporter, ResponseFlags};
use crate::policy::Decision;

/// The inbound listener's bounds beyond its connection caps (which the accept loop applies).
pub struct Limits {
    /// Connections in their TLS and HTTP/2 set-up at once.
    pub handshakes: Admission,
    /// The HBONE server's timeouts (set-up, idle streams).
    pub server: ServerSettings,
}

pub async fn handle(
    mesh: Arc<Mesh>,
    limits: Arc<Limits>,
    conn: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let local = match conn.local_addr() {
        Ok(a) => a,
        Err(e) => return debug!(%peer, error = %e, "inbound: no local address"),
    };
    let span = info_span!("inbound", src = %peer, dst = %local);
    async move {
        let state = mesh.config.state();
        let rejected = |reason: &str| mesh.metrics().inbound_rejected.with_label_values(&[reason]).inc();
        let Some(pod) = Mesh::local_workload(&state, local.ip()) else {
            rejected("not_local_pod");
            return debug!("not an enrolled pod of this node; closing");
        };
        let Some(svid) = mesh.svid(&pod.identity) else {
            rejected("no_certificate");
            return debug!(identity = %pod.identity, "no certificate for the destination yet; closing");
        };
        let tls = match mesh.tls.server(&svid) {
            Ok(cfg) => cfg,
            Err(e) => {
                rejected("tls_config");
                return debug!(error = %e, "building the server TLS config failed");
            }
        };
        let Ok(slot) = limits.handshakes.admit(Some(peer.ip())) else {
            return debug!("too many handshakes in progress; closing");
        };
        let handler = Arc::new(Inbound {
            mesh: mesh.clone(),
            peer,
        });
        if let Err(e) = hbone::serve_tls_holding(conn, tls, handler, &limits.server, stop, slot).await {
            rejected(e.reason());
            debug!(reason = e.reason(), error = %e, "HBONE connection ended with an error");
        }
    }
    .instrument(span)
    .await
}

struct Inbound {
    mesh: Arc<Mesh>,
    /// The TCP peer of the HBONE connection (the source's node proxy).
    peer: SocketAddr,
}

impl Inbound {
    /// The record of a tunnelled connection: the source as the TCP peer and its certificate
    /// name it (the peer's `forwarded` address, its own claim, only picks which workload of
    /// that identity, and is recorded apart; its baggage names a source this node does not
    /// know), the destination the local pod, and the service the source dialled when this
    /// node's state confirms that the pod serves it.
    fn meta(&self, req: &Request) -> ConnMeta {
        let state = self.mesh.config.state();
        let source = req
            .forwarded_for
            .and_then(|a| state.workload_by_ip(a.ip()))
            .filter(|w| w.identity.to_string() == req.source_identity)
            .map(Peer::of)
            .or_else(|| {
                let identity = Identity::from_str(&req.source_identity).ok()?;
                source_from_baggage(&identity, &req.baggage)
            })
            .unwrap_or_else(|| Peer::principal_only(&req.source_identity));
        let pod = Mesh::local_workload(&state, req.dst.ip());
        let service = pod
            .as_ref()
            .and_then(|w| destination_service(&state, req.service.as_ref(), w, req.dst.port()));
        let destination = pod.as_ref().map_or_else(Peer::unknown, Peer::of);
        ConnMeta {
            direction: Direction::Inbound,
            route: "hbone",
            src_addr: self.peer,
            forwarded_for: req.forwarded_for,
            dst_addr: req.dst,
            source,
            destination,
            service: service.map(|s| s.to_string()),
            reporters: &[Reporter::Destination],
        }
    }
}

impl Handler for Inbound {
    type Upstream = Counted<TcpStream>;

    fn authorize(&self, req: &Request) -> Result<(), Deny> {
        let state = self.mesh.config.state();
        let deny = |policy: &str| {
            let error = format!("denied by policy {policy}");
            let meta = self.meta(req);
            self.mesh.connections.failed(&meta, ResponseFlags::Denied, &error);
            Deny {
                policy: policy.to_owned(),
            }
        };
        let source = Identity::from_str(&req.source_identity).map_err(|_| deny("invalid-source-identity"))?;
        let dst = Mesh::local_workload(&state, req.dst.ip()).ok_or_else(|| deny("not-a-local-pod"))?;
        match self.mesh.authorize(&state, &dst, &source, req.dst.port()) {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny { policy } => {
                info!(src = %source, dst = %req.dst, workload = %format!("{}/{}", dst.namespace, dst.name), %policy, "denied by policy");
                Err(deny(&policy))
            }
        }
    }

    fn bad_request(&self, reason: &'static str) {
        self.mesh
            .metrics()
            .inbound_rejected
            .with_label_values(&[reason])
            .inc();
    }

    fn connect(&self, req: &Request) -> impl Future<Output = io::Result<Self::Upstream>> + Send {
        let dst = req.dst;
        // From the HBONE connection's own peer: the client pod's address when its node keeps
        // it, verified by the TCP handshake (unlike the Forwarded header, which it may set).
        let (src, mark, keepalive) = (
            self.mesh.source_to(self.peer.ip(), dst.ip()),
            self.mesh.proxy_mark,
            self.mesh.carried.keepalive,
        );
        let meta = self.meta(req);
        let connections = self.mesh.connections.clone();
        async move {
            match connect_marked(dst, src, mark, keepalive).await {
                Ok(s) => Ok(Counted::new(
                    s,
                    connections.open(meta),
                    Orientation::FacesDestination,
                )),
                Err(e) => {
                    connections.failed(&meta, ResponseFlags::ConnectFailed, &e.to_string());
                    Err(e)
                }
            }
        }
    }

    fn handshake(&self, result: Result<Duration, &'static str>) {
        self.mesh.metrics().handshake("server", result);
    }
}
