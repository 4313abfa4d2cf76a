//! wrk: HTTP/1.1 load over keep-alive or new connections, and its text report.
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use mesh_harness::{Cluster, Pod};

/// What a wrk run measured.
#[derive(Debug, PartialEq)]
pub struct WrkReport {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Socket errors and non-2xx/3xx answers.
    pub errors: u64,
}

/// Runs wrk in `pod` against `http://dst/` with `connections` over `threads` for `duration`;
/// `close` makes every request ask for its own connection.
pub fn run(
    cluster: &Cluster,
    pod: &Pod,
    dst: SocketAddr,
    connections: u32,
    threads: u32,
    duration: Duration,
    close: bool,
) -> Result<WrkReport> {
    let mut cmd = Command::new("wrk");
    cmd.args(["--latency", "--timeout", "5s"])
        .arg(format!("-t{}", threads.min(connections)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{dst}/"));
    let out = cluster.exec_in_pod(pod, cmd)?.success().context("wrk failed")?;
    parse(&out.stdout).with_context(|| format!("reading wrk's report:\n{}", out.stdout))
}

pub fn parse(text: &str) -> Result<WrkReport> {
    let mut requests = None;
    let mut rps = None;
    let mut percentiles = [None; 3];
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [n, "requests", "in", ..] => requests = Some(n.parse().context("request count")?),
            ["Requests/sec:", v] => rps = Some(v.parse().context("Requests/sec")?),
            [q, v] if q.ends_with('%') => {
                let slot = match *q {
                    "50%" => 0,
                    "90%" => 1,
                    "99%" => 2,
                    _ => continue,
                };
                percentiles[slot] = Some(micros(v)?);
            }
            ["Socket", "errors:", rest @ ..] => {
                for count in rest.iter().skip(1).step_by(2) {
                    errors += count
                        .trim_end_matches(',')
                        .parse::<u64>()
                        .context("socket errors")?;
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().context("non-2xx")?,
            _ => {}
        }
    }
    let [p50, p90, p99] = percentiles;
    Ok(WrkReport {
        requests: requests.context("no `N requests in` line")?,
        rps: rps.context("no `Requests/sec:` line")?,
        p50_us: p50.context("no 50% latency (was --latency given?)")?,
        p90_us: p90.context("no 90% latency")?,
        p99_us: p99.context("no 99% latency")?,
        errors,
    })
}

/// `595.00us`, `0.97ms`, `1.20s` → microseconds.
fn micros(v: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("latency {v:?} has no unit");
    };
    Ok(num.parse::<f64>().with_context(|| format!("latency {v:?}"))? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP_ALIVE: &str = "\
Running 10s test @ http://10.1.2.10:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   652.04us  300.96us   8.38ms   80.62%
    Req/Sec    49.92k     3.88k   57.87k    73.00%
  Latency Distribution
     50%  595.00us
     75%  751.00us
     90%    0.97ms
     99%    1.67ms
  993357 requests in 10.00s, 1.19GB read
Requests/sec:  99331.76
Transfer/sec:    122.14MB
";

    const WITH_ERRORS: &str = "\
Running 1s test @ http://10.1.1.1:15101/
  2 threads and 16 connections
  Latency Distribution
     50%    1.00ms
     75%    2.00ms
     90%    3.50ms
     99%    1.20s
  5000 requests in 1.00s, 6.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   4990.00
Transfer/sec:      5.99MB
";

    #[test]
    fn keep_alive_report() {
        assert_eq!(
            parse(KEEP_ALIVE).unwrap(),
            WrkReport {
                requests: 993357,
                rps: 99331.76,
                p50_us: 595.0,
                p90_us: 970.0,
                p99_us: 1670.0,
                errors: 0,
            }
        );
    }

    #[test]
    fn errors_are_counted() {
        let r = parse(WITH_ERRORS).unwrap();
        assert_eq!(r.errors, 10);
        assert_eq!(r.p99_us, 1.2e6);
    }

    #[test]
    fn missing_lines_are_named() {
        let e = parse(&KEEP_ALIVE.replace("Requests/sec", "Reqs")).unwrap_err();
        assert!(e.to_string().contains("Requests/sec"), "{e}");
        let e = parse(&KEEP_ALIVE.replace("     90%    0.97ms\n", "")).unwrap_err();
        assert!(e.to_string().contains("90%"), "{e}");
        assert!(parse(&KEEP_ALIVE.replace("0.97ms", "0.97")).is_err());
    }
}
