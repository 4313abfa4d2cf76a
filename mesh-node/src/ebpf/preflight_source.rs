//! Pre-flight for `--preserve-source`: the kernel features that keeping the pod's address on
//! the proxy's connections needs, each probed for real in the agent's network namespace, per IP
//! family the node has. A missing one stops the agent with one line naming the feature, how to
//! provide it, and how to turn the feature off.
//!
//! - Transparent sockets: a TCP socket with `IP_TRANSPARENT` / `IPV6_TRANSPARENT` binds to an
//!   address that is not local (needs CAP_NET_ADMIN or CAP_NET_RAW), as the proxy's sockets
//!   bound to pod addresses do.
//! - Policy routing: the family's FIB rules can be listed (`CONFIG_IP_MULTIPLE_TABLES`,
//!   `CONFIG_IPV6_MULTIPLE_TABLES`), for the rules that bring replies back to the proxy.
//! - The tc programs' socket lookup and assignment (`bpf_skc_lookup_tcp`, `bpf_sk_assign`) are
//!   in every kernel from 5.7 on, so the 6.6 minimum [`super::preflight`] enforces covers them;
//!   they are not probed apart, which would take loading a program.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netlink;

/// A feature `--preserve-source` needs that this node lacks.
#[derive(Debug, thiserror::Error)]
#[error(
    "--preserve-source needs {feature}, which this node lacks ({cause}); {fix}, or start mesh-node with \
     --preserve-source=false (MESH_PRESERVE_SOURCE=false) to have the proxy connect from the node's address"
)]
pub struct MissingFeature {
    pub feature: String,
    pub cause: String,
    pub fix: &'static str,
}

/// Addresses that are never a node's own (RFC 5737, RFC 3849): binding one succeeds only on
/// a transparent socket.
const NOT_LOCAL_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NOT_LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Probes every feature for each family of `node_ips`.
pub fn preflight_source(node_ips: &[IpAddr]) -> Result<(), MissingFeature> {
    for ip in node_ips {
        let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        probe_transparent(ip.is_ipv6()).map_err(|e| MissingFeature {
            feature: format!(
                "transparent sockets ({family}: bind to a non-local address with {})",
                transparent_option(ip)
            ),
            cause: e.to_string(),
            fix: "grant CAP_NET_ADMIN (the mesh-node DaemonSet does) or CAP_NET_RAW",
        })?;
        netlink::probe_policy_routing(*ip).map_err(|e| MissingFeature {
            feature: format!("policy routing ({family} FIB rules)"),
            cause: e.to_string(),
            fix: "run a kernel built with CONFIG_IP_MULTIPLE_TABLES=y and CONFIG_IPV6_MULTIPLE_TABLES=y",
        })?;
    }
    Ok(())
}

fn transparent_option(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IP_TRANSPARENT"
    } else {
        "IPV6_TRANSPARENT"
    }
}

/// Binds a transparent TCP socket to an address no node holds, and closes it.
fn probe_transparent(v6: bool) -> io::Result<()> {
    let addr: SocketAddr = if v6 {
        (NOT_LOCAL_V6, 0).into()
    } else {
        (NOT_LOCAL_V4, 0).into()
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if v6 {
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.bind(&addr.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit tests run as root with every capability (as the rest of the suite does): the
    /// probes pass here, and a plain socket is refused the non-local address, which shows the
    /// probe tests what it says.
    #[test]
    fn the_probes_pass_with_the_feature_and_the_bind_needs_transparency() {
        preflight_source(&["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()]).unwrap();
        let plain = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        let err = plain
            .bind(&SocketAddr::from((NOT_LOCAL_V4, 0)).into())
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{err}");
    }

    #[test]
    fn the_message_names_the_feature_the_fix_and_the_switch() {
        let e = MissingFeature {
            feature: "transparent sockets (IPv4: bind to a non-local address with IP_TRANSPARENT)".into(),
            cause: "Operation not permitted (os error 1)".into(),
            fix: "grant CAP_NET_ADMIN (the mesh-node DaemonSet does) or CAP_NET_RAW",
        };
        assert_eq!(
            e.to_string(),
            "--preserve-source needs transparent sockets (IPv4: bind to a non-local address with \
             IP_TRANSPARENT), which this node lacks (Operation not permitted (os error 1)); grant \
             CAP_NET_ADMIN (the mesh-node DaemonSet does) or CAP_NET_RAW, or start mesh-node with \
             --preserve-source=false (MESH_PRESERVE_SOURCE=false) to have the proxy connect from \
             the node's address"
        );
    }
}
