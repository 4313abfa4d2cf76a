//! A pod's host-side veth, found from inside the pod's own network namespace: the interface
//! that holds the pod's address there, and its veth peer (`IFLA_LINK`), cross-checked from the
//! node's side. Neighbour and bridge forwarding entries are not used: any pod on the bridge can
//! rewrite them with a gratuitous ARP, and STRICT enforcement would follow the forgery.
//!
//! The namespace is reached through a process of the pod's cgroup (`/proc/<pid>/ns/net`; in
//! Kubernetes the sandbox's pause process is always there). A thread that enters another
//! namespace stays there, so the lookups run on a dedicated thread that ends with the round,
//! never on a pooled one.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::netlink::{self, NetlinkError, PodLink};

/// How deep below a pod's cgroup its processes are looked for (containers are one level down).
const MAX_DEPTH: usize = 3;

/// A pod to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// An address of the pod, as its own namespace holds it.
    pub ip: IpAddr,
}

#[derive(Debug, Error)]
pub enum VethError {
    #[error("no process in the pod's cgroup {0} to reach its network namespace through")]
    NoProcess(PathBuf),
    #[error("reading {path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("the pod shares the node's network namespace: it has no veth of its own")]
    NodeNamespace,
    #[error("entering the pod's network namespace: {0}")]
    Setns(io::Error),
    #[error("in the pod's network namespace: {0}")]
    InPod(NetlinkError),
    #[error("on the node: {0}")]
    OnNode(NetlinkError),
    #[error(
        "the pod's interface #{pod} names #{host} as its peer, but the node's #{host} is not its veth peer"
    )]
    NotPeers { pod: u32, host: u32 },
    #[error("the lookup thread failed: {0}")]
    Thread(String),
}

/// The ifindex, in the calling thread's network namespace, of each pod's host-side veth (keyed
/// like `pods`).
pub fn host_veths<K: Ord + Clone + Send + Sync>(
    pods: &BTreeMap<K, Pod>,
) -> BTreeMap<K, Result<u32, VethError>> {
    if pods.is_empty() {
        return BTreeMap::new();
    }
    let node_ns = match namespace_id(Path::new("/proc/thread-self/ns/net")) {
        Ok(id) => id,
        Err(e) => {
            let msg = e.to_string();
            return pods
                .keys()
                .map(|k| (k.clone(), Err(VethError::Thread(msg.clone()))))
                .collect();
        }
    };
    let inside = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("pod-netns".into())
            .spawn_scoped(s, || {
                pods.iter()
                    .map(|(k, pod)| (k.clone(), pod_side(pod, node_ns)))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
            .and_then(|t| t.join().map_err(|_| "panicked".to_owned()))
    });
    match inside {
        Ok(found) => found
            .into_iter()
            .map(|(k, r)| (k, r.and_then(node_side)))
            .collect(),
        Err(e) => pods
            .keys()
            .map(|k| (k.clone(), Err(VethError::Thread(e.clone()))))
            .collect(),
    }
}

/// On the lookup thread: enter the pod's namespace, read its interface and the peer's index.
fn pod_side(pod: &Pod, node_ns: (u64, u64)) -> Result<PodLink, VethError> {
    let ns = namespace_of(&pod.cgroup)?;
    let id = ns.metadata().map_err(|err| VethError::Io {
        path: pod.cgroup.clone(),
        err,
    })?;
    if (id.dev(), id.ino()) == node_ns {
        return Err(VethError::NodeNamespace);
    }
    // SAFETY: a plain syscall on an fd we own; it moves only this dedicated thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(VethError::Setns(io::Error::last_os_error()));
    }
    netlink::pod_link(pod.ip).map_err(VethError::InPod)
}

/// Back in the node's namespace: the peer must be a veth whose own peer is the pod's interface.
fn node_side(link: PodLink) -> Result<u32, VethError> {
    match netlink::veth_peer(link.peer_ifindex).map_err(VethError::OnNode)? {
        Some(peer) if peer == link.ifindex => Ok(link.peer_ifindex),
        _ => Err(VethError::NotPeers {
            pod: link.ifindex,
            host: link.peer_ifindex,
        }),
    }
}

/// The network namespace of a process of the cgroup `dir` (or of one below it).
fn namespace_of(dir: &Path) -> Result<File, VethError> {
    for pid in processes(dir, MAX_DEPTH)? {
        let Ok(ns) = File::open(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        // A pid read from the cgroup may have exited and been reused since: the namespace
        // counts only if the pid is still in the pod's cgroup after it was opened.
        if processes(dir, MAX_DEPTH)?.contains(&pid) {
            return Ok(ns);
        }
    }
    Err(VethError::NoProcess(dir.to_owned()))
}

/// The pids in `dir`'s `cgroup.procs` and in its subdirectories', up to `depth` levels.
fn processes(dir: &Path, depth: usize) -> Result<Vec<u32>, VethError> {
    let path = dir.join("cgroup.procs");
    let text = fs::read_to_string(&path).map_err(|err| VethError::Io { path, err })?;
    let mut pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    if depth > 1 {
        let children = fs::read_dir(dir).map_err(|err| VethError::Io {
            path: dir.to_owned(),
            err,
        })?;
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                // A container cgroup that vanished meanwhile has no processes to offer.
                pids.extend(processes(&child.path(), depth - 1).unwrap_or_default());
            }
        }
    }
    Ok(pids)
}

fn namespace_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_read_from_the_pod_and_its_containers() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("podx");
        fs::create_dir_all(pod.join("c1/deeper/too-deep")).unwrap();
        fs::write(pod.join("cgroup.procs"), "").unwrap();
        fs::write(pod.join("c1/cgroup.procs"), "12\n13\n").unwrap();
        fs::write(pod.join("c1/deeper/cgroup.procs"), "14\n").unwrap();
        fs::write(pod.join("c1/deeper/too-deep/cgroup.procs"), "15\n").unwrap();
        let mut pids = processes(&pod, MAX_DEPTH).unwrap();
        pids.sort_unstable();
        assert_eq!(pids, [12, 13, 14]);
        assert!(processes(&root.path().join("gone"), MAX_DEPTH).is_err());
    }

    #[test]
    fn a_pod_without_processes_is_reported() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.procs"), "").unwrap();
        let err = namespace_of(root.path()).unwrap_err();
        assert!(matches!(err, VethError::NoProcess(_)), "{err}");
    }
}
