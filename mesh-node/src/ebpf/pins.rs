//! The pin layout, and checking / removing what is pinned.
//!
//! ```text
//! <pin_dir>/                        e.g. /sys/fs/bpf/mesh
//!   current -> <abi>                symlink to the active set (stable path for other tools)
//!   <abi>/                          16 hex digits: FNV-1a 64 of the embedded eBPF object
//!     mesh_config mesh_enrolled mesh_cookie_dst mesh_tuple_dst
//!     mesh_excl_ports mesh_excl_cidrs mesh_counters                 maps
//!     prog_connect4 prog_connect6 prog_sock_ops prog_getsockopt     programs
//!     link_connect4_cg<ID> link_connect6_cg<ID> link_sock_ops_cg<ID>  cgroup links (pods cgroup)
//!     link_getsockopt_cg<ID>                                          cgroup link (proxy cgroup)
//!     mesh_dests                     addresses the mesh serves (what connect4/6 capture)
//!     mesh_local_ips mesh_tc_config mesh_pod_gw                       maps of the tc programs
//!     prog_tc_inbound prog_tc_strict prog_tc_reply                    tc programs
//!     tcx_inbound_if<IFINDEX>        TCX ingress link on the uplink (set_inbound)
//!     tcx_strict_if<IFINDEX>         TCX egress link on an enrolled pod's host veth (set_strict)
//!     tcx_reply_if<IFINDEX>          TCX ingress link on an enrolled pod's host veth (set_strict)
//!   staging-<abi>-<pid>/            a set being built; renamed to <abi> once complete
//! ```
//! TCX links name interfaces by index, which is only meaningful in the agent's network
//! namespace: one pin dir serves one node netns. `Datapath::start` keeps `tcx_*` pins as they
//! are (they are the desired state of `set_inbound`/`set_strict`, which reconcile them); a
//! replacement set re-attaches its own programs to the same interfaces before the old set goes.
//! Removing a link pin detaches that link (nothing else keeps link fds open: `Datapath` holds
//! map fds only), and removal also issues `BPF_LINK_DETACH` so an fd some other process still
//! holds cannot keep a stale program attached.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{maps::MapData, programs::ProgramInfo};
use mesh_common as common;
use tracing::{debug, warn};

use super::{error::EbpfError, sys};

/// Symlink to the active set.
pub(crate) const CURRENT: &str = "current";
/// Prefix of a set under construction.
/// (bpffs refuses names that contain a dot: lookups of them fail with EPERM.)
pub(crate) const STAGING_PREFIX: &str = "staging-";
const LINK_PREFIX: &str = "link_";
/// Prefix of TCX link pins (`tcx_inbound_if<N>`, `tcx_strict_if<N>`).
pub(crate) const TCX_PREFIX: &str = "tcx_";

/// `enum bpf_map_type` values used here.
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;

/// `enum bpf_attach_type`: BPF_TCX_INGRESS, BPF_TCX_EGRESS.
pub(crate) const BPF_TCX_INGRESS: u32 = 46;
pub(crate) const BPF_TCX_EGRESS: u32 = 47;

/// The ABI directory name of an object: 16 hex digits of its FNV-1a 64 hash.
pub(crate) fn abi_of(object: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in object {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The programs of the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prog {
    Connect4,
    Connect6,
    SockOps,
    Getsockopt,
    TcInbound,
    TcStrict,
    TcReply,
}

impl Prog {
    /// Every program of the set (loaded, pinned and checked together).
    pub(crate) const ALL: [Prog; 7] = [
        Prog::Connect4,
        Prog::Connect6,
        Prog::SockOps,
        Prog::Getsockopt,
        Prog::TcInbound,
        Prog::TcStrict,
        Prog::TcReply,
    ];
    /// The tc programs (TCX links, one pin per interface).
    pub(crate) const TC: [Prog; 3] = [Prog::TcInbound, Prog::TcStrict, Prog::TcReply];
    /// The programs `Datapath::start` attaches to cgroups.
    pub(crate) const CGROUP: [Prog; 4] = [Prog::Connect4, Prog::Connect6, Prog::SockOps, Prog::Getsockopt];

    /// ELF symbol name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Prog::Connect4 => common::PROG_CONNECT4,
            Prog::Connect6 => common::PROG_CONNECT6,
            Prog::SockOps => common::PROG_SOCK_OPS,
            Prog::Getsockopt => common::PROG_GETSOCKOPT,
            Prog::TcInbound => common::PROG_TC_INBOUND,
            Prog::TcStrict => common::PROG_TC_STRICT,
            Prog::TcReply => common::PROG_TC_REPLY,
        }
    }

    pub(crate) fn pin_name(self) -> &'static str {
        match self {
            Prog::Connect4 => "prog_connect4",
            Prog::Connect6 => "prog_connect6",
            Prog::SockOps => "prog_sock_ops",
            Prog::Getsockopt => "prog_getsockopt",
            Prog::TcInbound => "prog_tc_inbound",
            Prog::TcStrict => "prog_tc_strict",
            Prog::TcReply => "prog_tc_reply",
        }
    }

    pub(crate) fn link_stem(self) -> &'static str {
        match self {
            Prog::Connect4 => "link_connect4",
            Prog::Connect6 => "link_connect6",
            Prog::SockOps => "link_sock_ops",
            Prog::Getsockopt => "link_getsockopt",
            Prog::TcInbound => "tcx_inbound",
            Prog::TcStrict => "tcx_strict",
            Prog::TcReply => "tcx_reply",
        }
    }

    /// `enum bpf_prog_type`.
    fn prog_type(self) -> u32 {
        match self {
            Prog::Connect4 | Prog::Connect6 => 18, // BPF_PROG_TYPE_CGROUP_SOCK_ADDR
            Prog::SockOps => 13,                   // BPF_PROG_TYPE_SOCK_OPS
            Prog::Getsockopt => 25,                // BPF_PROG_TYPE_CGROUP_SOCKOPT
            Prog::TcInbound | Prog::TcStrict | Prog::TcReply => 3, // BPF_PROG_TYPE_SCHED_CLS
        }
    }

    /// `enum bpf_attach_type`.
    pub(crate) fn attach_type(self) -> u32 {
        match self {
            Prog::Connect4 => 10,   // BPF_CGROUP_INET4_CONNECT
            Prog::Connect6 => 11,   // BPF_CGROUP_INET6_CONNECT
            Prog::SockOps => 3,     // BPF_CGROUP_SOCK_OPS
            Prog::Getsockopt => 21, // BPF_CGROUP_GETSOCKOPT
            Prog::TcInbound | Prog::TcReply => BPF_TCX_INGRESS,
            Prog::TcStrict => BPF_TCX_EGRESS,
        }
    }

    /// The pin name of this (tc) program's TCX link on interface `ifindex`.
    pub(crate) fn tc_pin_name(self, ifindex: u32) -> String {
        format!("{}_if{ifindex}", self.link_stem())
    }
}

/// The (tc program, ifindex) a TCX link pin name stands for.
pub(crate) fn parse_tc_pin(name: &str) -> Option<(Prog, u32)> {
    Prog::TC.into_iter().find_map(|prog| {
        let index = name.strip_prefix(prog.link_stem())?.strip_prefix("_if")?;
        let ifindex: u32 = index.parse().ok().filter(|i| *i > 0)?;
        (prog.tc_pin_name(ifindex) == name).then_some((prog, ifindex))
    })
}

/// A TCX link pin of a set directory.
#[derive(Clone, Debug)]
pub(crate) struct TcPin {
    pub prog: Prog,
    pub ifindex: u32,
    pub path: PathBuf,
}

/// The TCX link pins in `dir`, sorted by name.
pub(crate) fn tc_pins(dir: &Path) -> Result<Vec<TcPin>, EbpfError> {
    Ok(list(dir)?
        .into_iter()
        .filter_map(|path| {
            let (prog, ifindex) = parse_tc_pin(path.file_name()?.to_str()?)?;
            Some(TcPin { prog, ifindex, path })
        })
        .collect())
}

/// Whether the TCX link pinned at `path` is attached to `ifindex` as `prog`'s hook, running
/// program `prog_id`. `Err` is why not.
pub(crate) fn check_tc_link(path: &Path, prog: Prog, ifindex: u32, prog_id: u32) -> Result<(), String> {
    let fd = sys::obj_get(path).map_err(|e| format!("cannot open: {e}"))?;
    if sys::obj_kind(&fd) != sys::ObjKind::Link {
        return Err("not a link".into());
    }
    let info = sys::tcx_link_info(&fd).map_err(|e| format!("link info: {e}"))?;
    if info.link_type != sys::BPF_LINK_TYPE_TCX {
        return Err(format!("link type {} is not a TCX link", info.link_type));
    }
    if info.ifindex == 0 {
        return Err("defunct (its interface is gone)".into());
    }
    if info.ifindex != ifindex || info.attach_type != prog.attach_type() {
        return Err(format!(
            "attached to ifindex {} as {}, expected ifindex {ifindex} as {}",
            info.ifindex,
            info.attach_type,
            prog.attach_type()
        ));
    }
    if info.prog_id != prog_id {
        return Err(format!("runs program id {}, not this set's", info.prog_id));
    }
    Ok(())
}

/// The info of the TCX link pinned at `path`; `None` when it is not a TCX link or its interface
/// is gone.
pub(crate) fn tc_link_alive(path: &Path) -> Option<sys::TcxLinkInfo> {
    let fd = sys::obj_get(path).ok()?;
    if sys::obj_kind(&fd) != sys::ObjKind::Link {
        return None;
    }
    sys::tcx_link_info(&fd)
        .ok()
        .filter(|i| i.link_type == sys::BPF_LINK_TYPE_TCX && i.ifindex != 0)
}

/// A cgroup link the set must have.
#[derive(Clone, Debug)]
pub(crate) struct WantedLink {
    pub prog: Prog,
    pub cgroup_dir: PathBuf,
    pub cgroup_id: u64,
}

impl WantedLink {
    /// The cgroup id is part of the name, so a proxy restarted into another cgroup (a new
    /// DaemonSet pod) gets a new getsockopt link and the old one is recognised as unwanted.
    pub(crate) fn pin_name(&self) -> String {
        format!("{}_cg{}", self.prog.link_stem(), self.cgroup_id)
    }
}

struct MapSpec {
    name: &'static str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

const fn spec<K, V>(name: &'static str, map_type: u32, max_entries: u32) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        max_entries,
    }
}

const MAP_SPECS: [MapSpec; 11] = [
    spec::<u32, common::ProxyConfig>(common::MAP_CONFIG, BPF_MAP_TYPE_ARRAY, common::CONFIG_MAX_ENTRIES),
    spec::<u64, common::Enrollment>(
        common::MAP_ENROLLED,
        BPF_MAP_TYPE_HASH,
        common::ENROLLED_MAX_ENTRIES,
    ),
    spec::<u64, common::OrigDst>(
        common::MAP_COOKIE_DST,
        BPF_MAP_TYPE_LRU_HASH,
        common::COOKIE_DST_MAX_ENTRIES,
    ),
    spec::<common::SockKey, common::OrigDst>(
        common::MAP_TUPLE_DST,
        BPF_MAP_TYPE_LRU_HASH,
        common::TUPLE_DST_MAX_ENTRIES,
    ),
    spec::<u16, u8>(
        common::MAP_EXCL_PORTS,
        BPF_MAP_TYPE_HASH,
        common::EXCL_PORTS_MAX_ENTRIES,
    ),
    // LPM key: u32 prefix length + 16 address bytes.
    spec::<[u32; 5], u8>(
        common::MAP_EXCL_CIDRS,
        BPF_MAP_TYPE_LPM_TRIE,
        common::EXCL_CIDRS_MAX_ENTRIES,
    ),
    spec::<u32, u64>(
        common::MAP_COUNTERS,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        common::COUNTER_COUNT,
    ),
    spec::<[u32; 4], u32>(
        common::MAP_LOCAL_IPS,
        BPF_MAP_TYPE_HASH,
        common::LOCAL_IPS_MAX_ENTRIES,
    ),
    spec::<u32, common::TcConfig>(
        common::MAP_TC_CONFIG,
        BPF_MAP_TYPE_ARRAY,
        common::TC_CONFIG_MAX_ENTRIES,
    ),
    spec::<u32, common::PodGateway>(common::MAP_POD_GW, BPF_MAP_TYPE_HASH, common::POD_GW_MAX_ENTRIES),
    spec::<[u32; 4], u32>(
        common::MAP_DESTINATIONS,
        BPF_MAP_TYPE_HASH,
        common::DESTINATIONS_MAX_ENTRIES,
    ),
];

/// A pinned set whose maps and programs are present and consistent.
pub(crate) struct PinnedSet {
    pub maps: HashMap<&'static str, MapData>,
    prog_ids: HashMap<&'static str, u32>,
}

impl PinnedSet {
    /// Opens and checks the maps and programs pinned in `dir`. `Err` is the reason the set
    /// cannot be used as is.
    pub(crate) fn open(dir: &Path) -> Result<PinnedSet, String> {
        if !dir.is_dir() {
            return Err("no pinned set".into());
        }
        let mut maps = HashMap::new();
        let mut map_ids = HashMap::new();
        for spec in &MAP_SPECS {
            let path = dir.join(spec.name);
            let data = MapData::from_pin(&path).map_err(|e| format!("map {}: {e}", spec.name))?;
            let info = data.info().map_err(|e| format!("map {}: {e}", spec.name))?;
            let map_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
            let found = (map_type, info.key_size(), info.value_size(), info.max_entries());
            let want = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries);
            if found != want {
                return Err(format!(
                    "map {} is (type, key, value, entries) {found:?}, expected {want:?}",
                    spec.name
                ));
            }
            map_ids.insert(info.id(), spec.name);
            maps.insert(spec.name, data);
        }
        let counters_id = map_ids
            .iter()
            .find_map(|(id, name)| (*name == common::MAP_COUNTERS).then_some(*id))
            .unwrap_or_default();
        let mut prog_ids = HashMap::new();
        for prog in Prog::ALL {
            let path = dir.join(prog.pin_name());
            let info =
                ProgramInfo::from_pin(&path).map_err(|e| format!("program {}: {e}", prog.pin_name()))?;
            if info.program_type() as u32 != prog.prog_type() {
                return Err(format!("program {} has the wrong type", prog.pin_name()));
            }
            // Every program counts, and may only use this set's maps: a program from
            // another load would reference other map ids.
            let ids = info
                .map_ids()
                .map_err(|e| format!("program {}: {e}", prog.pin_name()))?
                .unwrap_or_default();
            if !ids.contains(&counters_id) || ids.iter().any(|id| !map_ids.contains_key(id)) {
                return Err(format!(
                    "program {} uses maps that are not this set's",
                    prog.pin_name()
                ));
            }
            prog_ids.insert(prog.name(), info.id());
        }
        Ok(PinnedSet { maps, prog_ids })
    }

    /// The kernel id of one of the set's programs.
    pub(crate) fn prog_id(&self, prog: Prog) -> u32 {
        self.prog_ids.get(prog.name()).copied().unwrap_or_default()
    }

    /// Whether the link pinned at `path` is attached, to the right cgroup, with this set's
    /// program. `Err` is why not.
    pub(crate) fn check_link(&self, path: &Path, want: &WantedLink) -> Result<(), String> {
        let fd = sys::obj_get(path).map_err(|e| format!("cannot open: {e}"))?;
        if sys::obj_kind(&fd) != sys::ObjKind::Link {
            return Err("not a link".into());
        }
        let info = sys::link_info(&fd).map_err(|e| format!("link info: {e}"))?;
        if info.link_type != sys::BPF_LINK_TYPE_CGROUP {
            return Err(format!("link type {} is not a cgroup link", info.link_type));
        }
        if info.cgroup_id == 0 {
            return Err("defunct (its cgroup is gone)".into());
        }
        if info.cgroup_id != want.cgroup_id || info.attach_type != want.prog.attach_type() {
            return Err(format!(
                "attached to cgroup {} as {}, expected cgroup {} as {}",
                info.cgroup_id,
                info.attach_type,
                want.cgroup_id,
                want.prog.attach_type()
            ));
        }
        if self.prog_ids.get(want.prog.name()) != Some(&info.prog_id) {
            return Err(format!("runs program id {}, not this set's", info.prog_id));
        }
        Ok(())
    }
}

/// Link pins in `dir` that are not wanted.
pub(crate) fn unwanted_links(dir: &Path, wanted: &[WantedLink]) -> Result<Vec<PathBuf>, EbpfError> {
    let keep: BTreeSet<String> = wanted.iter().map(WantedLink::pin_name).collect();
    Ok(list(dir)?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(LINK_PREFIX) && !keep.contains(n))
        })
        .collect())
}

/// Whether `path` names a getsockopt link pin.
pub(crate) fn is_getsockopt_link(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(Prog::Getsockopt.link_stem()))
}

/// Whether the link pinned at `path` is still attached to a living cgroup.
pub(crate) fn link_alive(path: &Path) -> bool {
    sys::obj_get(path)
        .ok()
        .filter(|fd| sys::obj_kind(fd) == sys::ObjKind::Link)
        .and_then(|fd| sys::link_info(&fd).ok())
        .is_some_and(|info| info.cgroup_id != 0)
}

/// Entries of `dir`, sorted.
pub(crate) fn list(dir: &Path) -> Result<Vec<PathBuf>, EbpfError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(EbpfError::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| EbpfError::io(format!("listing {}", dir.display()), e))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

/// Removes one pin; a link is detached first (`BPF_LINK_DETACH`). Returns whether it was a link.
pub(crate) fn remove_pin(path: &Path) -> Result<bool, EbpfError> {
    let mut was_link = false;
    if let Ok(fd) = sys::obj_get(path) {
        if sys::obj_kind(&fd) == sys::ObjKind::Link {
            was_link = true;
            if let Err(e) = sys::link_detach(&fd) {
                // Already defunct links answer ENOLINK; unpinning below is what matters.
                debug!(path = %path.display(), error = %e, "BPF_LINK_DETACH failed");
            }
        }
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(was_link),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(was_link),
        Err(e) => Err(EbpfError::io(format!("removing pin {}", path.display()), e)),
    }
}

/// Removes a pin, a symlink, or a directory of them. Returns the number of links detached.
pub(crate) fn remove_tree(path: &Path) -> Result<usize, EbpfError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(EbpfError::io(format!("reading {}", path.display()), e)),
    };
    if meta.file_type().is_symlink() {
        fs::remove_file(path).map_err(|e| EbpfError::io(format!("removing {}", path.display()), e))?;
        return Ok(0);
    }
    if !meta.is_dir() {
        return remove_pin(path).map(usize::from);
    }
    // Links first, so programs stop running before their maps' pins go.
    let mut entries = list(path)?;
    entries.sort_by_key(|p| {
        !p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(LINK_PREFIX) || n.starts_with(TCX_PREFIX))
    });
    let mut detached = 0;
    for entry in entries {
        detached += remove_tree(&entry)?;
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(detached),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(detached),
        Err(e) => Err(EbpfError::io(format!("removing {}", path.display()), e)),
    }
}

/// The cgroup ids enrolled in other (stale) sets under `pin_dir`, so a replacement set
/// captures the same pods from its first moment. Best effort: unreadable sets are skipped.
pub(crate) fn enrolled_in(stale: &[PathBuf]) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    for dir in stale {
        let path = dir.join(common::MAP_ENROLLED);
        if !path.exists() {
            continue;
        }
        let read = || -> Result<Vec<u64>, String> {
            let data = MapData::from_pin(&path).map_err(|e| e.to_string())?;
            let info = data.info().map_err(|e| e.to_string())?;
            if info.key_size() != 8 {
                return Err(format!("key size {}", info.key_size()));
            }
            // The value layout may differ between versions: read keys only.
            sys::map_keys_u64(data.fd().as_fd()).map_err(|e| e.to_string())
        };
        match read() {
            Ok(keys) => ids.extend(keys),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read enrolled cgroups of a stale set")
            }
        }
    }
    ids
}

/// What the tc programs of other (stale) sets under `pin_dir` were configured with: the local
/// pod addresses (map form) with their flags, and the marks, so a replacement set captures and
/// enforces the same from its first moment. Best effort: unreadable or differently shaped maps
/// are skipped.
pub(crate) fn tc_state_in(stale: &[PathBuf]) -> (BTreeMap<[u32; 4], u32>, Option<common::TcConfig>) {
    use aya::maps::{Array, Map};
    let ips = addr_map_in(stale, common::MAP_LOCAL_IPS);
    let mut config = None;
    for dir in stale {
        let path = dir.join(common::MAP_TC_CONFIG);
        if config.is_none() && path.exists() {
            let read = || -> Result<common::TcConfig, String> {
                let data = MapData::from_pin(&path).map_err(|e| e.to_string())?;
                let info = data.info().map_err(|e| e.to_string())?;
                if info.value_size() as usize != size_of::<common::TcConfig>() {
                    return Err(format!("value size {}", info.value_size()));
                }
                let map = Map::from_map_data(data).map_err(|e| e.to_string())?;
                let map = Array::<MapData, common::TcConfig>::try_from(map).map_err(|e| e.to_string())?;
                map.get(&0, 0).map_err(|e| e.to_string())
            };
            match read() {
                Ok(cfg) if cfg.flags & common::TC_CONFIG_SET != 0 => config = Some(cfg),
                Ok(_) => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot read the tc config of a stale set")
                }
            }
        }
    }
    (ips, config)
}

/// The mesh destinations (map form, with their flags) of other (stale) sets, so a replacement
/// set captures the same destinations from its first moment. Best effort, like [`tc_state_in`].
pub(crate) fn destinations_in(stale: &[PathBuf]) -> BTreeMap<[u32; 4], u32> {
    addr_map_in(stale, common::MAP_DESTINATIONS)
}

/// The union of the address → flags map `name` (16-byte keys, u32 values) over `stale` sets.
/// Sets without it, or with another shape, are skipped.
fn addr_map_in(stale: &[PathBuf], name: &str) -> BTreeMap<[u32; 4], u32> {
    use aya::maps::{HashMap as AyaHashMap, Map};
    let mut out = BTreeMap::new();
    for dir in stale {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let read = || -> Result<Vec<([u32; 4], u32)>, String> {
            let data = MapData::from_pin(&path).map_err(|e| e.to_string())?;
            let info = data.info().map_err(|e| e.to_string())?;
            if (info.key_size(), info.value_size()) != (16, 4) {
                return Err(format!(
                    "key/value size {}/{}",
                    info.key_size(),
                    info.value_size()
                ));
            }
            let map = Map::from_map_data(data).map_err(|e| e.to_string())?;
            let map = AyaHashMap::<MapData, [u32; 4], u32>::try_from(map).map_err(|e| e.to_string())?;
            map.iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
        };
        match read() {
            Ok(entries) => out.extend(entries),
            Err(e) => {
                warn!(path = %path.display(), error = %e, map = name, "cannot read a map of a stale set")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_is_16_hex_digits_and_content_sensitive() {
        let a = abi_of(b"one");
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, abi_of(b"two"));
        assert_eq!(abi_of(b""), "cbf29ce484222325");
    }

    #[test]
    fn tc_pin_names_round_trip() {
        assert_eq!(Prog::TcInbound.tc_pin_name(2), "tcx_inbound_if2");
        assert_eq!(Prog::TcStrict.tc_pin_name(17), "tcx_strict_if17");
        assert_eq!(parse_tc_pin("tcx_inbound_if2"), Some((Prog::TcInbound, 2)));
        assert_eq!(parse_tc_pin("tcx_strict_if17"), Some((Prog::TcStrict, 17)));
        for bad in [
            "tcx_strict_if0",
            "tcx_strict_if",
            "tcx_strict_if07",
            "tcx_other_if3",
            "link_connect4_cg1",
        ] {
            assert_eq!(parse_tc_pin(bad), None, "{bad}");
        }
    }

    #[test]
    fn link_names_carry_the_cgroup_id() {
        let w = WantedLink {
            prog: Prog::Getsockopt,
            cgroup_dir: PathBuf::from("/x"),
            cgroup_id: 42,
        };
        assert_eq!(w.pin_name(), "link_getsockopt_cg42");
    }
}
