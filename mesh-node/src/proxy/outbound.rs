//! Outbound: a connection captured from an enrolled pod goes to its destination — over HBONE
//! with the pod's own identity when the destination is in the mesh, in-process (still by
//! policy) when it is on this node, and as plain TCP otherwise.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::{Identity, Workload};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info, info_span, Instrument};

use super::copy;
use super::hbone::{HboneError, PoolKey, HBONE_PORT};
use super::mesh::Mesh;
use super::orig_dst::original_dst;
use super::route::{self, Route};
use super::upstream::connect_marked;
use crate::config::Config;
use crate::connections::{ConnMeta, Counted, Direction, Orientation};
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
        mesh.metrics().outbound.with_label_values(&[label]).inc();
        let source = Mesh::local_workload(&state, peer.ip());
        let mut meta = ConnMeta {
            direction: Direction::Outbound,
            route: label,
            src_addr: peer,
            dst_addr: dst,
            source: source.as_ref().map_or_else(Peer::unknown, Peer::of),
            destination: Peer::unknown(),
            service: None,
            reporters: &[Reporter::Source],
        };
        let result = match route {
            Route::Passthrough { dst, service, .. } => {
                meta.service = service.map(|s| s.to_string());
                passthrough(&cfg, &mesh, client, meta, dst).await
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
                meta.service = service.map(|s| s.to_string());
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
                    Some(src) => via_hbone(&mesh, client, &src.identity, meta, identity).await,
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
    match connect(mesh, target).await {
        Ok(upstream) => carry(mesh, client, meta, upstream).await,
        Err(e) => Err(fail(
            mesh,
            &client,
            &meta,
            ResponseFlags::ConnectFailed,
            e.to_string(),
        )),
    }
}

async fn via_hbone(
    mesh: &Mesh,
    client: TcpStream,
    src: &Identity,
    meta: ConnMeta,
    dst_identity: Identity,
) -> io::Result<(u64, u64)> {
    let dst_identity = dst_identity.to_string();
    let key = PoolKey {
        src_identity: src.to_string(),
        dst_identity: dst_identity.clone(),
        dst: SocketAddr::new(meta.dst_addr.ip(), HBONE_PORT),
    };
    let stream = mesh
        .pool
        .connect(
            &key,
            || dial_config(mesh, src, &dst_identity),
            meta.dst_addr,
            meta.src_addr,
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

/// Copies between the client and its upstream, counted, until both sides are done.
async fn carry<U>(mesh: &Mesh, client: TcpStream, meta: ConnMeta, mut upstream: U) -> io::Result<(u64, u64)>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Counted::new(client, mesh.connections.open(meta), Orientation::FacesSource);
    copy::bidirectional(&mut client, &mut upstream, mesh.carried.idle_timeout).await
}

/// Records a connection that could not be carried and resets the client: it already holds an
/// established connection to us, and a reset is the closest we can come to the refusal it
/// would have seen without the mesh.
fn fail(
    mesh: &Mesh,
    client: &TcpStream,
    meta: &ConnMeta,
    flags: ResponseFlags,
    error: impl Into<String>,
) -> io::Error {
    let error = error.into();
    reset(client);
    mesh.connections.failed(meta, flags, &error);
    io::Error::other(error)
}

/// The TLS config for a new HBONE connection. The pool asks only when it must dial, so a warm
/// pool costs no certificate work per connection.
fn dial_config(mesh: &Mesh, src: &Identity, dst_identity: &str) -> Result<Arc<tls::ClientConfig>, TlsError> {
    let svid = mesh
        .svid(src)
        .ok_or_else(|| TlsError::InvalidMaterial(format!("no certificate for {src} yet")))?;
    mesh.tls.client(&svid, dst_identity)
}

async fn passthrough(
    cfg: &Config,
    mesh: &Mesh,
    client: TcpStream,
    meta: ConnMeta,
    dst: SocketAddr,
) -> io::Result<(u64, u64)> {
    let upstream = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(fail(
                mesh,
                &client,
                &meta,
                ResponseFlags::ConnectFailed,
                e.to_string(),
            ))
        }
        Err(_) => {
            let error = "connect timed out";
            return Err(fail(mesh, &client, &meta, ResponseFlags::ConnectFailed, error));
        }
    };
    let _ = upstream.set_nodelay(true);
    carry(mesh, client, meta, upstream).await
}

async fn connect(mesh: &Mesh, dst: SocketAddr) -> io::Result<TcpStream> {
    tokio::time::timeout(
        mesh.connect_timeout,
        connect_marked(dst, mesh.proxy_mark, mesh.carried.keepalive),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
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
