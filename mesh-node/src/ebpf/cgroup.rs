//! cgroup v2 paths and ids.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::{error::EbpfError, sys};

/// The id of a cgroup v2 directory: its inode number on cgroup2fs, the value
/// `bpf_get_current_cgroup_id()` returns for tasks in it.
pub fn cgroup_id(dir: &Path) -> Result<u64, EbpfError> {
    check_cgroup2("the", dir)?;
    let meta = fs::metadata(dir).map_err(|e| EbpfError::io(format!("reading {}", dir.display()), e))?;
    Ok(meta.ino())
}

/// Fails unless `dir` is an existing directory on cgroup2fs.
pub(crate) fn check_cgroup2(role: &'static str, dir: &Path) -> Result<(), EbpfError> {
    match sys::fs_magic(dir) {
        Ok(sys::CGROUP2_SUPER_MAGIC) if dir.is_dir() => Ok(()),
        Ok(_) => Err(EbpfError::NotCgroup2 {
            role,
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(EbpfError::CgroupNotFound {
            role,
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(EbpfError::io(format!("statfs {}", dir.display()), e)),
    }
}

/// The cgroup v2 directory of this process: the `0::` line of /proc/self/cgroup under the
/// cgroup2 mount point found in /proc/self/mountinfo.
pub fn own_cgroup() -> Result<PathBuf, EbpfError> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| EbpfError::OwnCgroup(format!("reading /proc/self/cgroup: {e}")))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| EbpfError::OwnCgroup("no cgroup v2 (\"0::\") line in /proc/self/cgroup".into()))?;
    let rel = rel.strip_suffix(" (deleted)").unwrap_or(rel);
    let mount = cgroup2_mount()?;
    // With the mount's root below the hierarchy root (a bind mount of a subtree), the
    // process's path is relative to the hierarchy root: strip the mount's root off.
    let rel = if mount.root != "/" {
        rel.strip_prefix(mount.root.as_str()).unwrap_or(rel)
    } else {
        rel
    };
    Ok(mount.mount_point.join(rel.trim_start_matches('/')))
}

/// Where the cgroup v2 hierarchy is mounted in this mount namespace (e.g. /sys/fs/cgroup, or
/// /sys/fs/cgroup/unified on a hybrid setup).
pub fn cgroup2_mount_point() -> Result<PathBuf, EbpfError> {
    Ok(cgroup2_mount()?.mount_point)
}

struct Mount {
    mount_point: PathBuf,
    root: String,
}

fn cgroup2_mount() -> Result<Mount, EbpfError> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| EbpfError::OwnCgroup(format!("reading /proc/self/mountinfo: {e}")))?;
    parse_mountinfo(&text).ok_or_else(|| {
        EbpfError::OwnCgroup(
            "no cgroup2 mount in /proc/self/mountinfo: mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
                .into(),
        )
    })
}

/// The first cgroup2 mount whose root is the hierarchy root, else the first cgroup2 mount.
fn parse_mountinfo(text: &str) -> Option<Mount> {
    let mut found: Option<Mount> = None;
    for line in text.lines() {
        // id parent major:minor root mount_point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mount = Mount {
            mount_point: PathBuf::from(unescape(mount_point)),
            root: unescape(root),
        };
        if mount.root == "/" {
            return Some(mount);
        }
        found.get_or_insert(mount);
    }
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_v1_mounts() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let m = parse_mountinfo(text).expect("cgroup2 mount");
        assert_eq!(m.mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m.root, "/");
    }

    #[test]
    fn prefers_hierarchy_root_and_unescapes() {
        let text = "\
50 23 0:40 /kubepods /mnt/sub rw shared:1 - cgroup2 none rw
51 23 0:40 / /mnt/with\\040space rw - cgroup2 none rw
";
        let m = parse_mountinfo(text).expect("cgroup2 mount");
        assert_eq!(m.mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn no_cgroup2() {
        assert!(parse_mountinfo("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n").is_none());
    }
}
