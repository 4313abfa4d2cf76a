//! The few raw system calls aya 0.14 does not expose: link info with its cgroup and TCX
//! fields, `BPF_LINK_CREATE` for cgroups and TCX, `BPF_LINK_DETACH`, `statfs` magic numbers,
//! interface names, and what kind of object a pin holds; and the lock on the pin directory.

use std::{
    ffi::CString,
    fs, io,
    mem::size_of,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `enum bpf_link_type`: BPF_LINK_TYPE_CGROUP.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// `enum bpf_link_type`: BPF_LINK_TYPE_TCX.
pub const BPF_LINK_TYPE_TCX: u32 = 11;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized `union bpf_attr` prefix.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = cstring(path)?;
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The leading part of `struct bpf_link_info` for cgroup links.
#[repr(C, align(8))]
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    /// 0 once the cgroup is gone (the link is then defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
    _pad2: u32,
}

pub fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    obj_info(fd)
}

/// `BPF_OBJ_GET_INFO_BY_FD` into the leading part of the kernel's info struct `T` (the kernel
/// fills at most `size_of::<T>()` bytes).
fn obj_info<T: Default>(fd: &OwnedFd) -> io::Result<T> {
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = T::default();
    let mut attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: &mut info as *mut T as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// `BPF_LINK_DETACH`: detaches a link now, even while other fds still hold it.
pub fn link_detach(fd: &OwnedFd) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
    }
    let mut attr = Attr {
        link_fd: fd.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjKind {
    Map,
    Prog,
    Link,
    Other,
}

/// What a bpf fd refers to, from its anon inode name ("bpf-map", "bpf-prog", "bpf_link").
pub fn obj_kind(fd: &OwnedFd) -> ObjKind {
    let target = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default();
    let name = target.to_string_lossy();
    if name.contains("bpf-map") {
        ObjKind::Map
    } else if name.contains("bpf-prog") {
        ObjKind::Prog
    } else if name.contains("bpf_link") || name.contains("bpf-link") {
        ObjKind::Link
    } else {
        ObjKind::Other
    }
}

/// The file system magic of the file system `path` is on.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = cstring(path)?;
    // SAFETY: zeroed `statfs` is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// An exclusive `flock` held until dropped (`File::lock` is `flock(LOCK_EX)` on Linux).
pub struct FileLock(fs::File);

impl FileLock {
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        let file = fs::File::open(path)?;
        loop {
            match file.lock() {
                Ok(()) => return Ok(FileLock(file)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the file would release the lock too; unlocking says so where it happens.
        let _ = self.0.unlock();
    }
}

/// All keys of a map with 8-byte keys (`BPF_MAP_GET_NEXT_KEY`), whatever its value type.
pub fn map_keys_u64(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u64>> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let mut keys = Vec::new();
    let mut next: u64 = 0;
    let mut cur: Option<u64> = None;
    // Bounded: a key deleted under us makes the kernel restart from the first key.
    for _ in 0..(1u32 << 20) {
        let mut attr = Attr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            // A null key asks for the first one.
            key: cur.as_ref().map_or(0, |k| k as *const u64 as u64),
            next_key: &mut next as *mut u64 as u64,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                keys.push(next);
                cur = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("map keys kept changing while being listed"))
}

/// `BPF_LINK_CREATE` for a cgroup attach point: a bpf_link owned by the returned fd.
pub fn cgroup_link_create(
    prog_fd: std::os::fd::BorrowedFd<'_>,
    cgroup_fd: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = Attr {
        prog_fd: prog_fd.as_raw_fd() as u32,
        target_fd: cgroup_fd.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`.
pub fn obj_pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    const BPF_OBJ_PIN: libc::c_long = 6;
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = cstring(path)?;
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// The leading part of `struct bpf_link_info` for TCX links.
#[repr(C, align(8))]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcxLinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    /// 0 once the device is gone (the link is then defunct).
    pub ifindex: u32,
    pub attach_type: u32,
    _pad2: u64,
}

pub fn tcx_link_info(fd: &OwnedFd) -> io::Result<TcxLinkInfo> {
    obj_info(fd)
}

/// `BPF_LINK_CREATE` for a TCX hook (`BPF_TCX_INGRESS`/`BPF_TCX_EGRESS`) of the interface
/// `ifindex` in the calling thread's network namespace: a bpf_link owned by the returned fd,
/// appended after the programs already on the hook (no `BPF_F_BEFORE`/`AFTER`, no expected
/// revision), so it coexists with other users of the hook.
pub fn tcx_link_create(
    prog_fd: std::os::fd::BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        relative_fd: u32,
        _pad: u32,
        expected_revision: u64,
    }
    let mut attr = Attr {
        prog_fd: prog_fd.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags: 0,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn if_nametoindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name contains a NUL byte"))?;
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// The name of interface `index` in the calling thread's network namespace.
pub fn if_indextoname(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_excludes_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = FileLock::exclusive(dir.path()).unwrap();
        // Another open file description, as another agent process would have.
        let other = fs::File::open(dir.path()).unwrap();
        assert!(matches!(other.try_lock(), Err(fs::TryLockError::WouldBlock)));
        drop(held);
        other.try_lock().unwrap();
    }
}
