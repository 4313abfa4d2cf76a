//! The node's own addresses, as the proxy's network namespace holds them: a captured
//! connection must never be carried to one of them (it would be the proxy, or the node, which
//! a pod reaches without the mesh). Read with `getifaddrs` and refreshed on a timer, not per
//! connection.
use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// The latest set of local addresses; cheap to read from any thread.
pub struct LocalAddrs {
    set: ArcSwap<HashSet<IpAddr>>,
}

impl LocalAddrs {
    /// Reads the addresses once; an error leaves the set empty until a refresh succeeds (loopback
    /// and the unspecified address count as local regardless).
    pub fn new() -> (LocalAddrs, io::Result<()>) {
        let addrs = LocalAddrs {
            set: ArcSwap::from_pointee(HashSet::new()),
        };
        let read = addrs.refresh();
        (addrs, read)
    }

    /// Reads the addresses again (a blocking system call: call it off the proxy's threads).
    pub fn refresh(&self) -> io::Result<()> {
        self.set.store(Arc::new(interface_addresses()?));
        Ok(())
    }

    /// Whether `ip` is this node: loopback, unspecified, or an address of one of its interfaces
    /// (IPv4-mapped IPv6 compared as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || ip.is_unspecified() || self.set.load().contains(&ip)
    }
}

/// Every address on this network namespace's interfaces.
fn interface_addresses() -> io::Result<HashSet<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = HashSet::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family tells its real type.
        if let Some(ip) = unsafe { ip_of(ifa.ifa_addr) } {
            out.insert(ip);
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The IP address of a `sockaddr_in`/`sockaddr_in6`; `None` for other families or null.
///
/// # Safety
/// `sa` is null or points to a valid sockaddr of the size its family implies.
unsafe fn ip_of(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match i32::from(unsafe { (*sa).sa_family }) {
        libc::AF_INET => {
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
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
        assert!(addrs.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
