//! Finding a pod's cgroup v2 directory by its pod UID, as the kubelet names them.
//!
//! - cgroupfs driver: `pod<uid>`, under `kubepods/` (Guaranteed), `kubepods/burstable/` or
//!   `kubepods/besteffort/`, e.g. `/sys/fs/cgroup/kubepods/burstable/pod0b3c…-…/`.
//! - systemd driver: `kubepods-pod<uid>.slice`, `kubepods-burstable-pod<uid>.slice`,
//!   `kubepods-besteffort-pod<uid>.slice`, with `_` for every `-` of the UID (systemd
//!   reserves `-` for nesting), e.g. `/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod0b3c…_….slice/`. A kubelet with a `--cgroup-root` prefixes it
//!   (`kubelet-kubepods-…-pod<uid>.slice`, as kind does), so any prefix containing
//!   `kubepods` is accepted.
//!
//! Name matching is pure ([`matches_pod`], [`pod_uid_of`]); the directory walk
//! ([`find_pod_cgroups`]) is bounded in depth and in directories visited, and never descends
//! into a pod's own directory (its containers live there).
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};

use crate::control::NodeState;
use crate::enrollment::LocalWorkload;

/// How deep below the root a pod directory may be (`kubelet/kubepods/burstable/pod…` is 4).
pub const MAX_DEPTH: usize = 6;
/// Directories looked at in one walk, at most.
pub const MAX_DIRS: usize = 50_000;

/// A UID as the kubelet's cgroupfs driver writes it: lowercase, with `-`.
pub fn normalize_uid(uid: &str) -> String {
    uid.trim().to_ascii_lowercase().replace('_', "-")
}

/// Whether the directory `name` is the pod-level cgroup of the pod with `uid`.
pub fn matches_pod(name: &str, uid: &str) -> bool {
    let uid = normalize_uid(uid);
    if uid.is_empty() {
        return false;
    }
    if name.strip_prefix("pod") == Some(uid.as_str()) {
        return true;
    }
    let systemd_uid = uid.replace('-', "_");
    name.strip_suffix(".slice")
        .and_then(|n| n.strip_suffix(systemd_uid.as_str()))
        .and_then(|n| n.strip_suffix("-pod"))
        .is_some_and(|prefix| prefix.contains("kubepods"))
}

/// The pod UID a directory name stands for, if it looks like a pod-level cgroup: `pod` or
/// `…kubepods…-pod` followed by a UID of hex digits and separators (32 to 36 characters, as
/// both a UUID and a static pod's hash are).
pub fn pod_uid_of(name: &str) -> Option<String> {
    let candidate = if let Some(slice) = name.strip_suffix(".slice") {
        let (prefix, uid) = slice.rsplit_once("-pod")?;
        if !prefix.contains("kubepods") {
            return None;
        }
        uid
    } else {
        name.strip_prefix("pod")?
    };
    let uid_like = (32..=36).contains(&candidate.len())
        && candidate
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    uid_like.then(|| normalize_uid(candidate))
}

/// Walks `root` breadth-first and returns the directory of each of `uids` found (keyed by
/// the UID as given). Stops descending at pod directories, below [`MAX_DEPTH`], and after
/// [`MAX_DIRS`] directories. Directories that vanish during the walk are skipped; only an
/// unreadable `root` is an error.
pub fn find_pod_cgroups(root: &Path, uids: &BTreeSet<String>) -> io::Result<BTreeMap<String, PathBuf>> {
    let wanted: HashMap<String, &String> = uids.iter().map(|u| (normalize_uid(u), u)).collect();
    // UIDs that do not look like one (test fixtures) are matched by exact name instead.
    let odd: Vec<(&String, &String)> = wanted
        .iter()
        .filter(|(uid, _)| pod_uid_of(&format!("pod{uid}")).is_none())
        .map(|(uid, original)| (uid, *original))
        .collect();
    let mut found = BTreeMap::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    let mut queue = VecDeque::from([(root.to_owned(), 0usize)]);
    let mut visited = 0usize;
    let mut first = true;
    while let Some((dir, depth)) = queue.pop_front() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if first => return Err(e),
            Err(_) => continue,
        };
        first = false;
        let mut children: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        children.sort();
        for (name, path) in children {
            visited += 1;
            if visited > MAX_DIRS {
                tracing::warn!(root = %root.display(), "cgroup walk stopped after {MAX_DIRS} directories");
                return Ok(found);
            }
            let pod = pod_uid_of(&name);
            let hit = match &pod {
                Some(uid) => wanted.get(uid).map(|original| (*original).clone()),
                None => odd
                    .iter()
                    .find(|(uid, _)| matches_pod(&name, uid))
                    .map(|(_, original)| (*original).clone()),
            };
            if let Some(uid) = hit {
                found.entry(uid).or_insert(path);
                if found.len() == wanted.len() {
                    return Ok(found);
                }
                continue;
            }
            if pod.is_some() || depth + 1 >= MAX_DEPTH {
                continue;
            }
            queue.push_back((path, depth + 1));
        }
    }
    Ok(found)
}

/// The cgroup directory of one pod, if it exists under `root`.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> io::Result<Option<PathBuf>> {
    let uids = BTreeSet::from([uid.to_owned()]);
    Ok(find_pod_cgroups(root, &uids)?.into_values().next())
}

/// The enrolled local pods of `state` with their cgroup directories, as the enrollment
/// reconcile loop takes them, and the pods whose directory is not there (yet).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub workloads: Vec<LocalWorkload>,
    /// `namespace/name (uid)` of enrolled pods without a cgroup directory.
    pub missing: Vec<String>,
}

pub fn resolve_enrolled(state: &NodeState, pods_root: &Path) -> io::Result<Resolved> {
    let uids: BTreeSet<String> = state.enrolled_local().map(|w| w.uid.clone()).collect();
    let dirs = find_pod_cgroups(pods_root, &uids)?;
    let mut resolved = Resolved::default();
    for w in state.enrolled_local() {
        match dirs.get(&w.uid) {
            Some(dir) => resolved.workloads.push(LocalWorkload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                cgroup: dir.clone(),
            }),
            None => resolved
                .missing
                .push(format!("{}/{} ({})", w.namespace, w.name, w.uid)),
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const UID: &str = "0b3c7e0e-1111-4c8a-9c1e-000000000001";
    const UID_: &str = "0b3c7e0e_1111_4c8a_9c1e_000000000001";

    #[test]
    fn names_of_both_drivers() {
        let yes = [
            format!("pod{UID}"),
            format!("kubepods-pod{UID_}.slice"),
            format!("kubepods-burstable-pod{UID_}.slice"),
            format!("kubepods-besteffort-pod{UID_}.slice"),
            format!("kubelet-kubepods-burstable-pod{UID_}.slice"),
        ];
        for name in &yes {
            assert!(matches_pod(name, UID), "{name}");
            assert!(matches_pod(name, UID_), "{name} (uid given systemd-style)");
            assert_eq!(pod_uid_of(name).as_deref(), Some(UID), "{name}");
        }
        let other = "0b3c7e0e-1111-4c8a-9c1e-000000000002";
        let no = [
            format!("pod{other}"),
            format!("pod{UID}x"),
            format!("xpod{UID}"),
            format!("kubepods-burstable-pod{UID}.slice"),
            format!("system-pod{UID_}.slice"),
            format!("kubepods-burstable-pod{UID_}.scope"),
            "kubepods".into(),
            "burstable".into(),
            "kubepods-burstable.slice".into(),
            "pods".into(),
            "pod".into(),
        ];
        for name in &no {
            assert!(!matches_pod(name, UID), "{name}");
        }
        assert!(!matches_pod("pod", ""));
        // The bulk heuristic wants something UID-like; exact matching takes any UID.
        assert_eq!(pod_uid_of("pods"), None);
        assert_eq!(pod_uid_of("podcast"), None);
        assert_eq!(pod_uid_of("kubepods-burstable.slice"), None);
        assert_eq!(
            pod_uid_of("pod6f1c8a3e2b1d4c5e9f8a7b6c5d4e3f2a").as_deref(),
            Some("6f1c8a3e2b1d4c5e9f8a7b6c5d4e3f2a"),
            "static pods have a 32-digit hash as UID"
        );
        assert!(matches_pod("podweb-1", "web-1"));
    }

    fn mkdirs(root: &Path, dirs: &[&str]) {
        for d in dirs {
            fs::create_dir_all(root.join(d)).unwrap();
        }
    }

    #[test]
    fn walks_cgroupfs_and_systemd_layouts() {
        let uids = [
            "aaaaaaaa-0000-0000-0000-000000000001",
            "aaaaaaaa-0000-0000-0000-000000000002",
            "aaaaaaaa-0000-0000-0000-000000000003",
        ];
        let sys = |u: &str| u.replace('-', "_");

        let cgroupfs = tempfile::tempdir().unwrap();
        mkdirs(
            cgroupfs.path(),
            &[
                &format!("kubepods/pod{}/c1", uids[0]),
                &format!("kubepods/burstable/pod{}/c2", uids[1]),
                &format!("kubepods/besteffort/pod{}", uids[2]),
                "system.slice/containerd.service",
            ],
        );
        let systemd = tempfile::tempdir().unwrap();
        mkdirs(
            systemd.path(),
            &[
                &format!(
                    "kubepods.slice/kubepods-pod{}.slice/cri-containerd-1.scope",
                    sys(uids[0])
                ),
                &format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                    sys(uids[1])
                ),
                &format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                    sys(uids[2])
                ),
            ],
        );
        let wanted: BTreeSet<String> = uids.iter().map(|u| u.to_string()).collect();
        for (root, layout) in [(cgroupfs.path(), "cgroupfs"), (systemd.path(), "systemd")] {
            let found = find_pod_cgroups(root, &wanted).unwrap();
            assert_eq!(found.len(), 3, "{layout}: {found:?}");
            for (uid, dir) in &found {
                assert!(dir.starts_with(root));
                assert!(
                    matches_pod(&dir.file_name().unwrap().to_string_lossy(), uid),
                    "{layout}"
                );
            }
        }
        assert_eq!(
            find_pod_cgroup(cgroupfs.path(), uids[1]).unwrap(),
            Some(cgroupfs.path().join(format!("kubepods/burstable/pod{}", uids[1])))
        );
        assert_eq!(
            find_pod_cgroup(cgroupfs.path(), "aaaaaaaa-0000-0000-0000-00000000000f").unwrap(),
            None
        );
        assert!(find_pod_cgroups(&cgroupfs.path().join("nope"), &wanted).is_err());
        assert!(find_pod_cgroups(Path::new("/nonexistent"), &BTreeSet::new())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn walk_is_bounded_and_skips_pod_contents() {
        let root = tempfile::tempdir().unwrap();
        let uid = "bbbbbbbb-0000-0000-0000-000000000001";
        // Too deep to be found.
        let deep = format!("a/b/c/d/e/f/pod{uid}");
        // A pod directory inside another pod's directory is never looked at.
        let nested = format!("kubepods/podcccccccc-0000-0000-0000-000000000001/pod{uid}");
        mkdirs(root.path(), &[&deep, &nested]);
        let wanted = BTreeSet::from([uid.to_owned()]);
        assert!(find_pod_cgroups(root.path(), &wanted).unwrap().is_empty());
        mkdirs(root.path(), &[&format!("a/b/c/d/pod{uid}")]);
        assert_eq!(find_pod_cgroups(root.path(), &wanted).unwrap().len(), 1);
    }

    #[test]
    fn resolves_the_enrolled_local_pods_of_a_state() {
        use mesh_api::{MtlsMode, NodeView, Update, UpdateKind, Version, Workload};

        let pod = |uid: &str, name: &str, node: &str, enrolled: bool| Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: "shop".into(),
            node: node.into(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            enrolled,
            mtls_mode: MtlsMode::Permissive,
            labels: Default::default(),
        };
        let here = "dddddddd-0000-0000-0000-000000000001";
        let not_yet = "dddddddd-0000-0000-0000-000000000002";
        let opted_out = "dddddddd-0000-0000-0000-000000000003";
        let elsewhere = "dddddddd-0000-0000-0000-000000000004";
        let mut view = NodeView::default();
        view.insert_workload(pod(here, "web-1", "a", true));
        view.insert_workload(pod(not_yet, "web-2", "a", true));
        view.insert_workload(pod(opted_out, "legacy", "a", false));
        view.insert_workload(pod(elsewhere, "web-3", "b", true));
        let update = Update {
            version: Version {
                epoch: "e".into(),
                number: 1,
            },
            kind: UpdateKind::Snapshot(view),
        };
        let state = crate::control::apply(&NodeState::new("a"), update).unwrap();

        let root = tempfile::tempdir().unwrap();
        for uid in [here, opted_out, elsewhere] {
            mkdirs(root.path(), &[&format!("kubepods/burstable/pod{uid}")]);
        }
        let resolved = resolve_enrolled(&state, root.path()).unwrap();
        assert_eq!(
            resolved.workloads,
            [LocalWorkload {
                namespace: "shop".into(),
                name: "web-1".into(),
                cgroup: root.path().join(format!("kubepods/burstable/pod{here}")),
            }]
        );
        assert_eq!(resolved.missing, [format!("shop/web-2 ({not_yet})")]);
    }
}
