//! Write protection of shared weights in the process that maps them.
//!
//! The buffer is shared by every process on the machine (Ray's object
//! store), and torch ignores DLPack's read-only flag: an in-place write
//! through one actor's tensor would change the weights of every actor. A
//! [`WriteGuard`] makes the buffer's pages read-only in this process, so such
//! a write faults in the writer instead.
//!
//! mprotect alone is not enough on shared memory: the mapping may still be
//! made writable, so `mprotect(PROT_WRITE)` undoes it and
//! `madvise(MADV_REMOVE)` (which only asks that the mapping be shared and
//! *may* write) zeroes the pages for every process. So a shared mapping is
//! replaced, over the guarded range, by a mapping of the same file pages
//! through a read-only descriptor: the kernel then refuses to ever make it
//! writable (`EACCES`). The pages are the same page-cache pages: nothing is
//! copied. When no read-only descriptor can be found, the guard falls back
//! to mprotect and says so ([`GuardState::Mprotect`]).
//!
//! What a guard on this process's mappings cannot stop, all of it deliberate
//! rather than a stray write:
//! - another writable mapping of the same file in this process. The rest of
//!   the object store's mapping stays writable (this process creates objects
//!   in it), and `mremap(addr, 0, len, MREMAP_MAYMOVE)` of it makes a new
//!   writable mapping from its file offset on, which can reach the weights'
//!   pages; the guard's own stash (`PROT_NONE`, see [`seal`]) is one too;
//! - a writable descriptor of the file (`write`, `ftruncate`,
//!   `fallocate(PUNCH_HOLE)`): the plasma client closes its own, but the
//!   raylet holds one, which a process of the same user can open for
//!   writing through `/proc/<raylet pid>/fd`, as the guard opens it for
//!   reading;
//! - writes into another process that maps the file writable (ptrace,
//!   `process_vm_writev`).
//!
//! Neither `/proc/self/mem` nor ptrace can force a write into a shared
//! mapping without write permission: the kernel refuses both, sealed or
//! mprotect'ed alike.
//!
//! Several handles may guard the same pages (one buffer opened twice): the
//! protection is counted per page range and lifted when the last goes. It is
//! lifted before the buffer's owner is released, so memory the owner hands
//! back for reuse is writable again.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use super::descriptor::{self, Source};
use super::maps::{self, Vma};
use super::{fault, page_size};
use crate::{fail, Result};

/// How firmly guarded pages refuse writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardState {
    /// Shared memory mapped through a read-only descriptor: a write faults,
    /// and the kernel refuses to make the mapping writable or to punch it
    /// out (`mprotect(PROT_WRITE)`, `madvise(MADV_REMOVE)`: `EACCES`). Only
    /// a writable descriptor or another writable mapping of the same file,
    /// which only deliberate code makes, still reaches the pages.
    Sealed,
    /// Memory private to this process (anonymous, or a private mapping),
    /// read-only by mprotect: a write faults; whatever this process does to
    /// the pages, no other process sees it.
    Private,
    /// Shared memory made read-only by mprotect only, because no read-only
    /// descriptor of its file could be found: a write faults, but
    /// `mprotect(PROT_WRITE)` or `madvise(MADV_REMOVE)` in this process
    /// would still change the pages for every process.
    Mprotect,
}

/// What dropping the last guard of a range undoes.
enum Undo {
    /// mprotect'ed: each `(start, end, prot)` piece gets its protection back.
    Protection(Vec<(usize, usize, i32)>),
    /// Replaced by a read-only mapping of `file` (device, inode, offset of
    /// the range's first byte): the original mapping waits at `stash`
    /// (`PROT_NONE`) and goes back with protection `prot`.
    Mapping {
        stash: usize,
        prot: i32,
        file: ((u32, u32), u64, u64),
    },
}

struct Entry {
    count: usize,
    state: GuardState,
    undo: Undo,
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
    state: GuardState,
}

impl WriteGuard {
    /// Protects every whole page of `buffer`: from the first page boundary
    /// at or after its start to the last at or before its end, the header's
    /// pages included (a rewritten header would make every later load of the
    /// buffer fail). The bytes before the first boundary stay writable:
    /// they share their page with whatever precedes the buffer (Ray's
    /// object store aligns objects to 64 bytes only, so that is another
    /// object, which this process may be writing), and protecting them
    /// would fault those writes. Likewise the bytes after the last boundary.
    ///
    /// `tensors` (the tensor data, as offsets into `buffer`) must lie in
    /// those pages: fails, changing nothing, when a page holding tensor data
    /// is not entirely inside the buffer. An empty `tensors` guards nothing.
    ///
    /// The caller keeps `buffer` mapped for as long as the guard lives.
    pub fn protect(buffer: &[u8], tensors: std::ops::Range<usize>) -> Result<Option<WriteGuard>> {
        Self::protect_with(buffer, tensors, descriptor::ALL)
    }

    /// [`WriteGuard::protect`], looking for a read-only descriptor in
    /// `sources` only.
    fn protect_with(
        buffer: &[u8],
        tensors: std::ops::Range<usize>,
        sources: &[Source],
    ) -> Result<Option<WriteGuard>> {
        if tensors.is_empty() {
            return Ok(None);
        }
        let (lo, hi) = whole_pages(buffer, tensors)?;
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        // The same pages guarded already (this buffer opened again, or a
        // part of a buffer that is guarded whole): count on that guard.
        if let Some((&(a, b), e)) = reg.iter_mut().find(|(&(a, b), _)| a <= lo && hi <= b) {
            e.count += 1;
            return Ok(Some(WriteGuard {
                lo: a,
                hi: b,
                state: e.state,
            }));
        }
        if reg.keys().any(|&(a, b)| a < hi && lo < b) {
            fail!(
                InvalidArgument,
                "cannot write-protect this buffer: it overlaps, without lying inside, another buffer this process \
                 guards"
            );
        }
        let Some(pieces) = maps::mappings(lo, hi)? else {
            fail!(
                InvalidArgument,
                "cannot write-protect: part of the buffer is not mapped in this process"
            );
        };
        fault::publish(lo, hi);
        let (state, undo) = match guard_pages(lo, hi, &pieces, sources) {
            Ok(guarded) => guarded,
            Err(e) => {
                fault::unpublish(lo);
                return Err(e);
            }
        };
        reg.insert(
            (lo, hi),
            Entry {
                count: 1,
                state,
                undo,
            },
        );
        Ok(Some(WriteGuard { lo, hi, state }))
    }

    /// The protected range `[lo, hi)` of addresses.
    #[cfg(test)]
    pub fn range(&self) -> (usize, usize) {
        (self.lo, self.hi)
    }

    /// How firmly the pages refuse writes.
    pub fn state(&self) -> GuardState {
        self.state
    }

    /// Whether `addr` lies in a range some guard of this process protects
    /// (the lookup the fault handler makes).
    #[cfg(test)]
    pub fn covers(addr: usize) -> bool {
        fault::guarded(addr)
    }
}

/// The whole pages `[lo, hi)` of `buffer`, after checking that every page
/// holding tensor data (`tensors`, offsets into `buffer`) lies inside them.
fn whole_pages(buffer: &[u8], tensors: std::ops::Range<usize>) -> Result<(usize, usize)> {
    let page = page_size();
    let base = buffer.as_ptr() as usize;
    let lo = base.next_multiple_of(page);
    let hi = (base + buffer.len()) / page * page;
    if (base + tensors.start) / page * page < lo || (base + tensors.end).div_ceil(page) * page > hi
    {
        fail!(
            InvalidArgument,
            "cannot write-protect this buffer: its tensors are not surrounded by a page ({page} bytes) of other \
             bytes, so protecting them would also protect memory outside it (pack with guard_bytes >= {page})"
        );
    }
    Ok((lo, hi))
}

/// Makes `[lo, hi)` (mapped as `pieces`) refuse writes: sealed through a
/// read-only descriptor found in `sources` when one is, else mprotect'ed.
fn guard_pages(
    lo: usize,
    hi: usize,
    pieces: &[Vma],
    sources: &[Source],
) -> Result<(GuardState, Undo)> {
    if let Some(stash) = seal(lo, hi, pieces, sources) {
        let undo = Undo::Mapping {
            stash,
            prot: pieces[0].prot,
            file: identity(&pieces[0], lo),
        };
        return Ok((GuardState::Sealed, undo));
    }
    // SAFETY: [lo, hi) is page-aligned, inside the buffer and mapped (the
    // caller checked); only its protection changes.
    if unsafe { libc::mprotect(lo as *mut _, hi - lo, libc::PROT_READ) } != 0 {
        let e = std::io::Error::last_os_error();
        fail!(Io, "mprotect(PROT_READ) of the weights failed: {e}");
    }
    let state = if pieces.iter().any(|p| p.shared) {
        GuardState::Mprotect
    } else {
        GuardState::Private
    };
    let undo = pieces
        .iter()
        .map(|p| (p.start.max(lo), p.end.min(hi), p.prot))
        .collect();
    Ok((state, Undo::Protection(undo)))
}

/// Replaces the shared mapping of `[lo, hi)` with a read-only mapping of the
/// same file pages; returns where the original mapping now waits
/// (`PROT_NONE`), or `None`, changing nothing, when that cannot be done.
///
/// Why a stash: lifting the guard must give back a writable mapping (the
/// object store reuses the memory for objects this process may write), and
/// keeping a writable descriptor instead would leave a door open while
/// guarded. `mremap` with old size 0 duplicates a shared mapping (the same
/// pages, the same flags) without any descriptor; the duplicate waits
/// `PROT_NONE`, and `mremap(MREMAP_FIXED)` moves it back over the read-only
/// mapping in one step. Each step replaces mappings atomically: no thread
/// ever finds the range unmapped.
fn seal(lo: usize, hi: usize, pieces: &[Vma], sources: &[Source]) -> Option<usize> {
    // One mapping, so that the stash (which copies the first mapping's
    // flags) gives back exactly what was there.
    let [vma] = pieces else { return None };
    if !vma.shared {
        return None;
    }
    let file = descriptor::open_read_only(vma, sources)?;
    let len = hi - lo;
    let offset = vma.offset + (lo - vma.start) as u64;
    // SAFETY: [lo, hi) lies in one shared mapping (just read); old size 0
    // adds a new mapping of its pages elsewhere and leaves it in place.
    let stash = unsafe { libc::mremap(lo as *mut _, 0, len, libc::MREMAP_MAYMOVE) };
    if stash == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: the stash was just mapped, `len` bytes, and nothing else
    // knows it.
    if unsafe { libc::mprotect(stash, len, libc::PROT_NONE) } != 0 {
        // SAFETY: as above.
        unsafe { libc::munmap(stash, len) };
        return None;
    }
    // SAFETY: MAP_FIXED replaces [lo, hi), inside the caller's buffer, with
    // the same file pages read-only: every byte stays readable and equal.
    let mapped = unsafe {
        libc::mmap(
            lo as *mut _,
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_FIXED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            offset as libc::off_t,
        )
    };
    // The mapping keeps the file: the descriptor closes here.
    drop(file);
    if mapped == libc::MAP_FAILED {
        // A failed MAP_FIXED may have unmapped the range: put the original
        // back either way.
        unstash(lo, hi, stash as usize, vma.prot);
        return None;
    }
    Some(stash as usize)
}

/// Device, inode and file offset of address `at` of `vma`.
fn identity(vma: &Vma, at: usize) -> ((u32, u32), u64, u64) {
    (vma.dev, vma.inode, vma.offset + (at - vma.start) as u64)
}

/// Whether `[lo, hi)` is still the read-only stand-in of `file` that
/// `seal` mapped. Mapping the stash back over anything else would replace
/// memory this guard does not own (should the owner have unmapped the
/// buffer and the address been reused).
fn still_sealed(lo: usize, hi: usize, file: ((u32, u32), u64, u64)) -> bool {
    matches!(maps::mappings(lo, hi), Ok(Some(v))
        if matches!(&v[..], [m] if m.shared && m.prot == libc::PROT_READ && identity(m, lo) == file))
}

/// Moves the original mapping back from `stash` over `[lo, hi)`.
fn unstash(lo: usize, hi: usize, stash: usize, prot: i32) {
    let len = hi - lo;
    // SAFETY: `stash` is the `len` bytes `seal` set aside, known to no one
    // else; its protection goes back first so that the range is never
    // PROT_NONE where a thread may be reading it.
    if unsafe { libc::mprotect(stash as *mut _, len, prot) } != 0 {
        return; // the read-only stand-in stays: readable, and still guarded
    }
    // SAFETY: replaces [lo, hi), the read-only stand-in of the original
    // mapping, with the original itself: the same pages, writable again.
    // Should this fail (out of memory for mappings, its only way to), the
    // range is left read-only or unmapped: a later write there faults, and
    // nothing is corrupted.
    unsafe {
        libc::mremap(
            stash as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            lo as *mut libc::c_void,
        )
    };
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
        let Some(e) = reg.remove(&(self.lo, self.hi)) else {
            return;
        };
        match e.undo {
            Undo::Mapping { stash, prot, file } => {
                if still_sealed(self.lo, self.hi, file) {
                    unstash(self.lo, self.hi, stash, prot);
                } else {
                    // SAFETY: the stash is this guard's own mapping, which
                    // nothing else knows.
                    unsafe { libc::munmap(stash as *mut _, self.hi - self.lo) };
                }
            }
            Undo::Protection(pieces) => {
                for (a, b, prot) in pieces {
                    // SAFETY: restores what `protect` changed, on the same
                    // range, which the owner still maps (the guard goes
                    // first).
                    unsafe { libc::mprotect(a as *mut _, b - a, prot) };
                }
            }
        }
        fault::unpublish(self.lo);
    }
}

#[cfg(test)]
mod tests;
