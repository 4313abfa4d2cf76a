//! The kernel edges of the harness: iproute2, network namespaces, cgroup v2, bpffs, leftovers.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub(crate) const NETNS_DIR: &str = "/run/netns";
const BPFFS: &str = "/sys/fs/bpf";
/// Where the harness mounts cgroup2 itself when the machine has no cgroup2 mount.
const PRIVATE_CGROUP2: &str = "/run/mesh-harness/cgroup2";

/// Runs `ip [-n NETNS] -batch -` with one command per line; fails with the failing line on error.
pub(crate) fn ip_batch(netns: Option<&str>, cmds: &[String]) -> Result<()> {
    ip_batch_inner(netns, cmds, false)
}

/// Like [`ip_batch`] but goes on after a failing line (`-force`), for teardown.
fn ip_batch_force(netns: Option<&str>, cmds: &[String]) -> Result<()> {
    ip_batch_inner(netns, cmds, true)
}

fn ip_batch_inner(netns: Option<&str>, cmds: &[String], force: bool) -> Result<()> {
    if cmds.is_empty() {
        return Ok(());
    }
    let mut c = Command::new("ip");
    if let Some(ns) = netns {
        c.args(["-n", ns]);
    }
    if force {
        c.arg("-force");
    }
    c.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().context("running `ip` (is iproute2 installed?)")?;
    let mut script = cmds.join("\n");
    script.push('\n');
    let write = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().context("waiting for `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip{} -batch` failed ({}): {}\ncommands:\n{}",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            script.trim_end()
        );
    }
    if let Some(Err(e)) = write {
        bail!("writing commands to `ip`: {e}");
    }
    Ok(())
}

/// `ip netns add` runs through one lock per process: the first one on a machine sets /run/netns up
/// as a shared mount, and racing that from two threads can stack two mounts.
static NETNS_ADD: Mutex<()> = Mutex::new(());

pub(crate) fn netns_add(name: &str) -> Result<()> {
    let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("ip")
        .args(["netns", "add", name])
        .output()
        .context("running `ip netns add`")?;
    if !out.status.success() {
        bail!(
            "`ip netns add {name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes the named network namespaces (those that exist), logging failures.
pub(crate) fn netns_del_all(names: &[String]) {
    let cmds: Vec<String> = names
        .iter()
        .filter(|n| Path::new(NETNS_DIR).join(n).exists())
        .map(|n| format!("netns del {n}"))
        .collect();
    if let Err(e) = ip_batch_force(None, &cmds) {
        // Some may have gone concurrently (e.g. a parallel leftover clean-up); report only survivors.
        let left: Vec<&String> = names
            .iter()
            .filter(|n| Path::new(NETNS_DIR).join(n).exists())
            .collect();
        if !left.is_empty() {
            log(&format!("deleting network namespaces {left:?}: {e:#}"));
        }
    }
}

/// Names in /run/netns starting with `prefix`.
pub(crate) fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Writes `/proc/sys/<key with dots as slashes>` = `value` inside network namespace `netns`
/// (from a short-lived thread that enters it, so the process itself stays where it is).
pub(crate) fn sysctls_in_netns(netns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let ns =
        File::open(Path::new(NETNS_DIR).join(netns)).with_context(|| format!("opening netns {netns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            // SAFETY: plain syscall on an fd we own; only this (fresh, short-lived) thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {netns}: {}", std::io::Error::last_os_error());
            }
            for (key, value) in settings {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                fs::write(&path, value).with_context(|| format!("sysctl {key}={value} in netns {netns}"))?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("sysctl thread panicked"))?
    })
}

struct MountEntry {
    mount_point: PathBuf,
    fstype: String,
}

fn mounts() -> Result<Vec<MountEntry>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some(MountEntry {
                mount_point: unescape_mount(mount_point).into(),
                fstype: fstype.to_string(),
            })
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in mount arguments");
    let (src, tgt, fs_) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings, null data.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs_.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!(
            "mount -t {fstype} {source} {target}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The cgroup2 mount point (mounting one on a harness-owned directory when there is none).
pub(crate) fn cgroup2_root() -> Result<PathBuf> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(p) = ROOT.get() {
        return Ok(p.clone());
    }
    let _g = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = ROOT.get() {
        return Ok(p.clone());
    }
    let found = mounts()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point);
    let root = match found {
        Some(p) => p,
        None => {
            fs::create_dir_all(PRIVATE_CGROUP2).with_context(|| format!("creating {PRIVATE_CGROUP2}"))?;
            mount("cgroup2", PRIVATE_CGROUP2, "cgroup2")?;
            PathBuf::from(PRIVATE_CGROUP2)
        }
    };
    Ok(ROOT.get_or_init(|| root).clone())
}

/// /sys/fs/bpf, mounting bpffs there when it is not mounted.
pub(crate) fn bpffs_root() -> Result<PathBuf> {
    static INIT: Mutex<bool> = Mutex::new(false);
    let mut done = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        let mounted = mounts()?
            .iter()
            .any(|m| m.fstype == "bpf" && m.mount_point == Path::new(BPFFS));
        if !mounted {
            fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
            mount("bpf", BPFFS, "bpf")?;
        }
        *done = true;
    }
    Ok(PathBuf::from(BPFFS))
}

/// A cgroup v2 id: the inode number of its directory.
pub(crate) fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// Kills every process in the cgroup subtree at `path` (no-op when it is gone).
pub(crate) fn cgroup_kill(path: &Path) -> Result<()> {
    match fs::write(path.join("cgroup.kill"), "1") {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        r => r.with_context(|| format!("writing 1 to {}/cgroup.kill", path.display())),
    }
}

/// Removes the cgroup directory tree at `path`, deepest first, retrying while killed processes
/// drain, until `deadline`.
pub(crate) fn remove_cgroup_tree(path: &Path, deadline: Duration) -> Result<()> {
    let mut dirs = Vec::new();
    collect_dirs(path, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let end = Instant::now() + deadline;
    for dir in dirs {
        let mut interval = Duration::from_millis(1);
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < end => {
                    std::thread::sleep(interval);
                    interval = (interval * 2).min(Duration::from_millis(20));
                }
                Err(e) => {
                    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    bail!(
                        "removing cgroup {}: {e} (processes still in it: {:?})",
                        dir.display(),
                        procs.split_whitespace().collect::<Vec<_>>()
                    );
                }
            }
        }
    }
    Ok(())
}

fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    if !path.is_dir() {
        return;
    }
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
    out.push(path.to_path_buf());
}

/// Removes a bpffs directory tree (unlinking pins is how pins are removed).
pub(crate) fn remove_pin_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        r => r.with_context(|| format!("removing pin dir {}", path.display())),
    }
}

/// Parses a harness run id `mt<pid>x<counter>` at the start of `name`, followed by the end or `-`.
pub(crate) fn parse_run_id(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix("mt")?;
    let (pid, rest) = rest.split_once('x')?;
    let counter_len = rest.find('-').unwrap_or(rest.len());
    let counter = &rest[..counter_len];
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(counter) {
        return None;
    }
    let id_len = 2 + pid.len() + 1 + counter_len;
    Some((pid.parse().ok()?, &name[..id_len]))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces, cgroup trees and bpffs dirs of harness runs whose process is gone.
pub(crate) fn clean_leftovers(cgroup2: &Path, bpffs: &Path) {
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect()
    };
    let dead = |name: &str, exact: bool| matches!(parse_run_id(name), Some((pid, id)) if (id.len() == name.len()) == exact && !pid_alive(pid));
    // Processes first (the cgroup trees), then namespaces, then cgroup directories and pins.
    let cgroups: Vec<String> = names(cgroup2).into_iter().filter(|n| dead(n, true)).collect();
    for id in &cgroups {
        let _ = cgroup_kill(&cgroup2.join(id));
    }
    let netns: Vec<String> = names(Path::new(NETNS_DIR))
        .into_iter()
        .filter(|n| dead(n, false))
        .collect();
    if !netns.is_empty() {
        log(&format!(
            "removing {} network namespaces left by dead runs",
            netns.len()
        ));
        netns_del_all(&netns);
    }
    for id in &cgroups {
        if let Err(e) = remove_cgroup_tree(&cgroup2.join(id), Duration::from_secs(5)) {
            log(&format!("leftover clean-up: {e:#}"));
        }
    }
    for id in names(bpffs).into_iter().filter(|n| dead(n, true)) {
        if let Err(e) = remove_pin_tree(&bpffs.join(&id)) {
            log(&format!("leftover clean-up: {e:#}"));
        }
    }
}

pub(crate) fn log(msg: &str) {
    eprintln!("mesh-harness: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids() {
        assert_eq!(parse_run_id("mt123x4"), Some((123, "mt123x4")));
        assert_eq!(parse_run_id("mt123x4-net"), Some((123, "mt123x4")));
        assert_eq!(parse_run_id("mt123x4-a-b"), Some((123, "mt123x4")));
        assert_eq!(parse_run_id("mt123x"), None);
        assert_eq!(parse_run_id("mtx4"), None);
        assert_eq!(parse_run_id("mt12ax4"), None);
        assert_eq!(parse_run_id("mt1x4y"), None);
        assert_eq!(parse_run_id("mesh"), None);
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount("/end\\"), "/end\\");
    }
}
