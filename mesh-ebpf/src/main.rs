//! Kernel programs; built for `bpfel-unknown-none` by mesh-node's build script.
//!
//! Small and dumb on purpose: they steer enrolled pods' outbound TCP to destinations the mesh
//! serves (the addresses user space lists in `mesh_dests`) to the node proxy and remember where
//! it was going; other destinations are left alone. Every decision with policy in it lives in
//! user space.
//!
//! - `cgroup/connect4`, `cgroup/connect6` (pods' cgroup root): rewrite a connect to a mesh
//!   destination to the proxy, keep socket cookie → original destination (`connect.rs`).
//! - `sockops` (pods' cgroup root): on the client's ACTIVE_ESTABLISHED, move that entry to a
//!   4-tuple key the proxy can find (`sockops.rs`).
//! - `cgroup/getsockopt` (proxy's cgroup): answer `SO_ORIGINAL_DST` (`getsockopt.rs`).
//! - tc ingress on the node's uplink: mark inbound HBONE to local pods for capture by policy
//!   routing (`tc_inbound.rs`).
//! - tc egress on enrolled pods' host-side veths: drop SYNs that do not carry the proxy's mark
//!   (into a PERMISSIVE pod, nor come from a socket of the node) (`tc_strict.rs`). The tc programs share
//!   maps and a header parser (`tc.rs`).
//! - tc ingress on enrolled pods' host-side veths: deliver pods' replies to the proxy's
//!   transparent sockets (connections made from the client's address) locally (`tc_reply.rs`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod getsockopt;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sockops;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod tc_inbound;
#[cfg(target_arch = "bpf")]
mod tc_reply;
#[cfg(target_arch = "bpf")]
mod tc_strict;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
