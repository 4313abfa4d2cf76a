//! `cgroup/getsockopt` at the proxy's cgroup: answer `SO_ORIGINAL_DST` (`SOL_IP`, 80) with a
//! `sockaddr_in` and `IP6T_SO_ORIGINAL_DST` (`SOL_IPV6`, 80) with a `sockaddr_in6` for a
//! captured connection, from our tuple map only. A socket the map does not know was not
//! redirected by us, and its `SO_ORIGINAL_DST` fails with `ENOENT`: with conntrack active in the
//! node's netns the kernel's own answer would be the connection's own destination (a direct
//! connection to the proxy's port), which the proxy would then dial, itself. Other options keep
//! the kernel's answer.
//!
//! The kernel picks cgroup sockopt programs by the cgroup of the *socket* (not of the caller),
//! and an accepted socket inherits its listener's: this runs for connections accepted on
//! listeners created by a process in the proxy's cgroup.
//!
//! The tuple entry is NOT deleted once answered: a proxy may ask more than once (both levels
//! on a dual-stack socket, retries), and user space reads the same map (the proxy's
//! map-lookup path, inspection). The LRU bounds the map, a new captured connection on the
//! same 4-tuple overwrites the entry, and `sockops` drops an entry whose 4-tuple is reused by
//! a connection made to the proxy directly.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sockopt},
    macros::cgroup_sockopt,
    programs::SockoptContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{v4_mapped, Counter, SockKey, AF_INET, AF_INET6, SO_ORIGINAL_DST};

use crate::{
    ctx::{rd, rd_words, wr},
    maps::{count, MESH_TUPLE_DST},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// `ENOENT`, as the kernel's own `SO_ORIGINAL_DST` fails for a connection it does not track.
const ENOENT: i32 = 2;

/// What became of one getsockopt call.
enum Outcome {
    /// Not `SO_ORIGINAL_DST`: the kernel's answer stands.
    Other,
    /// `SO_ORIGINAL_DST`, answered from the map.
    Answered,
    /// `SO_ORIGINAL_DST` for a socket we did not redirect (or that we cannot answer): it fails.
    Refused,
}

#[cgroup_sockopt(getsockopt)]
pub fn mesh_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    match unsafe { handle(so) } {
        Outcome::Other | Outcome::Answered => 1,
        Outcome::Refused => {
            // The error the caller sees; returning 0 makes the call fail even where a kernel
            // ignored the write (EPERM then).
            unsafe { wr(addr_of_mut!((*so).retval), -ENOENT) };
            0
        }
    }
}

#[inline(always)]
unsafe fn handle(so: *mut bpf_sockopt) -> Outcome {
    if unsafe { rd(addr_of_mut!((*so).optname)) } != SO_ORIGINAL_DST {
        return Outcome::Other;
    }
    let want_v6 = match unsafe { rd(addr_of_mut!((*so).level)) } {
        SOL_IP => false,
        SOL_IPV6 => true,
        _ => return Outcome::Other,
    };
    let sk: *mut bpf_sock = unsafe { rd(addr_of_mut!((*so).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return Outcome::Refused;
    }
    let key = unsafe { reverse_tuple(sk) };
    let orig = match MESH_TUPLE_DST.get_ptr(key) {
        Some(p) => unsafe { *p },
        None => {
            count(Counter::GetsockoptMiss);
            return Outcome::Refused;
        }
    };
    let optval = unsafe { rd(addr_of_mut!((*so).__bindgen_anon_2.optval)) } as *mut u8;
    let end = unsafe { rd(addr_of_mut!((*so).__bindgen_anon_3.optval_end)) } as *mut u8;
    let port_be = orig.port.to_be();
    if !want_v6 {
        if orig.family != AF_INET {
            count(Counter::GetsockoptFamilyMismatch);
            return Outcome::Refused;
        }
        if optval.wrapping_add(SOCKADDR_IN_LEN) > end {
            count(Counter::GetsockoptShortBuffer);
            return Outcome::Refused;
        }
        // struct sockaddr_in { u16 family; be16 port; be32 addr; u8 zero[8]; }
        unsafe {
            wr(optval as *mut u16, AF_INET);
            wr(optval.add(2) as *mut u16, port_be);
            wr(optval.add(4) as *mut u32, orig.addr[3]);
            wr(optval.add(8) as *mut u32, 0);
            wr(optval.add(12) as *mut u32, 0);
            wr(addr_of_mut!((*so).optlen), SOCKADDR_IN_LEN as i32);
            wr(addr_of_mut!((*so).retval), 0);
        }
    } else {
        if optval.wrapping_add(SOCKADDR_IN6_LEN) > end {
            count(Counter::GetsockoptShortBuffer);
            return Outcome::Refused;
        }
        // struct sockaddr_in6 { u16 family; be16 port; u32 flowinfo; u8 addr[16]; u32 scope_id; }
        // An IPv4 original is already v4-mapped in `orig.addr`.
        unsafe {
            wr(optval as *mut u16, AF_INET6);
            wr(optval.add(2) as *mut u16, port_be);
            wr(optval.add(4) as *mut u32, 0);
            wr(optval.add(8) as *mut u32, orig.addr[0]);
            wr(optval.add(12) as *mut u32, orig.addr[1]);
            wr(optval.add(16) as *mut u32, orig.addr[2]);
            wr(optval.add(20) as *mut u32, orig.addr[3]);
            wr(optval.add(24) as *mut u32, 0);
            wr(addr_of_mut!((*so).optlen), SOCKADDR_IN6_LEN as i32);
            wr(addr_of_mut!((*so).retval), 0);
        }
    }
    count(Counter::GetsockoptHit);
    Outcome::Answered
}

/// The accepted socket sees (local = proxy, remote = client); the map is keyed the client's
/// way round. In `bpf_sock`, `src_port` is host order and `dst_port` is big-endian.
/// All fields are read unconditionally (see `sockops::tuple` for why).
#[inline(always)]
unsafe fn reverse_tuple(sk: *mut bpf_sock) -> SockKey {
    let (family, local4, remote4, local6, remote6, local_port, remote_port) = unsafe {
        (
            rd(addr_of_mut!((*sk).family)),
            rd(addr_of_mut!((*sk).src_ip4)),
            rd(addr_of_mut!((*sk).dst_ip4)),
            rd_words(addr_of_mut!((*sk).src_ip6)),
            rd_words(addr_of_mut!((*sk).dst_ip6)),
            rd(addr_of_mut!((*sk).src_port)),
            rd(addr_of_mut!((*sk).dst_port)),
        )
    };
    let (local, remote) = if family == AF_INET as u32 {
        (v4_mapped(local4), v4_mapped(remote4))
    } else {
        (local6, remote6)
    };
    SockKey {
        src_addr: remote,
        dst_addr: local,
        src_port: u16::from_be(remote_port),
        dst_port: local_port as u16,
        pad: 0,
    }
}
