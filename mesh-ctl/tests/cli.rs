//! The `meshctl` binary on this machine: pre-flight, and nodes that cannot be reached.

mod common;

use common::{meshctl, meshctl_with, one_line};
use mesh_ctl::exit;

#[test]
fn check_passes_on_this_machine() {
    let out = meshctl(&["check"]);
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    let names = [
        "kernel",
        "btf",
        "cgroup2",
        "bpffs",
        "capabilities",
        "transparent-sockets",
        "policy-routing",
        "socket-lookup",
    ];
    assert_eq!(lines.len(), names.len(), "{out:?}");
    for (line, name) in lines.iter().zip(names) {
        assert!(line.starts_with(&format!("PASS {name}: ")), "{line}");
    }
}

#[test]
fn check_fails_on_a_directory_that_is_not_a_bpffs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    let out = meshctl(&["check", "--bpffs-dir", &path]);
    assert_eq!(out.code, 1, "{out:?}");
    let bpffs = out
        .stdout
        .lines()
        .find(|l| l.contains("bpffs:"))
        .expect("a bpffs line");
    assert!(bpffs.starts_with(&format!("FAIL bpffs: {path} is ")), "{bpffs}");
    assert!(
        bpffs.ends_with(&format!("(fix: mount -t bpf bpf {path})")),
        "{bpffs}"
    );
    // Only that requirement was taken away.
    assert_eq!(
        out.stdout.lines().filter(|l| l.starts_with("FAIL")).count(),
        1,
        "{out:?}"
    );
    assert_eq!(one_line(&out), "meshctl: 1 of 8 pre-flight checks failed");
}

#[test]
fn check_fails_on_a_cgroup_root_that_is_not_cgroup2_and_a_missing_btf() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let btf = dir.path().join("vmlinux").display().to_string();
    let out = meshctl(&["check", "--cgroup-root", &root, "--btf", &btf, "-o", "json"]);
    assert_eq!(out.code, 1, "{out:?}");
    let lines: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let failed: Vec<&str> = lines
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["pass"] == false)
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["btf", "cgroup2"], "{}", out.stdout);
    let cgroup = &lines[2];
    assert_eq!(
        cgroup["fix"].as_str().unwrap(),
        format!("mount -t cgroup2 none {root}, or boot with systemd.unified_cgroup_hierarchy=1")
    );
}

#[test]
fn a_closed_port_is_unreachable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let node = format!("127.0.0.1:{port}");
    let out = meshctl(&["node", "status", "--node", &node]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let line = one_line(&out);
    assert!(
        line.starts_with(&format!("meshctl: cannot reach node {node}: "))
            && line.contains("connection refused"),
        "{line}"
    );
}

#[test]
fn the_node_can_come_from_the_environment() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let node = format!("127.0.0.1:{port}");
    let out = meshctl_with(&["node", "status"], &[("MESHCTL_NODE", &node)]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        one_line(&out).starts_with(&format!("meshctl: cannot reach node {node}: ")),
        "{out:?}"
    );
}

#[test]
fn an_unresolvable_host_is_unreachable() {
    let out = meshctl(&[
        "node",
        "workloads",
        "--node",
        "no-such-node.invalid:15000",
        "--connect-timeout",
        "2s",
    ]);
    assert_eq!(out.code, 3, "{out:?}");
    let line = one_line(&out);
    assert!(
        line.starts_with("meshctl: cannot reach node no-such-node.invalid:15000: "),
        "{line}"
    );
}

#[test]
fn a_missing_socket_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let out = meshctl(&["node", "certs", "--socket", &socket.display().to_string()]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(one_line(&out).contains("no such socket"), "{out:?}");
}

#[test]
fn a_malformed_address_is_a_usage_error() {
    let out = meshctl(&["node", "status", "--node", "node-a"]);
    assert_eq!(out.code, i32::from(exit::USAGE), "{out:?}");
    assert!(out.stderr.contains("is not HOST:PORT"), "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}

#[test]
fn help_lists_the_exit_codes_and_the_commands() {
    let out = meshctl(&["--help"]);
    assert_eq!(out.code, 0, "{out:?}");
    for want in [
        "Exit codes:",
        "4  the node speaks another admin API version",
        "node",
        "check",
        "enroll",
        "unenroll",
        "completions",
    ] {
        assert!(out.stdout.contains(want), "{want} missing from\n{}", out.stdout);
    }
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef meshctl"),
        ("fish", "complete -c meshctl"),
    ] {
        let out = meshctl(&["completions", shell]);
        assert_eq!(out.code, 0, "{out:?}");
        assert!(
            out.stdout.contains(marker),
            "{shell}: {}",
            &out.stdout[..200.min(out.stdout.len())]
        );
        assert!(
            out.stdout.contains("workloads"),
            "{shell} completes node subcommands"
        );
    }
}

#[test]
fn version_of_meshctl_alone() {
    let out = meshctl(&["version", "--client"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        format!("meshctl    {} (admin API v1)\n", env!("CARGO_PKG_VERSION"))
    );
    let out = meshctl(&["version", "--client", "-o", "yaml"]);
    assert_eq!(
        out.stdout,
        format!("meshctl: {}\napi: 1\n", env!("CARGO_PKG_VERSION"))
    );
}

/// Without CAP_NET_ADMIN and CAP_NET_RAW (dropped with `setpriv`; needs root), the kernel
/// refuses a transparent socket, and check says so with the fix and the switch.
#[test]
fn check_fails_transparent_sockets_without_the_capability() {
    let out = std::process::Command::new("setpriv")
        .args([
            "--inh-caps=-net_admin,-net_raw",
            "--bounding-set=-net_admin,-net_raw",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_meshctl"))
        .arg("check")
        .output()
        .expect("running meshctl under setpriv (is it installed, and is this root?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("transparent-sockets:"))
        .expect("a transparent-sockets line");
    assert!(line.starts_with("FAIL transparent-sockets: "), "{line}");
    assert!(line.contains("IPv4: Operation not permitted"), "{line}");
    assert!(line.contains("--preserve-source=false"), "{line}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(
        failed.len(),
        2,
        "capabilities and transparent sockets only: {stdout}"
    );
}
