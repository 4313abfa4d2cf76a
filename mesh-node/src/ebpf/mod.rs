//! Loading, attaching and pinning the capture programs, and access to their maps.
//!
//! [`Datapath::start`] makes the kernel state match this binary's programs and the given
//! config, re-using what an earlier agent pinned whenever it is this very object and still
//! valid, so an agent restart never stops capture. Pin layout: see `pins.rs`.
//!
//! Replacing a stale set (another version, a partial or corrupt set) is make-before-break: the
//! new set is loaded into a staging dir, its maps filled (config, exclusions, and the enrolled
//! cgroups of the set it replaces), its links attached, and only then are the old pins removed
//! (which detaches the old links). While both are attached, the two compose: cgroup programs
//! of one attach point run in attach order, so the old connect program rewrites first and the
//! new one then sees the proxy's own address and leaves it; each set's sock_ops and getsockopt
//! only answer from their own maps and leave a miss untouched. `BPF_LINK_UPDATE` was not used:
//! it swaps one program in place but cannot carry the old set's map contents, and a set can
//! differ in shape (number of programs, maps) between versions.

mod attach;
mod cgroup;
mod error;
mod maps;
mod pins;
mod preflight;
mod sys;

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use tracing::{debug, info, warn};

pub use cgroup::{cgroup2_mount_point, cgroup_id, own_cgroup};
pub use error::EbpfError;
pub use mesh_common::{ProxyConfig, COUNTER_NAMES};
pub use preflight::preflight;

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
}

/// What `set_enrolled` changed (cgroup ids, ascending).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrollDiff {
    pub added: Vec<u64>,
    pub removed: Vec<u64>,
}

/// The running datapath: handles to the pinned maps. It holds no program or link fds, so
/// dropping it (or the process exiting) changes nothing in the kernel.
pub struct Datapath {
    dir: PathBuf,
    abi: String,
    reused: bool,
    links_attached: usize,
    maps: maps::Maps,
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
        let mut maps = maps::Maps::new(std::mem::take(&mut set.maps))?;
        maps.apply_config(cfg)?;

        // Everything else under pin_dir is stale: other builds, leftovers of failed starts.
        let stale: Vec<PathBuf> = pins::list(pin_dir)?
            .into_iter()
            .filter(|p| p != &dir && p != &set_dir && p.file_name() != Some(pins::CURRENT.as_ref()))
            .collect();
        if !reused {
            // Capture the same pods from the first moment the new programs are attached.
            let mut previous = stale.clone();
            previous.push(dir.clone());
            let carried = pins::enrolled_in(&previous);
            if !carried.is_empty() {
                maps.add_enrolled(&carried)?;
                info!(
                    count = carried.len(),
                    "carried enrolled cgroups over from the replaced set"
                );
            }
        }

        let links_attached = ensure_links(&set, &set_dir, &wanted)?;

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

        info!(
            dir = %dir.display(),
            reused,
            links_attached,
            pods_cgroup = pods_id,
            proxy_cgroup = proxy_id,
            "eBPF datapath ready"
        );
        Ok(Datapath {
            dir,
            abi,
            reused,
            links_attached,
            maps,
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
    Prog::ALL
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
