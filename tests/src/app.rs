//! The test app (`mesh-testapp`) in pods: echo servers and clients whose JSON reports say what
//! each end saw.
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::agent::Agent;
use crate::{bin_path, wait_until, Cluster, Pod, Proc};

const WAIT: Duration = Duration::from_secs(20);

pub fn testapp() -> Result<Command> {
    Ok(Command::new(bin_path("mesh-testapp")?))
}

/// An echo server in `pod` on each of `ports`, IPv4 and IPv6; returns once it listens.
pub fn echo_server(cluster: &Cluster, pod: &Pod, ports: &[u16]) -> Result<Proc> {
    let mut cmd = testapp()?;
    cmd.arg("echo-server");
    for port in ports {
        cmd.arg("--listen").arg(format!("0.0.0.0:{port}"));
        cmd.arg("--listen").arg(format!("[::]:{port}"));
    }
    let server = cluster.spawn_in_pod(pod, cmd)?;
    server.wait_for_line(WAIT, |l| l.contains(r#""event":"listening""#))?;
    Ok(server)
}

/// What the client saw of one echo exchange.
#[derive(Debug, Deserialize)]
pub struct ClientReport {
    pub ok: bool,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub sent: u64,
    pub received: u64,
    pub error: Option<String>,
}

/// The test app's echo client: sends `bytes` to `dst` and checks they come back, within
/// `timeout_ms` for the whole exchange; it prints a [`ClientReport`] and exits non-zero when
/// the exchange failed.
pub fn client_cmd(dst: SocketAddr, bytes: usize, timeout_ms: u64) -> Result<Command> {
    let mut cmd = testapp()?;
    cmd.args([
        "client",
        "--connect",
        &dst.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--timeout-ms",
        &timeout_ms.to_string(),
    ]);
    Ok(cmd)
}

/// Sends `bytes` from `pod` to `dst` and checks they come back intact.
pub fn client(cluster: &Cluster, pod: &Pod, dst: SocketAddr, bytes: usize) -> Result<ClientReport> {
    // A bound on the whole exchange, generous for big transfers on a busy machine.
    let cmd = client_cmd(dst, bytes, 10_000 + bytes as u64 / 2_000)?;
    let out = cluster.exec_in_pod(pod, cmd)?;
    let report: ClientReport = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("client output: {} / {}", out.stdout, out.stderr))?;
    if !report.ok {
        bail!("client in {} → {dst} failed: {report:?}", pod.name);
    }
    Ok(report)
}

/// Waits until `agents` have meshed their enrolled pods and an exchange from `pod` to `dst`
/// works end to end: from then on the path goes through the mesh, not around it.
pub fn wait_mesh_path(cluster: &Cluster, agents: &[Agent], pod: &Pod, dst: SocketAddr) -> Result<()> {
    for agent in agents {
        agent.wait_meshed(cluster)?;
    }
    wait_until(
        WAIT,
        &format!("a working mesh path {} → {dst}", pod.name),
        || {
            client(cluster, pod, dst, 1024)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        },
    )
}

/// The peer address the server saw on its `n`-th accepted connection (1-based).
pub fn accept_peer(server: &Proc, n: usize) -> Result<SocketAddr> {
    let lines = server.wait_for_lines(WAIT, n, |l| l.contains(r#""event":"accept""#))?;
    let v: Value = serde_json::from_str(&lines[n - 1])?;
    Ok(v["peer"].as_str().context("accept without peer")?.parse()?)
}

/// Sends `marker` from `pod` to an echo server at `dst` and returns what came back: a
/// printable payload to look for on the wire.
pub fn send_marker(cluster: &Cluster, pod: &Pod, dst: SocketAddr, marker: &str) -> Result<String> {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args([
        "-c",
        MARKER_CLIENT,
        &dst.ip().to_string(),
        &dst.port().to_string(),
        marker,
    ]);
    Ok(cluster.exec_in_pod(pod, cmd)?.success()?.stdout)
}

const MARKER_CLIENT: &str = "import socket,sys\n\
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10)\n\
s.sendall(sys.argv[3].encode())\ns.shutdown(socket.SHUT_WR)\nb=b''\n\
while True:\n    d=s.recv(65536)\n    if not d: break\n    b+=d\n\
print(b.decode())\n";
