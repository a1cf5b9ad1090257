//! Write protection of shared weights in the process that maps them.
//!
//! The buffer is shared by every process on the machine (Ray's object
//! store), and torch ignores DLPack's read-only flag: an in-place write
//! through one actor's tensor would change the weights of every actor. A
//! [`WriteGuard`] makes the pages holding tensor data read-only in this
//! process, so such a write faults in the writer instead. mprotect works on
//! whole pages, so only pages lying entirely inside the buffer are touched
//! (never a neighbour's memory): the buffer needs a page of non-tensor bytes
//! before its first tensor and after its last (the packer's `guard_bytes`).
//!
//! Several handles may guard the same pages (one buffer opened twice): the
//! protection is counted per page range and lifted when the last goes. It is
//! lifted before the buffer's owner is released, so memory the owner hands
//! back for reuse is writable again.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use super::{fault, maps, page_size};
use crate::{fail, Result};

struct Entry {
    count: usize,
    /// Whether this guard changed the protection (false when the pages were
    /// read-only already: then there is nothing to restore).
    changed: bool,
}

fn registry() -> &'static Mutex<HashMap<(usize, usize), Entry>> {
    static R: OnceLock<Mutex<HashMap<(usize, usize), Entry>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Pages of a buffer made read-only in this process; restored on drop.
#[derive(Debug)]
pub struct WriteGuard {
    lo: usize,
    hi: usize,
}

impl WriteGuard {
    /// Protects the pages covering bytes `[start, end)` of `buffer` (the
    /// tensor data). Fails, changing nothing, when those pages are not
    /// entirely inside the buffer. An empty range guards nothing.
    ///
    /// The caller keeps `buffer` mapped for as long as the guard lives.
    pub fn protect(buffer: &[u8], start: usize, end: usize) -> Result<Option<WriteGuard>> {
        if start >= end {
            return Ok(None);
        }
        let page = page_size();
        let base = buffer.as_ptr() as usize;
        let lo = (base + start) / page * page;
        let hi = (base + end).div_ceil(page) * page;
        if lo < base || hi > base + buffer.len() {
            fail!(
                InvalidArgument,
                "cannot write-protect this buffer: its tensors are not surrounded by a page ({page} bytes) of other \
                 bytes, so protecting them would also protect memory outside it (pack with guard_bytes >= {page})"
            );
        }
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = reg.get_mut(&(lo, hi)) {
            e.count += 1;
            return Ok(Some(WriteGuard { lo, hi }));
        }
        let changed = match maps::writable(lo, hi)? {
            None => fail!(
                InvalidArgument,
                "cannot write-protect: part of the buffer is not mapped in this process"
            ),
            Some(false) => false, // read-only already
            Some(true) => {
                fault::publish(lo, hi);
                // SAFETY: [lo, hi) is page-aligned, inside the buffer and
                // mapped (just checked); only its protection changes.
                if unsafe { libc::mprotect(lo as *mut _, hi - lo, libc::PROT_READ) } != 0 {
                    let e = std::io::Error::last_os_error();
                    fault::unpublish(lo);
                    fail!(Io, "mprotect(PROT_READ) of the weights failed: {e}");
                }
                true
            }
        };
        reg.insert((lo, hi), Entry { count: 1, changed });
        Ok(Some(WriteGuard { lo, hi }))
    }

    /// The protected range `[lo, hi)` of addresses.
    pub fn range(&self) -> (usize, usize) {
        (self.lo, self.hi)
    }

    /// Whether `addr` lies in a range some guard of this process protects
    /// (the lookup the fault handler makes).
    pub fn covers(addr: usize) -> bool {
        fault::guarded(addr)
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = reg.get_mut(&(self.lo, self.hi)) else {
            return;
        };
        e.count -= 1;
        if e.count > 0 {
            return;
        }
        let changed = e.changed;
        reg.remove(&(self.lo, self.hi));
        if changed {
            // SAFETY: restores what `protect` changed, on the same range,
            // which the owner still maps (the guard goes first).
            unsafe {
                libc::mprotect(
                    self.lo as *mut _,
                    self.hi - self.lo,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            fault::unpublish(self.lo);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(pages: usize) -> &'static mut [u8] {
        let len = pages * page_size();
        // SAFETY: a fresh anonymous mapping, leaked for the test's duration.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `len` bytes just mapped read-write.
        unsafe { std::slice::from_raw_parts_mut(p.cast(), len) }
    }

    #[test]
    fn protects_counts_and_restores() {
        let page = page_size();
        let buf = mapped(4);
        let (lo, hi) = (
            buf.as_ptr() as usize + page,
            buf.as_ptr() as usize + 3 * page,
        );
        let g1 = WriteGuard::protect(buf, page + 10, 2 * page + 5)
            .unwrap()
            .unwrap();
        assert_eq!(g1.range(), (lo, hi));
        assert_eq!(maps::writable(lo, hi).unwrap(), Some(false));
        assert!(WriteGuard::covers(lo + 100));
        let g2 = WriteGuard::protect(buf, page + 10, 2 * page + 5)
            .unwrap()
            .unwrap();
        drop(g1);
        assert_eq!(
            maps::writable(lo, hi).unwrap(),
            Some(false),
            "still guarded by the second handle"
        );
        drop(g2);
        assert_eq!(maps::writable(lo, hi).unwrap(), Some(true));
        buf[page + 20] = 1; // writable again
        assert!(!WriteGuard::covers(lo + 100));
    }

    #[test]
    fn refuses_to_protect_outside_the_buffer() {
        let page = page_size();
        let buf = mapped(2);
        let inner = &buf[10..2 * page - 10];
        let e = WriteGuard::protect(inner, 0, 100).unwrap_err();
        assert!(e.message().contains("guard_bytes"), "{}", e.message());
        assert!(WriteGuard::protect(inner, 5, 5).unwrap().is_none());
    }
}
