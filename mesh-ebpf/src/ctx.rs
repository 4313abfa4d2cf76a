//! Context field access. Every read and write of a context field is a single volatile access
//! of the field's own width: the verifier rejects context accesses LLVM merges into wider
//! ones (e.g. `optlen` + `retval` stored as one u64, or two `remote_ip6` words loaded as one).

use core::ptr::{read_volatile, write_volatile};

#[inline(always)]
pub unsafe fn rd<T: Copy>(p: *const T) -> T {
    unsafe { read_volatile(p) }
}

#[inline(always)]
pub unsafe fn wr<T: Copy>(p: *mut T, v: T) {
    unsafe { write_volatile(p, v) }
}

/// Reads four context words one at a time.
#[inline(always)]
pub unsafe fn rd_words(p: *const [u32; 4]) -> [u32; 4] {
    let w = p as *const u32;
    unsafe { [rd(w), rd(w.add(1)), rd(w.add(2)), rd(w.add(3))] }
}

/// Writes four context words one at a time.
#[inline(always)]
pub unsafe fn wr_words(p: *mut [u32; 4], v: [u32; 4]) {
    let w = p as *mut u32;
    unsafe {
        wr(w, v[0]);
        wr(w.add(1), v[1]);
        wr(w.add(2), v[2]);
        wr(w.add(3), v[3]);
    }
}
