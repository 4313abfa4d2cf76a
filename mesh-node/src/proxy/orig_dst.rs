//! The original destination of a captured connection, as the kernel's getsockopt program
//! answers `SO_ORIGINAL_DST` for the proxy's accepted sockets.
use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

pub fn original_dst(conn: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(conn);
    let addr = match conn.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}
