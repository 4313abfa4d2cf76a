//! iperf3: bulk TCP throughput, from its JSON report.
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use mesh_harness::{Cluster, Pod};

/// Gbit/s the receiver saw from `pod` to the iperf3 server at `dst`, over `streams` parallel
/// streams for `duration` (`None`: 1 KiB only, to check that the path works).
pub fn run(
    cluster: &Cluster,
    pod: &Pod,
    dst: SocketAddr,
    streams: u32,
    duration: Option<Duration>,
) -> Result<f64> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-J", "--connect-timeout", "5000", "-c"])
        .arg(dst.ip().to_string())
        .arg("-p")
        .arg(dst.port().to_string())
        .arg("-P")
        .arg(streams.to_string());
    match duration {
        Some(d) => cmd.arg("-t").arg(d.as_secs().max(1).to_string()),
        None => cmd.args(["-n", "1K"]),
    };
    let out = cluster.exec_in_pod(pod, cmd)?;
    // iperf3 -J reports its errors in the JSON too, and exits non-zero.
    let gbps =
        parse(&out.stdout).with_context(|| format!("iperf3 to {dst} ({}): {}", out.status, out.stderr));
    if gbps.is_ok() && !out.status.success() {
        bail!("iperf3 to {dst} failed ({}): {}", out.status, out.stderr);
    }
    gbps
}

pub fn parse(json: &str) -> Result<f64> {
    let v: Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("no end.sum_received.bits_per_second in iperf3's report")?;
    Ok(bps / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// iperf3 3.12 -J, trimmed to what is read.
    const REPORT: &str = r#"{
        "start": {"connected": [{"socket": 5, "local_host": "10.1.1.10", "remote_host": "10.1.2.10"}],
                  "test_start": {"protocol": "TCP", "num_streams": 1, "duration": 10}},
        "intervals": [],
        "end": {
            "sum_sent": {"start": 0, "end": 10.0, "bytes": 30000000000, "bits_per_second": 24000000000.0},
            "sum_received": {"start": 0, "end": 10.0, "bytes": 29875000000, "bits_per_second": 23900000000.0}
        }
    }"#;

    #[test]
    fn receiver_throughput_in_gbit() {
        assert_eq!(parse(REPORT).unwrap(), 23.9);
    }

    #[test]
    fn errors_and_gaps_are_named() {
        let e = parse(r#"{"start": {}, "intervals": [], "end": {}, "error": "unable to connect to server: Connection refused"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("Connection refused"), "{e}");
        let e = parse(r#"{"end": {}}"#).unwrap_err();
        assert!(e.to_string().contains("sum_received"), "{e}");
        assert!(parse("iperf3: error").is_err());
    }
}
