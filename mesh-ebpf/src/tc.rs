//! What the tc programs share: their maps, their config, and a small TCP/IP header parser.
//!
//! Headers are read with `bpf_skb_load_bytes` (aya's `load`), not by direct packet access: a
//! variable IPv4 header length or a chain of IPv6 extension headers then needs no bounds proofs
//! for the verifier, and a short packet is simply "not TCP".

use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN,
    },
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::map,
    maps::{Array, HashMap},
    programs::TcContext,
};
use core::{
    mem::size_of,
    ptr::{addr_of, addr_of_mut},
};
use mesh_common::{
    is_v4_mapped, v4_mapped, PodGateway, TcConfig, LOCAL_IPS_MAX_ENTRIES, POD_GW_MAX_ENTRIES,
    TC_CONFIG_MAX_ENTRIES, TC_CONFIG_SET,
};

use crate::ctx::{rd, wr};

/// Local pod address (v6 form) → `LOCAL_IP_CAPTURE_INBOUND` | `LOCAL_IP_PERMISSIVE`.
#[map(name = "mesh_local_ips")]
pub static MESH_LOCAL_IPS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(LOCAL_IPS_MAX_ENTRIES, 0);

/// Enrolled pod's host-side veth ifindex → the node's link-layer address for its frames.
#[map(name = "mesh_pod_gw")]
pub static MESH_POD_GW: HashMap<u32, PodGateway> = HashMap::with_max_entries(POD_GW_MAX_ENTRIES, 0);

#[map(name = "mesh_tc_config")]
pub static MESH_TC_CONFIG: Array<TcConfig> = Array::with_max_entries(TC_CONFIG_MAX_ENTRIES, 0);

/// TCX verdicts (`enum tcx_action_base`). `TCX_NEXT` hands the packet to the next program on
/// the hook (or lets it through when there is none), so other users of the hook, and a set
/// that replaces this one, keep working.
pub const TCX_NEXT: i32 = -1;
pub const TCX_DROP: i32 = 2;

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers followed before giving up on finding the transport header.
const MAX_IPV6_EXT: u32 = 6;

/// A TCP segment, as far as the programs care.
pub struct Tcp {
    /// Source address, v6 form (IPv4 as v4-mapped), network-order words.
    pub src: [u32; 4],
    /// Source port, host order (0 in a non-first fragment).
    pub src_port: u16,
    /// Destination address, v6 form (IPv4 as v4-mapped), network-order words.
    pub dst: [u32; 4],
    /// Destination port, host order (0 in a non-first fragment).
    pub dst_port: u16,
    /// The TCP flags byte (0 in a non-first fragment).
    pub flags: u8,
    /// Part of a fragmented datagram: its TCP header may be missing or incomplete.
    pub fragment: bool,
}

pub enum Parsed {
    /// Not TCP over IPv4/IPv6 (or too short to tell).
    Other,
    Tcp(Tcp),
    /// IPv6 whose extension-header chain is longer than we follow: it may carry TCP.
    Opaque,
}

/// The tc programs' config, when user space has written it.
#[inline(always)]
pub fn tc_config() -> Option<TcConfig> {
    let cfg = MESH_TC_CONFIG.get(0).copied()?;
    (cfg.flags & TC_CONFIG_SET != 0).then_some(cfg)
}

#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    unsafe { rd(addr_of!((*ctx.skb.skb).mark)) }
}

#[inline(always)]
pub fn set_mark(ctx: &TcContext, mark: u32) {
    unsafe { wr(addr_of_mut!((*ctx.skb.skb).mark), mark) }
}

/// The frame's ethertype, host order, as the kernel classified it (for a VLAN-tagged frame
/// whose tag the kernel took out, the ethertype after the tag).
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> u16 {
    let skb: *mut __sk_buff = ctx.skb.skb;
    u16::from_be(unsafe { rd(addr_of!((*skb).protocol)) } as u16)
}

/// Whether the kernel holds a VLAN tag for the frame outside its data (the tag a bridge or a
/// NIC took out); the parser reads past it unaware.
#[inline(always)]
pub fn vlan_tagged(ctx: &TcContext) -> bool {
    unsafe { rd(addr_of!((*ctx.skb.skb).vlan_present)) != 0 }
}

/// Parses the Ethernet frame the program sees (tc runs with the MAC header in front, both on
/// ingress and on egress).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let parsed = match ethertype(ctx) {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => None,
    };
    parsed.unwrap_or(Parsed::Other)
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Option<Parsed> {
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let protocol: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if protocol != IPPROTO_TCP {
        return Some(Parsed::Other);
    }
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    let src = v4_mapped(ctx.load(ETH_HLEN + 12).ok()?);
    let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
    let dst = v4_mapped(dst);
    let more_fragments = frag & 0x2000 != 0;
    if frag & 0x1fff != 0 {
        return Some(Parsed::Tcp(Tcp {
            src,
            src_port: 0,
            dst,
            dst_port: 0,
            flags: 0,
            fragment: true,
        }));
    }
    Some(tcp_at(ctx, ETH_HLEN + ihl, src, dst, more_fragments))
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Option<Parsed> {
    let vtc: u8 = ctx.load(ETH_HLEN).ok()?;
    if vtc >> 4 != 6 {
        return None;
    }
    let mut next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    let src: [u32; 4] = ctx.load(ETH_HLEN + 8).ok()?;
    let dst: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut fragment = false;
    let mut i = 0;
    while i < MAX_IPV6_EXT {
        match next {
            IPPROTO_TCP => return Some(tcp_at(ctx, off, src, dst, fragment)),
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                next = hdr[0];
                off += (hdr[1] as usize + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                next = hdr[0];
                off += (hdr[1] as usize + 2) * 4;
            }
            // Fragment header: 8 octets; a non-first fragment carries no TCP header.
            44 => {
                let hdr: [u8; 4] = ctx.load(off).ok()?;
                next = hdr[0];
                fragment = true;
                if u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 != 0 {
                    if next != IPPROTO_TCP {
                        return Some(Parsed::Other);
                    }
                    return Some(Parsed::Tcp(Tcp {
                        src,
                        src_port: 0,
                        dst,
                        dst_port: 0,
                        flags: 0,
                        fragment: true,
                    }));
                }
                off += 8;
            }
            _ => return Some(Parsed::Other),
        }
        i += 1;
    }
    if next == IPPROTO_TCP {
        return Some(tcp_at(ctx, off, src, dst, fragment));
    }
    match next {
        0 | 43 | 44 | 51 | 60 => Some(Parsed::Opaque),
        _ => Some(Parsed::Other),
    }
}

/// The destination of an IPv6 packet (for one the parser calls [`Parsed::Opaque`]).
#[inline(always)]
pub fn ipv6_dst(ctx: &TcContext) -> Option<[u32; 4]> {
    let vtc: u8 = ctx.load(ETH_HLEN).ok()?;
    if vtc >> 4 != 6 {
        return None;
    }
    ctx.load(ETH_HLEN + 24).ok()
}

/// The TCP header at `off`. A header cut short by fragmentation is reported as a fragment
/// without port or flags.
#[inline(always)]
fn tcp_at(ctx: &TcContext, off: usize, src: [u32; 4], dst: [u32; 4], fragment: bool) -> Parsed {
    let hdr: Option<[u8; 14]> = ctx.load(off).ok();
    match hdr {
        Some(h) => Parsed::Tcp(Tcp {
            src,
            src_port: u16::from_be_bytes([h[0], h[1]]),
            dst,
            dst_port: u16::from_be_bytes([h[2], h[3]]),
            flags: h[13],
            fragment,
        }),
        None => Parsed::Tcp(Tcp {
            src,
            src_port: 0,
            dst,
            dst_port: 0,
            flags: 0,
            fragment: true,
        }),
    }
}

/// A socket of this namespace (not a listener) owns the packet's 4-tuple.
#[inline(always)]
pub fn has_socket(ctx: &TcContext, tcp: &Tcp) -> bool {
    let (mut tuple, size) = tuple(tcp, tcp.dst_port);
    let sk = unsafe { lookup(ctx, &mut tuple, size) };
    if sk.is_null() {
        return false;
    }
    let state = unsafe { rd(addr_of_mut!((*sk).state)) };
    unsafe { bpf_sk_release(sk.cast()) };
    state != BPF_TCP_LISTEN
}

#[inline(always)]
pub unsafe fn lookup(ctx: &TcContext, tuple: &mut bpf_sock_tuple, size: u32) -> *mut bpf_sock {
    unsafe { bpf_skc_lookup_tcp(ctx.skb.skb.cast(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0) }
}

/// The packet's tuple with destination port `dport`, and its size for the lookup helpers.
#[inline(always)]
pub fn tuple(tcp: &Tcp, dport: u16) -> (bpf_sock_tuple, u32) {
    // SAFETY: a plain C union of integers; all-zero is a valid value of either member.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    if is_v4_mapped(&tcp.dst) {
        let v4 = unsafe { &mut t.__bindgen_anon_1.ipv4 };
        v4.saddr = tcp.src[3];
        v4.daddr = tcp.dst[3];
        v4.sport = tcp.src_port.to_be();
        v4.dport = dport.to_be();
        (t, size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32)
    } else {
        let v6 = unsafe { &mut t.__bindgen_anon_1.ipv6 };
        v6.saddr = tcp.src;
        v6.daddr = tcp.dst;
        v6.sport = tcp.src_port.to_be();
        v6.dport = dport.to_be();
        (t, size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32)
    }
}
