//! The real `mesh-node` agent on a harness node: its process, its logs, its admin API and its
//! pinned maps as the kernel holds them.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::controller::Controller;
use crate::prometheus::Sample;
use crate::{bin_path, wait_until, Cluster, Node, Pod, Proc};

/// How long an agent may take to attach its programs and bind its listeners.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to act on a change.
const WAIT: Duration = Duration::from_secs(20);

/// A node's agent, configured by the cluster's controller.
pub struct Agent {
    node: Node,
    controller: SocketAddr,
    root_ca: PathBuf,
    token_file: PathBuf,
    extra_args: Vec<String>,
    log_filter: String,
    reconcile_interval: String,
    proc: Option<Proc>,
}

impl Agent {
    /// Prepares (does not start) the agent of `node`, registering the node with `controller`;
    /// `extra_args` go to every start.
    pub fn new(node: &Node, controller: &Controller, extra_args: &[&str]) -> Result<Agent> {
        Ok(Agent {
            node: node.clone(),
            controller: controller.addr(),
            root_ca: controller.root_ca(),
            token_file: controller.node_token(&node.name)?,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            log_filter: "info,mesh_node=debug".into(),
            reconcile_interval: "100ms".into(),
            proc: None,
        })
    }

    /// Makes later starts log with `filter` instead of `info,mesh_node=debug` (whose
    /// per-connection records the tests read, and a benchmark must not pay for).
    pub fn set_log_filter(&mut self, filter: &str) {
        self.log_filter = filter.to_owned();
    }

    /// Makes later starts reconcile every `interval` (humantime) instead of the tests' 100 ms.
    pub fn set_reconcile_interval(&mut self, interval: &str) {
        self.reconcile_interval = interval.to_owned();
    }

    /// Makes later starts read the controller token from `path` (to test refusals).
    pub fn set_token_file(&mut self, path: PathBuf) {
        self.token_file = path;
    }

    /// The agent's admin Unix socket, in the controller's directory (the cluster's own).
    pub fn admin_socket(&self) -> PathBuf {
        let dir = self
            .token_file
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/tmp"));
        dir.join(format!("admin-{}.sock", self.node.name))
    }

    /// The command line of this node's agent.
    pub fn command(&self) -> Result<Command> {
        self.command_with(&self.node.pin_dir, &self.node.pods_cgroup)
    }

    /// The command line with another pin dir and pods cgroup (to test what the agent refuses).
    pub fn command_with(&self, pin_dir: &Path, pods_cgroup: &Path) -> Result<Command> {
        let n = &self.node;
        let mut cmd = Command::new(bin_path("mesh-node")?);
        cmd.arg("--node-name")
            .arg(&n.name)
            .arg("--node-ip")
            .arg(format!("{},{}", n.ipv4, n.ipv6))
            .arg("--bpffs-dir")
            .arg(pin_dir)
            .arg("--pods-cgroup")
            .arg(pods_cgroup)
            .arg("--controller")
            .arg(self.controller.to_string())
            .arg("--controller-ca")
            .arg(&self.root_ca)
            .arg("--controller-token-file")
            .arg(&self.token_file)
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .arg("--reconcile-interval")
            .arg(&self.reconcile_interval)
            .args(["--log-format", "json"])
            .arg("--log")
            .arg(&self.log_filter)
            .args(&self.extra_args);
        Ok(cmd)
    }

    /// Starts the agent in the node's netns and agent cgroup and waits until it is ready.
    pub fn start(&mut self, cluster: &Cluster) -> Result<&Proc> {
        if self.proc.is_some() {
            bail!("agent on {} already started", self.node.name);
        }
        let proc = cluster.spawn_on_node(&self.node, self.command()?)?;
        proc.wait_for_line(READY_TIMEOUT, |l| log_message(l).as_deref() == Some("ready"))
            .with_context(|| format!("agent on {} did not become ready", self.node.name))?;
        Ok(self.proc.insert(proc))
    }

    /// The running agent process.
    pub fn proc(&self) -> Result<&Proc> {
        self.proc.as_ref().context("agent not started")
    }

    /// Takes the process out (to kill it, or wait for its exit); the agent can be started again.
    pub fn take(&mut self) -> Option<Proc> {
        self.proc.take()
    }

    /// The agent's JSON log records so far.
    pub fn logs(&self) -> Vec<Value> {
        self.proc
            .as_ref()
            .map(|p| {
                p.lines()
                    .iter()
                    .filter_map(|(_, l)| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the kernel's enrolled map holds exactly the cgroups of `pods`.
    pub fn wait_enrolled(&self, pods: &[&Pod]) -> Result<()> {
        let mut want: Vec<u64> = pods.iter().map(|p| p.cgroup_id).collect();
        want.sort_unstable();
        wait_until(WAIT, "the enrolled map to match the workloads", || {
            let have = self.enrolled().map_err(|e| format!("{e:#}"))?;
            if have == want {
                Ok(())
            } else {
                Err(format!("enrolled {have:?}, want {want:?}"))
            }
        })
    }

    /// The connections the proxy captured so far, as (source, original destination), in order.
    pub fn captured(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.logs()
            .iter()
            .filter(|v| v["message"] == "captured")
            .filter_map(|v| {
                Some((
                    v["span"]["src"].as_str()?.parse().ok()?,
                    v["dst"].as_str()?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// Waits for the proxy to capture a connection to `dst`; returns its source.
    pub fn wait_captured(&self, dst: SocketAddr) -> Result<SocketAddr> {
        wait_until(
            WAIT,
            &format!("the agent to capture a connection to {dst}"),
            || {
                let captured = self.captured();
                captured
                    .iter()
                    .find(|(_, d)| *d == dst)
                    .map(|(src, _)| *src)
                    .ok_or_else(|| format!("captured so far: {captured:?}"))
            },
        )
    }

    /// Waits for the proxy's `n`-th captured connection (1-based).
    pub fn wait_nth_captured(&self, n: usize) -> Result<(SocketAddr, SocketAddr)> {
        wait_until(WAIT, &format!("the agent's captured connection #{n}"), || {
            let captured = self.captured();
            captured
                .get(n - 1)
                .copied()
                .ok_or_else(|| format!("captured so far: {captured:?}"))
        })
    }

    /// `GET` on the agent's admin API (127.0.0.1:15000 inside the node), as JSON.
    pub fn admin_get(&self, cluster: &Cluster, path: &str) -> Result<Value> {
        let out = cluster
            .exec_on_node(&self.node, curl(&format!("http://127.0.0.1:15000{path}")))?
            .success()?;
        serde_json::from_str(&out.stdout).with_context(|| format!("admin {path}: {}", out.stdout))
    }

    /// The value of one Prometheus sample on the agent's :15020/metrics, e.g.
    /// `mesh_outbound_connections_total{route="hbone"}`; 0 when it is absent.
    pub fn metric(&self, cluster: &Cluster, sample: &str) -> Result<f64> {
        let out = cluster
            .exec_on_node(&self.node, curl("http://127.0.0.1:15020/metrics"))?
            .success()?;
        let line = out
            .stdout
            .lines()
            .find(|l| l.split_once(' ').map(|(name, _)| name) == Some(sample));
        match line.and_then(|l| l.rsplit_once(' ')) {
            Some((_, v)) => Ok(v.parse()?),
            None => Ok(0.0),
        }
    }

    /// Waits until every enrolled pod of this node is captured by the kernel and has its
    /// certificate: from then on its connections go through the mesh, not around it.
    pub fn wait_meshed(&self, cluster: &Cluster) -> Result<()> {
        wait_until(
            WAIT,
            &format!("the enrolled pods of {} to be meshed", self.node.name),
            || {
                let workloads = self
                    .admin_get(cluster, "/v1/workloads")
                    .map_err(|e| format!("{e:#}"))?;
                let certs = self
                    .admin_get(cluster, "/v1/certs")
                    .map_err(|e| format!("{e:#}"))?;
                let has_cert = |id: &Value| {
                    certs
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| &c["identity"] == id)
                };
                let waiting: Vec<&Value> = workloads
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|w| w["enrolled"] == true && (w["captured"] != true || !has_cert(&w["identity"])))
                    .collect();
                if waiting.is_empty() {
                    Ok(())
                } else {
                    Err(format!("not yet: {waiting:?}"))
                }
            },
        )
    }

    /// Waits until the veth programs of `pods` (pods of this node, each with a process in its
    /// cgroup for the agent to find its veth by) are attached: from then on the proxy delivers
    /// to them from the client's own address.
    pub fn wait_veth_ready(&self, cluster: &Cluster, pods: &[&Pod]) -> Result<()> {
        let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        wait_until(WAIT, &format!("the veth programs of {names:?}"), || {
            let workloads = self
                .admin_get(cluster, "/v1/workloads")
                .map_err(|e| format!("{e:#}"))?;
            let waiting: Vec<&Value> = workloads
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| names.iter().any(|n| w["name"] == *n) && w["veth_ready"] != true)
                .collect();
            if waiting.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet: {waiting:?}"))
            }
        })
    }

    /// Every sample of metric `name` on the agent's :15020/metrics, with its labels.
    pub fn samples(&self, cluster: &Cluster, name: &str) -> Result<Vec<Sample>> {
        let out = cluster
            .exec_on_node(&self.node, curl("http://127.0.0.1:15020/metrics"))?
            .success()?;
        out.stdout
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
            })
            .map(parse_sample)
            .collect()
    }

    /// The sum of metric `name` over the samples whose labels include all of `labels`.
    pub fn metric_sum(&self, cluster: &Cluster, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(self
            .samples(cluster, name)?
            .iter()
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum())
    }

    /// The admin API over the agent's Unix socket: `GET path` (or `PUT` with `body`).
    pub fn admin_unix(
        &self,
        cluster: &Cluster,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Value> {
        let mut cmd = curl(&format!("http://localhost{path}"));
        cmd.arg("--unix-socket")
            .arg(self.admin_socket())
            .args(["-X", method]);
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "--data", body]);
        }
        let out = cluster.exec_on_node(&self.node, cmd)?.success()?;
        serde_json::from_str(&out.stdout).with_context(|| format!("admin {method} {path}: {}", out.stdout))
    }

    /// The readiness probe's answer: (HTTP status, body).
    pub fn readiness(&self, cluster: &Cluster) -> Result<(u16, String)> {
        let mut cmd = curl("http://127.0.0.1:15021/healthz/ready");
        cmd.args(["-w", "\n%{http_code}"]);
        let out = cluster.exec_on_node(&self.node, cmd)?.success()?;
        let (body, code) = out
            .stdout
            .trim_end()
            .rsplit_once('\n')
            .context("curl printed no status")?;
        Ok((code.parse()?, body.to_owned()))
    }

    /// The cgroup ids in the kernel's enrolled map, read from the pins with bpftool.
    pub fn enrolled(&self) -> Result<Vec<u64>> {
        let map = find_pin(&self.node.pin_dir, "mesh_enrolled")?;
        let mut ids: Vec<u64> = bpftool_dump(&map)?
            .iter()
            .map(|entry| value_u64(&entry["key"]))
            .collect::<Result<_>>()?;
        ids.sort_unstable();
        Ok(ids)
    }
}

fn curl(url: &str) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", url]);
    cmd
}

/// `name{k="v",...} value` (label values in our metrics hold no `",`: names and identities).
fn parse_sample(line: &str) -> Result<Sample> {
    let (head, value) = line
        .rsplit_once(' ')
        .with_context(|| format!("sample line {line:?}"))?;
    let mut labels = BTreeMap::new();
    if let Some((_, rest)) = head.split_once('{') {
        for pair in rest.trim_end_matches('}').split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once("=\"")
                .with_context(|| format!("label {pair:?} in {line:?}"))?;
            labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
        }
    }
    Ok(Sample {
        labels,
        value: value.parse().with_context(|| format!("value in {line:?}"))?,
    })
}

/// The `message` of a JSON log line.
pub fn log_message(line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    v.get("message")?.as_str().map(str::to_owned)
}

/// A pinned object of the agent's current set (`<pin dir>/current` names it).
pub fn find_pin(pin_dir: &Path, name: &str) -> Result<PathBuf> {
    let path = pin_dir.join("current").join(name);
    if !path.exists() {
        bail!("no pin {}", path.display());
    }
    Ok(path)
}

fn bpftool_dump(pin: &Path) -> Result<Vec<Value>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin)
        .output()
        .context("running bpftool (installed by the set-up script)")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump {}: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A little-endian integer as bpftool prints it: a number, or hex byte strings.
pub fn value_u64(v: &Value) -> Result<u64> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    let bytes = v.as_array().context("expected a number or a byte array")?;
    let mut n = 0u64;
    for (i, b) in bytes.iter().enumerate().take(8) {
        let s = b.as_str().context("expected a hex byte")?;
        n |= u64::from_str_radix(s.trim_start_matches("0x"), 16)? << (8 * i);
    }
    Ok(n)
}
