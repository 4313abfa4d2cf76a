//! `GET /v1/bpf`: the kernel side as this agent's pinned set shows it.
use mesh_api::admin::{BpfInfo, BpfMap, BpfProgram};

use crate::ebpf::{Datapath, EbpfError};

pub fn info(dp: &Datapath) -> Result<BpfInfo, EbpfError> {
    Ok(BpfInfo {
        pin_dir: dp.pin_path().display().to_string(),
        abi: dp.abi().to_owned(),
        programs: dp
            .links()?
            .into_iter()
            .map(|l| BpfProgram {
                name: l.program.into(),
                attach: l.attach.into(),
                target: l.target,
                prog_id: l.prog_id,
                link_id: l.link_id,
            })
            .collect(),
        maps: dp
            .map_fill()?
            .into_iter()
            .map(|m| BpfMap {
                name: m.name.into(),
                max_entries: m.max_entries,
                entries: m.entries,
            })
            .collect(),
        counters: dp
            .counters()?
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    })
}
