//! Loading the object into pins, and attaching pinned programs to cgroups and TCX hooks as
//! pinned links.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    programs::{CgroupSockAddr, CgroupSockopt, SchedClassifier, SockOps},
    EbpfLoader,
};
use mesh_common::MAP_NAMES;

use super::{error::EbpfError, pins::Prog, sys};

/// Loads the object (maps created, programs verified) and pins every map and program in
/// `dir`. Nothing is attached yet. The loader's fds are closed on return; the pins keep it
/// all alive.
pub(crate) fn load_and_pin(object: &[u8], dir: &Path) -> Result<(), EbpfError> {
    let mut ebpf = EbpfLoader::new()
        .load(object)
        .map_err(|e| EbpfError::aya("loading the eBPF object", e))?;
    for name in MAP_NAMES {
        let map = ebpf.map(name).ok_or_else(|| missing("map", name))?;
        map.pin(dir.join(name))
            .map_err(|e| EbpfError::aya(format!("pinning map {name}"), e))?;
    }
    for prog in Prog::ALL {
        let name = prog.name();
        let program = ebpf.program_mut(name).ok_or_else(|| missing("program", name))?;
        let loaded = match prog {
            Prog::Connect4 | Prog::Connect6 => <&mut CgroupSockAddr>::try_from(&mut *program)
                .map_err(|e| EbpfError::aya(format!("program {name}"), e))?
                .load(),
            Prog::SockOps => <&mut SockOps>::try_from(&mut *program)
                .map_err(|e| EbpfError::aya(format!("program {name}"), e))?
                .load(),
            Prog::Getsockopt => <&mut CgroupSockopt>::try_from(&mut *program)
                .map_err(|e| EbpfError::aya(format!("program {name}"), e))?
                .load(),
            Prog::TcInbound | Prog::TcStrict | Prog::TcReply => {
                <&mut SchedClassifier>::try_from(&mut *program)
                    .map_err(|e| EbpfError::aya(format!("program {name}"), e))?
                    .load()
            }
        };
        loaded.map_err(|e| EbpfError::aya(format!("loading program {name}"), e))?;
        program
            .pin(dir.join(prog.pin_name()))
            .map_err(|e| EbpfError::aya(format!("pinning program {name}"), e))?;
    }
    Ok(())
}

fn missing(what: &str, name: &str) -> EbpfError {
    EbpfError::Aya {
        action: format!("{what} {name}"),
        err: "missing from the eBPF object".into(),
    }
}

/// Attaches the program pinned in `dir` to `cgroup_dir` with a bpf_link and pins the link at
/// `link_pin`. cgroup links always allow other programs on the same cgroup (multi mode), so
/// this coexists with other users' programs and with a set being replaced.
///
/// Raw `BPF_LINK_CREATE` + `BPF_OBJ_PIN` rather than aya's `attach` + `take_link` + `FdLink::pin`:
/// aya 0.14 has no `FdLink` conversion for `CgroupSockopt` links, and one path for all four
/// programs is simpler to reason about.
pub(crate) fn attach(prog: Prog, dir: &Path, cgroup_dir: &Path, link_pin: &Path) -> Result<(), EbpfError> {
    let action = format!("attaching {} to cgroup {}", prog.name(), cgroup_dir.display());
    let cgroup = File::open(cgroup_dir)
        .map_err(|e| EbpfError::io(format!("opening cgroup {}", cgroup_dir.display()), e))?;
    let prog_pin = dir.join(prog.pin_name());
    let prog_fd = sys::obj_get(&prog_pin)
        .map_err(|e| EbpfError::io(format!("opening pinned program {}", prog_pin.display()), e))?;
    let link = sys::cgroup_link_create(prog_fd.as_fd(), cgroup.as_fd(), prog.attach_type())
        .map_err(|e| attach_error(action, e))?;
    // Until pinned, the link lives only as long as `link`: a failure below detaches it.
    sys::obj_pin(link.as_fd(), link_pin)
        .map_err(|e| EbpfError::io(format!("pinning link {}", link_pin.display()), e))?;
    Ok(())
}

/// By the time we attach, loading has already proven the capabilities: an EPERM here means
/// the cgroup holds a program attached in exclusive (non-multi) mode by someone else.
fn attach_error(action: String, err: std::io::Error) -> EbpfError {
    if err.raw_os_error() == Some(libc::EPERM) {
        return EbpfError::Aya {
            action,
            err: "EPERM: the cgroup has a program of this type attached in exclusive mode by another \
                  component (or capabilities are missing)"
                .into(),
        };
    }
    EbpfError::io(action, err)
}

/// Attaches the tc program pinned in `dir` to the TCX hook of interface `ifindex` (in this
/// thread's network namespace) with a bpf_link and pins the link at `link_pin`. TCX hooks hold
/// many programs (appended here, run in order), so this coexists with other users of the
/// interface and with a set being replaced.
///
/// Raw `BPF_LINK_CREATE` like the cgroup links rather than aya's `SchedClassifier::attach`: that
/// needs an aya `Program` loaded in this process (ours are pinned and re-opened by fd), and one
/// link path keeps the pin/check/replace logic the same for every link of the set.
pub(crate) fn attach_tcx(prog: Prog, dir: &Path, ifindex: u32, link_pin: &Path) -> Result<(), EbpfError> {
    let hook = if prog.attach_type() == super::pins::BPF_TCX_INGRESS {
        "ingress"
    } else {
        "egress"
    };
    let action = format!("attaching {} to TCX {hook} of ifindex {ifindex}", prog.name());
    let prog_pin = dir.join(prog.pin_name());
    let prog_fd = sys::obj_get(&prog_pin)
        .map_err(|e| EbpfError::io(format!("opening pinned program {}", prog_pin.display()), e))?;
    let link = sys::tcx_link_create(prog_fd.as_fd(), ifindex, prog.attach_type())
        .map_err(|e| EbpfError::io(action, e))?;
    // Until pinned, the link lives only as long as `link`: a failure below detaches it.
    sys::obj_pin(link.as_fd(), link_pin)
        .map_err(|e| EbpfError::io(format!("pinning link {}", link_pin.display()), e))?;
    Ok(())
}
