//! Inbound plaintext (DESIGN.md §4): TCP from outside the mesh to a local PERMISSIVE pod,
//! steered by the kernel onto the proxy's transparent listener (`*:15006`). Two ways in:
//! - from a pod of this node that is not enrolled: its connect was rewritten to the node's
//!   address on 15006, so the original destination is `SO_ORIGINAL_DST`;
//! - from another host, through the uplink: the SYN was assigned to this listener, so the
//!   accepted socket's local address is the pod's own `IP:port`.
//!
//! Anything else (someone dialling 15006 directly, a pod that is not PERMISSIVE) is refused.
//! Policy decides with no authenticated principal; an allowed connection goes on to the pod
//! from a socket with the proxy's mark, counted in the metrics and the access log.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::{MtlsMode, Workload};
use tokio::net::TcpStream;
use tracing::{debug, info, info_span, Instrument};

use super::carry::{self, fail, reset};
use super::mesh::Mesh;
use super::orig_dst::original_dst;
use crate::connections::{ConnMeta, Direction};
use crate::control::NodeState;
use crate::metrics::labels::{Peer, Reporter, ResponseFlags};
use crate::policy::Decision;

/// The `route` of these connections in metrics and access logs.
pub const ROUTE: &str = "plaintext";

pub async fn handle(mesh: Arc<Mesh>, client: TcpStream, peer: SocketAddr) {
    let span = info_span!("inbound_plain", src = %peer);
    async move {
        let state = mesh.config.state();
        let (dst, pod) = match destination(&state, &client) {
            Ok(d) => d,
            Err(reason) => {
                debug!(reason, "not plaintext for a PERMISSIVE pod of this node; closing");
                return reset(&client);
            }
        };
        let meta = ConnMeta {
            direction: Direction::Inbound,
            route: ROUTE,
            src_addr: peer,
            forwarded_for: None,
            dst_addr: dst,
            // Nothing authenticates a plaintext source: whatever its address says, it has no
            // identity here.
            source: Peer::unknown(),
            destination: Peer::of(&pod),
            service: None,
            reporters: &[Reporter::Destination],
        };
        match authorize_and_carry(&mesh, &state, client, &pod, meta).await {
            Ok((sent, received)) => debug!(%dst, sent, received, "closed"),
            Err(e) => debug!(%dst, error = %e, "failed"),
        }
    }
    .instrument(span)
    .await
}

/// The pod the client meant, when it is a PERMISSIVE enrolled pod of this node.
fn destination(state: &NodeState, conn: &TcpStream) -> Result<(SocketAddr, Workload), &'static str> {
    let local = conn.local_addr().map_err(|_| "no local address")?;
    let dst = if Mesh::local_pod(state, local.ip()).is_some() {
        local
    } else {
        original_dst(conn).map_err(|_| "no original destination")?
    };
    let pod = Mesh::local_workload(state, dst.ip()).ok_or("not an enrolled pod of this node")?;
    if pod.mtls_mode != MtlsMode::Permissive {
        // The kernel steers only PERMISSIVE pods; a STRICT one admits no plaintext, so the
        // proxy must not carry it in with its mark.
        return Err("the pod is STRICT");
    }
    Ok((dst, pod))
}

async fn authorize_and_carry(
    mesh: &Mesh,
    state: &NodeState,
    client: TcpStream,
    pod: &Workload,
    meta: ConnMeta,
) -> io::Result<(u64, u64)> {
    let dst = meta.dst_addr;
    if let Decision::Deny { policy } = mesh.authorize_plaintext(state, pod, dst.port()) {
        info!(src = %meta.src_addr, %dst, workload = %format!("{}/{}", pod.namespace, pod.name), %policy, "plaintext denied by policy");
        return Err(fail(
            mesh,
            &client,
            &meta,
            ResponseFlags::Denied,
            format!("denied by policy {policy}"),
        ));
    }
    let _ = client.set_nodelay(true);
    // From the client's own address: the pod sees who called, as it would without the mesh.
    carry::carry_to(mesh, client, meta, dst).await
}
