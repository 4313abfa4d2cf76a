//! The two ends of a connection the proxy accepted from a client: carry it to its upstream,
//! counted, or refuse it, recorded. Shared by every direction that faces the client.
use std::io;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::copy;
use super::mesh::Mesh;
use crate::connections::{ConnMeta, Counted, Orientation};
use crate::metrics::labels::ResponseFlags;

/// Copies between the client and its upstream, counted, until both sides are done or the
/// connection has been silent for the idle timeout.
pub async fn carry<U>(
    mesh: &Mesh,
    client: TcpStream,
    meta: ConnMeta,
    mut upstream: U,
) -> io::Result<(u64, u64)>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Counted::new(client, mesh.connections.open(meta), Orientation::FacesSource);
    copy::bidirectional(&mut client, &mut upstream, mesh.carried.idle_timeout).await
}

/// Connects to `dst` as the client (from its own address with `--preserve-source`) and carries
/// the connection there as plain TCP; a failed connect resets the client.
pub async fn carry_to(
    mesh: &Mesh,
    client: TcpStream,
    meta: ConnMeta,
    dst: std::net::SocketAddr,
) -> io::Result<(u64, u64)> {
    match mesh.connect(dst, meta.src_addr.ip()).await {
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

/// Records a connection that could not be carried and resets the client: it already holds an
/// established connection to us, and a reset is the closest we can come to the refusal it
/// would have seen without the mesh.
pub fn fail(
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

/// Linger 0 turns the coming close into an RST.
pub fn reset(conn: &TcpStream) {
    let _ = SockRef::from(conn).set_linger(Some(std::time::Duration::ZERO));
}
