//! The proxy's connections to local pods. They carry the proxy mark (`SO_MARK`), which is how a
//! STRICT pod's veth program tells them from plain connections that did not come through the
//! proxy (`crate::ebpf::Marks`, DESIGN.md §4). Setting `SO_MARK` needs CAP_NET_ADMIN. Like
//! every socket a peer can hold, they carry keepalive and `TCP_USER_TIMEOUT`.
use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use crate::limits::Keepalive;

/// Connects to `dst` from a socket marked `mark` (the proxy mark; `--proxy-mark`).
pub async fn connect_marked(dst: SocketAddr, mark: u32, keepalive: Keepalive) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    SockRef::from(&socket).set_mark(mark)?;
    keepalive.apply(SockRef::from(&socket))?;
    socket.set_nodelay(true)?;
    socket.connect(dst).await
}
