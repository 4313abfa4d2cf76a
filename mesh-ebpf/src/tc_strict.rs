//! tc egress (TCX) on a STRICT pod's host-side veth, i.e. packets on their way into the pod:
//! a TCP SYN without ACK is dropped unless it carries the proxy's mark
//! (`skb->mark & proxy_mask == proxy_mark`, set by the proxy's `SO_MARK`). Everything else
//! passes: established flows, the pod's own outgoing connections (their SYN-ACKs), ICMP, UDP.
//! A mark cannot be forged from outside the node's netns: it is scrubbed when a packet crosses
//! a veth into another namespace.
//!
//! TCP fragments (which may hide a SYN's header) and IPv6 packets with more extension headers
//! than the parser follows are treated like SYNs: fail closed.
//!
//! Whether a pod is STRICT is decided in user space, which attaches this program only to STRICT
//! pods' veths; the program itself holds no per-pod state.

use aya_ebpf::{macros::classifier, programs::TcContext};
use mesh_common::Counter;

use crate::{
    maps::count,
    tc::{mark, parse, tc_config, Parsed, TCP_FLAG_ACK, TCP_FLAG_SYN, TCX_DROP, TCX_NEXT},
};

#[classifier]
pub fn mesh_tc_strict(ctx: TcContext) -> i32 {
    if should_drop(&ctx) {
        TCX_DROP
    } else {
        TCX_NEXT
    }
}

#[inline(always)]
fn should_drop(ctx: &TcContext) -> bool {
    let opens_connection = match parse(ctx) {
        Parsed::Tcp(tcp) => tcp.fragment || (tcp.flags & TCP_FLAG_SYN != 0 && tcp.flags & TCP_FLAG_ACK == 0),
        Parsed::Opaque => true,
        Parsed::Other => false,
    };
    if !opens_connection {
        return false;
    }
    let Some(cfg) = tc_config() else {
        // Not configured yet (a fresh set before user space wrote the marks): fail open, as
        // if the pod were PERMISSIVE, rather than cut every pod off.
        count(Counter::TcNoConfig);
        return false;
    };
    if mark(ctx) & cfg.proxy_mask == cfg.proxy_mark {
        count(Counter::StrictAllowedProxy);
        return false;
    }
    count(Counter::StrictDropped);
    true
}
