//! Outbound: a connection captured from an enrolled pod goes to its destination — over HBONE
//! with the pod's own identity when the destination is in the mesh, in-process (still by
//! policy) when it is on this node, and as plain TCP otherwise.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::Identity;
use socket2::SockRef;
use tokio::net::TcpStream;
use tracing::{debug, info, info_span, Instrument};

use super::hbone::{PoolKey, HBONE_PORT};
use super::mesh::Mesh;
use super::orig_dst::original_dst;
use super::route::{self, Route};
use super::upstream::connect_marked;
use crate::config::Config;
use crate::control::NodeState;
use crate::policy::Decision;
use crate::tls::{self, TlsError};

/// Copy buffers per direction: large enough that a bulk transfer is not syscall-bound.
const COPY_BUFFER: usize = 64 * 1024;

pub async fn handle(cfg: Arc<Config>, mesh: Arc<Mesh>, client: TcpStream, peer: SocketAddr) {
    let span = info_span!("outbound", src = %peer);
    async move {
        let dst = match original_dst(&client) {
            Ok(dst) => dst,
            Err(e) => {
                // Not a captured connection (someone dialled the port directly): refuse it.
                debug!(error = %e, "no original destination; closing");
                reset(&client);
                return;
            }
        };
        if is_own_listener(&cfg, dst) {
            debug!(%dst, "original destination is this proxy; refusing to loop");
            reset(&client);
            return;
        }
        debug!(%dst, "captured");
        let _ = client.set_nodelay(true);
        let state = mesh.config.state();
        let route = route::route(&state, dst, &mut |n| mesh.next(n));
        let label = match &route {
            Route::Passthrough { .. } => "passthrough",
            Route::NoEndpoint { .. } => "no_endpoint",
            Route::Hbone { local: true, .. } => "local",
            Route::Hbone { local: false, .. } => "hbone",
        };
        mesh.metrics.outbound.with_label_values(&[label]).inc();
        let result = match route {
            Route::Passthrough { dst, .. } => passthrough(&cfg, client, dst).await,
            Route::NoEndpoint { service } => {
                reset(&client);
                Err(io::Error::other(format!(
                    "service {service} has no ready endpoint"
                )))
            }
            Route::Hbone {
                dst: target,
                identity,
                local,
                workload_uid,
                ..
            } => {
                let to = Destination {
                    target,
                    identity,
                    local,
                    uid: workload_uid,
                };
                via_mesh(&mesh, &state, client, peer, to).await
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

/// A mesh destination: the pod's address and port, its identity, whether it is on this node.
struct Destination {
    target: SocketAddr,
    identity: Identity,
    local: bool,
    uid: String,
}

async fn via_mesh(
    mesh: &Mesh,
    state: &NodeState,
    mut client: TcpStream,
    peer: SocketAddr,
    to: Destination,
) -> io::Result<(u64, u64)> {
    let Some(src) = Mesh::local_workload(state, peer.ip()) else {
        reset(&client);
        return Err(io::Error::other("the source is not an enrolled pod of this node"));
    };
    if to.local {
        // Same node: nothing crosses a wire, so no TLS; policy still decides.
        let Some(dst) = state.workload(&to.uid) else {
            reset(&client);
            return Err(io::Error::other("destination workload vanished"));
        };
        if let Decision::Deny { policy } = mesh.authorize(state, dst, &src.identity, to.target.port()) {
            info!(src = %src.identity, dst = %to.target, %policy, "denied by policy");
            reset(&client);
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, policy));
        }
        let mut upstream = match connect(mesh, to.target).await {
            Ok(s) => s,
            Err(e) => {
                reset(&client);
                return Err(e);
            }
        };
        return copy(&mut client, &mut upstream).await;
    }
    let dst_identity = to.identity.to_string();
    let key = PoolKey {
        src_identity: src.identity.to_string(),
        dst_identity: dst_identity.clone(),
        dst: SocketAddr::new(to.target.ip(), HBONE_PORT),
    };
    match mesh
        .pool
        .connect(
            &key,
            || dial_config(mesh, &src.identity, &dst_identity),
            to.target,
            peer,
        )
        .await
    {
        Ok(mut stream) => copy(&mut client, &mut stream).await,
        Err(e) => {
            // Denied, refused or unreachable: the app sees its connection reset at once.
            reset(&client);
            Err(io::Error::other(format!(
                "HBONE to {} ({}): {e}",
                to.target,
                e.reason()
            )))
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

async fn passthrough(cfg: &Config, mut client: TcpStream, dst: SocketAddr) -> io::Result<(u64, u64)> {
    let connect = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(dst)).await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // The client already holds an established connection to us; a reset is the
            // closest we can come to the refusal it would have seen without the mesh.
            reset(&client);
            return Err(e);
        }
        Err(_) => {
            reset(&client);
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
    };
    let _ = upstream.set_nodelay(true);
    copy(&mut client, &mut upstream).await
}

async fn connect(mesh: &Mesh, dst: SocketAddr) -> io::Result<TcpStream> {
    tokio::time::timeout(mesh.connect_timeout, connect_marked(dst, mesh.proxy_mark))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn copy<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

fn is_own_listener(cfg: &Config, dst: SocketAddr) -> bool {
    dst.port() == cfg.datapath.outbound_port
        && (Some(dst.ip()) == cfg.datapath.proxy_ipv4.map(Into::into)
            || Some(dst.ip()) == cfg.datapath.proxy_ipv6.map(Into::into))
}

/// Linger 0 turns the coming close into an RST.
fn reset(conn: &TcpStream) {
    let _ = SockRef::from(conn).set_linger(Some(std::time::Duration::ZERO));
}
