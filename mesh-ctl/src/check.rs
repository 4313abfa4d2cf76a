//! `meshctl check`: can mesh-node's datapath run on this machine? [`Facts::gather`] reads the
//! system; [`evaluate`] judges the facts without touching it, one line per requirement, each
//! failing one with the command or setting that fixes it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The oldest kernel the datapath runs on: the tc programs attach as TCX links
/// (`BPF_LINK_CREATE` on `BPF_TCX_INGRESS`/`EGRESS`, Linux 6.6); everything else it uses
/// (cgroup sock_addr, sock_ops and sockopt programs with bpf_links, netns cookies) is older.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

pub const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const CAPABILITIES: [(u32, &str); 3] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
];

/// Where each probe looks; the defaults are where mesh-node looks.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The bpffs mount mesh-node pins its programs and maps under.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf")]
    pub bpffs_dir: PathBuf,
    /// The cgroup v2 root the pods' cgroups live under.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// The kernel's BTF, which the programs' CO-RE relocations are resolved against.
    #[arg(long, value_name = "FILE", default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
}

/// A file system probe's answer: the statfs magic, or why there is none.
pub type Magic = Result<u64, io::ErrorKind>;

/// What the machine is, as far as the datapath cares.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// `uname -r`.
    pub kernel_release: String,
    pub btf_path: PathBuf,
    pub btf_present: bool,
    pub cgroup_root: PathBuf,
    pub cgroup_root_magic: Magic,
    /// `<root>/unified`, where a hybrid hierarchy mounts cgroup v2.
    pub cgroup_unified_magic: Magic,
    pub bpffs_dir: PathBuf,
    pub bpffs_magic: Magic,
    /// The effective capability set of this process; none if it could not be read.
    pub cap_eff: Option<u64>,
}

impl Facts {
    pub fn gather(args: &CheckArgs) -> Facts {
        let magic = |p: &Path| -> Magic {
            rustix::fs::statfs(p)
                // The type's width differs between architectures; the magic numbers fit all.
                .map(|s| s.f_type as u64 & 0xffff_ffff)
                .map_err(|e| io::Error::from(e).kind())
        };
        Facts {
            kernel_release: rustix::system::uname().release().to_string_lossy().into_owned(),
            btf_path: args.btf.clone(),
            btf_present: args.btf.is_file(),
            cgroup_root: args.cgroup_root.clone(),
            cgroup_root_magic: magic(&args.cgroup_root),
            cgroup_unified_magic: magic(&args.cgroup_root.join("unified")),
            bpffs_dir: args.bpffs_dir.clone(),
            bpffs_magic: magic(&args.bpffs_dir),
            cap_eff: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| cap_eff(&s)),
        }
    }
}

/// `CapEff` of a `/proc/<pid>/status` text.
pub fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// `6.18.0-1-amd64` → (6, 18).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub name: &'static str,
    pub pass: bool,
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Line {
    fn pass(name: &'static str, detail: String) -> Line {
        Line {
            name,
            pass: true,
            detail,
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: String, fix: String) -> Line {
        Line {
            name,
            pass: false,
            detail,
            fix: Some(fix),
        }
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        write!(f, "{verdict} {}: {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, " (fix: {fix})")?;
        }
        Ok(())
    }
}

fn what_is(magic: &Magic) -> String {
    match magic {
        Ok(BPF_FS_MAGIC) => "a bpffs".into(),
        Ok(CGROUP2_SUPER_MAGIC) => "cgroup v2".into(),
        Ok(0x0102_1994) => "a tmpfs".into(),
        Ok(0x0027_e0eb) => "cgroup v1".into(),
        Ok(0xef53) => "an ext2/3/4 file system".into(),
        Ok(0x5846_5342) => "an xfs file system".into(),
        Ok(0x9123_683e) => "a btrfs file system".into(),
        Ok(0x794c_7630) => "an overlayfs".into(),
        Ok(other) => format!("a file system of type {other:#x}"),
        Err(io::ErrorKind::NotFound) => "missing".into(),
        Err(kind) => format!("unreadable ({kind})"),
    }
}

/// Judges the facts: one line per requirement, in a fixed order.
pub fn evaluate(f: &Facts) -> Vec<Line> {
    let (want_major, want_minor) = MIN_KERNEL;
    let kernel = match parse_release(&f.kernel_release) {
        Some(v) if v >= MIN_KERNEL => Line::pass(
            "kernel",
            format!(
                "Linux {} (needs {want_major}.{want_minor} or newer)",
                f.kernel_release
            ),
        ),
        Some(_) => Line::fail(
            "kernel",
            format!(
                "Linux {} is older than {want_major}.{want_minor}, which the tc programs' TCX links need",
                f.kernel_release
            ),
            format!("boot a Linux {want_major}.{want_minor} or newer kernel"),
        ),
        None => Line::fail(
            "kernel",
            format!("cannot read the version in kernel release {:?}", f.kernel_release),
            format!("make sure the kernel is Linux {want_major}.{want_minor} or newer"),
        ),
    };
    let btf = if f.btf_present {
        Line::pass("btf", format!("{} present", f.btf_path.display()))
    } else {
        Line::fail(
            "btf",
            format!("{} not found", f.btf_path.display()),
            "run a kernel built with CONFIG_DEBUG_INFO_BTF=y".into(),
        )
    };
    let root = f.cgroup_root.display();
    let cgroup = match (&f.cgroup_root_magic, &f.cgroup_unified_magic) {
        (Ok(CGROUP2_SUPER_MAGIC), _) => Line::pass("cgroup2", format!("{root} is cgroup v2")),
        (_, Ok(CGROUP2_SUPER_MAGIC)) => Line::pass(
            "cgroup2",
            format!(
                "hybrid hierarchy: cgroup v2 at {} (give mesh-node that directory)",
                f.cgroup_root.join("unified").display()
            ),
        ),
        (Err(io::ErrorKind::NotFound), _) => Line::fail(
            "cgroup2",
            format!("{root} does not exist"),
            format!("mkdir -p {root} && mount -t cgroup2 none {root}"),
        ),
        (magic, _) => Line::fail(
            "cgroup2",
            format!("{root} is {}, not cgroup v2", what_is(magic)),
            format!("mount -t cgroup2 none {root}, or boot with systemd.unified_cgroup_hierarchy=1"),
        ),
    };
    let dir = f.bpffs_dir.display();
    let bpffs = match &f.bpffs_magic {
        Ok(BPF_FS_MAGIC) => Line::pass("bpffs", format!("{dir} is a bpffs")),
        Err(io::ErrorKind::NotFound) => Line::fail(
            "bpffs",
            format!("{dir} does not exist"),
            format!("mkdir -p {dir} && mount -t bpf bpf {dir}"),
        ),
        magic => Line::fail(
            "bpffs",
            format!("{dir} is {}, not a bpffs", what_is(magic)),
            format!("mount -t bpf bpf {dir}"),
        ),
    };
    let names = CAPABILITIES.map(|(_, name)| name).join(", ");
    let capabilities = match f.cap_eff {
        None => Line::fail(
            "capabilities",
            "cannot read CapEff in /proc/self/status".into(),
            "run where /proc is mounted".into(),
        ),
        Some(eff) => {
            let missing: Vec<&str> = CAPABILITIES
                .iter()
                .filter(|(bit, _)| eff & (1u64 << bit) == 0)
                .map(|(_, name)| *name)
                .collect();
            if missing.is_empty() {
                Line::pass("capabilities", format!("{names} effective"))
            } else {
                Line::fail(
                    "capabilities",
                    format!("{} missing", missing.join(", ")),
                    format!("run as root, or grant {names} (the mesh-node DaemonSet does)"),
                )
            }
        }
    };
    vec![kernel, btf, cgroup, bpffs, capabilities]
}

pub fn render(lines: &[Line]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine that meets every requirement.
    fn good() -> Facts {
        Facts {
            kernel_release: "6.18.0-1-amd64".into(),
            btf_path: "/sys/kernel/btf/vmlinux".into(),
            btf_present: true,
            cgroup_root: "/sys/fs/cgroup".into(),
            cgroup_root_magic: Ok(CGROUP2_SUPER_MAGIC),
            cgroup_unified_magic: Err(io::ErrorKind::NotFound),
            bpffs_dir: "/sys/fs/bpf".into(),
            bpffs_magic: Ok(BPF_FS_MAGIC),
            cap_eff: Some(0x1ff_ffff_ffff),
        }
    }

    /// The one failing line of `facts`, which must fail nothing else.
    fn only_failure(facts: &Facts) -> Line {
        let failed: Vec<Line> = evaluate(facts).into_iter().filter(|l| !l.pass).collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        failed.into_iter().next().unwrap()
    }

    #[test]
    fn a_good_machine_passes_everything() {
        let lines = evaluate(&good());
        assert!(lines.iter().all(|l| l.pass), "{lines:?}");
        assert_eq!(
            lines.iter().map(|l| l.name).collect::<Vec<_>>(),
            ["kernel", "btf", "cgroup2", "bpffs", "capabilities"]
        );
        assert_eq!(
            lines[0].to_string(),
            "PASS kernel: Linux 6.18.0-1-amd64 (needs 6.6 or newer)"
        );
    }

    #[test]
    fn an_old_kernel_fails() {
        for release in ["6.5.0", "5.15.0-91-generic", "4.19.0"] {
            let line = only_failure(&Facts {
                kernel_release: release.into(),
                ..good()
            });
            assert_eq!(line.name, "kernel");
            assert!(line.detail.contains("TCX"), "{line}");
            assert_eq!(line.fix.as_deref(), Some("boot a Linux 6.6 or newer kernel"));
        }
        assert!(
            evaluate(&Facts {
                kernel_release: "6.6.0".into(),
                ..good()
            })[0]
                .pass
        );
        let line = only_failure(&Facts {
            kernel_release: "weird".into(),
            ..good()
        });
        assert_eq!(line.name, "kernel");
    }

    #[test]
    fn missing_btf_fails() {
        let line = only_failure(&Facts {
            btf_present: false,
            ..good()
        });
        assert_eq!(
            line.to_string(),
            "FAIL btf: /sys/kernel/btf/vmlinux not found (fix: run a kernel built with CONFIG_DEBUG_INFO_BTF=y)"
        );
    }

    #[test]
    fn cgroup_v1_fails_and_hybrid_passes() {
        let v1 = only_failure(&Facts {
            cgroup_root_magic: Ok(0x0102_1994),
            ..good()
        });
        assert_eq!(v1.name, "cgroup2");
        assert_eq!(v1.detail, "/sys/fs/cgroup is a tmpfs, not cgroup v2");
        assert!(v1
            .fix
            .as_deref()
            .unwrap()
            .starts_with("mount -t cgroup2 none /sys/fs/cgroup"));
        let hybrid = evaluate(&Facts {
            cgroup_root_magic: Ok(0x0102_1994),
            cgroup_unified_magic: Ok(CGROUP2_SUPER_MAGIC),
            ..good()
        });
        assert!(hybrid[2].pass);
        assert!(
            hybrid[2].detail.contains("/sys/fs/cgroup/unified"),
            "{}",
            hybrid[2]
        );
        let missing = only_failure(&Facts {
            cgroup_root: "/nope".into(),
            cgroup_root_magic: Err(io::ErrorKind::NotFound),
            ..good()
        });
        assert_eq!(
            missing.fix.as_deref(),
            Some("mkdir -p /nope && mount -t cgroup2 none /nope")
        );
    }

    #[test]
    fn a_directory_that_is_not_a_bpffs_fails() {
        let line = only_failure(&Facts {
            bpffs_dir: "/tmp/x".into(),
            bpffs_magic: Ok(0xef53),
            ..good()
        });
        assert_eq!(
            line.to_string(),
            "FAIL bpffs: /tmp/x is an ext2/3/4 file system, not a bpffs (fix: mount -t bpf bpf /tmp/x)"
        );
        let missing = only_failure(&Facts {
            bpffs_magic: Err(io::ErrorKind::NotFound),
            ..good()
        });
        assert_eq!(
            missing.fix.as_deref(),
            Some("mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf")
        );
    }

    #[test]
    fn missing_capabilities_are_named() {
        let line = only_failure(&Facts {
            cap_eff: Some(1 << CAP_NET_ADMIN),
            ..good()
        });
        assert_eq!(line.name, "capabilities");
        assert_eq!(line.detail, "CAP_BPF, CAP_SYS_ADMIN missing");
        assert_eq!(
            line.fix.as_deref(),
            Some(
                "run as root, or grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN (the mesh-node DaemonSet does)"
            )
        );
        assert_eq!(
            only_failure(&Facts {
                cap_eff: None,
                ..good()
            })
            .name,
            "capabilities"
        );
    }

    #[test]
    fn proc_status_and_release_parsing() {
        let status = "Name:\tmeshctl\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(cap_eff("Name: x\n"), None);
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("6.6"), Some((6, 6)));
        assert_eq!(parse_release("garbage"), None);
    }
}
