//! tc ingress (TCX) on the node's uplink: every packet of a TCP flow to a local pod's HBONE
//! port (15008) gets the capture mark OR-ed into `skb->mark`. A policy-routing rule scoped to
//! the uplink (`iif <uplink> fwmark CAPTURE/CAPTURE lookup T`, `local 0.0.0.0/0 dev lo table T`)
//! then delivers it locally, to the proxy's transparent listener on `0.0.0.0:15008`, instead
//! of forwarding it to the pod. Every packet, not only the SYN: the established flow must keep
//! being delivered locally.
//!
//! The program never drops and never decides policy: it returns `TCX_NEXT` for everything.

use aya_ebpf::{macros::classifier, programs::TcContext};
use mesh_common::{Counter, HBONE_PORT};

use crate::{
    maps::count,
    tc::{mark, parse, set_mark, tc_config, Parsed, MESH_LOCAL_IPS, TCX_NEXT},
};

#[classifier]
pub fn mesh_tc_inbound(ctx: TcContext) -> i32 {
    inbound(&ctx);
    TCX_NEXT
}

#[inline(always)]
fn inbound(ctx: &TcContext) {
    let Parsed::Tcp(tcp) = parse(ctx) else {
        return;
    };
    if tcp.dst_port != HBONE_PORT || MESH_LOCAL_IPS.get_ptr(&tcp.dst).is_none() {
        return;
    }
    let Some(cfg) = tc_config() else {
        count(Counter::TcNoConfig);
        return;
    };
    set_mark(ctx, mark(ctx) | cfg.capture_mark);
    count(Counter::InboundMarked);
}
