//! The node's own addresses, as the proxy's network namespace holds them: a captured
//! connection must never be carried to one of them (it would be the proxy, or the node, which
//! a pod reaches without the mesh). Read over netlink and refreshed on a timer, not per
//! connection.
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::netlink::{self, NetlinkError};

/// The latest set of local addresses; cheap to read from any thread.
pub struct LocalAddrs {
    set: ArcSwap<HashSet<IpAddr>>,
}

impl LocalAddrs {
    /// Reads the addresses once; an error leaves the set empty until a refresh succeeds (loopback
    /// and the unspecified address count as local regardless).
    pub fn new() -> (LocalAddrs, Result<(), NetlinkError>) {
        let addrs = LocalAddrs {
            set: ArcSwap::from_pointee(HashSet::new()),
        };
        let read = addrs.refresh();
        (addrs, read)
    }

    /// Reads the addresses again (blocking netlink calls: call it off the proxy's threads).
    pub fn refresh(&self) -> Result<(), NetlinkError> {
        self.set.store(Arc::new(netlink::local_addresses()?));
        Ok(())
    }

    /// Whether `ip` is this node: loopback, unspecified, or an address of one of its interfaces
    /// (IPv4-mapped IPv6 compared as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || ip.is_unspecified() || self.set.load().contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_the_unspecified_address_are_always_local() {
        let addrs = LocalAddrs {
            set: ArcSwap::from_pointee(HashSet::new()),
        };
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert!(addrs.contains(ip.parse().unwrap()), "{ip}");
        }
        assert!(!addrs.contains("10.1.1.1".parse().unwrap()));
    }

    #[test]
    fn interface_addresses_are_read() {
        let (addrs, read) = LocalAddrs::new();
        read.unwrap();
        // Read from the interfaces, not only taken as loopback.
        assert!(addrs.set.load().contains(&IpAddr::from([127, 0, 0, 1])));
    }
}
