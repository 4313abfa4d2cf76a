//! Loading, attaching and pinning the capture programs, and access to their maps.
//!
//! [`Datapath::start`] makes the kernel state match this binary's programs and the given
//! config, re-using what an earlier agent pinned whenever it is this very object and still
//! valid, so an agent restart never stops capture. Pin layout: see `pins.rs`.
//!
//! Replacing a stale set (another version, a partial or corrupt set) is make-before-break: the
//! new set is loaded into a staging dir, its maps filled (config, exclusions, and the enrolled
//! cgroups and mesh destinations of the set it replaces), its links attached, and only then are
//! the old pins removed (which detaches the old links). While both are attached, the two
//! compose: cgroup programs of one attach point run in attach order, so the old connect program
//! rewrites first and the new one then sees the proxy's own address and leaves it; a new set
//! with no mesh destinations to carry over captures every destination until the agent first
//! writes them (`CONFIG_CAPTURE_ALL`). Each set's sock_ops and getsockopt only answer from their
//! own maps and leave a miss untouched. `BPF_LINK_UPDATE` was not used: it swaps one program in
//! place but cannot carry the old set's map contents, and a set can differ in shape (number of
//! programs, maps) between versions.
//!
//! Inbound capture and STRICT enforcement are tc programs on interfaces of the node's network
//! namespace, attached as TCX links: [`Datapath::set_inbound`] (ingress of the uplink) and
//! [`Datapath::set_strict`] (egress of enrolled pods' host-side veths, failing closed, and their
//! ingress, where pods' replies to the proxy's transparent sockets are marked) reconcile
//! their link pins against a desired state, like `set_enrolled` does for the map. `start` never
//! removes those pins (a restart keeps them attached, untouched); a replacement set attaches its own tc
//! programs to the same interfaces, with the old set's marks and pod addresses, before the old
//! set is removed. The tc programs read their marks and the preserve-source switch from
//! `mesh_tc_config` ([`Marks`], [`Datapath::set_tc`]); the policy routing that completes inbound
//! capture and brings replies back is in `crate::netlink`.

mod attach;
mod cgroup;
mod error;
mod inspect;
mod maps;
mod marks;
mod pins;
mod preflight;
mod preflight_source;
mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use tracing::{debug, info, warn};

pub use cgroup::{cgroup2_mount_point, cgroup_id, own_cgroup};
pub use error::EbpfError;
pub use inspect::{MapFill, ProgramLink};
pub use marks::Marks;
pub use mesh_common::{ProxyConfig, TcConfig, COUNTER_NAMES, DESTINATIONS_MAX_ENTRIES};
pub use preflight::preflight;
pub use preflight_source::{preflight_source, MissingFeature};

use pins::{PinnedSet, Prog, WantedLink};

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// What the datapath should look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Default /sys/fs/bpf/mesh (the caller passes it). Must be a directory inside a bpffs.
    pub pin_dir: PathBuf,
    /// cgroup v2 dir: connect4/connect6/sock_ops attach here.
    pub pods_cgroup: PathBuf,
    /// cgroup v2 dir of the proxy process: getsockopt attaches here.
    pub proxy_cgroup: PathBuf,
    pub proxy_ipv4: Option<Ipv4Addr>,
    pub proxy_ipv6: Option<Ipv6Addr>,
    pub outbound_port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    /// Port of the proxy's inbound plaintext listener, where plaintext to PERMISSIVE pods is
    /// steered (0: not steered).
    pub inbound_plain_port: u16,
}

/// What `set_enrolled` changed (cgroup ids, ascending).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrollDiff {
    pub added: Vec<u64>,
    pub removed: Vec<u64>,
}

/// What `set_destinations` changed (ascending; IPv4 as IPv4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationsDiff {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// Desired destinations that did not fit in the map (`DESTINATIONS_MAX_ENTRIES`): connects
    /// to them are not captured.
    pub left_out: usize,
}

/// Why an address is a mesh destination (`mesh_dests` values; both may be set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestKind {
    pub service_vip: bool,
    pub workload: bool,
}

impl DestKind {
    fn flags(self) -> u32 {
        let mut f = 0;
        if self.service_vip {
            f |= mesh_common::DEST_SERVICE_VIP;
        }
        if self.workload {
            f |= mesh_common::DEST_WORKLOAD;
        }
        f
    }

    fn from_flags(f: u32) -> DestKind {
        DestKind {
            service_vip: f & mesh_common::DEST_SERVICE_VIP != 0,
            workload: f & mesh_common::DEST_WORKLOAD != 0,
        }
    }
}

/// A pod's mTLS mode, as far as the kernel is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// mTLS from the mesh, and plain TCP from outside it: plaintext from pods that are not
    /// enrolled and from other hosts is steered to the proxy's inbound plaintext listener,
    /// where policy applies with no authenticated principal. `policed`: an AuthorizationPolicy
    /// selects the pod, so plaintext the steering did not see (bridged from a pod, DNAT'd by
    /// the node) is dropped at its veth rather than let around the policy.
    Permissive { policed: bool },
    /// A connection into the pod must come from the node proxy (its mark); others' SYNs are
    /// dropped at the pod's host-side veth. (A PERMISSIVE pod's veth also admits SYNs from the
    /// node's own sockets.)
    Strict,
}

/// Which STRICT links [`Datapath::set_strict`] leaves in place although their interface is not
/// among the ones it was given: the last known interfaces of STRICT pods whose interface could
/// not be found this time. Enforcement fails closed: a link goes only when its pod is known to
/// be elsewhere, no longer STRICT, or gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keep {
    /// The links on these interfaces.
    Only(BTreeSet<u32>),
    /// Every link: a STRICT pod was not found and where it was is unknown (after a restart).
    All,
}

impl Keep {
    fn contains(&self, ifindex: u32) -> bool {
        match self {
            Keep::Only(set) => set.contains(&ifindex),
            Keep::All => true,
        }
    }
}

/// An interface by index, with its name when it still exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub ifindex: u32,
    pub name: Option<String>,
}

/// What `set_inbound` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboundDiff {
    /// Local pod addresses added to / removed from the capture map (ascending, map form: an
    /// IPv4 address given as `::ffff:a.b.c.d` is reported as IPv4).
    pub ips_added: Vec<IpAddr>,
    pub ips_removed: Vec<IpAddr>,
    /// Whether the uplink's ingress link was attached now (false: a valid one was re-used).
    pub attached: bool,
    /// Inbound links detached from other interfaces (the uplink changed).
    pub detached: Vec<Iface>,
}

/// What `set_strict` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StrictDiff {
    /// Interfaces whose egress link was attached now (ascending by index).
    pub attached: Vec<Iface>,
    /// Interfaces whose link was detached (no longer STRICT, or gone).
    pub detached: Vec<Iface>,
    /// Interfaces not asked for whose live link stays ([`Keep`]).
    pub kept: Vec<Iface>,
    /// Interfaces asked for that do not exist in this network namespace → why. Retried on the
    /// next call; not an error, like an enrolled pod whose cgroup is not there yet.
    pub unresolved: BTreeMap<u32, String>,
}

/// Which tc program a TCX link runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TcKind {
    Inbound,
    Strict,
    Reply,
}

/// A pinned TCX link of the active set, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcLink {
    pub kind: TcKind,
    /// The interface the pin was made for.
    pub ifindex: u32,
    pub name: Option<String>,
    /// `None` when the pin no longer holds a live TCX link (e.g. the interface is gone).
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
}

/// The running datapath: handles to the pinned maps. It holds no program or link fds, so
/// dropping it (or the process exiting) changes nothing in the kernel.
pub struct Datapath {
    dir: PathBuf,
    abi: String,
    reused: bool,
    links_attached: usize,
    tc_links_carried: usize,
    maps: maps::Maps,
    /// Kernel ids of this set's tc programs.
    tc_prog_ids: [(Prog, u32); 3],
    marks: Option<Marks>,
    /// `TC_PRESERVE_SOURCE` as written with the marks.
    preserve_source: bool,
}

impl fmt::Debug for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datapath")
            .field("dir", &self.dir)
            .field("abi", &self.abi)
            .field("reused", &self.reused)
            .field("links_attached", &self.links_attached)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Pre-flight checks, then re-use valid pins or load+attach+pin; writes config and
    /// exclusions (desired state replaces what is in the maps).
    pub fn start(cfg: &DatapathConfig) -> Result<Datapath, EbpfError> {
        preflight(cfg)?;
        let pods_id = cgroup_id(&cfg.pods_cgroup)?;
        let proxy_id = cgroup_id(&cfg.proxy_cgroup)?;
        let pin_dir = &cfg.pin_dir;
        fs::create_dir_all(pin_dir)
            .map_err(|e| EbpfError::io(format!("creating {}", pin_dir.display()), e))?;
        // One agent at a time rearranges pins (e.g. old and new pod during a rollout).
        let _lock = sys::FileLock::exclusive(pin_dir)
            .map_err(|e| EbpfError::io(format!("locking {}", pin_dir.display()), e))?;

        let abi = pins::abi_of(OBJECT);
        let dir = pin_dir.join(&abi);
        let wanted = wanted_links(cfg, pods_id, proxy_id);

        let (mut set, set_dir, staging) = match PinnedSet::open(&dir) {
            Ok(set) => (set, dir.clone(), None),
            Err(reason) => {
                if dir.exists() {
                    warn!(dir = %dir.display(), %reason, "pinned set unusable, building a new one");
                } else {
                    info!(dir = %dir.display(), "no pinned set for this build, loading");
                }
                let staging = Staging::create(pin_dir, &abi)?;
                attach::load_and_pin(OBJECT, &staging.path)?;
                let set = PinnedSet::open(&staging.path).map_err(|err| EbpfError::Aya {
                    action: "checking the freshly pinned set".into(),
                    err,
                })?;
                (set, staging.path.clone(), Some(staging))
            }
        };
        let reused = staging.is_none();
        let tc_prog_ids = [
            (Prog::TcInbound, set.prog_id(Prog::TcInbound)),
            (Prog::TcStrict, set.prog_id(Prog::TcStrict)),
            (Prog::TcReply, set.prog_id(Prog::TcReply)),
        ];
        let mut maps = maps::Maps::new(std::mem::take(&mut set.maps))?;
        maps.apply_config(cfg, proxy_id)?;

        // Everything else under pin_dir is stale: other builds, leftovers of failed starts.
        let stale: Vec<PathBuf> = pins::list(pin_dir)?
            .into_iter()
            .filter(|p| p != &dir && p != &set_dir && p.file_name() != Some(pins::CURRENT.as_ref()))
            .collect();
        let mut previous = stale.clone();
        previous.push(dir.clone());
        if !reused {
            // Capture the same pods from the first moment the new programs are attached.
            let carried = pins::enrolled_in(&previous);
            if !carried.is_empty() {
                maps.add_enrolled(&carried)?;
                info!(
                    count = carried.len(),
                    "carried enrolled cgroups over from the replaced set"
                );
            }
            let (ips, tc_config) = pins::tc_state_in(&previous);
            if !ips.is_empty() {
                maps.add_local_ips(ips.iter())?;
                info!(
                    count = ips.len(),
                    "carried local pod addresses over from the replaced set"
                );
            }
            if let Some(tc_config) = tc_config {
                maps.set_tc_config(tc_config)?;
            }
            let dests = pins::destinations_in(&previous);
            if dests.is_empty() {
                // Nothing known of what the mesh serves (a first install, or an upgrade from a
                // version that captured everything): capture everything until the agent knows.
                maps.set_capture_all(true)?;
            } else {
                maps.add_destinations(&dests)?;
                info!(
                    count = dests.len(),
                    "carried mesh destinations over from the replaced set"
                );
            }
        }

        let links_attached = ensure_links(&set, &set_dir, &wanted)?;
        let tc_links_carried = if reused {
            0
        } else {
            carry_tc_links(&set, &set_dir, &previous)?
        };

        // The new set is complete and attached: now remove what it replaces.
        if let Some(staging) = staging {
            if fs::symlink_metadata(&dir).is_ok() {
                let detached = pins::remove_tree(&dir)?;
                warn!(dir = %dir.display(), links_detached = detached, "replaced unusable pinned set");
            }
            staging.commit(&dir)?;
        }
        for path in &stale {
            let detached = pins::remove_tree(path)?;
            warn!(path = %path.display(), links_detached = detached, "removed stale pins");
        }
        point_current(pin_dir, &abi);

        let tc = Marks::from_tc_config(&maps.tc_config()?);
        let (marks, preserve_source) = (tc.map(|(m, _)| m), tc.is_some_and(|(_, on)| on));
        info!(
            dir = %dir.display(),
            reused,
            links_attached,
            tc_links_carried,
            pods_cgroup = pods_id,
            proxy_cgroup = proxy_id,
            "eBPF datapath ready"
        );
        Ok(Datapath {
            dir,
            abi,
            reused,
            links_attached,
            tc_links_carried,
            maps,
            tc_prog_ids,
            marks,
            preserve_source,
        })
    }

    /// A second handle on the same pinned set, with map handles of its own, for readers (the
    /// metrics scrape, the admin API): they never wait for the reconcile loop, which owns the
    /// first handle and holds it for a whole round.
    pub fn reopen(&self) -> Result<Datapath, EbpfError> {
        let mut set = PinnedSet::open(&self.dir).map_err(|err| EbpfError::Aya {
            action: format!("re-opening the pinned set {}", self.dir.display()),
            err,
        })?;
        Ok(Datapath {
            dir: self.dir.clone(),
            abi: self.abi.clone(),
            reused: self.reused,
            links_attached: self.links_attached,
            tc_links_carried: self.tc_links_carried,
            maps: maps::Maps::new(std::mem::take(&mut set.maps))?,
            tc_prog_ids: self.tc_prog_ids,
            marks: self.marks,
            preserve_source: self.preserve_source,
        })
    }

    /// Make mesh_enrolled equal `desired` (cgroup ids); returns what changed.
    pub fn set_enrolled(&mut self, desired: &BTreeSet<u64>) -> Result<EnrollDiff, EbpfError> {
        let diff = self.maps.set_enrolled(desired)?;
        if !diff.added.is_empty() || !diff.removed.is_empty() {
            debug!(added = ?diff.added, removed = ?diff.removed, "enrolled cgroups changed");
        }
        Ok(diff)
    }

    pub fn enrolled(&self) -> Result<BTreeSet<u64>, EbpfError> {
        self.maps.enrolled()
    }

    /// Makes `mesh_dests` equal `desired`: the addresses the mesh serves, the only ones an
    /// enrolled pod's connect is captured to from now on. More than the map holds are reported in
    /// [`DestinationsDiff::left_out`], not failed.
    pub fn set_destinations(
        &mut self,
        desired: &BTreeMap<IpAddr, DestKind>,
    ) -> Result<DestinationsDiff, EbpfError> {
        let flags = desired.iter().map(|(ip, k)| (*ip, k.flags())).collect();
        let diff = self.maps.set_destinations(&flags)?;
        if self.maps.set_capture_all(false)? {
            info!(
                destinations = desired.len() - diff.left_out,
                "outbound capture limited to the mesh destinations"
            );
        }
        Ok(diff)
    }

    /// Whether outbound capture is limited to the mesh destinations: false until the first
    /// [`Datapath::set_destinations`] on a set that had none to carry over (every destination
    /// is captured meanwhile).
    pub fn destinations_known(&self) -> Result<bool, EbpfError> {
        Ok(self.maps.proxy_config()?.flags & mesh_common::CONFIG_CAPTURE_ALL == 0)
    }

    /// The mesh destinations as the kernel programs see them (IPv4 as IPv4).
    pub fn destinations(&self) -> Result<BTreeMap<IpAddr, DestKind>, EbpfError> {
        Ok(self
            .maps
            .destinations()?
            .into_iter()
            .map(|(ip, f)| (ip, DestKind::from_flags(f)))
            .collect())
    }

    /// Every counter of `mesh_counters` by name, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, EbpfError> {
        self.maps.counters()
    }

    /// True when this start re-used an already loaded and pinned set (no program was loaded).
    /// Links for a cgroup that changed (e.g. a proxy restarted into a new pod cgroup) may
    /// still have been attached: see [`Datapath::links_attached`].
    pub fn reused_pins(&self) -> bool {
        self.reused
    }

    /// How many cgroup links this start attached (0 on a plain restart).
    pub fn links_attached(&self) -> usize {
        self.links_attached
    }

    /// The directory of the active set (`<pin_dir>/<abi>`; `<pin_dir>/current` links to it).
    pub fn pin_path(&self) -> &Path {
        &self.dir
    }

    /// The ABI id of the embedded programs (the set's directory name).
    pub fn abi(&self) -> &str {
        &self.abi
    }

    /// The original destination of a captured connection, looked up the way the proxy sees
    /// it: `peer` and `local` are the accepted socket's peer and local addresses. The same
    /// answer `getsockopt(SO_ORIGINAL_DST)` gives in the proxy's cgroup.
    pub fn original_dst(&self, peer: SocketAddr, local: SocketAddr) -> Result<Option<SocketAddr>, EbpfError> {
        self.maps.original_dst(peer, local)
    }

    /// The proxy config as the kernel programs see it.
    pub fn proxy_config(&self) -> Result<ProxyConfig, EbpfError> {
        self.maps.proxy_config()
    }

    /// Excluded ports and CIDRs as the kernel programs see them.
    pub fn exclusions(&self) -> Result<(BTreeSet<u16>, BTreeSet<IpNet>), EbpfError> {
        self.maps.exclusions()
    }

    /// Writes the marks the tc programs use. Until the first call on a set, its tc programs
    /// change nothing (no capture mark, no STRICT drop). A restarted agent finds the marks of the
    /// previous one already in place ([`Datapath::marks`]) and should call this again with its
    /// own config.
    pub fn set_marks(&mut self, marks: Marks) -> Result<(), EbpfError> {
        self.set_tc(marks, self.preserve_source)
    }

    /// [`Datapath::set_marks`], and whether the proxy connects from clients' own addresses
    /// (`--preserve-source`): only then do the tc programs look for its transparent sockets.
    pub fn set_tc(&mut self, marks: Marks, preserve_source: bool) -> Result<(), EbpfError> {
        marks.validate().map_err(EbpfError::InvalidMarks)?;
        if self.marks != Some(marks) || self.preserve_source != preserve_source {
            self.maps.set_tc_config(marks.tc_config(preserve_source))?;
            info!(
                capture = format_args!("{:#x}", marks.capture),
                proxy = format_args!("{:#x}", marks.proxy),
                reply = format_args!("{:#x}", marks.reply),
                preserve_source,
                "tc config set"
            );
        }
        self.marks = Some(marks);
        self.preserve_source = preserve_source;
        Ok(())
    }

    /// The marks the tc programs use, if set.
    pub fn marks(&self) -> Option<Marks> {
        self.marks
    }

    /// Inbound capture: makes the set of local pod addresses whose HBONE port (15008) is
    /// captured equal the keys of `local_pods`, steers plaintext to those whose mode is
    /// [`Mode::Permissive`] to the inbound plaintext listener (on the uplink, and from local
    /// pods outside the mesh through connect4/6), and ensures exactly one inbound link, on the
    /// TCX ingress of `uplink` (an interface of this thread's network namespace). A valid link is re-used;
    /// a link on another interface (the uplink changed) is detached after the new one is
    /// attached. Addresses are added before the link is attached, so the first packet after
    /// the attach is already captured. Needs [`Datapath::set_marks`] first.
    ///
    /// This is the kernel half of inbound capture: the packets it marks are delivered locally
    /// only with the rule and route of `crate::netlink::ensure_capture_routing`, to a listener
    /// made by `crate::proxy::listener::bind_transparent`.
    pub fn set_inbound(
        &mut self,
        uplink: &str,
        local_pods: &BTreeMap<IpAddr, Mode>,
    ) -> Result<InboundDiff, EbpfError> {
        if self.marks.is_none() {
            return Err(EbpfError::MarksNotSet);
        }
        let ifindex = sys::if_nametoindex(uplink).map_err(|_| EbpfError::InterfaceNotFound {
            role: "uplink",
            name: uplink.to_string(),
        })?;
        let _lock = self.lock()?;
        let flags = local_pods
            .iter()
            .map(|(ip, mode)| (*ip, local_ip_flags(*mode)))
            .collect();
        let (ips_added, ips_removed) = self.maps.set_local_ips(&flags)?;
        let attached = self.ensure_tc_link(Prog::TcInbound, ifindex)?;
        let mut detached = Vec::new();
        for pin in pins::tc_pins(&self.dir)? {
            if pin.prog == Prog::TcInbound && pin.ifindex != ifindex {
                pins::remove_pin(&pin.path)?;
                detached.push(iface(pin.ifindex));
            }
        }
        let diff = InboundDiff {
            ips_added,
            ips_removed,
            attached,
            detached,
        };
        if diff != InboundDiff::default() {
            info!(
                uplink,
                ifindex,
                added = ?diff.ips_added,
                removed = ?diff.ips_removed,
                attached = diff.attached,
                detached = ?diff.detached,
                "inbound capture updated"
            );
        }
        Ok(diff)
    }

    /// Stops inbound capture: detaches every inbound link and empties the address map.
    /// Returns the interfaces detached from.
    pub fn remove_inbound(&mut self) -> Result<Vec<Iface>, EbpfError> {
        let _lock = self.lock()?;
        let mut detached = Vec::new();
        for pin in pins::tc_pins(&self.dir)? {
            if pin.prog == Prog::TcInbound {
                pins::remove_pin(&pin.path)?;
                detached.push(iface(pin.ifindex));
            }
        }
        self.maps.set_local_ips(&BTreeMap::new())?;
        Ok(detached)
    }

    /// The local pod addresses inbound capture is on for (IPv4 as IPv4).
    pub fn local_ips(&self) -> Result<BTreeSet<IpAddr>, EbpfError> {
        Ok(self.maps.local_ips()?.into_keys().collect())
    }

    /// Pod-veth programs: enforcement (STRICT, and PERMISSIVE by the modes in the local-address
    /// map) on egress, and the delivery of pods' replies to the proxy's transparent sockets on
    /// ingress, attached to the host-side veths `veths`
    /// (interface indexes in this thread's network namespace). A link on another interface is
    /// detached unless `keep` holds it and it is still live; a link whose interface is gone is
    /// always removed. Valid links are re-used, so calling this again (or after a restart)
    /// attaches nothing twice. Interfaces that do not exist are reported in `unresolved`, not
    /// failed. Needs [`Datapath::set_marks`] first.
    pub fn set_strict(&mut self, veths: &BTreeSet<u32>, keep: &Keep) -> Result<StrictDiff, EbpfError> {
        if self.marks.is_none() {
            return Err(EbpfError::MarksNotSet);
        }
        let _lock = self.lock()?;
        let mut diff = StrictDiff::default();
        for &ifindex in veths {
            match sys::if_indextoname(ifindex) {
                Ok(_) => {
                    // Once per veth: its bridge does not change under it, and every round
                    // would otherwise cost a netlink exchange per pod.
                    if !self.maps.has_pod_gateway(ifindex) {
                        self.set_pod_gateway(ifindex);
                    }
                    // The reply program first: a pod is never enforced without it.
                    let reply = self.ensure_tc_link(Prog::TcReply, ifindex)?;
                    if self.ensure_tc_link(Prog::TcStrict, ifindex)? || reply {
                        diff.attached.push(iface(ifindex));
                    }
                }
                Err(e) => {
                    diff.unresolved
                        .insert(ifindex, format!("interface not found: {e}"));
                }
            }
        }
        for pin in pins::tc_pins(&self.dir)? {
            if pin.prog == Prog::TcInbound || veths.contains(&pin.ifindex) {
                continue;
            }
            let live = pins::tc_link_alive(&pin.path).is_some_and(|info| info.ifindex == pin.ifindex);
            if live && keep.contains(pin.ifindex) {
                if pin.prog == Prog::TcStrict {
                    diff.kept.push(iface(pin.ifindex));
                }
                continue;
            }
            pins::remove_pin(&pin.path)?;
            if pin.prog == Prog::TcStrict {
                diff.detached.push(iface(pin.ifindex));
            }
            if let Err(e) = self.maps.set_pod_gateway(pin.ifindex, None) {
                warn!(ifindex = pin.ifindex, error = %e, "clearing the pod gateway entry failed");
            }
        }
        if !diff.attached.is_empty() || !diff.detached.is_empty() {
            info!(attached = ?diff.attached, detached = ?diff.detached, "pod veth programs updated");
        }
        Ok(diff)
    }

    /// Keeps `mesh_pod_gw` right for a pod's veth. A failure costs only replies to the proxy's
    /// transparent sockets that the stack would not see, so it is logged, not fatal.
    fn set_pod_gateway(&mut self, ifindex: u32) {
        let result = crate::netlink::pod_gateway(ifindex)
            .map_err(|e| e.to_string())
            .and_then(|gw| self.maps.set_pod_gateway(ifindex, gw).map_err(|e| e.to_string()));
        if let Err(error) = result {
            warn!(ifindex, %error, "setting the pod gateway address failed");
        }
    }

    /// The TCX link pins of the active set, with what the kernel says about each (interface
    /// names as seen from the calling thread's network namespace).
    pub fn tc_links(&self) -> Result<Vec<TcLink>, EbpfError> {
        Ok(pins::tc_pins(&self.dir)?
            .into_iter()
            .map(|pin| {
                let info = pins::tc_link_alive(&pin.path);
                TcLink {
                    kind: match pin.prog {
                        Prog::TcInbound => TcKind::Inbound,
                        Prog::TcReply => TcKind::Reply,
                        _ => TcKind::Strict,
                    },
                    ifindex: pin.ifindex,
                    name: sys::if_indextoname(pin.ifindex).ok(),
                    link_id: info.map(|i| i.id),
                    prog_id: info.map(|i| i.prog_id),
                }
            })
            .collect())
    }

    /// How many TCX links this start attached to carry a replaced set's over (0 on a restart).
    pub fn tc_links_carried(&self) -> usize {
        self.tc_links_carried
    }

    /// Keeps a valid `prog` link on `ifindex`, else attaches one. Returns whether it attached.
    fn ensure_tc_link(&self, prog: Prog, ifindex: u32) -> Result<bool, EbpfError> {
        let path = self.dir.join(prog.tc_pin_name(ifindex));
        let prog_id = self.tc_prog_id(prog);
        if fs::symlink_metadata(&path).is_ok() {
            match pins::check_tc_link(&path, prog, ifindex, prog_id) {
                Ok(()) => return Ok(false),
                Err(reason) => {
                    warn!(link = %path.display(), %reason, "replacing invalid TCX link pin");
                    pins::remove_pin(&path)?;
                }
            }
        }
        attach::attach_tcx(prog, &self.dir, ifindex, &path)?;
        debug!(link = %path.display(), ifindex, "attached");
        Ok(true)
    }

    fn tc_prog_id(&self, prog: Prog) -> u32 {
        self.tc_prog_ids
            .iter()
            .find_map(|(p, id)| (*p == prog).then_some(*id))
            .unwrap_or_default()
    }

    /// The pin dir lock, and a check that this handle's set is still the one pinned.
    fn lock(&self) -> Result<sys::FileLock, EbpfError> {
        let pin_dir = self.dir.parent().unwrap_or(Path::new("/"));
        let lock = sys::FileLock::exclusive(pin_dir)
            .map_err(|e| EbpfError::io(format!("locking {}", pin_dir.display()), e))?;
        if !self.dir.is_dir() {
            return Err(EbpfError::SetReplaced {
                dir: self.dir.clone(),
            });
        }
        Ok(lock)
    }
}

/// The `mesh_local_ips` value of a pod in `mode`.
fn local_ip_flags(mode: Mode) -> u32 {
    match mode {
        Mode::Strict => mesh_common::LOCAL_IP_CAPTURE_INBOUND,
        Mode::Permissive { policed: false } => {
            mesh_common::LOCAL_IP_CAPTURE_INBOUND | mesh_common::LOCAL_IP_PERMISSIVE
        }
        Mode::Permissive { policed: true } => {
            mesh_common::LOCAL_IP_CAPTURE_INBOUND
                | mesh_common::LOCAL_IP_PERMISSIVE
                | mesh_common::LOCAL_IP_POLICED
        }
    }
}

fn iface(ifindex: u32) -> Iface {
    Iface {
        ifindex,
        name: sys::if_indextoname(ifindex).ok(),
    }
}

/// Attaches this set's tc programs to every interface a replaced set's live TCX links are on
/// (pinned under the same names), so inbound capture and STRICT enforcement never lapse while
/// the old set is removed. Returns how many links it attached.
fn carry_tc_links(set: &PinnedSet, set_dir: &Path, previous: &[PathBuf]) -> Result<usize, EbpfError> {
    let mut attached = 0;
    for dir in previous {
        for pin in pins::tc_pins(dir)? {
            if pins::tc_link_alive(&pin.path).is_none_or(|info| info.ifindex != pin.ifindex) {
                continue;
            }
            let path = set_dir.join(pin.prog.tc_pin_name(pin.ifindex));
            if fs::symlink_metadata(&path).is_ok() {
                if pins::check_tc_link(&path, pin.prog, pin.ifindex, set.prog_id(pin.prog)).is_ok() {
                    continue;
                }
                pins::remove_pin(&path)?;
            }
            attach::attach_tcx(pin.prog, set_dir, pin.ifindex, &path)?;
            info!(link = %path.display(), "carried TCX link over from the replaced set");
            attached += 1;
        }
    }
    Ok(attached)
}

/// Removes every pin under pin_dir, which detaches the programs (for `mesh-node uninstall`
/// and tests). A missing pin_dir is already uninstalled.
pub fn uninstall(pin_dir: &Path) -> Result<(), EbpfError> {
    if fs::symlink_metadata(pin_dir).is_err() {
        return Ok(());
    }
    // Never delete anything that is not a pin inside a bpffs.
    preflight::check_pin_dir(pin_dir)?;
    {
        let _lock = sys::FileLock::exclusive(pin_dir)
            .map_err(|e| EbpfError::io(format!("locking {}", pin_dir.display()), e))?;
        for path in pins::list(pin_dir)? {
            let detached = pins::remove_tree(&path)?;
            info!(path = %path.display(), links_detached = detached, "removed pins");
        }
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EbpfError::io(format!("removing {}", pin_dir.display()), e)),
    }
}

fn wanted_links(cfg: &DatapathConfig, pods_id: u64, proxy_id: u64) -> Vec<WantedLink> {
    Prog::CGROUP
        .into_iter()
        .map(|prog| {
            let (cgroup_dir, cgroup_id) = if prog == Prog::Getsockopt {
                (cfg.proxy_cgroup.clone(), proxy_id)
            } else {
                (cfg.pods_cgroup.clone(), pods_id)
            };
            WantedLink {
                prog,
                cgroup_dir,
                cgroup_id,
            }
        })
        .collect()
}

/// Keeps valid link pins, attaches the missing ones, then detaches links no longer wanted
/// (their cgroup changed). Returns how many links were attached.
fn ensure_links(set: &PinnedSet, dir: &Path, wanted: &[WantedLink]) -> Result<usize, EbpfError> {
    let mut attached = 0;
    for want in wanted {
        let path = dir.join(want.pin_name());
        if fs::symlink_metadata(&path).is_ok() {
            match set.check_link(&path, want) {
                Ok(()) => {
                    debug!(link = %path.display(), "re-using pinned link");
                    continue;
                }
                Err(reason) => {
                    warn!(link = %path.display(), %reason, "replacing invalid link pin");
                    pins::remove_pin(&path)?;
                }
            }
        }
        attach::attach(want.prog, dir, &want.cgroup_dir, &path)?;
        debug!(link = %path.display(), cgroup = %want.cgroup_dir.display(), "attached");
        attached += 1;
    }
    for path in pins::unwanted_links(dir, wanted)? {
        // The kernel runs cgroup sockopt programs for the *socket's* cgroup, and an accepted
        // socket inherits its listener's: a proxy still draining in its old cgroup (new
        // agent started alongside) keeps getting answers until that cgroup is gone.
        if pins::is_getsockopt_link(&path) && pins::link_alive(&path) {
            info!(link = %path.display(), "keeping the previous proxy cgroup's getsockopt link while that cgroup exists");
            continue;
        }
        pins::remove_pin(&path)?;
        warn!(link = %path.display(), "detached link whose cgroup is no longer configured");
    }
    Ok(attached)
}

/// `<pin_dir>/current` → `<abi>`, replaced atomically. Best effort: a convenience path for
/// other tools, not needed by the datapath.
fn point_current(pin_dir: &Path, abi: &str) {
    let current = pin_dir.join(pins::CURRENT);
    if fs::read_link(&current).is_ok_and(|t| t == Path::new(abi)) {
        return;
    }
    let tmp = pin_dir.join(format!("current-tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = std::os::unix::fs::symlink(abi, &tmp).and_then(|()| fs::rename(&tmp, &current));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        warn!(path = %current.display(), error = %e, "cannot point the `current` symlink at the active set");
    }
}

/// A set being built; removed (detaching anything it attached) unless committed.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(pin_dir: &Path, abi: &str) -> Result<Staging, EbpfError> {
        let path = pin_dir.join(format!("{}{abi}-{}", pins::STAGING_PREFIX, std::process::id()));
        pins::remove_tree(&path)?;
        fs::create_dir(&path).map_err(|e| EbpfError::io(format!("creating {}", path.display()), e))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    fn commit(mut self, dir: &Path) -> Result<(), EbpfError> {
        fs::rename(&self.path, dir).map_err(|e| {
            EbpfError::io(
                format!("renaming {} to {}", self.path.display(), dir.display()),
                e,
            )
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = pins::remove_tree(&self.path) {
                warn!(path = %self.path.display(), error = %e, "cannot remove an unfinished pinned set");
            }
        }
    }
}

// The agent moves the datapath into its reconcile task.
const _: fn() = || {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Datapath>();
    send_sync::<EbpfError>();
};
