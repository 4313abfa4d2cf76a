//! The netns cluster harness: nodes and pods out of network namespaces and cgroups.
//!
//! A [`Cluster`] lives entirely inside namespaces it created, with no link to the root network
//! namespace. Its id is `mt<pid>x<counter>`; its network namespaces are named `<id>-<name>`.
//!
//! ```text
//!  <id>-net     br0 10.0.0.254/24 fd00::254/64, ports n1, n2, …     the wire between the nodes
//!                │ nN
//!  <id>-<node>  eth0 10.0.0.N/24 fd00::N/64                          node N = 1, 2, … (uplink)
//!               br0  10.1.N.1/24 fd00:1:N::1/64                      the pods' bridge and gateway
//!               forwarding on; 10.1.M.0/24 via 10.0.0.M, fd00:1:M::/64 via fd00::M for each other node M
//!                │ Pod::host_veth (v<pod>), a port of br0
//!  <id>-<pod>   eth0 10.1.N.(10+i)/24 fd00:1:N::(10+i)/64            i-th pod of node N;
//!               default routes via 10.1.N.1 and fd00:1:N::1          IPv6 digits = IPv4 digits
//! ```
//!
//! Cgroups (v2) under `<cgroup2 mount>/<id>/`: `<node>/agent/` for the node agent,
//! `<node>/pods/` as the pods' root, `<node>/pods/<pod>/` per pod. A per-node bpffs pin directory
//! `/sys/fs/bpf/<id>/<node>` is left for the agent to create, and removed on teardown.
//!
//! Everything is torn down on drop (also while unwinding from a panic) and on SIGINT, SIGTERM or
//! SIGHUP (exit status 130); leftovers of runs that died are removed by the next [`Cluster::new`].

pub mod agent;
pub mod app;
mod cluster;
pub mod controller;
pub mod frames;
pub mod load;
mod proc;
pub mod prometheus;
mod sys;
pub mod wire;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use cluster::{teardown_all, Cluster, ExecOutput, Node, Pod, LINK_IPV4, LINK_IPV6};
pub use proc::{Proc, Stream};

/// Polls `f` (at a short, growing interval) until it returns `Ok`, for at most `deadline`.
/// On expiry, fails with `what` and the last error `f` reported.
pub fn wait_until<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> Result<T> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(2);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(last) => {
                let elapsed = start.elapsed();
                if elapsed >= deadline {
                    bail!("timed out after {deadline:?} waiting for {what}; last observation: {last}");
                }
                std::thread::sleep(interval.min(deadline - elapsed));
                interval = (interval * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// The path of a workspace binary: `$MESH_BIN_DIR/<name>` if that variable is set, else next to
/// the running executable (`target/<profile>/` for xtask, the parent of `deps/` for a test).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("MESH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("finding the current executable")?;
            let mut dir = exe
                .parent()
                .context("the current executable has no parent dir")?
                .to_path_buf();
            if matches!(
                dir.file_name().and_then(|n| n.to_str()),
                Some("deps" | "examples")
            ) {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "binary `{name}` not found at {}: run `cargo build --workspace --bins` (or `cargo xtask test`) \
             first, or point MESH_BIN_DIR at the directory holding it",
            path.display()
        );
    }
    Ok(path)
}
