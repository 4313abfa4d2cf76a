//! The figures of one round, each taken on every path in turn, and the metrics they yield.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use mesh_harness::app::testapp;
use mesh_harness::load::RateReport;
use mesh_harness::{wait_until, Cluster, Pod};

use super::proc_stats::{cpu_seconds, memory, passive_opens, reset_peaks};
use super::report::{Metric, PathKind, Samples, Target};
use super::topology::{Topology, HTTP_PORT};
use super::{iperf, wrk, Plan};

/// The fixed request rate at which latency is compared.
const RATE: f64 = 1000.0;
/// How many idle connections the memory figure holds open.
const IDLE_CONNECTIONS: usize = 1000;
const MIB: f64 = 1024.0 * 1024.0;

const fn metric(id: &'static str, label: &'static str, unit: &'static str, target: Option<Target>) -> Metric {
    Metric {
        id,
        label,
        unit,
        target,
    }
}

const fn ratio(ratio: f64) -> Option<Target> {
    Some(Target::RatioToDirectAtLeast { ratio })
}

/// Every row of the table, in order; the targets are the issue's, for a 2-core machine.
pub const METRICS: [Metric; 20] = [
    metric("ka1_rps", "HTTP/1.1 keep-alive, 1 conn", "req/s", None),
    metric("ka1_p50", "  1 conn p50", "µs", None),
    metric("ka1_p90", "  1 conn p90", "µs", None),
    metric("ka1_p99", "  1 conn p99", "µs", None),
    metric("ka64_rps", "HTTP/1.1 keep-alive, 64 conns", "req/s", ratio(0.57)),
    metric("ka64_p50", "  64 conns p50", "µs", None),
    metric("ka64_p90", "  64 conns p90", "µs", None),
    metric("ka64_p99", "  64 conns p99", "µs", None),
    metric(
        "rate_p50",
        "fixed 1000 req/s, 1 conn, p50",
        "µs",
        Some(Target::AddedOverDirectAtMost { limit: 60.0 }),
    ),
    metric("rate_p90", "  fixed 1000 req/s p90", "µs", None),
    metric(
        "rate_p99",
        "  fixed 1000 req/s p99",
        "µs",
        Some(Target::AddedOverDirectAtMost { limit: 150.0 }),
    ),
    metric(
        "new16_rps",
        "new TCP conn per request, 16 conns",
        "req/s",
        ratio(0.28),
    ),
    metric("bulk1_gbps", "bulk TCP, 1 stream", "Gbit/s", ratio(0.70)),
    metric("bulk8_gbps", "bulk TCP, 8 streams", "Gbit/s", None),
    metric(
        "cpu_ka64",
        "proxy CPU per 10k req, 64 keep-alive conns",
        "s",
        None,
    ),
    metric("cpu_new16", "proxy CPU per 10k req, new conn per req", "s", None),
    metric(
        "rss_idle",
        "proxy RSS idle",
        "MiB",
        Some(Target::AtMost { limit: 10.0 }),
    ),
    metric("rss_peak", "proxy peak RSS under load", "MiB", None),
    metric(
        "rss_conns",
        "proxy RSS, 1000 idle conns",
        "MiB",
        Some(Target::AtMost { limit: 40.0 }),
    ),
    metric(
        "new16_accepts",
        "  server's accepted conns per request",
        "conns",
        None,
    ),
];

/// The timed figures, in the order a round takes them.
#[derive(Clone, Copy, Debug)]
enum Figure {
    KeepAlive1,
    KeepAlive64,
    FixedRate,
    NewConnections,
    Bulk1,
    Bulk8,
}

impl Figure {
    const ALL: [Figure; 6] = [
        Figure::KeepAlive1,
        Figure::KeepAlive64,
        Figure::FixedRate,
        Figure::NewConnections,
        Figure::Bulk1,
        Figure::Bulk8,
    ];
}

/// One round: every figure on every path, path after path, then the memory figures.
pub fn round(topo: &Topology, plan: &Plan, samples: &mut Samples) -> Result<()> {
    let paths = topo.paths();
    let proxied: Vec<PathKind> = paths.iter().copied().filter(|p| *p != PathKind::Direct).collect();
    for &path in &proxied {
        for cgroup in topo.proxy_cgroups(path) {
            reset_peaks(&cgroup)?;
        }
        let idle = max_memory(topo, path)?;
        samples.add("rss_idle", path, idle.0 as f64 / MIB);
    }
    let d = plan.duration;
    for figure in Figure::ALL {
        for &path in &paths {
            match figure {
                Figure::KeepAlive1 => keep_alive(topo, path, &KA1, d, samples),
                Figure::KeepAlive64 => keep_alive(topo, path, &KA64, d, samples),
                Figure::FixedRate => fixed_rate(topo, path, d, samples),
                Figure::NewConnections => new_connections(topo, path, d, samples),
                Figure::Bulk1 => bulk(topo, path, 1, d, "bulk1_gbps", samples),
                Figure::Bulk8 => bulk(topo, path, 8, d, "bulk8_gbps", samples),
            }
            .with_context(|| format!("{figure:?} on the {path:?} path"))?;
        }
    }
    for &path in &proxied {
        samples.add("rss_peak", path, max_memory(topo, path)?.1 as f64 / MIB);
    }
    for &path in &proxied {
        let rss = idle_connections(topo, path).with_context(|| format!("idle connections on {path:?}"))?;
        samples.add("rss_conns", path, rss / MIB);
    }
    Ok(())
}

/// The metric ids a keep-alive figure fills: req/s, p50, p90, p99, and proxy CPU if any.
struct KeepAlive {
    connections: u32,
    threads: u32,
    ids: [&'static str; 4],
    cpu_id: Option<&'static str>,
}

const KA1: KeepAlive = KeepAlive {
    connections: 1,
    threads: 1,
    ids: ["ka1_rps", "ka1_p50", "ka1_p90", "ka1_p99"],
    cpu_id: None,
};
const KA64: KeepAlive = KeepAlive {
    connections: 64,
    threads: 2,
    ids: ["ka64_rps", "ka64_p50", "ka64_p90", "ka64_p99"],
    cpu_id: Some("cpu_ka64"),
};

fn keep_alive(
    topo: &Topology,
    path: PathKind,
    fig: &KeepAlive,
    duration: Duration,
    samples: &mut Samples,
) -> Result<()> {
    let KeepAlive {
        connections,
        threads,
        ids,
        cpu_id,
    } = *fig;
    let cpu_before = cpu(topo, path)?;
    let r = wrk::run(
        &topo.cluster,
        topo.client(path),
        topo.http(path),
        connections,
        threads,
        duration,
        false,
    )?;
    let cpu_used = cpu(topo, path)? - cpu_before;
    check_errors(r.errors, r.requests)?;
    let [rps, p50, p90, p99] = ids;
    samples.add(rps, path, r.rps);
    samples.add(p50, path, r.p50_us);
    samples.add(p90, path, r.p90_us);
    samples.add(p99, path, r.p99_us);
    if let (Some(id), PathKind::Mesh | PathKind::Peer) = (cpu_id, path) {
        samples.add(id, path, cpu_used * 1e4 / r.requests as f64);
    }
    eprintln!(
        "bench:   {path:?} {connections} conn(s): {:.0} req/s, p99 {:.0} µs",
        r.rps, r.p99_us
    );
    Ok(())
}

fn fixed_rate(topo: &Topology, path: PathKind, duration: Duration, samples: &mut Samples) -> Result<()> {
    let mut cmd = testapp()?;
    cmd.args(["http-rate", "--connect", &topo.http(path).to_string()])
        .args(["--rate", &RATE.to_string()])
        .args(["--duration-ms", &duration.as_millis().to_string()]);
    let out = topo.cluster.exec_in_pod(topo.client(path), cmd)?;
    let report: RateReport = serde_json::from_str(out.stdout.trim()).with_context(|| {
        format!(
            "reading mesh-testapp http-rate's report: {} {}",
            out.stdout, out.stderr
        )
    })?;
    if report.errors > 0 || !out.status.success() {
        bail!(
            "{} of {} requests failed: {:?}",
            report.errors,
            report.requests,
            report.error
        );
    }
    samples.add("rate_p50", path, report.p50_us);
    samples.add("rate_p90", path, report.p90_us);
    samples.add("rate_p99", path, report.p99_us);
    eprintln!(
        "bench:   {path:?} at {RATE} req/s ({:.0} achieved): p50 {:.0} µs, p99 {:.0} µs",
        report.achieved_rate, report.p50_us, report.p99_us
    );
    Ok(())
}

fn new_connections(topo: &Topology, path: PathKind, duration: Duration, samples: &mut Samples) -> Result<()> {
    let server = topo.server(path);
    let opens = accepted(&topo.cluster, server)?;
    let cpu_before = cpu(topo, path)?;
    let r = wrk::run(
        &topo.cluster,
        topo.client(path),
        topo.http(path),
        16,
        2,
        duration,
        true,
    )?;
    let cpu_used = cpu(topo, path)? - cpu_before;
    let accepts = accepted(&topo.cluster, server)? - opens;
    check_errors(r.errors, r.requests)?;
    // wrk reconnects when the server closes after `Connection: close`; a connection per
    // request is what the figure claims, so it is checked on the server every time.
    if (accepts as f64) < 0.99 * r.requests as f64 {
        bail!(
            "{} requests were carried by only {accepts} connections",
            r.requests
        );
    }
    samples.add("new16_rps", path, r.rps);
    samples.add("new16_accepts", path, accepts as f64 / r.requests as f64);
    if path != PathKind::Direct {
        samples.add("cpu_new16", path, cpu_used * 1e4 / r.requests as f64);
    }
    eprintln!("bench:   {path:?} new conn per request: {:.0} req/s", r.rps);
    Ok(())
}

fn bulk(
    topo: &Topology,
    path: PathKind,
    streams: u32,
    duration: Duration,
    id: &'static str,
    samples: &mut Samples,
) -> Result<()> {
    let gbps = iperf::run(
        &topo.cluster,
        topo.client(path),
        topo.iperf(path),
        streams,
        Some(duration),
    )?;
    samples.add(id, path, gbps);
    eprintln!("bench:   {path:?} bulk, {streams} stream(s): {gbps:.2} Gbit/s");
    Ok(())
}

/// Holds [`IDLE_CONNECTIONS`] open through `path` and returns the largest proxy's RSS.
fn idle_connections(topo: &Topology, path: PathKind) -> Result<f64> {
    let server = topo.server(path);
    let mut cmd = testapp()?;
    cmd.args(["hold", "--connect", &topo.http(path).to_string()])
        .args(["--connections", &IDLE_CONNECTIONS.to_string()]);
    let hold = topo.cluster.spawn_in_pod(topo.client(path), cmd)?;
    hold.wait_for_line(Duration::from_secs(120), |l| {
        l.contains(r#""event":"holding""#) || l.contains(r#""event":"error""#)
    })
    .and_then(|line| match line.contains("holding") {
        true => Ok(()),
        false => bail!("mesh-testapp hold: {line}"),
    })?;
    let rss = max_memory(topo, path)?.0 as f64;
    eprintln!(
        "bench:   {path:?} {IDLE_CONNECTIONS} idle conns: {:.1} MiB",
        rss / MIB
    );
    drop(hold);
    // The next round's idle figure is to see no connections left over from this one.
    wait_until(
        Duration::from_secs(30),
        "the held connections to close",
        || match established(&topo.cluster, server, HTTP_PORT) {
            Ok(sockets) if sockets.is_empty() => Ok(()),
            Ok(sockets) => Err(format!(
                "{} still established: {}",
                sockets.len(),
                sockets.join("; ")
            )),
            Err(e) => Err(format!("{e:#}")),
        },
    )?;
    Ok(rss)
}

fn check_errors(errors: u64, requests: u64) -> Result<()> {
    if errors > 0 {
        bail!("{errors} errors in {requests} requests");
    }
    if requests == 0 {
        bail!("no request completed");
    }
    Ok(())
}

/// The proxies' CPU seconds so far, summed over the nodes (0 for direct).
fn cpu(topo: &Topology, path: PathKind) -> Result<f64> {
    topo.proxy_cgroups(path).iter().map(|c| cpu_seconds(c)).sum()
}

/// The largest (RSS, peak RSS) of the path's proxies, one per node, in bytes.
fn max_memory(topo: &Topology, path: PathKind) -> Result<(u64, u64)> {
    let cgroups: Vec<PathBuf> = topo.proxy_cgroups(path);
    let mut most = (0, 0);
    for c in &cgroups {
        let m = memory(c)?;
        most = (most.0.max(m.rss), most.1.max(m.peak));
    }
    Ok(most)
}

/// TCP connections the pod's network namespace has accepted so far.
fn accepted(cluster: &Cluster, pod: &Pod) -> Result<u64> {
    let mut cat = Command::new("cat");
    cat.arg("/proc/net/snmp");
    passive_opens(&cluster.exec_in_pod(pod, cat)?.success()?.stdout)
}

/// Established TCP connections on the pod's local `port`.
fn established(cluster: &Cluster, pod: &Pod, port: u16) -> Result<Vec<String>> {
    let mut ss = Command::new("ss");
    // With timers (-o) and the owning process (-p), so a connection that does not close says
    // who holds it and whether anything is still trying.
    ss.args(["-Htnpo", "state", "established", &format!("( sport = :{port} )")]);
    let out = cluster.exec_in_pod(pod, ss)?.success()?;
    Ok(out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect())
}
