//! Pods' replies to the proxy's transparent sockets.
//!
//! With `--preserve-source` (`TC_PRESERVE_SOURCE`) the proxy connects from the client's own
//! address, on a transparent socket of the node that holds an address that is not the node's:
//! to a pod from the original client's, and to HBONE peers and passthrough destinations from
//! the source pod's. Replies are addressed to that client, and the node would forward them
//! there, or, on one bridge, never see them at all. A packet that belongs to a socket of the
//! node's namespace (never a listener) gets the reply mark, which an unscoped rule
//! `fwmark reply/reply lookup T` (`local default dev lo table T`) delivers to that socket; a
//! frame is re-addressed to the interface where the node's IP stack receives the pod's traffic
//! (`mesh_pod_gw`: its bridge, or a routed veth itself).
//!
//! - tc ingress (TCX) on an enrolled pod's host-side veth (`mesh_tc_reply`): what the pod sends,
//!   its replies to connections the proxy made into it. A reply to a client on the same bridge
//!   would otherwise be switched straight to that client.
//! - tc egress on an enrolled pod's veth (`tc_strict.rs`, through [`reply_into_pod`]): what goes
//!   into the pod, a reply from a pod outside the mesh on the same bridge to a connection the
//!   proxy made from this pod's address; it is turned back into the node's stack.
//!
//! Packets to and from the proxy's own address (captured connections) are never looked up.
//! Neither direction drops anything.

use aya_ebpf::{bindings::BPF_F_INGRESS, helpers::bpf_redirect, macros::classifier, programs::TcContext};
use core::ptr::addr_of;
use mesh_common::{v4_mapped, Counter, TcConfig, CONFIG_HAS_V4, CONFIG_HAS_V6, TC_PRESERVE_SOURCE};

use crate::{
    ctx::rd,
    maps::{config, count},
    tc::{has_socket, mark, parse, set_mark, tc_config, Parsed, Tcp, MESH_POD_GW, TCX_NEXT},
};

/// `TC_ACT_REDIRECT`, which `bpf_redirect` returns.
const TCX_REDIRECT: i32 = 7;

#[classifier]
pub fn mesh_tc_reply(ctx: TcContext) -> i32 {
    let (Some(cfg), Parsed::Tcp(tcp)) = (tc_config(), parse(&ctx)) else {
        return TCX_NEXT;
    };
    if is_reply(&ctx, &cfg, &tcp, &tcp.dst) {
        readdress(&ctx, &cfg);
        count(Counter::ReplyPodMarked);
    }
    TCX_NEXT
}

/// For the egress program of an enrolled pod's veth: `Some(verdict)` when the packet into the
/// pod is a reply to one of the proxy's transparent sockets, turned back to the node's stack.
#[inline(always)]
pub fn reply_into_pod(ctx: &TcContext, cfg: &TcConfig, tcp: &Tcp) -> Option<i32> {
    if mark(ctx) & cfg.proxy_mask == cfg.proxy_mark || !is_reply(ctx, cfg, tcp, &tcp.src) {
        return None;
    }
    let ifindex = readdress(ctx, cfg)?;
    count(Counter::ReplyRedirected);
    Some(unsafe { bpf_redirect(ifindex, BPF_F_INGRESS as u64) } as i32)
}

/// Whether the packet belongs to a socket of the node (the proxy's), when sources are preserved;
/// `proxy_side` is the address that would be the proxy's own for a captured connection.
#[inline(always)]
fn is_reply(ctx: &TcContext, cfg: &TcConfig, tcp: &Tcp, proxy_side: &[u32; 4]) -> bool {
    cfg.flags & TC_PRESERVE_SOURCE != 0
        && !tcp.fragment
        && !config().is_some_and(|p| {
            (p.flags & CONFIG_HAS_V4 != 0 && *proxy_side == v4_mapped(p.ipv4))
                || (p.flags & CONFIG_HAS_V6 != 0 && *proxy_side == p.ipv6)
        })
        && has_socket(ctx, tcp)
}

/// Marks the packet for local delivery and re-addresses the frame to where the node's stack
/// receives the pod's traffic; returns that interface when it is known.
#[inline(always)]
fn readdress(ctx: &TcContext, cfg: &TcConfig) -> Option<u32> {
    set_mark(ctx, mark(ctx) | cfg.reply_mark);
    let ifindex = unsafe { rd(addr_of!((*ctx.skb.skb).ifindex)) };
    let gw = MESH_POD_GW.get_ptr(&ifindex)?;
    let (mac, target) = unsafe { ((*gw).mac, (*gw).ifindex) };
    ctx.store(0, &mac, 0).ok()?;
    Some(target)
}
