//! tc ingress (TCX) on the node's uplink. Three jobs, both for local enrolled pods
//! (`mesh_local_ips`); every packet they concern gets the capture mark OR-ed into `skb->mark`.
//! A policy-routing rule scoped to the uplink (`iif <uplink> fwmark CAPTURE/CAPTURE lookup T`,
//! `local 0.0.0.0/0 dev lo table T`) then delivers it locally instead of forwarding it to the pod.
//!
//! - HBONE: every packet of a TCP flow to a pod's port 15008, to the proxy's transparent
//!   listener on `*:15008` (the normal socket lookup finds it: same port).
//! - Plaintext to a PERMISSIVE pod on any other port (DESIGN.md §4): a SYN is assigned
//!   (`bpf_sk_assign`) to the proxy's transparent inbound plaintext listener (`*:15006`), so
//!   the accepted socket's local address is the pod's `IP:port`, the original destination.
//!   Later packets of a flow are marked only when they belong to a socket of this namespace
//!   (the proxy's accepted one), found by the same lookup the stack will do; a flow that
//!   reached the pod before the pod was steered (no socket here) keeps flowing to the pod.
//!   A fragment, or IPv6 with more extension headers than the parser follows, cannot be told
//!   apart, so it is marked: a SYN hidden in one then goes to no socket rather than around the
//!   proxy.
//!
//! - Replies to the proxy's own connections made from a local pod's address (HBONE and
//!   passthrough with `--preserve-source`, `TC_PRESERVE_SOURCE`): a packet to a local pod that
//!   belongs to a socket of this namespace (the proxy's transparent one; never a listener) is
//!   marked, so it reaches that socket instead of being forwarded to the pod.
//!
//! The program never drops and never decides policy: it returns `TCX_NEXT` for everything.

use aya_ebpf::{
    bindings::BPF_TCP_LISTEN,
    helpers::generated::{bpf_sk_assign, bpf_sk_release},
    macros::classifier,
    programs::TcContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{Counter, HBONE_PORT, LOCAL_IP_PERMISSIVE, TC_PRESERVE_SOURCE};

use crate::{
    ctx::rd,
    maps::{config, count},
    tc::{
        has_socket, ipv6_dst, lookup, mark, parse, set_mark, tc_config, tuple, Parsed, Tcp, MESH_LOCAL_IPS,
        TCP_FLAG_ACK, TCP_FLAG_SYN, TCX_NEXT,
    },
};

#[classifier]
pub fn mesh_tc_inbound(ctx: TcContext) -> i32 {
    inbound(&ctx);
    TCX_NEXT
}

#[inline(always)]
fn inbound(ctx: &TcContext) {
    let tcp = match parse(ctx) {
        Parsed::Tcp(tcp) => tcp,
        Parsed::Opaque => return opaque(ctx),
        Parsed::Other => return,
    };
    let Some(pod) = MESH_LOCAL_IPS.get_ptr(&tcp.dst) else {
        return;
    };
    let pod_flags = unsafe { *pod };
    let Some(cfg) = tc_config() else {
        count(Counter::TcNoConfig);
        return;
    };
    let capture = if tcp.dst_port == HBONE_PORT {
        count(Counter::InboundMarked);
        true
    } else {
        // Steering already looked the socket up for a packet that opens nothing: the same
        // lookup answers for a reply, so it is not made twice.
        let steered = if pod_flags & LOCAL_IP_PERMISSIVE != 0 {
            steer_plain(ctx, &tcp)
        } else {
            None
        };
        steered.unwrap_or_else(|| reply(ctx, cfg.flags, &tcp))
    };
    if capture {
        set_mark(ctx, mark(ctx) | cfg.capture_mark);
    }
}

/// IPv6 with more extension headers than the parser follows may hide a SYN: to a PERMISSIVE
/// pod it is marked like a fragment, so it reaches no socket rather than going around the proxy.
#[inline(always)]
fn opaque(ctx: &TcContext) {
    let Some(dst) = ipv6_dst(ctx) else {
        return;
    };
    let permissive = MESH_LOCAL_IPS
        .get_ptr(&dst)
        .is_some_and(|flags| unsafe { *flags } & LOCAL_IP_PERMISSIVE != 0);
    let steering = config().is_some_and(|c| c.inbound_plain_port != 0);
    if let (true, true, Some(cfg)) = (permissive, steering, tc_config()) {
        set_mark(ctx, mark(ctx) | cfg.capture_mark);
    }
}

/// Whether a plaintext packet to a PERMISSIVE pod goes to the proxy (assigning a SYN to the
/// plaintext listener); `None` when plaintext steering is off.
#[inline(always)]
fn steer_plain(ctx: &TcContext, tcp: &Tcp) -> Option<bool> {
    let port = config().map(|c| c.inbound_plain_port).filter(|p| *p != 0)?;
    if tcp.fragment {
        return Some(true);
    }
    let opens = tcp.flags & TCP_FLAG_SYN != 0 && tcp.flags & TCP_FLAG_ACK == 0;
    if !opens {
        return Some(has_socket(ctx, tcp));
    }
    count(Counter::PlainSteered);
    if !assign(ctx, tcp, port) {
        // Marked all the same: with no listener the SYN is dropped here, never forwarded to
        // the pod around the proxy.
        count(Counter::PlainNoListener);
    }
    Some(true)
}

/// Whether the packet is a reply to one of the proxy's transparent sockets (`--preserve-source`).
#[inline(always)]
fn reply(ctx: &TcContext, tc_flags: u32, tcp: &Tcp) -> bool {
    let owned = tc_flags & TC_PRESERVE_SOURCE != 0 && !tcp.fragment && has_socket(ctx, tcp);
    if owned {
        count(Counter::ReplyUplinkMarked);
    }
    owned
}

/// Assigns the packet to the listener on `port` that accepts for the packet's destination
/// address (the proxy's transparent `*:port`).
#[inline(always)]
fn assign(ctx: &TcContext, tcp: &Tcp, port: u16) -> bool {
    let (mut tuple, size) = tuple(tcp, port);
    let sk = unsafe { lookup(ctx, &mut tuple, size) };
    if sk.is_null() {
        return false;
    }
    let state = unsafe { rd(addr_of_mut!((*sk).state)) };
    let assigned = state == BPF_TCP_LISTEN && unsafe { bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0) } == 0;
    unsafe { bpf_sk_release(sk.cast()) };
    assigned
}
