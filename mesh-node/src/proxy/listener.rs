//! Binding the proxy's listeners. SO_REUSEPORT lets a new agent bind before the old one has
//! gone, so the listener never disappears during a rolling update.
use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpListener;

const BACKLOG: i32 = 1024;

pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    listen(addr, false)
}

/// The inbound HBONE listener (`0.0.0.0:15008` / `[::]:15008`): like [`bind`], plus
/// `IP_TRANSPARENT` (IPv4) or `IPV6_TRANSPARENT` (IPv6), so connections the uplink's tc program
/// and the capture routing deliver locally, addressed to a pod's IP, are accepted here; the
/// accepted socket's local address is then the pod's `IP:15008`, which tells the proxy which
/// pod (and certificate) was dialled. Needs CAP_NET_ADMIN.
pub fn bind_transparent(addr: SocketAddr) -> io::Result<TcpListener> {
    listen(addr, true)
}

fn listen(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if transparent {
        set_transparent(SockRef::from(&socket), addr.is_ipv6())?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// `IP_TRANSPARENT` or `IPV6_TRANSPARENT`: the socket may use an address that is not the
/// node's (listen for one, or connect from one). Needs CAP_NET_ADMIN.
pub(super) fn set_transparent(socket: SockRef<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}
