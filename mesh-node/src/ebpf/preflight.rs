//! Pre-flight checks: everything the datapath needs from the kernel and the host, each failing
//! with one line that names the requirement and how to provide it.

use std::{fs, io, path::Path};

use super::{cgroup::check_cgroup2, error::EbpfError, sys, DatapathConfig};

/// Oldest kernel with everything used here: TCX links for the tc programs (6.6), cgroup
/// bpf_links (5.7), `BPF_LINK_DETACH` (5.9), ancestor cgroup ids in sock_addr programs, BTF.
/// `meshctl check` holds machines to the same minimum.
const MIN_KERNEL: (u32, u32) = (6, 6);
const MIN_KERNEL_STR: &str = "6.6";

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Runs every check `Datapath::start` runs before touching the kernel (also for
/// `meshctl check`-style diagnostics).
pub fn preflight(cfg: &DatapathConfig) -> Result<(), EbpfError> {
    check_btf()?;
    check_kernel()?;
    check_capabilities()?;
    check_cgroup2("pods", &cfg.pods_cgroup)?;
    check_cgroup2("proxy", &cfg.proxy_cgroup)?;
    check_pin_dir(&cfg.pin_dir)?;
    check_config(cfg)
}

fn check_btf() -> Result<(), EbpfError> {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Ok(())
    } else {
        Err(EbpfError::NoBtf)
    }
}

fn check_kernel() -> Result<(), EbpfError> {
    let release = match fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(r) => r.trim().to_string(),
        // Unknown: let the load itself tell.
        Err(_) => return Ok(()),
    };
    match parse_release(&release) {
        Some(v) if v < MIN_KERNEL => Err(EbpfError::KernelTooOld {
            release,
            need: MIN_KERNEL_STR,
        }),
        _ => Ok(()),
    }
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn check_capabilities() -> Result<(), EbpfError> {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return Ok(());
    };
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| eff & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(EbpfError::MissingCapabilities {
            missing: missing.join(", "),
        })
    }
}

/// The pin dir must be a directory inside a bpffs: its parent on a bpffs (and the pin dir
/// itself too once it exists). The root of a bpffs mount is refused, because stale-pin cleanup
/// removes everything under the pin dir.
pub(crate) fn check_pin_dir(pin_dir: &Path) -> Result<(), EbpfError> {
    if pin_dir
        .file_name()
        .is_some_and(|n| n.as_encoded_bytes().contains(&b'.'))
    {
        return Err(EbpfError::InvalidConfig(format!(
            "pin dir {}: bpffs does not allow '.' in names",
            pin_dir.display()
        )));
    }
    let parent = pin_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let on_bpffs = |p: &Path| match sys::fs_magic(p) {
        Ok(magic) => Ok(magic == sys::BPF_FS_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(EbpfError::io(format!("statfs {}", p.display()), e)),
    };
    let exists = fs::symlink_metadata(pin_dir).is_ok();
    if !on_bpffs(parent)? {
        if exists && on_bpffs(pin_dir)? {
            return Err(EbpfError::InvalidConfig(format!(
                "pin dir {} is the root of a bpffs mount: pass a directory inside it, e.g. {}",
                pin_dir.display(),
                pin_dir.join("mesh").display()
            )));
        }
        return Err(EbpfError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    if exists && !on_bpffs(pin_dir)? {
        return Err(EbpfError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    Ok(())
}

fn check_config(cfg: &DatapathConfig) -> Result<(), EbpfError> {
    if cfg.proxy_ipv4.is_none() && cfg.proxy_ipv6.is_none() {
        return Err(EbpfError::InvalidConfig(
            "neither proxy_ipv4 nor proxy_ipv6 is set".into(),
        ));
    }
    if cfg.outbound_port == 0 {
        return Err(EbpfError::InvalidConfig("outbound_port is 0".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0"), Some((5, 4)));
        assert!(parse_release("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_release("garbage"), None);
    }
}
