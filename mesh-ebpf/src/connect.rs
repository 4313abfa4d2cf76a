//! `cgroup/connect4` and `cgroup/connect6`: rewrite an enrolled cgroup's TCP connect to a
//! destination the mesh serves (a Service VIP or an enrolled pod's address, anywhere in the
//! cluster: the keys of `mesh_dests`) to the node proxy's outbound listener, and a connect from
//! outside the mesh (a pod that is not enrolled or opted out, or an enrolled pod's connect that
//! an exclusion leaves uncaptured) to a local PERMISSIVE pod to the proxy's inbound plaintext
//! listener; either way remember the original destination by socket cookie.
//! Every other connect is left alone: it leaves the pod from the pod's own address, so the
//! pod's egress controls (NetworkPolicies, metadata hop limits) keep applying to it. Until the
//! agent has first written `mesh_dests` (`CONFIG_CAPTURE_ALL`), every destination counts as the
//! mesh's, so a new set never lets mesh traffic go around the proxy while it is being filled.
//! Outbound capture fails open (the connect goes on uncaptured: better than breaking the app);
//! plaintext steering fails closed (the connect is refused, EPERM): letting it through would
//! bypass the pod's policy.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{
    is_v4_mapped, v4_mapped, Counter, OrigDst, ProxyConfig, AF_INET, AF_INET6, CONFIG_CAPTURE_ALL,
    CONFIG_HAS_V4, CONFIG_HAS_V6, HBONE_PORT, LOCAL_IP_PERMISSIVE, MAX_CGROUP_DEPTH, ORIG_VIA_CONNECT6,
};

use crate::{
    ctx::{rd, rd_words, wr, wr_words},
    maps::{cidr_excluded, config, count, mesh_destination, port_excluded, MESH_COOKIE_DST, MESH_ENROLLED},
    tc::MESH_LOCAL_IPS,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    unsafe { connect4(ctx.sock_addr) }
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    unsafe { connect6(ctx.sock_addr) }
}

/// What to do with a connect.
enum Verdict {
    /// An enrolled pod's outbound connection: to the outbound listener.
    Outbound,
    /// Plaintext from outside the mesh to a local PERMISSIVE pod: to the inbound plaintext
    /// listener, where policy applies with no authenticated principal.
    Plain,
    Skip(Counter),
}

/// Return values of the connect programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

impl Verdict {
    /// What to return when the connect cannot be rewritten.
    #[inline(always)]
    fn unsteered(&self) -> i32 {
        match self {
            Verdict::Plain => REFUSE,
            _ => ALLOW,
        }
    }

    /// The proxy port it goes to.
    #[inline(always)]
    fn port(&self, cfg: &ProxyConfig) -> u16 {
        match self {
            Verdict::Plain => cfg.inbound_plain_port,
            _ => cfg.port,
        }
    }
}

/// Checked cheapest first.
#[inline(always)]
unsafe fn decide(
    sa: *mut bpf_sock_addr,
    cfg: &ProxyConfig,
    dst: &[u32; 4],
    port: u16,
    is_self: bool,
) -> Verdict {
    let sa_type = unsafe { rd(addr_of_mut!((*sa).type_)) };
    let protocol = unsafe { rd(addr_of_mut!((*sa).protocol)) };
    if sa_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return Verdict::Skip(Counter::SkipNotTcp);
    }
    if is_loopback(dst) {
        return Verdict::Skip(Counter::SkipLoopback);
    }
    if is_self {
        return Verdict::Skip(Counter::SkipSelf);
    }
    if !enrolled() {
        // Outside the mesh: only plaintext into a PERMISSIVE pod of this node is steered, on
        // every port (its HBONE port too: a pod may listen there itself), never the proxy's own
        // connects to pods, and no exclusion applies (they are for outbound capture).
        if cfg.inbound_plain_port != 0 && !is_proxy(cfg) && is_permissive_pod(dst) {
            return Verdict::Plain;
        }
        return Verdict::Skip(Counter::SkipNotEnrolled);
    }
    if port == HBONE_PORT {
        return Verdict::Skip(Counter::SkipHbonePort);
    }
    let excluded = if port_excluded(port) {
        Counter::SkipExcludedPort
    } else if cidr_excluded(*dst) {
        Counter::SkipExcludedCidr
    } else if cfg.flags & CONFIG_CAPTURE_ALL == 0 && !mesh_destination(dst) {
        Counter::SkipNotMeshDestination
    } else {
        return Verdict::Outbound;
    };
    // Not captured, so plaintext from outside the mesh as far as the destination is concerned:
    // into a PERMISSIVE pod of this node it goes through the plaintext listener, as it would
    // from another node (the pod's veth drops it otherwise).
    if cfg.inbound_plain_port != 0 && !is_proxy(cfg) && is_permissive_pod(dst) {
        return Verdict::Plain;
    }
    Verdict::Skip(excluded)
}

#[inline(always)]
unsafe fn connect4(sa: *mut bpf_sock_addr) -> i32 {
    let Some(cfg) = config() else {
        count(Counter::SkipNoConfig);
        return ALLOW;
    };
    let ip4 = unsafe { rd(addr_of_mut!((*sa).user_ip4)) };
    let port = user_port(unsafe { rd(addr_of_mut!((*sa).user_port)) });
    let dst = v4_mapped(ip4);
    let is_self = cfg.flags & CONFIG_HAS_V4 != 0 && ip4 == cfg.ipv4 && port == cfg.port;
    let verdict = unsafe { decide(sa, &cfg, &dst, port, is_self) };
    if let Verdict::Skip(skip) = verdict {
        count(skip);
        return ALLOW;
    }
    if cfg.flags & CONFIG_HAS_V4 == 0 {
        count(Counter::SkipNoProxyAddr);
        return verdict.unsteered();
    }
    let orig = OrigDst {
        addr: dst,
        port,
        family: AF_INET,
        flags: 0,
    };
    if !unsafe { save(sa, &orig) } {
        return verdict.unsteered();
    }
    unsafe {
        wr(addr_of_mut!((*sa).user_ip4), cfg.ipv4);
        wr(addr_of_mut!((*sa).user_port), user_port_raw(verdict.port(&cfg)));
    }
    count(match verdict {
        Verdict::Plain => Counter::PlainRedirected,
        _ => Counter::RedirectedV4,
    });
    ALLOW
}

#[inline(always)]
unsafe fn connect6(sa: *mut bpf_sock_addr) -> i32 {
    let Some(cfg) = config() else {
        count(Counter::SkipNoConfig);
        return ALLOW;
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
    let verdict = unsafe { decide(sa, &cfg, &dst, port, is_self) };
    if let Verdict::Skip(skip) = verdict {
        count(skip);
        return ALLOW;
    }
    let (target, family, counter) = if mapped {
        if cfg.flags & CONFIG_HAS_V4 == 0 {
            count(Counter::SkipNoProxyAddr);
            return verdict.unsteered();
        }
        (v4_mapped(cfg.ipv4), AF_INET, Counter::RedirectedV4Mapped)
    } else {
        if cfg.flags & CONFIG_HAS_V6 == 0 {
            count(Counter::SkipNoProxyAddr);
            return verdict.unsteered();
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
        return verdict.unsteered();
    }
    unsafe {
        wr_words(addr_of_mut!((*sa).user_ip6), target);
        wr(addr_of_mut!((*sa).user_port), user_port_raw(verdict.port(&cfg)));
    }
    count(match verdict {
        Verdict::Plain => Counter::PlainRedirected,
        _ => counter,
    });
    ALLOW
}

/// Cookie → original destination. Without it the proxy could not route the connection, so
/// a failed save does not rewrite the connect.
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
fn user_port_raw(port: u16) -> u32 {
    port.to_be() as u32
}

/// The caller is the proxy itself (its connects to pods carry policy already).
#[inline(always)]
fn is_proxy(cfg: &ProxyConfig) -> bool {
    let current = unsafe { bpf_get_current_cgroup_id() };
    current == cfg.proxy_cgroup
}

/// `dst` is a PERMISSIVE enrolled pod of this node.
#[inline(always)]
fn is_permissive_pod(dst: &[u32; 4]) -> bool {
    MESH_LOCAL_IPS
        .get_ptr(dst)
        .is_some_and(|flags| unsafe { *flags } & LOCAL_IP_PERMISSIVE != 0)
}
