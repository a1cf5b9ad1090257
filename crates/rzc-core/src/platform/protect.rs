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
        let page = page_size();
        let base = buffer.as_ptr() as usize;
        let lo = base.next_multiple_of(page);
        let hi = (base + buffer.len()) / page * page;
        if (base + tensors.start) / page * page < lo
            || (base + tensors.end).div_ceil(page) * page > hi
        {
            fail!(
                InvalidArgument,
                "cannot write-protect this buffer: its tensors are not surrounded by a page ({page} bytes) of other \
                 bytes, so protecting them would also protect memory outside it (pack with guard_bytes >= {page})"
            );
        }
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
        let (state, undo) = match seal(lo, hi, &pieces, sources) {
            Some(stash) => (
                GuardState::Sealed,
                Undo::Mapping {
                    stash,
                    prot: pieces[0].prot,
                    file: identity(&pieces[0], lo),
                },
            ),
            None => {
                // SAFETY: [lo, hi) is page-aligned, inside the buffer and
                // mapped (just checked); only its protection changes.
                if unsafe { libc::mprotect(lo as *mut _, hi - lo, libc::PROT_READ) } != 0 {
                    let e = std::io::Error::last_os_error();
                    fault::unpublish(lo);
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
                (state, Undo::Protection(undo))
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
    pub fn range(&self) -> (usize, usize) {
        (self.lo, self.hi)
    }

    /// How firmly the pages refuse writes.
    pub fn state(&self) -> GuardState {
        self.state
    }

    /// Whether `addr` lies in a range some guard of this process protects
    /// (the lookup the fault handler makes).
    pub fn covers(addr: usize) -> bool {
        fault::guarded(addr)
    }
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
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::process::{Command, Output};

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

    /// `pages` pages of a new memfd, mapped shared and writable, filled
    /// with a pattern; the memfd stays open.
    fn shared(pages: usize) -> (File, &'static mut [u8]) {
        let len = pages * page_size();
        // SAFETY: a fresh memfd, owned by the File below.
        let fd = unsafe { libc::memfd_create(c"rzc-guard-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and belongs to nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        // SAFETY: maps the whole file shared; leaked for the test's duration.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `len` bytes just mapped read-write.
        let buf: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(p.cast(), len) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        (file, buf)
    }

    fn errno_of(r: libc::c_int) -> Option<i32> {
        (r != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap())
    }

    fn madvise_remove(lo: usize, len: usize) -> Option<i32> {
        // SAFETY: the test's own mapping; what the call may do to it is the
        // point of the test.
        errno_of(unsafe { libc::madvise(lo as *mut _, len, libc::MADV_REMOVE) })
    }

    fn mprotect(lo: usize, len: usize, prot: i32) -> Option<i32> {
        // SAFETY: the test's own mapping.
        errno_of(unsafe { libc::mprotect(lo as *mut _, len, prot) })
    }

    #[test]
    fn protects_counts_and_restores() {
        let page = page_size();
        let buf = mapped(4);
        let (lo, hi) = (buf.as_ptr() as usize, buf.as_ptr() as usize + 4 * page);
        let g1 = WriteGuard::protect(buf, page + 10..2 * page + 5)
            .unwrap()
            .unwrap();
        assert_eq!(g1.range(), (lo, hi), "every whole page of the buffer");
        assert_eq!(g1.state(), GuardState::Private);
        assert_eq!(maps::writable(lo, hi).unwrap(), Some(false));
        assert!(WriteGuard::covers(lo + 100));
        let g2 = WriteGuard::protect(buf, page + 10..2 * page + 5)
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

    /// The header's whole pages are guarded too; the bytes before the first
    /// page boundary (another object's page) are not.
    #[test]
    fn guards_every_whole_page_of_the_buffer() {
        let page = page_size();
        let buf = mapped(5);
        let base = buf.as_ptr() as usize;
        let inner = &buf[64..4 * page + 100]; // starts mid-page, ends mid-page
        let g = WriteGuard::protect(inner, 2 * page..2 * page + 8)
            .unwrap()
            .unwrap();
        assert_eq!(g.range(), (base + page, base + 4 * page));
        assert_eq!(maps::writable(base, base + page).unwrap(), Some(true));
        assert_eq!(
            maps::writable(base + page, base + 4 * page).unwrap(),
            Some(false)
        );
        assert_eq!(
            maps::writable(base + 4 * page, base + 5 * page).unwrap(),
            Some(true)
        );
        drop(g);
    }

    #[test]
    fn refuses_to_protect_outside_the_buffer() {
        let page = page_size();
        let buf = mapped(2);
        let inner = &buf[10..2 * page - 10];
        let e = WriteGuard::protect(inner, 0..100).unwrap_err();
        assert!(e.message().contains("guard_bytes"), "{}", e.message());
        assert!(WriteGuard::protect(inner, 5..5).unwrap().is_none());
    }

    /// A part of a guarded buffer counts on its guard; a buffer straddling a
    /// guarded one is refused rather than half guarded.
    #[test]
    fn nested_and_overlapping_buffers() {
        let page = page_size();
        let buf = mapped(6);
        let base = buf.as_ptr() as usize;
        let whole = WriteGuard::protect(&buf[..4 * page], page..page + 1)
            .unwrap()
            .unwrap();
        let part = WriteGuard::protect(&buf[page..3 * page], page..page + 1)
            .unwrap()
            .unwrap();
        assert_eq!(part.range(), whole.range());
        let e = WriteGuard::protect(&buf[2 * page..6 * page], page..page + 1).unwrap_err();
        assert!(e.message().contains("overlaps"), "{}", e.message());
        drop(whole);
        assert_eq!(
            maps::writable(base, base + 4 * page).unwrap(),
            Some(false),
            "the part still guards"
        );
        drop(part);
        assert_eq!(maps::writable(base, base + 6 * page).unwrap(), Some(true));
    }

    /// A shared file mapping (a memfd: this process holds its descriptor) is
    /// sealed: MADV_REMOVE and mprotect(PROT_WRITE) fail with EACCES and the
    /// bytes stay; once the last guard goes the same mapping is back,
    /// writable, with the same bytes.
    #[test]
    fn seals_a_shared_file_mapping() {
        let page = page_size();
        let (file, buf) = shared(6);
        let base = buf.as_ptr() as usize;
        let before = buf.to_vec();
        let (lo, hi) = (base + page, base + 5 * page);
        let g1 = WriteGuard::protect(&buf[page - 64..5 * page + 64], 2 * page..3 * page)
            .unwrap()
            .unwrap();
        let g2 = WriteGuard::protect(&buf[page - 64..5 * page + 64], 2 * page..3 * page)
            .unwrap()
            .unwrap();
        assert_eq!(g1.range(), (lo, hi));
        assert_eq!(
            (g1.state(), g2.state()),
            (GuardState::Sealed, GuardState::Sealed)
        );
        assert!(WriteGuard::covers(lo) && WriteGuard::covers(hi - 1));
        assert_eq!(madvise_remove(lo, hi - lo), Some(libc::EACCES));
        assert_eq!(madvise_remove(lo + page, page), Some(libc::EACCES));
        assert_eq!(
            mprotect(lo, hi - lo, libc::PROT_READ | libc::PROT_WRITE),
            Some(libc::EACCES)
        );
        assert_eq!(
            mprotect(lo, page, libc::PROT_READ | libc::PROT_WRITE),
            Some(libc::EACCES)
        );
        // The kernel does not let /proc/self/mem force a write into a shared
        // mapping without write permission either.
        let mem = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/mem")
            .unwrap();
        assert!(std::os::unix::fs::FileExt::write_at(&mem, &[7], lo as u64).is_err());
        assert_eq!(buf, &before[..], "every byte as it was");
        let mut through_fd = vec![0u8; before.len()];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut through_fd, 0).unwrap();
        assert_eq!(through_fd, before, "the file holds them too");
        // The same page-cache pages: a write through the descriptor shows.
        std::os::unix::fs::FileExt::write_at(&file, &[9], (2 * page) as u64).unwrap();
        assert_eq!(buf[2 * page], 9);
        std::os::unix::fs::FileExt::write_at(
            &file,
            &before[2 * page..2 * page + 1],
            (2 * page) as u64,
        )
        .unwrap();

        drop(g1);
        assert_eq!(
            madvise_remove(lo, page),
            Some(libc::EACCES),
            "still sealed by the second"
        );
        drop(g2);
        assert_eq!(maps::writable(base, base + 6 * page).unwrap(), Some(true));
        let pieces = maps::mappings(lo, hi).unwrap().unwrap();
        assert!(
            pieces
                .iter()
                .all(|p| p.shared && p.offset as usize + base == p.start),
            "the original mapping of the file, at the same offsets: {pieces:?}"
        );
        assert_eq!(buf, &before[..]);
        buf[2 * page] = 42; // writable again, through the file
        let mut one = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut one, (2 * page) as u64).unwrap();
        assert_eq!(one[0], 42);
        assert!(!WriteGuard::covers(lo));
    }

    /// Two buffers side by side, both sealed: the kernel may merge their
    /// read-only mappings into one; each guard still lifts its own pages.
    #[test]
    fn neighbours_seal_and_lift_apart() {
        let page = page_size();
        let (_file, buf) = shared(8);
        let base = buf.as_ptr() as usize;
        let a = WriteGuard::protect(&buf[..4 * page], page..page + 1)
            .unwrap()
            .unwrap();
        let b = WriteGuard::protect(&buf[4 * page..], page..page + 1)
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.state(), b.state()),
            (GuardState::Sealed, GuardState::Sealed)
        );
        drop(a);
        assert_eq!(maps::writable(base, base + 4 * page).unwrap(), Some(true));
        assert_eq!(
            madvise_remove(base + 4 * page, 4 * page),
            Some(libc::EACCES)
        );
        buf[page] = 1;
        drop(b);
        assert_eq!(maps::writable(base, base + 8 * page).unwrap(), Some(true));
        buf[5 * page] = 1;
    }

    /// Should the owner unmap the buffer while guarded and the addresses be
    /// reused, lifting the guard leaves the new mapping alone.
    #[test]
    fn lifting_leaves_a_reused_range_alone() {
        let page = page_size();
        let (_file, buf) = shared(4);
        let base = buf.as_ptr() as usize;
        let g = WriteGuard::protect(buf, page..page + 1).unwrap().unwrap();
        assert_eq!(g.state(), GuardState::Sealed);
        // SAFETY: replaces the test's own mapping with anonymous memory.
        let p = unsafe {
            libc::mmap(
                base as *mut _,
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        assert_eq!(p as usize, base);
        buf[page] = 5;
        drop(g);
        let pieces = maps::mappings(base, base + 4 * page).unwrap().unwrap();
        assert!(
            pieces.iter().all(|m| !m.shared && m.inode == 0),
            "{pieces:?}"
        );
        assert_eq!(buf[page], 5);
    }

    /// No read-only descriptor found: mprotect only, and the state says
    /// that the kernel would still let this process change the pages.
    #[test]
    fn without_a_descriptor_falls_back_to_mprotect() {
        let page = page_size();
        let (file, buf) = shared(4);
        drop(file); // the mapping alone holds the memfd now
        let base = buf.as_ptr() as usize;
        let g = WriteGuard::protect_with(buf, page..2 * page, &[Source::OwnFds, Source::ParentFds])
            .unwrap()
            .unwrap();
        assert_eq!(g.state(), GuardState::Mprotect);
        assert_eq!(maps::writable(base, base + 4 * page).unwrap(), Some(false));
        drop(g);
        assert_eq!(maps::writable(base, base + 4 * page).unwrap(), Some(true));
        buf[page] = 1;
    }

    /// The mapping alone keeps the memfd: as root, /proc/self/map_files
    /// still opens it.
    #[test]
    fn map_files_finds_a_closed_file_as_root() {
        let page = page_size();
        let (file, buf) = shared(4);
        drop(file);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: /proc/self/map_files is not readable, not checked");
            return;
        }
        let g = WriteGuard::protect_with(buf, page..2 * page, &[Source::MapFiles])
            .unwrap()
            .unwrap();
        assert_eq!(g.state(), GuardState::Sealed);
        assert_eq!(madvise_remove(g.range().0, page), Some(libc::EACCES));
    }

    /// Runs [`child`] in a new process of this test binary with `env`.
    fn run_child(env: &[(&str, String)]) -> Output {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "platform::protect::tests::child",
                "--ignored",
                "--nocapture",
            ])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap()
    }

    /// What the tests below run in a child process; does nothing on its own.
    #[test]
    #[ignore]
    fn child() {
        let page = page_size();
        match std::env::var("RZC_GUARD_CHILD").as_deref() {
            Ok("parent-fd") => {
                // The parent's memfd, mapped here through /proc; then this
                // process holds no descriptor of it, as a Ray worker holds
                // none of the object store's file.
                let fd: i32 = std::env::var("RZC_PARENT_FD").unwrap().parse().unwrap();
                // SAFETY: getppid has no preconditions.
                let ppid = unsafe { libc::getppid() };
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(format!("/proc/{ppid}/fd/{fd}"))
                    .unwrap();
                // SAFETY: maps the parent's 4-page memfd shared; leaked.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4 * page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        file.as_raw_fd(),
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                drop(file);
                // SAFETY: the 4 pages just mapped.
                let buf = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 4 * page) };
                let g = WriteGuard::protect_with(buf, page..2 * page, &[Source::ParentFds])
                    .unwrap()
                    .unwrap();
                assert_eq!(g.state(), GuardState::Sealed);
                assert_eq!(madvise_remove(g.range().0, page), Some(libc::EACCES));
                println!("CHILD: sealed through the parent's descriptor");
            }
            Ok("write") => {
                let (_file, buf) = shared(4);
                let g = WriteGuard::protect(buf, page..2 * page).unwrap().unwrap();
                assert_eq!(g.state(), GuardState::Sealed);
                let at = buf[page..].as_ptr() as *mut u8;
                // SAFETY: none: a write into guarded pages, which must fault.
                unsafe { at.write_volatile(1) };
                println!("CHILD: wrote");
            }
            _ => {}
        }
    }

    /// A Ray worker's situation: the file is open only in the parent
    /// process. Its descriptor there is found and the mapping sealed.
    #[test]
    fn finds_the_parents_descriptor() {
        let (file, _buf) = shared(4);
        let out = run_child(&[
            ("RZC_GUARD_CHILD", "parent-fd".into()),
            ("RZC_PARENT_FD", file.as_raw_fd().to_string()),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("CHILD: sealed"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A write into a sealed mapping still faults, with the handler's
    /// message.
    #[test]
    fn a_write_into_a_sealed_mapping_faults_with_the_message() {
        use std::os::unix::process::ExitStatusExt;
        let out = run_child(&[("RZC_GUARD_CHILD", "write".into())]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("CHILD: wrote"));
        assert!(
            stderr.contains("ray-zerocopy: a write to read-only shared weights"),
            "{stderr}"
        );
    }
}
