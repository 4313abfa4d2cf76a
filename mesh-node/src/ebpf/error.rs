//! The one error type of the datapath. Expected conditions (a missing kernel feature, mount or
//! capability) are one line naming the requirement and how to provide it.

use std::{error::Error as StdError, io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "kernel BTF missing (/sys/kernel/btf/vmlinux not found): run a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,

    #[error("kernel {release} is too old: mesh's capture programs need Linux {need} or newer")]
    KernelTooOld { release: String, need: &'static str },

    #[error(
        "missing capabilities {missing}: loading and attaching eBPF needs CAP_BPF+CAP_NET_ADMIN+CAP_SYS_ADMIN (or root)"
    )]
    MissingCapabilities { missing: String },

    #[error(
        "permission denied while {action}: loading and attaching eBPF needs CAP_BPF+CAP_NET_ADMIN+CAP_SYS_ADMIN (or root)"
    )]
    PermissionDenied { action: String },

    #[error("{role} cgroup {path} does not exist: create it or pass an existing cgroup v2 directory")]
    CgroupNotFound { role: &'static str, path: PathBuf },

    #[error(
        "{role} cgroup {path} is not on a cgroup v2 filesystem: mount cgroup2 (`mount -t cgroup2 none /sys/fs/cgroup`) and pass a directory inside it"
    )]
    NotCgroup2 { role: &'static str, path: PathBuf },

    #[error("pin dir {path} is not on a bpffs: mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },

    #[error("invalid datapath config: {0}")]
    InvalidConfig(String),

    #[error("cannot find this process's cgroup v2 directory: {0}")]
    OwnCgroup(String),

    #[error("interface {name} not found in this network namespace ({role})")]
    InterfaceNotFound { role: &'static str, name: String },

    #[error("invalid marks: {0}")]
    InvalidMarks(String),

    #[error(
        "the tc programs' marks are not configured: call Datapath::set_marks before set_inbound/set_strict"
    )]
    MarksNotSet,

    #[error(
        "the pinned set {dir} was removed (replaced by another agent): this handle can no longer change it"
    )]
    SetReplaced { dir: PathBuf },

    /// An unexpected failure of a file system or `bpf(2)` operation.
    #[error("{action}: {err}")]
    Io { action: String, err: io::Error },

    /// An unexpected failure reported by aya (the message includes aya's, and the verifier
    /// log when a program is rejected).
    #[error("{action}: {err}")]
    Aya { action: String, err: String },
}

impl EbpfError {
    pub(crate) fn io(action: impl Into<String>, err: io::Error) -> Self {
        let action = action.into();
        if err.raw_os_error() == Some(libc::EPERM) {
            return EbpfError::PermissionDenied { action };
        }
        EbpfError::Io { action, err }
    }

    /// Wraps an aya error; an `EPERM` anywhere in its chain becomes `PermissionDenied`.
    pub(crate) fn aya(action: impl Into<String>, err: impl StdError + 'static) -> Self {
        let action = action.into();
        let mut cur: Option<&(dyn StdError + 'static)> = Some(&err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if io.raw_os_error() == Some(libc::EPERM) {
                    return EbpfError::PermissionDenied { action };
                }
            }
            cur = e.source();
        }
        EbpfError::Aya {
            action,
            err: err.to_string(),
        }
    }
}
