//! The marks the tc programs, the capture routing rules and the proxy's sockets share, and how
//! they are written to (and read back from) `mesh_tc_config`.
use mesh_common::TcConfig;

/// The marks shared by the tc programs, the capture routing rule and the proxy's sockets.
/// They must be non-zero and have no bit in common.
///
/// Defaults: capture `0x1000`, proxy `0x2000` (bits 12 and 13), reply `0x40` (bit 6). Chosen to
/// stay clear of the bits other node components commonly claim: Istio ambient uses
/// 0x111/0x222/0x539 under the mask 0xfff; Cilium uses 0x0f00 (its proxy/host/encrypt magic) and
/// the upper 16 bits (identities); Calico allocates from 0xffff0000; kube-proxy uses 0x4000
/// (masquerade) and 0x8000 (drop); the AWS VPC CNI 0x80. Known overlaps: Cilium with IPsec keeps
/// its key index in bits 12-15, and Istio's mask covers bit 6; pick other bits there
/// (`--capture-mark`, `--proxy-mark`, `--reply-mark`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marks {
    /// OR-ed into `skb->mark` of inbound HBONE to local pods on the uplink; the routing rule
    /// matches `fwmark capture/capture`.
    pub capture: u32,
    /// The proxy's upstream sockets carry it (`SO_MARK`); a SYN into an enrolled pod passes only
    /// when `mark & proxy == proxy`.
    pub proxy: u32,
    /// OR-ed into `skb->mark` of a pod's packet to one of the proxy's transparent sockets (at
    /// the pod's veth); an unscoped routing rule matches `fwmark reply/reply`.
    pub reply: u32,
}

impl Marks {
    pub const DEFAULT_CAPTURE: u32 = 0x1000;
    pub const DEFAULT_PROXY: u32 = 0x2000;
    pub const DEFAULT_REPLY: u32 = 0x40;

    pub fn validate(&self) -> Result<(), String> {
        let named = [
            ("capture", self.capture),
            ("proxy", self.proxy),
            ("reply", self.reply),
        ];
        for (name, mark) in named {
            if mark == 0 {
                return Err(format!("the {name} mark must be non-zero"));
            }
        }
        for (i, (a, x)) in named.iter().enumerate() {
            for (b, y) in &named[i + 1..] {
                if x & y != 0 {
                    return Err(format!(
                        "{a} mark {x:#x} and {b} mark {y:#x} share bits {:#x}: they must be disjoint",
                        x & y
                    ));
                }
            }
        }
        Ok(())
    }

    pub(super) fn tc_config(&self, preserve_source: bool) -> TcConfig {
        let mut flags = mesh_common::TC_CONFIG_SET;
        if preserve_source {
            flags |= mesh_common::TC_PRESERVE_SOURCE;
        }
        TcConfig {
            capture_mark: self.capture,
            proxy_mark: self.proxy,
            proxy_mask: self.proxy,
            flags,
            reply_mark: self.reply,
            reserved: 0,
        }
    }

    /// The marks and the preserve-source switch of a written tc config.
    pub(super) fn from_tc_config(cfg: &TcConfig) -> Option<(Marks, bool)> {
        (cfg.flags & mesh_common::TC_CONFIG_SET != 0).then_some((
            Marks {
                capture: cfg.capture_mark,
                proxy: cfg.proxy_mark,
                reply: cfg.reply_mark,
            },
            cfg.flags & mesh_common::TC_PRESERVE_SOURCE != 0,
        ))
    }
}

impl Default for Marks {
    fn default() -> Self {
        Marks {
            capture: Marks::DEFAULT_CAPTURE,
            proxy: Marks::DEFAULT_PROXY,
            reply: Marks::DEFAULT_REPLY,
        }
    }
}
