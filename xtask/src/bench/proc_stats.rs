//! What the proxies use, read from the kernel: CPU time of a cgroup (which also counts
//! processes that have exited), resident memory of the processes in it, and a network
//! namespace's count of accepted TCP connections.
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// CPU time used by everything that ever ran in the cgroup, in seconds.
pub fn cpu_seconds(cgroup: &Path) -> Result<f64> {
    let path = cgroup.join("cpu.stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let usec = field(&text, "usage_usec").with_context(|| format!("{}", path.display()))?;
    Ok(usec as f64 / 1e6)
}

/// Resident memory of the cgroup's processes, summed, in bytes: now and at its peak since the
/// last [`reset_peaks`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
}

pub fn memory(cgroup: &Path) -> Result<Memory> {
    let mut total = Memory::default();
    for pid in pids(cgroup)? {
        // A process that exited since the listing has nothing resident any more.
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        total.rss += field(&status, "VmRSS:").with_context(|| format!("/proc/{pid}/status"))? * 1024;
        total.peak += field(&status, "VmHWM:").with_context(|| format!("/proc/{pid}/status"))? * 1024;
    }
    Ok(total)
}

/// Restarts the peak-RSS record of the cgroup's processes from their current RSS.
pub fn reset_peaks(cgroup: &Path) -> Result<()> {
    for pid in pids(cgroup)? {
        // "5" resets VmHWM (proc(5), clear_refs); a process gone meanwhile needs no reset.
        let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
    Ok(())
}

fn pids(cgroup: &Path) -> Result<Vec<u32>> {
    let path = cgroup.join("cgroup.procs");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.split_whitespace()
        .map(|p| {
            p.parse()
                .with_context(|| format!("pid {p:?} in {}", path.display()))
        })
        .collect()
}

/// The number after `name` on the line that starts with it (`usage_usec 123`, `VmRSS: 5 kB`).
fn field(text: &str, name: &str) -> Result<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with([' ', '\t'])))
        .with_context(|| format!("no {name} line"))?;
    let value = line.split_whitespace().next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("{name} {value:?} is not a number"))
}

/// `Tcp: PassiveOpens` from a `/proc/net/snmp` (of the network namespace that read it).
pub fn passive_opens(snmp: &str) -> Result<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = tcp
        .next()
        .zip(tcp.next())
        .context("no Tcp: lines in /proc/net/snmp")?;
    let i = names
        .split_whitespace()
        .position(|n| n == "PassiveOpens")
        .context("no Tcp PassiveOpens in /proc/net/snmp")?;
    let v = values
        .split_whitespace()
        .nth(i)
        .context("Tcp values line too short")?;
    v.parse().with_context(|| format!("PassiveOpens {v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_cpu_stat() {
        let stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(field(stat, "usage_usec").unwrap(), 1_234_567);
        assert!(field(stat, "usage")
            .unwrap_err()
            .to_string()
            .contains("no usage line"));
    }

    #[test]
    fn proc_status_memory() {
        let status = "Name:\tmesh-node\nVmPeak:\t  900000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t    8000 kB\n";
        assert_eq!(field(status, "VmRSS:").unwrap(), 8000);
        assert_eq!(field(status, "VmHWM:").unwrap(), 12345);
        assert!(field("VmRSS:\t lots kB\n", "VmRSS:").is_err());
    }

    #[test]
    fn snmp_passive_opens() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n\
                    Tcp: 1 200 120000 -1 12 34567 0\nUdp: InDatagrams\nUdp: 0\n";
        assert_eq!(passive_opens(snmp).unwrap(), 34567);
        assert!(passive_opens("Ip: a\nIp: 1\n").is_err());
    }
}
