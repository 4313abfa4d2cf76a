//! `sockops` at the pods' cgroup root: when a client socket whose connect was rewritten
//! becomes established, its 4-tuple is known; move cookie → original destination to
//! {client ip, proxy ip, client port, proxy port} → original destination.

use aya_ebpf::{
    bindings::{bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{v4_mapped, Counter, SockKey, AF_INET};

use crate::{
    ctx::{rd, rd_words},
    maps::{config, count, MESH_COOKIE_DST, MESH_TUPLE_DST},
};

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    unsafe { handle(ctx.ops) };
    1
}

#[inline(always)]
unsafe fn handle(ops: *mut bpf_sock_ops) {
    if unsafe { rd(addr_of_mut!((*ops).op)) } != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let orig = match MESH_COOKIE_DST.get_ptr(cookie) {
        Some(p) => unsafe { *p },
        None => {
            count(Counter::SockopsMiss);
            unsafe { forget_stale_tuple(ops) };
            return;
        }
    };
    let key = unsafe { tuple(ops) };
    if MESH_TUPLE_DST.insert(key, orig, 0).is_err() {
        count(Counter::TupleSaveFailed);
    } else {
        count(Counter::SockopsHit);
    }
    let _ = MESH_COOKIE_DST.remove(cookie);
}

/// A connection made straight to the proxy's outbound port (not rewritten) may reuse the
/// 4-tuple of an earlier captured one: drop that entry so the proxy does not answer it with
/// someone else's original destination.
#[inline(always)]
unsafe fn forget_stale_tuple(ops: *mut bpf_sock_ops) {
    let Some(cfg) = config() else { return };
    if remote_port(ops) != cfg.port {
        return;
    }
    let key = unsafe { tuple(ops) };
    let _ = MESH_TUPLE_DST.remove(key);
}

/// `remote_port` carries the big-endian port in its upper 16 bits; `local_port` is host order.
#[inline(always)]
fn remote_port(ops: *mut bpf_sock_ops) -> u16 {
    let raw = unsafe { rd(addr_of_mut!((*ops).remote_port)) };
    u16::from_be((raw >> 16) as u16)
}

/// The client's view: local = client, remote = proxy; addresses in v6 form.
///
/// Every field is read unconditionally, then selected: with a read in each branch, LLVM sinks
/// the two loads into one load from `ctx + variable offset`, which the verifier rejects
/// ("dereference of modified ctx ptr").
#[inline(always)]
unsafe fn tuple(ops: *mut bpf_sock_ops) -> SockKey {
    let (family, local4, remote4, local6, remote6, local_port) = unsafe {
        (
            rd(addr_of_mut!((*ops).family)),
            rd(addr_of_mut!((*ops).local_ip4)),
            rd(addr_of_mut!((*ops).remote_ip4)),
            rd_words(addr_of_mut!((*ops).local_ip6)),
            rd_words(addr_of_mut!((*ops).remote_ip6)),
            rd(addr_of_mut!((*ops).local_port)),
        )
    };
    // AF_INET6 includes v4-mapped flows of dual-stack sockets (already in v6 form).
    let (src_addr, dst_addr) = if family == AF_INET as u32 {
        (v4_mapped(local4), v4_mapped(remote4))
    } else {
        (local6, remote6)
    };
    SockKey {
        src_addr,
        dst_addr,
        src_port: local_port as u16,
        dst_port: remote_port(ops),
        pad: 0,
    }
}
