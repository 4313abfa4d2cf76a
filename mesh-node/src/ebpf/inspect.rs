//! What the pinned set looks like from user space, for the admin API and metrics: the links
//! that attach its programs and how full its maps are.
use std::path::Path;

use mesh_common as common;

use super::pins::{self, Prog};
use super::{sys, Datapath, EbpfError};

/// One attached program: the link pin, where it hooks and what the kernel says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramLink {
    /// The program's ELF name.
    pub program: &'static str,
    /// `cgroup/connect4`, `tcx/ingress`, ...
    pub attach: &'static str,
    /// `cgroup <id>` or the interface name (`if<index>` when it has none here).
    pub target: String,
    /// `None` when the pin no longer holds a live link.
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
}

/// A map's capacity and use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub max_entries: u32,
    /// Entries in use; `None` for arrays (always full) and maps this handle does not read.
    pub entries: Option<u32>,
}

fn attach_name(prog: Prog) -> &'static str {
    match prog {
        Prog::Connect4 => "cgroup/connect4",
        Prog::Connect6 => "cgroup/connect6",
        Prog::SockOps => "cgroup/sock_ops",
        Prog::Getsockopt => "cgroup/getsockopt",
        Prog::TcInbound | Prog::TcReply => "tcx/ingress",
        Prog::TcStrict => "tcx/egress",
    }
}

impl Datapath {
    /// Every link of the active set, cgroup links first.
    pub fn links(&self) -> Result<Vec<ProgramLink>, EbpfError> {
        let mut out = Vec::new();
        for path in pins::list(&self.dir)? {
            let Some(prog) = cgroup_link_prog(&path) else {
                continue;
            };
            let info = sys::obj_get(&path).ok().and_then(|fd| sys::link_info(&fd).ok());
            let alive = info.filter(|i| i.cgroup_id != 0);
            out.push(ProgramLink {
                program: prog.name(),
                attach: attach_name(prog),
                target: alive.map_or_else(
                    || "cgroup (gone)".to_owned(),
                    |i| format!("cgroup {}", i.cgroup_id),
                ),
                link_id: alive.map(|i| i.id),
                prog_id: alive.map(|i| i.prog_id),
            });
        }
        for tc in self.tc_links()? {
            let prog = match tc.kind {
                super::TcKind::Inbound => Prog::TcInbound,
                super::TcKind::Strict => Prog::TcStrict,
                super::TcKind::Reply => Prog::TcReply,
            };
            out.push(ProgramLink {
                program: prog.name(),
                attach: attach_name(prog),
                target: tc.name.unwrap_or_else(|| format!("if{}", tc.ifindex)),
                link_id: tc.link_id,
                prog_id: tc.prog_id,
            });
        }
        Ok(out)
    }

    /// Capacity and use of each map of the set.
    pub fn map_fill(&self) -> Result<Vec<MapFill>, EbpfError> {
        let count = |n: usize| Some(u32::try_from(n).unwrap_or(u32::MAX));
        let (ports, cidrs) = self.maps.exclusions()?;
        Ok(vec![
            fill(common::MAP_CONFIG, common::CONFIG_MAX_ENTRIES, None),
            fill(
                common::MAP_ENROLLED,
                common::ENROLLED_MAX_ENTRIES,
                count(self.maps.enrolled()?.len()),
            ),
            fill(common::MAP_COOKIE_DST, common::COOKIE_DST_MAX_ENTRIES, None),
            fill(
                common::MAP_TUPLE_DST,
                common::TUPLE_DST_MAX_ENTRIES,
                count(self.maps.tuple_dst_len()),
            ),
            fill(
                common::MAP_EXCL_PORTS,
                common::EXCL_PORTS_MAX_ENTRIES,
                count(ports.len()),
            ),
            fill(
                common::MAP_EXCL_CIDRS,
                common::EXCL_CIDRS_MAX_ENTRIES,
                count(cidrs.len()),
            ),
            fill(common::MAP_COUNTERS, common::COUNTER_COUNT, None),
            fill(
                common::MAP_LOCAL_IPS,
                common::LOCAL_IPS_MAX_ENTRIES,
                count(self.maps.local_ips()?.len()),
            ),
            fill(common::MAP_TC_CONFIG, common::TC_CONFIG_MAX_ENTRIES, None),
            fill(
                common::MAP_DESTINATIONS,
                common::DESTINATIONS_MAX_ENTRIES,
                count(self.maps.destinations()?.len()),
            ),
        ])
    }
}

fn fill(name: &'static str, max_entries: u32, entries: Option<u32>) -> MapFill {
    MapFill {
        name,
        max_entries,
        entries,
    }
}

/// The cgroup program a link pin (`link_<stem>_cg<id>`) attaches.
fn cgroup_link_prog(path: &Path) -> Option<Prog> {
    let name = path.file_name()?.to_str()?;
    Prog::CGROUP.into_iter().find(|p| {
        name.strip_prefix(p.link_stem())
            .is_some_and(|rest| rest.starts_with("_cg"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_name_their_program() {
        assert_eq!(
            cgroup_link_prog(Path::new("/x/link_connect4_cg12")),
            Some(Prog::Connect4)
        );
        assert_eq!(
            cgroup_link_prog(Path::new("/x/link_getsockopt_cg7")),
            Some(Prog::Getsockopt)
        );
        assert_eq!(cgroup_link_prog(Path::new("/x/tcx_inbound_if3")), None);
        assert_eq!(cgroup_link_prog(Path::new("/x/mesh_enrolled")), None);
    }
}
