//! `--preserve-source` refuses to start the agent without the kernel features it needs, for
//! real: the agent runs in a network namespace of its own, without CAP_NET_ADMIN and
//! CAP_NET_RAW (dropped with `setpriv`), so the kernel refuses its transparent socket. Needs
//! root, `unshare` and `setpriv`.
use std::process::{Command, Output};

/// mesh-node with `args` in a fresh network namespace, with no capability that allows a
/// transparent socket. The controller files do not exist: an agent that gets past the
/// pre-flight stops when it reads them, having bound only its namespace's ports.
fn agent_without_net_admin(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("admin.sock");
    Command::new("unshare")
        .args(["--net", "--", "setpriv"])
        .args([
            "--inh-caps=-net_admin,-net_raw",
            "--bounding-set=-net_admin,-net_raw",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_mesh-node"))
        .args([
            "--node-ip",
            "10.99.0.1,fd99::1",
            "--controller",
            "unix:/nonexistent/controller.sock",
        ])
        .args([
            "--controller-ca",
            "/nonexistent/ca.pem",
            "--controller-token-file",
            "/nonexistent/token",
        ])
        .arg("--admin-socket")
        .arg(&socket)
        .args(args)
        .output()
        .expect("running mesh-node under unshare and setpriv (are both installed, and is this root?)")
}

#[test]
fn without_transparent_sockets_the_agent_refuses_to_start_and_says_how_to_turn_it_off() {
    let out = agent_without_net_admin(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("--preserve-source needs transparent sockets (IPv4: bind to a non-local address with IP_TRANSPARENT)"),
        "{stderr}"
    );
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    assert!(stderr.contains("grant CAP_NET_ADMIN"), "{stderr}");
    assert!(stderr.contains("--preserve-source=false"), "{stderr}");
}

#[test]
fn with_preserve_source_off_the_agent_does_not_probe() {
    let out = agent_without_net_admin(&["--preserve-source=false"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(!stderr.contains("--preserve-source needs"), "{stderr}");
    // It went on, to the next thing this set-up lacks.
    assert!(stderr.contains("--controller-ca"), "{stderr}");
}
