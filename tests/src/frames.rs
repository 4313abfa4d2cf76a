//! Hand-made Ethernet frames, sent and sniffed on an interface of a namespace through an
//! `AF_PACKET` socket: what a hostile pod can put on its link that its kernel would never build
//! (VLAN-tagged SYNs, gratuitous ARP for someone else's address).
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::sys::NETNS_DIR;

pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
/// 802.1Q (C-tag).
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad (S-tag, the outer tag of QinQ).
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const BROADCAST: Mac = [0xff; 6];

/// The MAC address of `ifname` in network namespace `netns`.
pub fn mac_of(netns: &str, ifname: &str) -> Result<Mac> {
    let out = Command::new("ip")
        .args(["-j", "-n", netns, "link", "show", "dev", ifname])
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip link show {ifname} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let text = json[0]["address"]
        .as_str()
        .with_context(|| format!("no address for {ifname} in {netns}: {json}"))?;
    parse_mac(text)
}

pub fn parse_mac(text: &str) -> Result<Mac> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("not a MAC address: {text}");
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("not a MAC address: {text}"))?;
    }
    Ok(mac)
}

/// An `AF_PACKET` socket on one interface of a network namespace (it stays there; the test
/// process does not move). Sees every frame in and out of the interface.
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawSocket {
    pub fn open(netns: &str, ifname: &str) -> Result<RawSocket> {
        let ns =
            File::open(Path::new(NETNS_DIR).join(netns)).with_context(|| format!("opening netns {netns}"))?;
        let ifname = std::ffi::CString::new(ifname)?;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<RawSocket> {
                // SAFETY: plain syscalls on fds we own; only this short-lived thread moves.
                unsafe {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        bail!("setns into {netns}: {}", std::io::Error::last_os_error());
                    }
                    let ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
                    if ifindex == 0 {
                        bail!("no interface {ifname:?} in {netns}");
                    }
                    let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
                    let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto);
                    if raw < 0 {
                        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                    }
                    let fd = OwnedFd::from_raw_fd(raw);
                    let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                    addr.sll_family = libc::AF_PACKET as u16;
                    addr.sll_protocol = proto as u16;
                    addr.sll_ifindex = ifindex;
                    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    if libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) != 0 {
                        bail!("binding AF_PACKET socket: {}", std::io::Error::last_os_error());
                    }
                    Ok(RawSocket { fd, ifindex })
                }
            })
            .join()
            .map_err(|_| anyhow!("raw socket thread panicked"))?
        })
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 || n as usize != frame.len() {
            bail!("sending a frame: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads frames until one satisfies `want` (returned) or `timeout` passes (`None`).
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 100) as i32) };
            if ready <= 0 {
                continue;
            }
            // SAFETY: the buffer is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 && want(&buf[..n as usize]) {
                return Ok(Some(buf[..n as usize].to_vec()));
            }
        }
    }

    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet header with `tags` (TPID, TCI) between the addresses and `ethertype`.
fn ethernet(dst: Mac, src: Mac, tags: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A TCP SYN in IPv4 in Ethernet, behind VLAN `tags` (outermost first; none for a plain frame).
pub struct Syn {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub tags: Vec<(u16, u16)>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Syn {
    pub fn frame(&self) -> Vec<u8> {
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&self.src.octets());
        pseudo.extend_from_slice(&self.dst.octets());
        pseudo.extend_from_slice(&[0, 6, 0, tcp.len() as u8]);
        let sum = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());

        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(40u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x4d45u16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        let sum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());

        let mut f = ethernet(self.dst_mac, self.src_mac, &self.tags, ETH_P_IP);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp);
        f
    }

    /// Whether `frame` is the destination's SYN-ACK to this SYN (untagged, as a pod answers).
    pub fn is_answered_by(&self, frame: &[u8]) -> bool {
        let Some(ip) = frame
            .get(14..)
            .filter(|_| frame[12..14] == ETH_P_IP.to_be_bytes())
        else {
            return false;
        };
        if ip.len() < 20 || ip[9] != 6 || ip[12..16] != self.dst.octets() || ip[16..20] != self.src.octets() {
            return false;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let Some(tcp) = ip.get(ihl..ihl + 14) else {
            return false;
        };
        tcp[0..2] == self.dst_port.to_be_bytes()
            && tcp[2..4] == self.src_port.to_be_bytes()
            && tcp[13] & 0x12 == 0x12
    }
}

/// A gratuitous ARP (a broadcast request with sender = target address): "`ip` is at `mac`".
pub fn gratuitous_arp(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet(BROADCAST, mac, &[], ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let syn = Syn {
            dst_mac: [2; 6],
            src_mac: [4; 6],
            tags: vec![(ETH_P_8021Q, 0)],
            src: Ipv4Addr::new(10, 1, 1, 10),
            dst: Ipv4Addr::new(10, 1, 1, 11),
            src_port: 40000,
            dst_port: 8080,
        };
        let f = syn.frame();
        assert_eq!(&f[12..14], &ETH_P_8021Q.to_be_bytes());
        let ip = &f[18..38];
        assert_eq!(checksum(&[ip]), 0, "IPv4 header checksum");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        assert_eq!(checksum(&[&pseudo, &f[38..58]]), 0, "TCP checksum");
        assert_eq!(parse_mac("0a:1B:02:03:04:ff").unwrap(), [10, 27, 2, 3, 4, 255]);
    }
}
