//! Types shared by the kernel programs (`mesh-ebpf`) and user space (`mesh-node`).
//!
//! Every map key and value is `#[repr(C)]` without implicit padding (padding is an explicit
//! field that must be zero), because the kernel compares hash keys byte for byte.
//!
//! Addresses are kept in one shape everywhere: 16 bytes in network order, IPv4 as v4-mapped
//! IPv6 (`::ffff:a.b.c.d`). They are stored as `[u32; 4]` whose in-memory bytes are the address
//! bytes (each word is "big endian" the way the kernel's `user_ip6[]`/`remote_ip6[]` are), so
//! kernel code copies context words straight in and user space converts with [`addr_from_ip`]
//! and [`ip_from_addr`] (feature `user`).
#![no_std]

/// Map names (≤ 15 characters; the kernel truncates object names to 15).
pub const MAP_CONFIG: &str = "mesh_config";
pub const MAP_ENROLLED: &str = "mesh_enrolled";
pub const MAP_COOKIE_DST: &str = "mesh_cookie_dst";
pub const MAP_TUPLE_DST: &str = "mesh_tuple_dst";
pub const MAP_EXCL_PORTS: &str = "mesh_excl_ports";
pub const MAP_EXCL_CIDRS: &str = "mesh_excl_cidrs";
pub const MAP_COUNTERS: &str = "mesh_counters";
/// Local enrolled pod addresses: their inbound HBONE (port 15008) is captured on the uplink,
/// and PERMISSIVE pods' inbound plaintext is steered to the proxy's plaintext listener.
pub const MAP_LOCAL_IPS: &str = "mesh_local_ips";
/// The single [`TcConfig`] of the tc programs: the capture and proxy marks.
pub const MAP_TC_CONFIG: &str = "mesh_tc_config";
/// Enrolled pods' host-side veth ifindex → [`PodGateway`]: the node's link-layer address to
/// which a pod's reply to one of the proxy's transparent sockets is re-addressed.
pub const MAP_POD_GW: &str = "mesh_pod_gw";
/// The destinations the mesh serves (Service VIPs, enrolled pods' addresses): an enrolled pod's
/// connect to any other address is left alone.
pub const MAP_DESTINATIONS: &str = "mesh_dests";

/// Every map of the object, in pin order.
pub const MAP_NAMES: [&str; 11] = [
    MAP_CONFIG,
    MAP_ENROLLED,
    MAP_COOKIE_DST,
    MAP_TUPLE_DST,
    MAP_EXCL_PORTS,
    MAP_EXCL_CIDRS,
    MAP_COUNTERS,
    MAP_LOCAL_IPS,
    MAP_TC_CONFIG,
    MAP_POD_GW,
    MAP_DESTINATIONS,
];

/// Program (ELF symbol) names. They differ from their section names on purpose: a function
/// named like its section makes bpf-linker fail with "changed binding to STB_GLOBAL".
pub const PROG_CONNECT4: &str = "mesh_connect4";
pub const PROG_CONNECT6: &str = "mesh_connect6";
pub const PROG_SOCK_OPS: &str = "mesh_sockops";
pub const PROG_GETSOCKOPT: &str = "mesh_getsockopt";
/// tc ingress (TCX) on the node's uplink: marks inbound HBONE to local pods for capture.
pub const PROG_TC_INBOUND: &str = "mesh_tc_inbound";
/// tc egress (TCX) on an enrolled pod's host-side veth: drops SYNs that did not come from the
/// proxy (into a PERMISSIVE pod, nor from a socket of the node).
pub const PROG_TC_STRICT: &str = "mesh_tc_strict";
/// tc ingress on enrolled pods' host-side veths: replies to the proxy's transparent sockets.
pub const PROG_TC_REPLY: &str = "mesh_tc_reply";

/// Map sizes; user space checks pinned maps against them.
pub const CONFIG_MAX_ENTRIES: u32 = 1;
pub const ENROLLED_MAX_ENTRIES: u32 = 16 * 1024;
pub const COOKIE_DST_MAX_ENTRIES: u32 = 64 * 1024;
pub const TUPLE_DST_MAX_ENTRIES: u32 = 64 * 1024;
pub const EXCL_PORTS_MAX_ENTRIES: u32 = 1024;
pub const EXCL_CIDRS_MAX_ENTRIES: u32 = 1024;
pub const LOCAL_IPS_MAX_ENTRIES: u32 = 16 * 1024;
pub const TC_CONFIG_MAX_ENTRIES: u32 = 1;
pub const POD_GW_MAX_ENTRIES: u32 = 16 * 1024;
/// Service VIPs of both families plus every enrolled pod's addresses in the cluster. When the
/// cluster has more, the agent reports the ones left out, and connects to them go uncaptured.
pub const DESTINATIONS_MAX_ENTRIES: u32 = 64 * 1024;

/// Default port of the proxy's outbound capture listener.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// HBONE (mTLS tunnel) port: never captured on the way out.
pub const HBONE_PORT: u16 = 15008;
/// Default port of the proxy's inbound plaintext listener (PERMISSIVE pods).
pub const DEFAULT_INBOUND_PLAIN_PORT: u16 = 15006;
/// `SO_ORIGINAL_DST` (level `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (level `SOL_IPV6`).
pub const SO_ORIGINAL_DST: i32 = 80;
/// How many ancestor levels of the caller's cgroup the connect programs check for enrollment.
pub const MAX_CGROUP_DEPTH: i32 = 16;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `ProxyConfig::flags`: `ipv4` is set.
pub const CONFIG_HAS_V4: u16 = 1 << 0;
/// `ProxyConfig::flags`: `ipv6` is set.
pub const CONFIG_HAS_V6: u16 = 1 << 1;
/// `ProxyConfig::flags`: `mesh_dests` has not been filled yet (a new set that had nothing to
/// carry over, e.g. the first start after an upgrade from a version without it): capture every
/// destination, as if all were listed, until the agent first writes the map.
pub const CONFIG_CAPTURE_ALL: u16 = 1 << 2;

/// The single entry of `mesh_config`: where captured connections are sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Proxy IPv4 address, network byte order (in-memory bytes = the address octets).
    pub ipv4: u32,
    /// Proxy IPv6 address, network-order words (in-memory bytes = the address octets).
    pub ipv6: [u32; 4],
    /// Outbound capture port, host byte order.
    pub port: u16,
    /// `CONFIG_HAS_V4` | `CONFIG_HAS_V6` | `CONFIG_CAPTURE_ALL`.
    pub flags: u16,
    /// Inbound plaintext listener port (PERMISSIVE pods), host byte order.
    pub inbound_plain_port: u16,
    /// Zero.
    pub reserved: [u16; 3],
    /// cgroup v2 id of the proxy: its own connects to PERMISSIVE pods are never steered back
    /// to itself.
    pub proxy_cgroup: u64,
}

/// `TcConfig::flags`: the entry has been written (an all-zero entry means "not configured":
/// the tc programs then change nothing and let every packet through).
pub const TC_CONFIG_SET: u32 = 1 << 0;
/// `TcConfig::flags`: the proxy connects from pods' and clients' own addresses (transparent
/// sockets, `--preserve-source`); packets that belong to one of its sockets get `reply_mark`.
pub const TC_PRESERVE_SOURCE: u32 = 1 << 1;

/// The single entry of `mesh_tc_config`. Marks are compared under masks, so the mesh shares
/// `skb->mark` with other components that use other bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcConfig {
    /// OR-ed into `skb->mark` of every inbound HBONE packet to a local pod (uplink ingress).
    /// The policy-routing rule matches `fwmark capture_mark/capture_mark`.
    pub capture_mark: u32,
    /// What the proxy's upstream sockets carry (`SO_MARK`): a SYN into an enrolled pod passes
    /// only if `mark & proxy_mask == proxy_mark`.
    pub proxy_mark: u32,
    pub proxy_mask: u32,
    /// `TC_CONFIG_SET` | `TC_PRESERVE_SOURCE`.
    pub flags: u32,
    /// OR-ed into `skb->mark` of a packet a pod sends to one of the proxy's transparent sockets
    /// (pod veth ingress); an unscoped rule `fwmark reply_mark/reply_mark` delivers it locally.
    pub reply_mark: u32,
    /// Zero.
    pub reserved: u32,
}

/// Value of `mesh_pod_gw`: the interface at which the node's IP stack receives what the pod
/// sends (its bridge; a routed veth itself) and that interface's MAC address: a frame that
/// belongs to one of the proxy's transparent sockets is re-addressed to it, so that the stack,
/// not the bridge, takes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodGateway {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// Zero.
    pub reserved: [u8; 2],
}

/// Value of `mesh_local_ips` (key: the pod address in v6 form, `[u32; 4]`): capture inbound
/// HBONE to this address.
pub const LOCAL_IP_CAPTURE_INBOUND: u32 = 1 << 0;
/// Value of `mesh_local_ips`: the pod is PERMISSIVE; steer plaintext TCP to it from outside the
/// mesh (non-enrolled local pods through connect4/6, other hosts on the uplink) to the proxy's
/// inbound plaintext listener, where policy applies. At the pod's veth, a SYN sent by a socket
/// of the node passes as well as the proxy's; without this flag only the proxy's do.
pub const LOCAL_IP_PERMISSIVE: u32 = 1 << 1;
/// Value of `mesh_local_ips`, with `LOCAL_IP_PERMISSIVE`: an AuthorizationPolicy selects the
/// pod. Only then is plaintext that the steering did not see (a SYN bridged from a pod, a
/// Service VIP the node DNATs) dropped at its veth: without a policy there is nothing to go
/// around, and dropping would only break clients outside the mesh.
pub const LOCAL_IP_POLICED: u32 = 1 << 2;

/// Value of `mesh_dests` (key: the address in v6 form, `[u32; 4]`): a Service VIP. The kernel
/// only asks whether a key is present; the flags say why, for inspection.
pub const DEST_SERVICE_VIP: u32 = 1 << 0;
/// Value of `mesh_dests`: an enrolled pod's address, on this node or another.
pub const DEST_WORKLOAD: u32 = 1 << 1;

/// `Enrollment::flags`: capture this cgroup's (and its descendants') outbound TCP.
pub const ENROLL_CAPTURE_OUTBOUND: u32 = 1 << 0;

/// Value of `mesh_enrolled` (key: cgroup v2 id, `u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrollment {
    pub flags: u32,
    /// Zero; room for later use without changing the value size.
    pub reserved: u32,
}

/// `OrigDst::flags`: the application connected through an IPv6 socket (connect6), so an
/// IPv4 destination was given as v4-mapped.
pub const ORIG_VIA_CONNECT6: u32 = 1 << 0;

/// The destination an application asked for before it was rewritten to the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Address in v6 form (IPv4 as v4-mapped), network-order words.
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// `AF_INET` when the destination is IPv4 (also when it was given v4-mapped), else `AF_INET6`.
    pub family: u16,
    /// `ORIG_VIA_CONNECT6`.
    pub flags: u32,
}

/// Key of `mesh_tuple_dst`: the client socket's view of a captured connection,
/// {client ip, proxy ip, client port, proxy port}.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Client address, v6 form, network-order words.
    pub src_addr: [u32; 4],
    /// Proxy address, v6 form, network-order words.
    pub dst_addr: [u32; 4],
    /// Client port, host byte order.
    pub src_port: u16,
    /// Proxy port, host byte order.
    pub dst_port: u16,
    /// Always zero (hash keys are compared byte for byte).
    pub pad: u32,
}

/// Prefix length of a full v6-form address in `mesh_excl_cidrs`; an IPv4 prefix `/n` is
/// stored as its v4-mapped form with prefix `96 + n`.
pub const CIDR_FULL_PREFIX: u32 = 128;
/// Added to an IPv4 prefix length when stored v4-mapped.
pub const CIDR_V4_MAPPED_OFFSET: u32 = 96;

/// The word `0x0000ffff` of a v4-mapped address, as stored (network order).
#[inline(always)]
pub const fn v4_mapped_marker() -> u32 {
    0x0000_ffffu32.to_be()
}

/// The v6 form of an IPv4 address given in network order (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, v4_mapped_marker(), ip4_be]
}

/// Whether a v6-form address is v4-mapped.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == v4_mapped_marker()
}

/// Counters of `mesh_counters` (a per-CPU array indexed by `Counter as u32`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    RedirectedV4 = 0,
    RedirectedV6,
    RedirectedV4Mapped,
    SkipNotEnrolled,
    SkipNotTcp,
    SkipExcludedPort,
    SkipExcludedCidr,
    SkipLoopback,
    SkipHbonePort,
    SkipSelf,
    SkipNoConfig,
    SkipNoProxyAddr,
    CookieSaveFailed,
    SockopsHit,
    SockopsMiss,
    TupleSaveFailed,
    GetsockoptHit,
    GetsockoptMiss,
    GetsockoptFamilyMismatch,
    GetsockoptShortBuffer,
    /// Packets to a local pod's HBONE port marked for capture on the uplink.
    InboundMarked,
    /// Packets the tc programs could not decide on because `mesh_tc_config` is unset (inbound
    /// lets them through unmarked; STRICT drops them).
    TcNoConfig,
    /// Frames into an enrolled pod dropped at its veth: SYNs (and TCP fragments) into a STRICT
    /// pod not from the proxy, and frames the program cannot parse (VLAN tags, other
    /// ethertypes), whatever the pod's mode.
    StrictDropped,
    /// SYNs into an enrolled pod let through at its veth: they carry the proxy's mark.
    StrictAllowedProxy,
    /// Connects from outside the mesh to a local PERMISSIVE pod rewritten to the proxy's
    /// inbound plaintext listener (connect4/6).
    PlainRedirected,
    /// SYNs from the uplink to a local PERMISSIVE pod assigned to the plaintext listener.
    PlainSteered,
    /// ... of which the plaintext listener could not be found or assigned (the SYN goes on
    /// marked, to be dropped: nothing reaches the pod around the proxy).
    PlainNoListener,
    /// SYNs into a local PERMISSIVE pod that a policy selects, dropped at its veth: neither from
    /// the proxy nor from a socket of the node (a pod's own SYN, a connection DNAT'd by the node).
    PermissiveDropped,
    /// SYNs into a local PERMISSIVE pod let through at its veth: sent by a socket of the node
    /// (the kubelet's probes, host-network processes).
    PermissiveAllowedNode,
    /// SYNs into a local PERMISSIVE pod that no policy selects, let through at its veth although
    /// neither the proxy nor the node sent them (nothing to enforce; steering still counts the
    /// connections it sees).
    PermissiveAllowedUnpoliced,
    /// Packets from the uplink to a local pod's address that belong to one of the proxy's
    /// transparent sockets (replies to HBONE and passthrough connections made from the pod's
    /// address), marked for local delivery.
    ReplyUplinkMarked,
    /// Packets a pod sends that belong to one of the proxy's transparent sockets (its replies
    /// to connections the proxy made from the client's address), marked for local delivery at
    /// the pod's veth.
    ReplyPodMarked,
    /// Packets on their way into an enrolled pod that belong to one of the proxy's transparent
    /// sockets (a reply from a pod outside the mesh on the same bridge, to a connection the
    /// proxy made from the enrolled pod's address), turned back into the node's IP stack.
    ReplyRedirected,
    /// Connects of enrolled pods left alone because the destination is not one the mesh serves
    /// (not in `mesh_dests`): they leave from the pod's own address.
    SkipNotMeshDestination,
}

/// Number of counters (entries of `mesh_counters`).
pub const COUNTER_COUNT: u32 = 34;

/// Name of each counter, indexed by `Counter as usize`.
pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] = [
    "redirected_v4",
    "redirected_v6",
    "redirected_v4_mapped",
    "skip_not_enrolled",
    "skip_not_tcp",
    "skip_excluded_port",
    "skip_excluded_cidr",
    "skip_loopback",
    "skip_hbone_port",
    "skip_self",
    "skip_no_config",
    "skip_no_proxy_addr",
    "cookie_save_failed",
    "sockops_hit",
    "sockops_miss",
    "tuple_save_failed",
    "getsockopt_hit",
    "getsockopt_miss",
    "getsockopt_family_mismatch",
    "getsockopt_short_buffer",
    "inbound_marked",
    "tc_no_config",
    "strict_dropped",
    "strict_allowed_proxy",
    "plain_redirected",
    "plain_steered",
    "plain_no_listener",
    "permissive_dropped",
    "permissive_allowed_node",
    "permissive_allowed_unpoliced",
    "reply_uplink_marked",
    "reply_pod_marked",
    "reply_redirected",
    "skip_not_mesh_destination",
];

// The counter list and its names must stay in step.
const _: () = assert!(Counter::SkipNotMeshDestination as u32 + 1 == COUNTER_COUNT);
const _: () = assert!(core::mem::size_of::<TcConfig>() == 24);
const _: () = assert!(core::mem::size_of::<PodGateway>() == 12);
const _: () = assert!(core::mem::size_of::<ProxyConfig>() == 40);
const _: () = assert!(core::mem::size_of::<Enrollment>() == 8);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);
const _: () = assert!(core::mem::size_of::<SockKey>() == 40);

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

    use super::*;

    // SAFETY: plain `#[repr(C)]` integers without implicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for ProxyConfig {}
    unsafe impl aya::Pod for Enrollment {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for TcConfig {}
    unsafe impl aya::Pod for PodGateway {}

    /// The v6 form (IPv4 as v4-mapped) of an address, as stored in the maps.
    pub fn addr_from_ip(ip: IpAddr) -> [u32; 4] {
        let octets = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        addr_from_octets(octets)
    }

    /// Map words from 16 address octets.
    pub fn addr_from_octets(o: [u8; 16]) -> [u32; 4] {
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        [w(0), w(4), w(8), w(12)]
    }

    /// The 16 address octets of map words.
    pub fn octets_from_addr(addr: &[u32; 4]) -> [u8; 16] {
        let mut o = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        o
    }

    /// The address of map words: IPv4 when v4-mapped, else IPv6.
    pub fn ip_from_addr(addr: &[u32; 4]) -> IpAddr {
        let v6 = Ipv6Addr::from(octets_from_addr(addr));
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    impl ProxyConfig {
        pub fn new(
            ipv4: Option<Ipv4Addr>,
            ipv6: Option<Ipv6Addr>,
            port: u16,
            inbound_plain_port: u16,
            proxy_cgroup: u64,
        ) -> Self {
            let mut flags = 0;
            if ipv4.is_some() {
                flags |= CONFIG_HAS_V4;
            }
            if ipv6.is_some() {
                flags |= CONFIG_HAS_V6;
            }
            ProxyConfig {
                ipv4: ipv4.map_or(0, |a| u32::from_ne_bytes(a.octets())),
                ipv6: ipv6.map_or([0; 4], |a| addr_from_octets(a.octets())),
                port,
                flags,
                inbound_plain_port,
                reserved: [0; 3],
                proxy_cgroup,
            }
        }

        pub fn ipv4_addr(&self) -> Option<Ipv4Addr> {
            (self.flags & CONFIG_HAS_V4 != 0).then(|| Ipv4Addr::from(self.ipv4.to_ne_bytes()))
        }

        pub fn ipv6_addr(&self) -> Option<Ipv6Addr> {
            (self.flags & CONFIG_HAS_V6 != 0).then(|| Ipv6Addr::from(octets_from_addr(&self.ipv6)))
        }
    }

    impl OrigDst {
        /// The original destination as the application meant it (an IPv4 destination given
        /// v4-mapped on an IPv6 socket is returned as IPv4).
        pub fn socket_addr(&self) -> SocketAddr {
            match ip_from_addr(&self.addr) {
                IpAddr::V4(v4) => SocketAddr::V4(SocketAddrV4::new(v4, self.port)),
                IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, self.port, 0, 0)),
            }
        }
    }

    impl SockKey {
        /// The key of a connection from the client's side: client (`src`) → proxy (`dst`).
        /// On the proxy's accepted socket that is (peer address, local address).
        pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
            SockKey {
                src_addr: addr_from_ip(src.ip()),
                dst_addr: addr_from_ip(dst.ip()),
                src_port: src.port(),
                dst_port: dst.port(),
                pad: 0,
            }
        }
    }
}

#[cfg(feature = "user")]
pub use user::{addr_from_ip, addr_from_octets, ip_from_addr, octets_from_addr};
