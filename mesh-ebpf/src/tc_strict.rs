//! tc egress (TCX) on a STRICT pod's host-side veth, i.e. packets on their way into the pod.
//! It fails closed: what it cannot read, it drops.
//!
//! - A TCP SYN without ACK is dropped unless it carries the proxy's mark
//!   (`skb->mark & proxy_mask == proxy_mark`, set by the proxy's `SO_MARK`). A mark cannot be
//!   forged from outside the node's netns: it is scrubbed when a packet crosses a veth.
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
//! Everything else passes: established flows, the pod's own outgoing connections (their
//! SYN-ACKs), ICMP, UDP (STRICT does not cover UDP).
//!
//! Whether a pod is STRICT is decided in user space, which attaches this program only to STRICT
//! pods' veths; the program itself holds no per-pod state.

use aya_ebpf::{macros::classifier, programs::TcContext};
use mesh_common::Counter;

use crate::{
    maps::count,
    tc::{
        ethertype, mark, parse, tc_config, vlan_tagged, Parsed, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6,
        TCP_FLAG_ACK, TCP_FLAG_SYN, TCX_DROP, TCX_NEXT,
    },
};

#[classifier]
pub fn mesh_tc_strict(ctx: TcContext) -> i32 {
    if should_drop(&ctx) {
        count(Counter::StrictDropped);
        TCX_DROP
    } else {
        TCX_NEXT
    }
}

#[inline(always)]
fn should_drop(ctx: &TcContext) -> bool {
    if vlan_tagged(ctx) {
        return true;
    }
    match ethertype(ctx) {
        ETH_P_IP | ETH_P_IPV6 => {}
        ETH_P_ARP => return false,
        _ => return true,
    }
    let opens_connection = match parse(ctx) {
        Parsed::Tcp(tcp) => tcp.fragment || (tcp.flags & TCP_FLAG_SYN != 0 && tcp.flags & TCP_FLAG_ACK == 0),
        Parsed::Opaque => true,
        Parsed::Other => false,
    };
    if !opens_connection {
        return false;
    }
    let Some(cfg) = tc_config() else {
        count(Counter::TcNoConfig);
        return true;
    };
    if mark(ctx) & cfg.proxy_mask == cfg.proxy_mark {
        count(Counter::StrictAllowedProxy);
        return false;
    }
    true
}
