//! A real Prometheus server (the `prometheus` binary of the Debian package) scraping a harness
//! cluster: it runs in the cluster network's namespace, like the controller, so every node's
//! `:15020` is reachable from it, with its config and TSDB in a directory of its own. The test
//! process queries its HTTP API over sockets opened inside that namespace.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::sys::NETNS_DIR;
use crate::{wait_until, Cluster, Node, Proc, LINK_IPV4};

/// How long Prometheus may take to open its TSDB and serve.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one API call may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The node agent's metrics port (DESIGN.md §5).
const METRICS_PORT: u16 = 15020;

/// One address to scrape (`/metrics`), in a job, with extra labels on its series.
#[derive(Clone, Debug)]
pub struct ScrapeTarget {
    pub job: String,
    pub address: SocketAddr,
    pub labels: BTreeMap<String, String>,
}

impl ScrapeTarget {
    /// A node agent's `:15020`, in job `mesh-node`, labelled `node=<name>` (as a Kubernetes
    /// service discovery relabelling would).
    pub fn mesh_node(node: &Node) -> ScrapeTarget {
        ScrapeTarget {
            job: "mesh-node".into(),
            address: SocketAddr::new(node.ipv4.into(), METRICS_PORT),
            labels: BTreeMap::from([("node".to_string(), node.name.clone())]),
        }
    }
}

/// One element of an instant vector (or the value of a scalar, with no labels).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape target as Prometheus reports it on `/api/v1/targets`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetHealth {
    pub scrape_pool: String,
    pub scrape_url: String,
    /// The target's labels after relabelling (`job`, `instance` and the extra ones).
    pub labels: BTreeMap<String, String>,
    /// `up`, `down` or `unknown` (not scraped yet).
    pub health: String,
    pub last_error: String,
}

/// Prometheus refused a query; carries its own words.
#[derive(Debug)]
pub struct PromqlError {
    /// `bad_data`, `execution`, `timeout`, …
    pub error_type: String,
    pub message: String,
}

impl std::fmt::Display for PromqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "prometheus: {}: {}", self.error_type, self.message)
    }
}

impl std::error::Error for PromqlError {}

/// A running Prometheus. Dropping it stops the process and removes its directory.
pub struct Prometheus {
    proc: Option<Proc>,
    dir: PathBuf,
    netns: String,
    addr: SocketAddr,
    targets: usize,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Prometheus {
    /// Starts Prometheus scraping `targets` every `scrape_interval` (sub-second intervals are
    /// fine) and returns once `/-/ready` answers 200.
    pub fn start(
        cluster: &Cluster,
        targets: &[ScrapeTarget],
        scrape_interval: Duration,
    ) -> Result<Prometheus> {
        let netns = cluster.link_netns().to_string();
        let dir = std::env::temp_dir().join(format!(
            "{}-prometheus{}",
            cluster.id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut prom = Prometheus {
            proc: None,
            addr: SocketAddr::new(LINK_IPV4.into(), free_port(&netns)?),
            dir,
            netns,
            targets: targets.len(),
        };
        std::fs::create_dir_all(prom.dir.join("data"))
            .with_context(|| format!("creating {}", prom.dir.display()))?;
        let config = prom.dir.join("prometheus.yml");
        // YAML is a superset of JSON, so serde_json writes a config Prometheus reads as it is.
        std::fs::write(&config, config_json(targets, scrape_interval).to_string())
            .with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", prom.dir.join("data").display()))
            .arg(format!("--web.listen-address={}", prom.addr))
            .arg("--log.level=info");
        let proc = cluster
            .spawn_in_net(&prom.netns, cmd)
            .context("starting prometheus (installed by xtask/scripts/setup.sh)")?;
        let proc = prom.proc.insert(proc);
        // Fails early, with Prometheus's last words, if it exits (a config it refuses, say).
        proc.wait_for_line(READY_TIMEOUT, |l| {
            l.contains("Server is ready to receive web requests")
        })
        .context("prometheus did not become ready")?;
        wait_until(
            READY_TIMEOUT,
            "prometheus /-/ready to answer 200",
            || match prom.get("/-/ready") {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("{status}: {body}")),
                Err(e) => Err(format!("{e:#}")),
            },
        )?;
        Ok(prom)
    }

    /// Evaluates `promql` now (an instant query). A vector gives one sample per series, a
    /// scalar one sample without labels; a refused query fails with a [`PromqlError`].
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let data = self.api(&format!("/api/v1/query?query={}", percent_encode(promql)))?;
        let data: QueryData = serde_json::from_value(data).context("reading the query result")?;
        match data.result_type.as_str() {
            "vector" => {
                let series: Vec<VectorSample> =
                    serde_json::from_value(data.result).context("reading the vector")?;
                series
                    .into_iter()
                    .map(|s| {
                        Ok(Sample {
                            labels: s.metric,
                            value: parse_value(&s.value.1)?,
                        })
                    })
                    .collect()
            }
            "scalar" => {
                let (_, v): (f64, String) =
                    serde_json::from_value(data.result).context("reading the scalar")?;
                Ok(vec![Sample {
                    labels: BTreeMap::new(),
                    value: parse_value(&v)?,
                }])
            }
            other => bail!("{promql}: a {other} result, not an instant vector or a scalar"),
        }
    }

    /// Evaluates `promql` until `predicate` holds for its samples, for at most `timeout`, and
    /// returns them. A refused query fails at once; on timeout the error shows the last
    /// samples seen.
    pub fn wait_for(
        &self,
        promql: &str,
        mut predicate: impl FnMut(&[Sample]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<Sample>> {
        let start = Instant::now();
        let mut interval = Duration::from_millis(20);
        loop {
            let last = match self.query(promql) {
                Ok(samples) if predicate(&samples) => return Ok(samples),
                Ok(samples) => format!("{samples:?}"),
                Err(e) if e.downcast_ref::<PromqlError>().is_some() => return Err(e),
                Err(e) => format!("{e:#}"),
            };
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                bail!("timed out after {timeout:?} waiting on `{promql}`; last seen: {last}");
            }
            std::thread::sleep(interval.min(timeout - elapsed));
            interval = (interval * 2).min(Duration::from_millis(200));
        }
    }

    /// The active scrape targets and their health.
    pub fn targets(&self) -> Result<Vec<TargetHealth>> {
        let data = self.api("/api/v1/targets?state=active")?;
        let active = data.get("activeTargets").cloned().context("no activeTargets")?;
        serde_json::from_value(active).context("reading the active targets")
    }

    /// Waits until every configured target has been scraped successfully; returns them.
    pub fn wait_targets_up(&self, timeout: Duration) -> Result<Vec<TargetHealth>> {
        wait_until(timeout, "every scrape target to be up", || {
            let targets = self.targets().map_err(|e| format!("{e:#}"))?;
            if targets.len() == self.targets && targets.iter().all(|t| t.health == "up") {
                Ok(targets)
            } else {
                let seen: Vec<String> = targets
                    .iter()
                    .map(|t| format!("{} {} {:?}", t.scrape_url, t.health, t.last_error))
                    .collect();
                Err(format!("{} of {} targets: {seen:?}", targets.len(), self.targets))
            }
        })
    }

    /// A `GET` on the API: the `data` of a success, a [`PromqlError`] for an error answer.
    fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path)?;
        let answer: ApiAnswer = serde_json::from_str(&body)
            .with_context(|| format!("GET {path}: HTTP {status}, not an API answer: {body}"))?;
        match answer.status.as_str() {
            "success" => Ok(answer.data),
            _ => Err(PromqlError {
                error_type: answer.error_type.unwrap_or_default(),
                message: answer.error.unwrap_or(body),
            }
            .into()),
        }
    }

    /// A plain HTTP/1.0 `GET` (so the body is neither chunked nor compressed, and ends with the
    /// connection): (status, body).
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self.addr;
        let mut stream = in_netns(&self.netns, move || {
            TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        })
        .with_context(|| format!("connecting to prometheus at {addr}"))?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .with_context(|| format!("reading the answer to GET {path}"))?;
        let raw = String::from_utf8(raw).context("the answer is not UTF-8")?;
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .with_context(|| format!("GET {path}: no end of headers in {raw:?}"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("GET {path}: bad status line in {head:?}"))?;
        Ok((status, body.to_string()))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // The process first: it holds files in the directory.
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Deserialize)]
struct ApiAnswer {
    status: String,
    #[serde(default)]
    data: Value,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct QueryData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Value,
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// Sample values travel as strings, to carry `NaN` and `±Inf`, which Rust parses as they are
/// written (`+Inf` included).
fn parse_value(s: &str) -> Result<f64> {
    s.parse().with_context(|| format!("sample value {s:?}"))
}

fn config_json(targets: &[ScrapeTarget], scrape_interval: Duration) -> Value {
    let interval = format!("{}ms", scrape_interval.as_millis().max(1));
    let mut jobs: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for t in targets {
        jobs.entry(&t.job).or_default().push(json!({
            "targets": [t.address.to_string()],
            "labels": t.labels,
        }));
    }
    let scrape_configs: Vec<Value> = jobs
        .into_iter()
        .map(|(job, static_configs)| {
            json!({
                "job_name": job,
                "scrape_interval": interval,
                // A scrape may take at most its interval.
                "scrape_timeout": interval,
                "static_configs": static_configs,
            })
        })
        .collect();
    json!({
        "global": { "scrape_interval": interval, "scrape_timeout": interval },
        "scrape_configs": scrape_configs,
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A port nobody listens on at [`LINK_IPV4`]: the namespace belongs to this cluster alone, so
/// it stays free until Prometheus binds it.
fn free_port(netns: &str) -> Result<u16> {
    let ip = IpAddr::from(LINK_IPV4);
    in_netns(netns, move || {
        TcpListener::bind(SocketAddr::new(ip, 0))?
            .local_addr()
            .map(|a| a.port())
    })
    .context("finding a free port for prometheus")
}

/// Runs `f` on a short-lived thread inside network namespace `netns`: sockets it opens belong
/// to that namespace and keep working from any thread, while the process stays where it is.
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> std::io::Result<T> + Send) -> Result<T> {
    let path = Path::new(NETNS_DIR).join(netns);
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            // SAFETY: plain syscall on an fd we own; only this (fresh, short-lived) thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {netns}: {}", std::io::Error::last_os_error());
            }
            Ok(f()?)
        })
        .join()
        .map_err(|_| anyhow!("the thread in netns {netns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            percent_encode(r#"sum by (a) (rate(x{b=~"c|d"}[1m]))"#),
            "sum%20by%20%28a%29%20%28rate%28x%7Bb%3D~%22c%7Cd%22%7D%5B1m%5D%29%29"
        );
    }

    #[test]
    fn sample_values_include_prometheus_special_values() {
        assert_eq!(parse_value("+Inf").ok(), Some(f64::INFINITY));
        assert_eq!(parse_value("-Inf").ok(), Some(f64::NEG_INFINITY));
        assert!(parse_value("NaN").is_ok_and(f64::is_nan));
        assert_eq!(parse_value("1e3").ok(), Some(1000.0));
    }

    #[test]
    fn the_config_groups_targets_by_job() {
        let target = |job: &str, port| ScrapeTarget {
            job: job.into(),
            address: SocketAddr::from(([10, 0, 0, 1], port)),
            labels: BTreeMap::from([("node".to_string(), "a".to_string())]),
        };
        let config = config_json(
            &[target("x", 1), target("y", 2), target("x", 3)],
            Duration::from_millis(200),
        );
        assert_eq!(config["global"]["scrape_interval"], "200ms");
        let jobs = config["scrape_configs"].as_array().expect("an array");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0]["job_name"], "x");
        assert_eq!(jobs[0]["static_configs"][1]["targets"][0], "10.0.0.1:3");
        assert_eq!(jobs[0]["static_configs"][0]["labels"]["node"], "a");
    }
}
