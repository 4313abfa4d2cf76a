//! `cgroup/connect4` and `cgroup/connect6`: rewrite an enrolled cgroup's TCP connect to the
//! node proxy's outbound listener and remember the original destination by socket cookie.
//! They always return 1 (allow): capture failing open is better than breaking the app.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{
    is_v4_mapped, v4_mapped, Counter, OrigDst, ProxyConfig, AF_INET, AF_INET6, CONFIG_HAS_V4, CONFIG_HAS_V6,
    HBONE_PORT, MAX_CGROUP_DEPTH, ORIG_VIA_CONNECT6,
};

use crate::{
    ctx::{rd, rd_words, wr, wr_words},
    maps::{cidr_excluded, config, count, port_excluded, MESH_COOKIE_DST, MESH_ENROLLED},
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    unsafe { connect4(ctx.sock_addr) };
    1
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    unsafe { connect6(ctx.sock_addr) };
    1
}

/// Why a connect is left alone, checked cheapest first; `None` means "capture it".
#[inline(always)]
unsafe fn common_checks(sa: *mut bpf_sock_addr, dst: &[u32; 4], port: u16, is_self: bool) -> Option<Counter> {
    let sa_type = unsafe { rd(addr_of_mut!((*sa).type_)) };
    let protocol = unsafe { rd(addr_of_mut!((*sa).protocol)) };
    if sa_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return Some(Counter::SkipNotTcp);
    }
    if is_loopback(dst) {
        return Some(Counter::SkipLoopback);
    }
    if port == HBONE_PORT {
        return Some(Counter::SkipHbonePort);
    }
    if is_self {
        return Some(Counter::SkipSelf);
    }
    if !enrolled() {
        return Some(Counter::SkipNotEnrolled);
    }
    if port_excluded(port) {
        return Some(Counter::SkipExcludedPort);
    }
    if cidr_excluded(*dst) {
        return Some(Counter::SkipExcludedCidr);
    }
    None
}

#[inline(always)]
unsafe fn connect4(sa: *mut bpf_sock_addr) {
    let Some(cfg) = config() else {
        count(Counter::SkipNoConfig);
        return;
    };
    let ip4 = unsafe { rd(addr_of_mut!((*sa).user_ip4)) };
    let port = user_port(unsafe { rd(addr_of_mut!((*sa).user_port)) });
    let dst = v4_mapped(ip4);
    let is_self = cfg.flags & CONFIG_HAS_V4 != 0 && ip4 == cfg.ipv4 && port == cfg.port;
    if let Some(skip) = unsafe { common_checks(sa, &dst, port, is_self) } {
        count(skip);
        return;
    }
    if cfg.flags & CONFIG_HAS_V4 == 0 {
        count(Counter::SkipNoProxyAddr);
        return;
    }
    let orig = OrigDst {
        addr: dst,
        port,
        family: AF_INET,
        flags: 0,
    };
    if !unsafe { save(sa, &orig) } {
        return;
    }
    unsafe {
        wr(addr_of_mut!((*sa).user_ip4), cfg.ipv4);
        wr(addr_of_mut!((*sa).user_port), set_user_port(&cfg));
    }
    count(Counter::RedirectedV4);
}

#[inline(always)]
unsafe fn connect6(sa: *mut bpf_sock_addr) {
    let Some(cfg) = config() else {
        count(Counter::SkipNoConfig);
        return;
    };
    let dst = unsafe { rd_words(addr_of_mut!((*sa).user_ip6)) };
    let port = user_port(unsafe { rd(addr_of_mut!((*sa).user_port)) });
    let mapped = is_v4_mapped(&dst);
    let is_self = port == cfg.port
        && if mapped {
            cfg.flags & CONFIG_HAS_V4 != 0 && dst[3] == cfg.ipv4
        } else {
            cfg.flags & CONFIG_HAS_V6 != 0 && dst == cfg.ipv6
        };
    if let Some(skip) = unsafe { common_checks(sa, &dst, port, is_self) } {
        count(skip);
        return;
    }
    let (target, family, counter) = if mapped {
        if cfg.flags & CONFIG_HAS_V4 == 0 {
            count(Counter::SkipNoProxyAddr);
            return;
        }
        (v4_mapped(cfg.ipv4), AF_INET, Counter::RedirectedV4Mapped)
    } else {
        if cfg.flags & CONFIG_HAS_V6 == 0 {
            count(Counter::SkipNoProxyAddr);
            return;
        }
        (cfg.ipv6, AF_INET6, Counter::RedirectedV6)
    };
    let orig = OrigDst {
        addr: dst,
        port,
        family,
        flags: ORIG_VIA_CONNECT6,
    };
    if !unsafe { save(sa, &orig) } {
        return;
    }
    unsafe {
        wr_words(addr_of_mut!((*sa).user_ip6), target);
        wr(addr_of_mut!((*sa).user_port), set_user_port(&cfg));
    }
    count(counter);
}

/// Cookie → original destination. Without it the proxy could not route the connection, so
/// a failed save leaves the connect alone.
#[inline(always)]
unsafe fn save(sa: *mut bpf_sock_addr, orig: &OrigDst) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    if MESH_COOKIE_DST.insert(cookie, orig, 0).is_err() {
        count(Counter::CookieSaveFailed);
        return false;
    }
    true
}

/// Is the caller's cgroup, or one of its ancestors, enrolled? Pods enroll their pod-level
/// cgroup; their containers live in child cgroups.
#[inline(always)]
fn enrolled() -> bool {
    let id = unsafe { bpf_get_current_cgroup_id() };
    if MESH_ENROLLED.get_ptr(id).is_some() {
        return true;
    }
    let mut level: i32 = 1;
    while level <= MAX_CGROUP_DEPTH {
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == id {
            break;
        }
        if MESH_ENROLLED.get_ptr(ancestor).is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// 127.0.0.0/8 (also v4-mapped), ::1, and the unspecified addresses (which mean "this host").
#[inline(always)]
fn is_loopback(a: &[u32; 4]) -> bool {
    if is_v4_mapped(a) {
        let v4 = u32::from_be(a[3]);
        return v4 >> 24 == 127 || v4 == 0;
    }
    a[0] == 0 && a[1] == 0 && a[2] == 0 && (a[3] == 0 || a[3] == 1u32.to_be())
}

/// `bpf_sock_addr.user_port` holds a big-endian u16 in the low bits of a u32.
#[inline(always)]
fn user_port(raw: u32) -> u16 {
    u16::from_be(raw as u16)
}

#[inline(always)]
fn set_user_port(cfg: &ProxyConfig) -> u32 {
    cfg.port.to_be() as u32
}
