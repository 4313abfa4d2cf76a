//! Reading the wire between nodes: a packet capture on a node's port of the cluster network,
//! to prove what crosses it.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{wait_until, Cluster, Node, Proc, LINK_IPV4};

const WAIT: Duration = Duration::from_secs(20);
/// A pcap file's global header; records follow it.
const PCAP_HEADER: usize = 24;
const RECORD_HEADER: usize = 16;
const HBONE_PORT: u16 = 15008;

/// tcpdump on `node`'s link to the cluster network, writing every packet to a file.
pub struct Sniffer {
    proc: Proc,
    pcap: PathBuf,
    node: Node,
}

/// What crossed the link.
pub struct Capture {
    /// The packets as captured (pcap file contents).
    pub bytes: Vec<u8>,
    /// Packets to or from port 15008 (HBONE).
    pub hbone_packets: usize,
    /// Every TCP segment, in order.
    pub segments: Vec<Segment>,
}

impl Capture {
    /// The source addresses of the segments sent to port 15008: who opened HBONE connections.
    pub fn hbone_sources(&self) -> std::collections::BTreeSet<IpAddr> {
        self.segments
            .iter()
            .filter(|s| s.dst.port() == HBONE_PORT)
            .map(|s| s.src.ip())
            .collect()
    }

    /// Does `needle` appear anywhere in the captured packets?
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.bytes.windows(needle.len()).any(|w| w == needle)
    }
}

impl Sniffer {
    pub fn start(cluster: &Cluster, node: &Node) -> Result<Sniffer> {
        let pcap = std::env::temp_dir().join(format!("{}-{}.pcap", cluster.id(), node.link_veth));
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", &node.link_veth, "-U", "-s", "0", "-w"])
            .arg(&pcap)
            .arg("tcp or udp");
        let proc = cluster.spawn_in_net(cluster.link_netns(), cmd)?;
        proc.wait_for_line(WAIT, |l| l.contains("listening on"))
            .context("tcpdump did not start")?;
        Ok(Sniffer {
            proc,
            pcap,
            node: node.clone(),
        })
    }

    /// Stops the capture once everything sent before this call has been written: a barrier
    /// datagram goes out after it, and packets on one interface are captured in order.
    pub fn stop(self, cluster: &Cluster) -> Result<Capture> {
        let barrier = format!("mesh-capture-barrier-{}", self.proc.pid());
        let send = format!("printf %s {barrier} > /dev/udp/{LINK_IPV4}/9");
        wait_until(WAIT, "the capture to reach its barrier", || {
            let mut cmd = Command::new("bash");
            cmd.args(["-c", &send]);
            cluster
                .exec_on_node(&self.node, cmd)
                .map_err(|e| format!("{e:#}"))?;
            let bytes = std::fs::read(&self.pcap).map_err(|e| e.to_string())?;
            if bytes.windows(barrier.len()).any(|w| w == barrier.as_bytes()) {
                Ok(())
            } else {
                Err(format!("{} bytes captured, no barrier yet", bytes.len()))
            }
        })?;
        self.proc.kill(libc::SIGTERM)?;
        self.proc.wait_exit(WAIT)?;
        let bytes = std::fs::read(&self.pcap).with_context(|| format!("reading {}", self.pcap.display()))?;
        let _ = std::fs::remove_file(&self.pcap);
        let segments = segments(&bytes);
        Ok(Capture {
            hbone_packets: segments
                .iter()
                .filter(|s| s.src.port() == HBONE_PORT || s.dst.port() == HBONE_PORT)
                .count(),
            segments,
            bytes,
        })
    }
}

/// A TCP segment seen on the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// The TCP segments (over IPv4 or IPv6) of the Ethernet frames in a pcap file (little-endian,
/// as tcpdump writes here).
fn segments(pcap: &[u8]) -> Vec<Segment> {
    let mut at = PCAP_HEADER;
    let mut out = Vec::new();
    while let Some(header) = pcap.get(at..at + RECORD_HEADER) {
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let frame = pcap
            .get(at + RECORD_HEADER..at + RECORD_HEADER + len)
            .unwrap_or_default();
        out.extend(segment(frame));
        at += RECORD_HEADER + len;
    }
    out
}

fn segment(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (proto, l4, src, dst): (u8, usize, IpAddr, IpAddr) = match ethertype {
        0x0800 => (
            *frame.get(23)?,
            14 + usize::from(frame.get(14)? & 0x0f) * 4,
            IpAddr::from(<[u8; 4]>::try_from(frame.get(26..30)?).ok()?),
            IpAddr::from(<[u8; 4]>::try_from(frame.get(30..34)?).ok()?),
        ),
        0x86dd => (
            *frame.get(20)?,
            14 + 40,
            IpAddr::from(<[u8; 16]>::try_from(frame.get(22..38)?).ok()?),
            IpAddr::from(<[u8; 16]>::try_from(frame.get(38..54)?).ok()?),
        ),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let p = frame.get(l4..l4 + 4)?;
    Some(Segment {
        src: SocketAddr::new(src, u16::from_be_bytes([p[0], p[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([p[2], p[3]])),
    })
}
