//! The maps. Plain (not pinned by name): user space pins them explicitly under its ABI dir.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use mesh_common::{
    Counter, Enrollment, OrigDst, ProxyConfig, SockKey, CONFIG_MAX_ENTRIES, COOKIE_DST_MAX_ENTRIES,
    COUNTER_COUNT, DESTINATIONS_MAX_ENTRIES, ENROLLED_MAX_ENTRIES, EXCL_CIDRS_MAX_ENTRIES,
    EXCL_PORTS_MAX_ENTRIES, TUPLE_DST_MAX_ENTRIES,
};

#[map(name = "mesh_config")]
pub static MESH_CONFIG: Array<ProxyConfig> = Array::with_max_entries(CONFIG_MAX_ENTRIES, 0);

/// cgroup v2 id → enrollment.
#[map(name = "mesh_enrolled")]
pub static MESH_ENROLLED: HashMap<u64, Enrollment> = HashMap::with_max_entries(ENROLLED_MAX_ENTRIES, 0);

/// Socket cookie → original destination, between connect() and ACTIVE_ESTABLISHED.
#[map(name = "mesh_cookie_dst")]
pub static MESH_COOKIE_DST: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(COOKIE_DST_MAX_ENTRIES, 0);

/// {client ip, proxy ip, client port, proxy port} → original destination.
#[map(name = "mesh_tuple_dst")]
pub static MESH_TUPLE_DST: LruHashMap<SockKey, OrigDst> =
    LruHashMap::with_max_entries(TUPLE_DST_MAX_ENTRIES, 0);

/// Destination ports never captured.
#[map(name = "mesh_excl_ports")]
pub static MESH_EXCL_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(EXCL_PORTS_MAX_ENTRIES, 0);

/// Destination CIDRs never captured (v6 form; IPv4 as v4-mapped with prefix + 96).
#[map(name = "mesh_excl_cidrs")]
pub static MESH_EXCL_CIDRS: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(EXCL_CIDRS_MAX_ENTRIES, 0);

/// Addresses the mesh serves (v6 form; IPv4 as v4-mapped) → `DEST_*` flags. Only these are
/// captured; the agent keeps the map equal to its control-plane state. Not preallocated: sized
/// for large clusters, it costs its buckets (1 MiB) plus what is in it, and only user space
/// writes it.
#[map(name = "mesh_dests")]
pub static MESH_DESTS: HashMap<[u32; 4], u32> =
    HashMap::with_max_entries(DESTINATIONS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "mesh_counters")]
pub static MESH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(p) = MESH_COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot; programs do not migrate while they run.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn config() -> Option<ProxyConfig> {
    MESH_CONFIG.get(0).copied()
}

#[inline(always)]
pub fn port_excluded(port: u16) -> bool {
    MESH_EXCL_PORTS.get_ptr(port).is_some()
}

#[inline(always)]
pub fn mesh_destination(addr: &[u32; 4]) -> bool {
    MESH_DESTS.get_ptr(addr).is_some()
}

#[inline(always)]
pub fn cidr_excluded(addr: [u32; 4]) -> bool {
    MESH_EXCL_CIDRS
        .get(Key::new(mesh_common::CIDR_FULL_PREFIX, addr))
        .is_some()
}
