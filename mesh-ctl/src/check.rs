//! `meshctl check`: can mesh-node's datapath run on this machine? [`Facts::gather`] reads the
//! system; [`evaluate`] judges the facts without touching it, one line per requirement, each
//! failing one with the command or setting that fixes it. The last three lines are what
//! mesh-node's `--preserve-source` (on by default) needs, and the agent's own pre-flight refuses
//! to start without: transparent sockets, policy routing, and the tc socket-lookup helpers.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::probe::{self, Probe};

/// The oldest kernel the datapath runs on: the tc programs attach as TCX links
/// (`BPF_LINK_CREATE` on `BPF_TCX_INGRESS`/`EGRESS`, Linux 6.6); everything else it uses
/// (cgroup sock_addr, sock_ops and sockopt programs with bpf_links, netns cookies) is older.
pub const MIN_KERNEL: (u32, u32) = (6, 6);
/// The first kernel whose tc programs may call `bpf_sk_assign` (`bpf_skc_lookup_tcp` is 5.2).
pub const SOCKET_LOOKUP_KERNEL: (u32, u32) = (5, 7);

/// How to do without what `--preserve-source` needs.
const PRESERVE_SOURCE_OFF: &str =
    "or run mesh-node with --preserve-source=false (MESH_PRESERVE_SOURCE=false)";

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
    /// Whether the kernel has IPv6 at all (`/proc/net/if_inet6`); the IPv6 probes count only
    /// then.
    pub ipv6: bool,
    /// A TCP socket with `IP_TRANSPARENT` / `IPV6_TRANSPARENT` binds to a non-local address.
    pub transparent_v4: Probe,
    pub transparent_v6: Probe,
    /// The family's routing rules can be listed (policy routing is built in).
    pub rules_v4: Probe,
    pub rules_v6: Probe,
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
            ipv6: Path::new("/proc/net/if_inet6").exists(),
            transparent_v4: probe::transparent(false),
            transparent_v6: probe::transparent(true),
            rules_v4: probe::policy_routing(false),
            rules_v6: probe::policy_routing(true),
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
    let mut lines = vec![kernel, btf, cgroup, bpffs, capabilities];
    lines.extend(preserve_source(f));
    lines
}

/// The lines of what `--preserve-source` needs.
fn preserve_source(f: &Facts) -> [Line; 3] {
    // The probes of the families this kernel has, by name; the failed ones with their error.
    let failed = |v4: &Probe, v6: &Probe| -> Vec<String> {
        let mut probes = vec![("IPv4", v4)];
        if f.ipv6 {
            probes.push(("IPv6", v6));
        }
        probes
            .into_iter()
            .filter_map(|(family, p)| p.as_ref().err().map(|e| format!("{family}: {e}")))
            .collect()
    };
    let families = if f.ipv6 {
        "IPv4 and IPv6"
    } else {
        "IPv4 (no IPv6 in this kernel)"
    };
    let failures = failed(&f.transparent_v4, &f.transparent_v6);
    let transparent = if failures.is_empty() {
        Line::pass(
            "transparent-sockets",
            format!("{families}: a transparent socket binds to a non-local address"),
        )
    } else {
        Line::fail(
            "transparent-sockets",
            format!(
                "IP_TRANSPARENT/IPV6_TRANSPARENT bind to a non-local address refused ({})",
                failures.join("; ")
            ),
            format!(
                "grant CAP_NET_ADMIN (the mesh-node DaemonSet does) or CAP_NET_RAW, {PRESERVE_SOURCE_OFF}"
            ),
        )
    };
    let failures = failed(&f.rules_v4, &f.rules_v6);
    let routing = if failures.is_empty() {
        Line::pass(
            "policy-routing",
            format!("{families}: routing rules can be listed"),
        )
    } else {
        Line::fail(
            "policy-routing",
            format!("listing routing rules failed ({})", failures.join("; ")),
            format!(
                "boot a kernel built with CONFIG_IP_MULTIPLE_TABLES=y and CONFIG_IPV6_MULTIPLE_TABLES=y, {PRESERVE_SOURCE_OFF}"
            ),
        )
    };
    let (major, minor) = SOCKET_LOOKUP_KERNEL;
    let lookup = match parse_release(&f.kernel_release) {
        Some(v) if v >= SOCKET_LOOKUP_KERNEL => Line::pass(
            "socket-lookup",
            format!(
                "bpf_skc_lookup_tcp and bpf_sk_assign in tc programs (Linux {major}.{minor}+; not probed apart: the kernel line covers them)"
            ),
        ),
        _ => Line::fail(
            "socket-lookup",
            format!(
                "Linux {} lacks bpf_sk_assign in tc programs (Linux {major}.{minor})",
                f.kernel_release
            ),
            format!(
                "boot a Linux {}.{} or newer kernel, {PRESERVE_SOURCE_OFF}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
    };
    [transparent, routing, lookup]
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
            ipv6: true,
            transparent_v4: Ok(()),
            transparent_v6: Ok(()),
            rules_v4: Ok(()),
            rules_v6: Ok(()),
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
            [
                "kernel",
                "btf",
                "cgroup2",
                "bpffs",
                "capabilities",
                "transparent-sockets",
                "policy-routing",
                "socket-lookup"
            ]
        );
        assert_eq!(
            lines[0].to_string(),
            "PASS kernel: Linux 6.18.0-1-amd64 (needs 6.6 or newer)"
        );
    }

    #[test]
    fn an_old_kernel_fails() {
        for release in ["6.5.0", "5.15.0-91-generic"] {
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
        // An unreadable version cannot vouch for the socket-lookup helpers either.
        let failed: Vec<&str> = evaluate(&Facts {
            kernel_release: "weird".into(),
            ..good()
        })
        .into_iter()
        .filter(|l| !l.pass)
        .map(|l| l.name)
        .collect();
        assert_eq!(failed, ["kernel", "socket-lookup"]);
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
    fn transparent_sockets_refused_name_the_family_the_fix_and_the_switch() {
        let eperm = "Operation not permitted (os error 1)".to_string();
        let line = only_failure(&Facts {
            transparent_v4: Err(eperm.clone()),
            transparent_v6: Err(eperm),
            ..good()
        });
        assert_eq!(
            line.to_string(),
            "FAIL transparent-sockets: IP_TRANSPARENT/IPV6_TRANSPARENT bind to a non-local address \
             refused (IPv4: Operation not permitted (os error 1); IPv6: Operation not permitted \
             (os error 1)) (fix: grant CAP_NET_ADMIN (the mesh-node DaemonSet does) or CAP_NET_RAW, or run \
             mesh-node with --preserve-source=false (MESH_PRESERVE_SOURCE=false))"
        );
    }

    #[test]
    fn missing_policy_routing_fails_and_ipv6_counts_only_where_the_kernel_has_it() {
        let no_v6_rules = Facts {
            rules_v6: Err("Address family not supported by protocol (os error 97)".into()),
            ..good()
        };
        let line = only_failure(&no_v6_rules);
        assert_eq!(line.name, "policy-routing");
        assert!(line.detail.contains("IPv6: Address family"), "{line}");
        assert!(!line.detail.contains("IPv4"), "{line}");
        let fix = line.fix.unwrap();
        assert!(fix.contains("CONFIG_IP_MULTIPLE_TABLES=y"), "{fix}");
        assert!(fix.contains("--preserve-source=false"), "{fix}");
        // A kernel without IPv6: the IPv6 probes fail and do not count.
        let v4_only = evaluate(&Facts {
            ipv6: false,
            transparent_v6: Err("no IPv6".into()),
            ..no_v6_rules
        });
        assert!(v4_only.iter().all(|l| l.pass), "{v4_only:?}");
        assert_eq!(
            v4_only[6].detail,
            "IPv4 (no IPv6 in this kernel): routing rules can be listed"
        );
    }

    #[test]
    fn socket_lookup_goes_by_the_kernel_version() {
        let lines = evaluate(&Facts {
            kernel_release: "5.4.0".into(),
            ..good()
        });
        let failed: Vec<&str> = lines.iter().filter(|l| !l.pass).map(|l| l.name).collect();
        assert_eq!(failed, ["kernel", "socket-lookup"]);
        assert!(lines[7].detail.contains("bpf_sk_assign"), "{}", lines[7]);
        assert!(evaluate(&good())[7].detail.contains("not probed apart"));
    }

    #[test]
    fn the_probes_pass_on_this_machine() {
        // The tests run as root on a kernel with policy routing (as mesh-node's do).
        assert_eq!(probe::transparent(false), Ok(()));
        assert_eq!(probe::policy_routing(false), Ok(()));
        assert_eq!(probe::policy_routing(true), Ok(()));
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
