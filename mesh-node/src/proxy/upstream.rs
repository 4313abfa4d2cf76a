//! The proxy's own connections: to local pods, to HBONE peers, and passed through. They carry
//! the proxy mark (`SO_MARK`), which is how a STRICT pod's veth program tells them from plain
//! connections that did not come through the proxy (`crate::ebpf::Marks`, DESIGN.md §4).
//! Setting `SO_MARK` needs CAP_NET_ADMIN. Like every socket a peer can hold, they carry
//! keepalive and `TCP_USER_TIMEOUT`.
//!
//! With `--preserve-source` a connection leaves from the client's own address, not the node's:
//! a transparent socket bound to it (`IP_TRANSPARENT`, CAP_NET_ADMIN). Its replies are
//! addressed to that client, so the tc programs mark the packets of the proxy's sockets (on the
//! uplink, and on the pod's veth) and a policy-routing rule delivers them here
//! (`crate::netlink::ensure_capture_routing`).
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd as _;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use super::listener::set_transparent;
use crate::limits::Keepalive;

/// Connects to `dst` from a socket marked `mark` (the proxy mark; `--proxy-mark`), from the
/// address `src` when given and of `dst`'s family (transparently: it need not be the node's),
/// else from whatever address the node's routing picks.
pub async fn connect_marked(
    dst: SocketAddr,
    src: Option<IpAddr>,
    mark: u32,
    keepalive: Keepalive,
) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    SockRef::from(&socket).set_mark(mark)?;
    keepalive.apply(SockRef::from(&socket))?;
    socket.set_nodelay(true)?;
    if let Some(src) = src.and_then(|src| source_for(dst, src)) {
        set_transparent(SockRef::from(&socket), dst.is_ipv6())?;
        // The port is picked at connect(), for the whole 4-tuple: bound to port 0 now, every
        // connection from one pod address would need a port of its own.
        bind_address_no_port(&socket)?;
        socket.bind(SocketAddr::new(src, 0))?;
    }
    socket.connect(dst).await
}

/// The client address to connect from for `dst`: `src` when it is of `dst`'s family (IPv4 in
/// its plain form), else none (the node's own address).
fn source_for(dst: SocketAddr, src: IpAddr) -> Option<IpAddr> {
    let src = src.to_canonical();
    (src.is_ipv6() == dst.is_ipv6()).then_some(src)
}

fn bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
