//! tc egress (TCX) on an enrolled pod's host-side veth, i.e. packets on their way into the pod.
//! It fails closed: what it cannot read, it drops.
//!
//! - A TCP SYN without ACK is dropped unless it carries the proxy's mark
//!   (`skb->mark & proxy_mask == proxy_mark`, set by the proxy's `SO_MARK`). A mark cannot be
//!   forged from outside the node's netns: it is scrubbed when a packet crosses a veth.
//! - Into a PERMISSIVE pod (`LOCAL_IP_PERMISSIVE` in `mesh_local_ips` for the destination), a
//!   SYN sent by a socket of the node's own network namespace passes too (`skb->sk` set: the
//!   kubelet's probes, host-network processes). A packet that came in over a veth — bridged
//!   from a pod, or forwarded after the node's DNAT (a Service VIP) — has no socket here: the
//!   kernel orphans it on the way in. Into a PERMISSIVE pod that a policy selects
//!   (`LOCAL_IP_POLICED`), such a SYN is dropped: plaintext from outside the mesh reaches it
//!   only through the proxy (steered there by connect4/6 and on the uplink), or not at all.
//!   Into one that no policy selects it passes, since there is nothing to go around.
//! - TCP fragments (which may hide a SYN's header) and IPv6 packets with more extension headers
//!   than the parser follows are treated like SYNs.
//! - Only three ethertypes pass: IPv4 and IPv6, which the parser reads, and ARP, without which
//!   the pod cannot be reached over IPv4 (NDP and ICMPv6 travel in IPv6; ICMP in IPv4). Every
//!   other frame is dropped whole: a VLAN tag (802.1Q, QinQ) the pod's kernel strips would
//!   otherwise smuggle a SYN past the parser, and a pod on a veth has no use for MPLS, PPPoE or
//!   the rest. A frame whose tag the kernel already holds outside its data is dropped too.
//! - Without its configuration (the marks) the program cannot tell the proxy's SYNs from
//!   others: it drops every connection attempt rather than let them all in.
//!
//! - A packet of an established flow that belongs to one of the proxy's transparent sockets is
//!   not the pod's: it is turned back into the node's IP stack (`tc_reply.rs`).
//!
//! Everything else passes: established flows, the pod's own outgoing connections (their
//! SYN-ACKs), ICMP, UDP (STRICT does not cover UDP).
//!
//! User space attaches this program to every enrolled pod's veth. A destination that is not in
//! `mesh_local_ips` as PERMISSIVE is treated as STRICT.

use aya_ebpf::{macros::classifier, programs::TcContext};
use core::ptr::addr_of;
use mesh_common::{Counter, LOCAL_IP_PERMISSIVE, LOCAL_IP_POLICED};

use crate::{
    ctx::rd,
    maps::count,
    tc::{
        ethertype, mark, parse, tc_config, vlan_tagged, Parsed, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6,
        MESH_LOCAL_IPS, TCP_FLAG_ACK, TCP_FLAG_SYN, TCX_DROP, TCX_NEXT,
    },
    tc_reply::reply_into_pod,
};

#[classifier]
pub fn mesh_tc_strict(ctx: TcContext) -> i32 {
    match verdict(&ctx) {
        Verdict::Pass => TCX_NEXT,
        Verdict::Redirect(action) => action,
        Verdict::Drop(counter) => {
            count(counter);
            TCX_DROP
        }
    }
}

enum Verdict {
    Pass,
    /// A reply to one of the proxy's transparent sockets, turned back to the node's stack
    /// (`tc_reply.rs`); the action `bpf_redirect` returned.
    Redirect(i32),
    /// Dropped, counted under this counter.
    Drop(Counter),
}

#[inline(always)]
fn verdict(ctx: &TcContext) -> Verdict {
    if vlan_tagged(ctx) {
        return Verdict::Drop(Counter::StrictDropped);
    }
    match ethertype(ctx) {
        ETH_P_IP | ETH_P_IPV6 => {}
        ETH_P_ARP => return Verdict::Pass,
        _ => return Verdict::Drop(Counter::StrictDropped),
    }
    // The destination of a packet that may open a connection; `None` when it cannot be read.
    let dst = match parse(ctx) {
        Parsed::Tcp(tcp)
            if tcp.fragment || (tcp.flags & TCP_FLAG_SYN != 0 && tcp.flags & TCP_FLAG_ACK == 0) =>
        {
            Some(tcp.dst)
        }
        Parsed::Tcp(tcp) => {
            return tc_config()
                .and_then(|cfg| reply_into_pod(ctx, &cfg, &tcp))
                .map_or(Verdict::Pass, Verdict::Redirect)
        }
        Parsed::Other => return Verdict::Pass,
        Parsed::Opaque => None,
    };
    let Some(cfg) = tc_config() else {
        count(Counter::TcNoConfig);
        return Verdict::Drop(Counter::StrictDropped);
    };
    if mark(ctx) & cfg.proxy_mask == cfg.proxy_mark {
        count(Counter::StrictAllowedProxy);
        return Verdict::Pass;
    }
    let flags = dst
        .and_then(|dst| MESH_LOCAL_IPS.get_ptr(&dst))
        .map_or(0, |flags| unsafe { *flags });
    if flags & LOCAL_IP_PERMISSIVE == 0 {
        return Verdict::Drop(Counter::StrictDropped);
    }
    if from_node_socket(ctx) {
        count(Counter::PermissiveAllowedNode);
        return Verdict::Pass;
    }
    if flags & LOCAL_IP_POLICED == 0 {
        count(Counter::PermissiveAllowedUnpoliced);
        return Verdict::Pass;
    }
    Verdict::Drop(Counter::PermissiveDropped)
}

/// Whether a socket of this network namespace sent the packet. Only locally generated packets
/// carry one at a veth's egress: one that came in over an interface was orphaned on receipt.
#[inline(always)]
fn from_node_socket(ctx: &TcContext) -> bool {
    !unsafe { rd(addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk)) }.is_null()
}
