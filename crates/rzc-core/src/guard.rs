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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

use crate::{fail, Error, ErrorKind, Result};

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

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

/// Whether every page of `[lo, hi)` is mapped writable in this process,
/// read from `/proc/self/maps`. `None` when part of the range is not mapped.
///
/// The kernel writes that file as it is read and lists mappings by address,
/// so reading stops at the first mapping past the range: a process with
/// torch loaded has hundreds of mappings, and generating all of them costs
/// about a millisecond.
fn writable(lo: usize, hi: usize) -> Result<Option<bool>> {
    use std::io::BufRead;
    let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("/proc/self/maps: {e}"));
    let file = std::fs::File::open("/proc/self/maps").map_err(io)?;
    let mut covered = lo;
    let mut all_writable = true;
    for line in std::io::BufReader::with_capacity(4096, file).lines() {
        let line = line.map_err(io)?;
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms)) = (it.next(), it.next()) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if a >= hi {
            break;
        }
        if b <= lo {
            continue;
        }
        if a > covered {
            return Ok(None);
        }
        covered = covered.max(b);
        all_writable &= perms.as_bytes().get(1) == Some(&b'w');
        if covered >= hi {
            break;
        }
    }
    Ok((covered >= hi).then_some(all_writable))
}

// -- A message for writes that hit a guard -----------------------------------
//
// A write into guarded pages is a SIGSEGV, which on its own reads like a bug
// in whatever crashed. The handler below recognises faults inside guarded
// ranges, says what happened and what to do, then hands the signal to
// whoever handled it before (Python's faulthandler prints the traceback) or
// to the default action. It only reads atomics and calls write(2): both are
// async-signal-safe.

const SLOTS: usize = 128;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: (AtomicUsize, AtomicUsize) = (AtomicUsize::new(0), AtomicUsize::new(0));
static GUARDED: [(AtomicUsize, AtomicUsize); SLOTS] = [EMPTY; SLOTS];
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

fn publish(lo: usize, hi: usize) {
    for (a, b) in GUARDED.iter() {
        if a.compare_exchange(0, lo, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            b.store(hi, Ordering::Release);
            return;
        }
    }
}

fn unpublish(lo: usize) {
    for (a, b) in GUARDED.iter() {
        if a.load(Ordering::Acquire) == lo {
            b.store(0, Ordering::Release);
            a.store(0, Ordering::Release);
            return;
        }
    }
}

/// Whether `addr` lies in a range a guard of this process protects (reads
/// atomics only: safe inside the signal handler).
fn guarded(addr: usize) -> bool {
    GUARDED.iter().any(|(a, b)| {
        let lo = a.load(Ordering::Acquire);
        lo != 0 && (lo..b.load(Ordering::Acquire)).contains(&addr)
    })
}

fn write_stderr(bytes: &[u8]) {
    // SAFETY: write(2) on a valid buffer; async-signal-safe.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if guarded(addr) {
        let mut hex = [0u8; 18];
        hex[0] = b'0';
        hex[1] = b'x';
        for i in 0..16 {
            let d = ((addr >> ((15 - i) * 4)) & 0xf) as u8;
            hex[2 + i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        }
        write_stderr(b"\nray-zerocopy: a write to read-only shared weights at ");
        write_stderr(&hex);
        write_stderr(
            b" was stopped. These weights are shared by every process on this machine that loaded them; \
              an in-place write (param.add_(), an optimizer step, .train() with BatchNorm) would change them \
              for all. clone() a tensor before modifying it, or load with write_protect=False to opt out.\n",
        );
    }
    // Hand the signal on as if this handler were not there.
    let Some(prev) = PREVIOUS.get() else { return };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Back to the default action: returning re-runs the faulting
        // instruction, which now terminates the process as it would have.
        // SAFETY: installs the default disposition; async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut());
        }
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the previous handler was installed with this signature.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

fn install_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: installs a handler for SIGSEGV, keeping the previous one.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_segv as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGSEGV, &act, &mut old) == 0 {
                let _ = PREVIOUS.set(old);
            }
        }
    });
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
        let changed = match writable(lo, hi)? {
            None => fail!(
                InvalidArgument,
                "cannot write-protect: part of the buffer is not mapped in this process"
            ),
            Some(false) => false, // read-only already
            Some(true) => {
                // SAFETY: [lo, hi) is page-aligned and inside the buffer,
                // which the caller keeps mapped while the guard lives.
                install_handler();
                publish(lo, hi);
                if unsafe { libc::mprotect(lo as *mut _, hi - lo, libc::PROT_READ) } != 0 {
                    let e = std::io::Error::last_os_error();
                    unpublish(lo);
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
        guarded(addr)
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = reg.get_mut(&(self.lo, self.hi)) else {
            return;
        };
        e.count -= 1;
        if e.count == 0 {
            let changed = e.changed;
            reg.remove(&(self.lo, self.hi));
            if changed {
                // SAFETY: restores what `protect` changed, on the same range.
                unsafe {
                    libc::mprotect(
                        self.lo as *mut _,
                        self.hi - self.lo,
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                unpublish(self.lo);
            }
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
        assert_eq!(writable(lo, hi).unwrap(), Some(false));
        assert!(WriteGuard::covers(lo + 100));
        let g2 = WriteGuard::protect(buf, page + 10, 2 * page + 5)
            .unwrap()
            .unwrap();
        drop(g1);
        assert_eq!(
            writable(lo, hi).unwrap(),
            Some(false),
            "still guarded by the second handle"
        );
        drop(g2);
        assert_eq!(writable(lo, hi).unwrap(), Some(true));
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
