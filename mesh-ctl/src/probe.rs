//! The kernel probes of `meshctl check` for `--preserve-source`, run in this process's network
//! namespace: the same tests mesh-node's own pre-flight makes before it starts.
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::{rule::RuleMessage, AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket as Netlink, SocketAddr as NetlinkAddr};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// A probe's answer: `Ok`, or what failed.
pub type Probe = Result<(), String>;

/// How long the kernel may take to answer the rule dump (it answers in microseconds).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a TCP socket with `IP_TRANSPARENT` (`IPV6_TRANSPARENT`) binds to an address no node
/// holds (RFC 5737 / RFC 3849): what the proxy's sockets on pod addresses need (CAP_NET_ADMIN or
/// CAP_NET_RAW).
pub fn transparent(v6: bool) -> Probe {
    let run = || -> io::Result<()> {
        let addr: SocketAddr = if v6 {
            (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 0).into()
        } else {
            (Ipv4Addr::new(192, 0, 2, 1), 0).into()
        };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if v6 {
            socket.set_ip_transparent_v6(true)?;
        } else {
            socket.set_ip_transparent_v4(true)?;
        }
        socket.bind(&addr.into())
    };
    run().map_err(|e| e.to_string())
}

/// Whether the family's routing rules can be listed: a kernel without policy routing
/// (`CONFIG_IP_MULTIPLE_TABLES`, `CONFIG_IPV6_MULTIPLE_TABLES`) refuses the dump.
pub fn policy_routing(v6: bool) -> Probe {
    rule_dump(if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    })
    .map_err(|e| e.to_string())
}

fn rule_dump(family: AddressFamily) -> io::Result<()> {
    let mut socket = Netlink::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    SockRef::from(&socket).set_read_timeout(Some(TIMEOUT))?;
    let mut query = RuleMessage::default();
    query.header.family = family;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::GetRule(query)));
    packet.finalize();
    let mut out = vec![0; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send(&out, 0)?;
    let mut buf = vec![0; 64 * 1024];
    // The first answer tells: a rule (or the end of an empty dump), or the kernel's error.
    let size = socket.recv(&mut &mut buf[..], 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..size])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            Some(code) => Err(io::Error::from_raw_os_error(code.get().abs())),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}
