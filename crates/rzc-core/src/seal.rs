//! Sealing while filling: the digest of a buffer's data section, computed
//! while the buffer is being filled, so that sealing costs little more than
//! the fill, on every core there is.
//!
//! The data section is hashed in blocks of 1 MiB, each a whole BLAKE3
//! subtree ([`crate::digest::blocks`]), so blocks can be hashed in any
//! order and on any thread; [`Sealer::finish`] joins their chaining values
//! into the same digest as one pass over the bytes. A block is hashed as
//! soon as its bytes are final, by whoever sees that first:
//!
//! - [`Sealer::copy`] and [`Sealer::read`] fill whole tensors into the
//!   buffer on several threads; the thread that writes a block's last
//!   missing tensor byte hashes the block at once, while it is still in
//!   that core's cache;
//! - a filler that writes the buffer itself declares how far the bytes are
//!   final ([`Sealer::advance`]); a thread of the sealer's own hashes the
//!   blocks below that watermark, in order, behind the fill;
//! - [`Sealer::finish`] hashes what is left on every core.
//!
//! Every block is hashed exactly once (claimed by an atomic flag), and only
//! once every byte of it is final: holding no tensor byte that a fill has
//! yet to write, or below the watermark with no fill of it still running
//! (the padding is written with the layout, before the sealer is made).
//!
//! The threads read and write memory the caller owns through a raw
//! pointer, only as the contracts below allow, and only until `finish` or
//! the sealer's drop: this is why the module is one of the core's places
//! with `unsafe` code (see `lib.rs`). The C ABI's `rzc_pack_sealer_*` calls
//! are thin shells over it.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::digest::{self, blocks, Digest};
use crate::pack::PAD_PREFIX;
use crate::platform;
use crate::{Error, ErrorKind, Result};

/// Below this many bytes, a copy runs on the calling thread alone: starting
/// threads would cost more than they save.
const PARALLEL_MIN: usize = 8 << 20;

/// Where a fill's bytes come from.
#[derive(Clone, Copy)]
enum Source {
    /// The caller's memory: a piece's `src` is an address.
    Memory,
    /// An open file, borrowed for the call: a piece's `src` is an offset in it.
    File(RawFd),
}

/// One whole tensor to fill: where its bytes come from, and where they go.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    /// Where the tensor's bytes are: their address, for [`Sealer::copy`];
    /// their offset in the file, for [`Sealer::read`].
    pub src: u64,
    /// Offset of the tensor's data in the buffer (its plan's offset).
    pub dst_offset: u64,
    /// Size in bytes; must be the tensor's.
    pub nbytes: u64,
}

/// The caller's buffer.
#[derive(Clone, Copy)]
struct Region {
    ptr: *mut u8,
    len: usize,
}

/// What the sealer's thread, the copying threads and the callers share.
struct State {
    region: Region,
    data_start: usize,
    /// Bytes below this are final (`advance`).
    upto: AtomicUsize,
    /// Stop the hashing thread (the sealer is finishing or freed).
    cancel: AtomicBool,
    wake: Condvar,
    lock: Mutex<()>,
    /// Every tensor with bytes: `(offset, nbytes)`, by offset.
    tensors: Vec<(usize, usize)>,
    /// Whether `copy` has taken tensor `i` (each is copied at most once).
    copied: Box<[AtomicBool]>,
    /// Per block (none when the data section fits one block): tensor bytes
    /// that `copy` has yet to write, bytes that a running `copy` took and
    /// has yet to write (a block below the watermark is final only when
    /// none are in flight), whether it is taken for hashing, and its
    /// chaining value.
    pending: Box<[AtomicUsize]>,
    inflight: Box<[AtomicUsize]>,
    claimed: Box<[AtomicBool]>,
    cvs: Box<[OnceLock<blocks::Cv>]>,
    /// Why a fill failed part-way (a read from a file fell short): the
    /// buffer holds bytes that are not the tensors', so the sealer refuses
    /// to go on, and to finish.
    failed: OnceLock<String>,
}

// SAFETY: `region` is the caller's buffer, which outlives the sealer (the
// contract of `Sealer::new`). It is written only by `copy` and
// `read`, each byte once and by one thread (a tensor is taken by one call,
// each fragment by one worker), and read only where final (see
// `State::is_final`; a fragment whose read failed never becomes final).
unsafe impl Send for State {}
// SAFETY: as above; every other field is atomic or locked.
unsafe impl Sync for State {}

impl State {
    fn data_len(&self) -> usize {
        self.region.len - self.data_start
    }

    /// Block `k`'s byte range in the buffer.
    fn block_span(&self, k: usize) -> (usize, usize) {
        let at = self.data_start + k * blocks::LEN;
        (at, (at + blocks::LEN).min(self.region.len))
    }

    /// Whether every byte of block `k` is final: every tensor byte in it
    /// copied, or the block below the watermark with no copy of it still
    /// running. The Acquire loads order the caller's reads after the writes
    /// that made the bytes final (the Release of `advance`, the AcqRel
    /// decrements of `copy`).
    fn is_final(&self, k: usize) -> bool {
        self.pending[k].load(Ordering::Acquire) == 0
            || (self.block_span(k).1 <= self.upto.load(Ordering::Acquire)
                && self.inflight[k].load(Ordering::Acquire) == 0)
    }

    /// Calls `f(block, bytes)` for each block that `[at, at + n)` touches.
    fn per_block(&self, at: usize, n: usize, f: impl FnMut(usize, usize)) {
        per_block(self.data_start, at, n, f);
    }

    /// Hashes block `k` unless it is taken already. Its bytes are final.
    fn hash_block(&self, k: usize) {
        if self.claimed[k].swap(true, Ordering::AcqRel) {
            return;
        }
        let (at, end) = self.block_span(k);
        // SAFETY: `[at, end)` lies in the caller's buffer and is final (the
        // caller checked `is_final`, or every copy has returned): no one
        // writes it any more.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.region.ptr.add(at).cast_const(), end - at) };
        let _ = self.cvs[k].set(blocks::cv(bytes, k, blocks::LEN));
    }

    /// Hashes, in order, every block that becomes final below the
    /// watermark, until cancelled (the sealer's own thread).
    fn hash_behind(&self) {
        let mut next = 0;
        while next < self.pending.len() && !self.cancel.load(Ordering::Acquire) {
            if self.claimed[next].load(Ordering::Acquire) {
                next += 1;
            } else if self.is_final(next) {
                self.hash_block(next);
                next += 1;
            } else {
                let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                // Re-checked under the lock: `advance` notifies under it.
                if !self.is_final(next) && !self.cancel.load(Ordering::Acquire) {
                    let _ = self.wake.wait_timeout(guard, Duration::from_millis(50));
                }
            }
        }
    }

    /// Index of the tensor whose data is exactly `[offset, offset + nbytes)`.
    fn tensor_at(&self, what: &str, i: usize, offset: u64, nbytes: u64) -> Result<usize> {
        let t = self.starting_at(offset).ok_or_else(|| {
            invalid(format!(
                "{what}[{i}]: no tensor's data starts at offset {offset} of the buffer"
            ))
        })?;
        if self.tensors[t].1 as u64 != nbytes {
            return Err(invalid(format!(
                "{what}[{i}]: the tensor at offset {offset} is {} bytes, not {nbytes}",
                self.tensors[t].1
            )));
        }
        Ok(t)
    }

    /// Checks `pieces` (the caller's `what`) against the layout and takes
    /// their tensors: nothing is taken when one is refused. Gives, for each
    /// piece with bytes, its index in `pieces`, its tensor's and its source.
    fn take(
        &self,
        what: &str,
        pieces: &[Piece],
        source: Source,
    ) -> Result<Vec<(usize, usize, u64)>> {
        let (lo, hi) = (
            self.region.ptr as usize,
            self.region.ptr as usize + self.region.len,
        );
        let mut found = Vec::with_capacity(pieces.len());
        for (i, c) in pieces.iter().enumerate() {
            if c.nbytes == 0 {
                // Nothing to copy (an empty tensor shares its offset with
                // the next one; a tensor with bytes left uncopied is
                // hashed as it stands).
                continue;
            }
            let t = self.tensor_at(what, i, c.dst_offset, c.nbytes)?;
            match source {
                Source::Memory => {
                    if c.src == 0 {
                        return Err(invalid(format!("{what}[{i}].src is NULL")));
                    }
                    match (c.src as usize).checked_add(c.nbytes as usize) {
                        Some(end) if end > lo && (c.src as usize) < hi => {
                            return Err(invalid(format!(
                                "{what}[{i}]: the source overlaps the sealer's buffer"
                            )));
                        }
                        Some(_) => {}
                        None => {
                            return Err(invalid(format!(
                                "{what}[{i}]: {} bytes from address {:#x} run past the end of memory",
                                c.nbytes, c.src
                            )));
                        }
                    }
                }
                Source::File(_) => {
                    let past = match c.src.checked_add(c.nbytes) {
                        Some(end) => end > i64::MAX as u64,
                        None => true,
                    };
                    if past {
                        return Err(invalid(format!(
                            "{what}[{i}]: {} bytes from offset {} lie past any file's end",
                            c.nbytes, c.src
                        )));
                    }
                }
            }
            found.push((i, t, c.src));
        }
        let mut seen: Vec<usize> = found.iter().map(|&(_, t, _)| t).collect();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!(
                "{what}: the tensor at offset {} is named twice",
                self.tensors[w[0]].0
            )));
        }
        // Under the lock `advance` takes: the watermark cannot pass a tensor
        // between the check and the in-flight count that keeps its blocks
        // from being hashed before this copy has written them.
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let upto = self.upto.load(Ordering::Acquire);
        if let Some(&(i, t, _)) = found.iter().find(|&&(_, t, _)| self.tensors[t].0 < upto) {
            return Err(invalid(format!(
                "{what}[{i}]: the tensor at offset {} lies below the bytes declared final ({upto})",
                self.tensors[t].0
            )));
        }
        for (j, &(i, t, _)) in found.iter().enumerate() {
            if self.copied[t].swap(true, Ordering::AcqRel) {
                for &(_, u, _) in &found[..j] {
                    self.copied[u].store(false, Ordering::Release);
                }
                return Err(invalid(format!(
                    "{what}[{i}]: the tensor at offset {} is filled already",
                    self.tensors[t].0
                )));
            }
        }
        if !self.inflight.is_empty() {
            for &(_, t, _) in &found {
                let (at, n) = self.tensors[t];
                self.per_block(at, n, |k, bytes| {
                    self.inflight[k].fetch_add(bytes, Ordering::Relaxed);
                });
            }
        }
        Ok(found)
    }

    /// The tensor with bytes whose data starts at `offset`, if any.
    fn starting_at(&self, offset: u64) -> Option<usize> {
        let o = usize::try_from(offset).ok()?;
        self.tensors.binary_search_by_key(&o, |&(at, _)| at).ok()
    }

    /// Fills the tensors `pieces` (the caller's `what`) from `source` on up
    /// to `threads` threads (0: one per core), hashing each block as it
    /// completes.
    fn fill(
        self: &Arc<Self>,
        what: &str,
        pieces: &[Piece],
        source: Source,
        threads: usize,
    ) -> Result<()> {
        self.usable()?;
        let taken = self.take(what, pieces, source)?;
        // Fragments `(at, src, n, j)` of `taken[j]` that do not cross a
        // block boundary, in buffer order, so that blocks complete (and are
        // hashed) early and in order. Memory sources as addresses: the
        // workers read them only during this call.
        let mut work: Vec<(usize, u64, usize, usize)> = Vec::new();
        for (j, &(_, t, src)) in taken.iter().enumerate() {
            let (at, n) = self.tensors[t];
            if self.pending.is_empty() {
                work.push((at, src, n, j));
            } else {
                let mut here = at;
                self.per_block(at, n, |_, step| {
                    work.push((here, src + (here - at) as u64, step, j));
                    here += step;
                });
            }
        }
        work.sort_unstable_by_key(|&(at, ..)| at);
        let total: usize = work.iter().map(|&(_, _, n, _)| n).sum();
        let threads = if threads == 0 { cores() } else { threads }
            .min(work.len())
            .min(total / PARALLEL_MIN + 1);
        // Whose failure `failed` records, if any: this call's, or another's
        // running at the same time.
        let ours = Arc::new(AtomicBool::new(false));
        let (state, next, failed_here) = (self.clone(), AtomicUsize::new(0), ours.clone());
        let what = what.to_owned();
        fan_out(threads, move || loop {
            let w = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(at, src, n, j)) = work.get(w) else {
                return;
            };
            if state.failed.get().is_some() {
                return;
            }
            // SAFETY: `[at, at + n)` is part of a tensor this call took: no
            // one else writes it, and nobody reads it before it is final.
            let dst = unsafe { state.region.ptr.add(at) };
            match source {
                // SAFETY: the source is the caller's `n` readable bytes
                // outside the buffer, valid until this call returns, which
                // `fan_out` joins.
                Source::Memory => unsafe {
                    std::ptr::copy_nonoverlapping(src as usize as *const u8, dst, n)
                },
                Source::File(fd) => {
                    // SAFETY: as above, `n` bytes at `dst` that this worker
                    // alone writes, and no one reads, meanwhile.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dst, n) };
                    // SAFETY: the caller's descriptor is borrowed for the
                    // whole call (`Sealer::read`), which `fan_out` joins.
                    let file = unsafe { BorrowedFd::borrow_raw(fd) };
                    if let Err(why) = platform::read_exact_at(file, dst, src) {
                        let (i, t, start) = taken[j];
                        let nbytes = state.tensors[t].1;
                        let why = format!(
                            "{what}[{i}] ({nbytes} bytes from offset {start} of fd {fd}): {why}"
                        );
                        // The block stays pending: never hashed, and the
                        // sealer refuses to go on or to finish.
                        if state.failed.set(why).is_ok() {
                            failed_here.store(true, Ordering::Release);
                        }
                        return;
                    }
                }
            }
            if !state.pending.is_empty() {
                let k = (at - state.data_start) / blocks::LEN;
                let completed = state.pending[k].fetch_sub(n, Ordering::AcqRel) == n;
                let drained = state.inflight[k].fetch_sub(n, Ordering::AcqRel) == n;
                if completed || (drained && state.is_final(k)) {
                    state.hash_block(k);
                }
            }
        });
        match self.failed.get() {
            None => Ok(()),
            Some(why) if ours.load(Ordering::Acquire) => {
                Err(Error::new(ErrorKind::Io, why.clone()))
            }
            Some(_) => self.usable(),
        }
    }

    /// Refuses a sealer whose fill failed.
    fn usable(&self) -> Result<()> {
        match self.failed.get() {
            Some(why) => Err(invalid(format!(
                "a fill of this sealer's buffer failed, so it cannot be sealed: {why}"
            ))),
            None => Ok(()),
        }
    }
}

/// Runs `job` on the calling thread and on `threads - 1` more (fewer when
/// the system refuses to start them), all joined before it returns; a panic
/// in any of them is resumed here. Not `std::thread::scope`: that gives the
/// calling thread (a C caller's) a Rust thread handle of its own, kept until
/// the thread ends.
fn fan_out(threads: usize, job: impl Fn() + Send + Sync + 'static) {
    let job = Arc::new(job);
    let helpers: Vec<JoinHandle<()>> = (1..threads)
        .map_while(|_| {
            let job = job.clone();
            std::thread::Builder::new()
                .name("rzc-seal-copy".into())
                .spawn(move || job())
                .ok()
        })
        .collect();
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job()));
    let mut panicked = mine.err();
    for h in helpers {
        if let Err(p) = h.join() {
            panicked.get_or_insert(p);
        }
    }
    if let Some(p) = panicked {
        std::panic::resume_unwind(p);
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, message)
}

/// The digest of a buffer's data section, computed while the buffer is
/// filled (see the module's documentation). Dropping it stops its thread.
pub struct Sealer {
    state: Arc<State>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Whether `finish` has run, under a lock each fill holds (shared) for
    /// its whole run, and `finish` (exclusive) for its own: a `finish` on
    /// one thread waits for the fills running on others, and a fill that
    /// comes after it is refused. Without it, safe code calling `finish`
    /// while another thread's fill was writing the buffer would hash bytes
    /// being written (in C, the caller's contract forbade it; a safe Rust
    /// API must not leave that to its caller).
    finished: RwLock<bool>,
}

impl Sealer {
    /// Starts computing the digest of the data section of the `len` bytes
    /// at `ptr`, a buffer planned with `reserve_digest` whose layout is
    /// written already (the header, and the padding between and around
    /// the tensors, neither of which may change afterwards), with a thread
    /// of its own. Then fill in the tensors' data, with [`Sealer::copy`] or
    /// [`Sealer::read`], or by writing it and calling [`Sealer::advance`]
    /// as it becomes final, and call [`Sealer::finish`].
    ///
    /// # Safety
    /// `ptr` points to `len` initialized, writable bytes (a tensor's bytes
    /// may hold anything until filled: one left unfilled is hashed as it
    /// stands) that stay valid until the sealer is dropped (a sealer leaked
    /// unfinished keeps its thread, and its claim on the buffer, for ever).
    /// Until then, the caller:
    /// - writes no byte of the header or of the padding (written with the
    ///   layout, before the sealer is made: a block of padding alone is
    ///   hashed at once), of a tensor named in a [`Sealer::copy`] or
    ///   [`Sealer::read`], or below a value it has passed to
    ///   [`Sealer::advance`];
    /// - reads no byte that a fill, or the caller itself, may still be
    ///   writing;
    /// - writes nothing once [`Sealer::finish`] may run, and holds no
    ///   reference into the buffer while it runs (it writes the header).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Result<Sealer> {
        if ptr.is_null() {
            return Err(invalid("the buffer to seal is NULL".into()));
        }
        // SAFETY: `len` readable bytes (the contract); only the header is
        // read here, which the caller has written.
        let bytes = unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) };
        let state = Arc::new(state_of(bytes, Region { ptr, len })?);
        let for_thread = state.clone();
        let thread = std::thread::Builder::new()
            .name("rzc-seal".into())
            .spawn(move || for_thread.hash_behind())
            .map_err(|e| invalid(format!("cannot start the hashing thread: {e}")))?;
        Ok(Sealer {
            state,
            thread: Mutex::new(Some(thread)),
            finished: RwLock::new(false),
        })
    }

    /// Whether this sealer hashes the buffer at `ptr` of `len` bytes.
    pub fn seals(&self, ptr: *const u8, len: usize) -> bool {
        self.state.region.ptr.cast_const() == ptr && self.state.region.len == len
    }

    /// Declares the bytes of the buffer below `upto` final: no one writes
    /// them any more. `upto` is a prefix: where several threads fill the
    /// buffer, it is the start of the first part any of them is still
    /// writing, not the end of one thread's own part (that would declare
    /// the parts below it final while others write them). Calls may come
    /// in any order, and from several threads at once; the largest counts.
    /// A block that a running [`Sealer::copy`] is writing waits for that
    /// copy.
    pub fn advance(&self, upto: usize) {
        let _g = self.state.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.state.upto.fetch_max(upto, Ordering::Release);
        self.state.wake.notify_one();
    }

    /// Copies whole tensors into the buffer, `copies[i].src` the address
    /// of tensor `i`'s bytes, on up to `threads` threads (0: one per core;
    /// a small copy runs on the calling thread), hashing every block whose
    /// bytes this completes while it is still in cache. Each tensor is
    /// named by its offset and size in the buffer's layout; a tensor may be
    /// filled once, and not below the bytes declared final. Nothing is
    /// copied when one entry is refused. Several calls may run at once,
    /// for different tensors.
    ///
    /// # Safety
    /// Every source with bytes is `nbytes` readable bytes outside the
    /// buffer, unchanged during the call.
    pub unsafe fn copy(&self, copies: &[Piece], threads: usize) -> Result<()> {
        self.fill("copies", copies, Source::Memory, threads)
    }

    /// Reads whole tensors from the open file `file` into the buffer with
    /// pread(2), `reads[i].src` the offset of tensor `i`'s bytes in the
    /// file, as [`Sealer::copy`] copies them from memory. Reading, not
    /// mapping, the file means that a file cut short while it is read is
    /// an [`ErrorKind::Io`] error (naming the entry and the file's size)
    /// instead of a SIGBUS; the sealer then refuses to go on or to finish,
    /// since its buffer is not whole (another fill running at that moment
    /// is refused as well). Whether the file's bytes are still those its
    /// header was read from is the caller's to check.
    /// A descriptor that cannot be read at all (not open for reading, not a
    /// regular file or block device) is refused before anything is taken,
    /// the sealer unharmed.
    pub fn read(&self, file: BorrowedFd<'_>, reads: &[Piece], threads: usize) -> Result<()> {
        platform::readable(file).map_err(|why| invalid(format!("reads: the descriptor {why}")))?;
        self.fill("reads", reads, Source::File(file.as_raw_fd()), threads)
    }

    fn fill(&self, what: &str, pieces: &[Piece], source: Source, threads: usize) -> Result<()> {
        let finished = self.finished.read().unwrap_or_else(|p| p.into_inner());
        if *finished {
            return Err(invalid("this sealer is finished already".into()));
        }
        self.state.fill(what, pieces, source, threads)
    }

    /// Stops the hashing thread where it is.
    fn stop(&self) {
        {
            let _g = self.state.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.state.cancel.store(true, Ordering::Release);
            self.state.wake.notify_one();
        }
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// Declares the whole buffer final, hashes the blocks left (on every
    /// core), joins them, writes the digest into the header
    /// (`rzc.data_blake3`) and returns the buffer's content digest. The
    /// sealer is then spent. Fills running on other threads (`copy`,
    /// `read`) are waited for, and later ones refused; bytes the caller
    /// writes itself are final by now (the contract of [`Sealer::new`]).
    pub fn finish(&self) -> Result<Digest> {
        let mut finished = self.finished.write().unwrap_or_else(|p| p.into_inner());
        if std::mem::replace(&mut *finished, true) {
            return Err(invalid("this sealer is finished already".into()));
        }
        self.stop();
        let s = &*self.state;
        s.usable()?;
        s.upto.store(s.region.len, Ordering::Release);
        let data = if s.pending.is_empty() {
            // SAFETY: every byte is final: no fill runs (this call holds the
            // lock each fill holds while it runs), the caller writes nothing
            // once finish may run (the contract of `new`), and the hashing
            // thread is joined.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    s.region.ptr.add(s.data_start).cast_const(),
                    s.data_len(),
                )
            };
            digest::blake3(bytes)
        } else {
            let left = s
                .claimed
                .iter()
                .filter(|c| !c.load(Ordering::Acquire))
                .count();
            let threads = cores().min(left * blocks::LEN / PARALLEL_MIN + 1);
            let (state, next) = (self.state.clone(), AtomicUsize::new(0));
            fan_out(threads, move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= state.pending.len() {
                    return;
                }
                state.hash_block(k);
            });
            let cvs: Option<Vec<blocks::Cv>> = s.cvs.iter().map(|c| c.get().copied()).collect();
            let cvs =
                cvs.ok_or_else(|| invalid("a block of the buffer was never hashed".into()))?;
            blocks::root(&cvs, s.data_len(), blocks::LEN)
        };
        // SAFETY: the caller's contract: the buffer is writable and no one
        // else uses it during this call; every thread of ours is done.
        let buffer = unsafe { std::slice::from_raw_parts_mut(s.region.ptr, s.region.len) };
        digest::write_data_digest_from(buffer, s.data_start, &data)
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Calls `f(block, bytes)` for each block of a data section starting at
/// `data_start` that `[at, at + n)` touches.
fn per_block(data_start: usize, at: usize, n: usize, mut f: impl FnMut(usize, usize)) {
    let (mut here, end) = (at, at + n);
    while here < end {
        let k = (here - data_start) / blocks::LEN;
        let step = (data_start + (k + 1) * blocks::LEN).min(end) - here;
        f(k, step);
        here += step;
    }
}

/// The sealer's view of a buffer whose header is written.
fn state_of(bytes: &[u8], region: Region) -> Result<State> {
    let parsed = digest::sealable_header(bytes)?;
    let data_start = parsed.data_start;
    let mut tensors: Vec<(usize, usize)> = parsed
        .tensors
        .iter()
        .filter(|t| t.nbytes > 0 && !t.name.starts_with(PAD_PREFIX))
        .map(|t| (t.offset, t.nbytes))
        .collect();
    tensors.sort_unstable();
    let n = blocks::count(region.len - data_start, blocks::LEN);
    let mut pending = vec![0usize; n];
    if n > 0 {
        for &(at, len) in &tensors {
            per_block(data_start, at, len, |k, bytes| pending[k] += bytes);
        }
    }
    Ok(State {
        region,
        data_start,
        upto: AtomicUsize::new(data_start),
        cancel: AtomicBool::new(false),
        wake: Condvar::new(),
        lock: Mutex::new(()),
        copied: tensors.iter().map(|_| AtomicBool::new(false)).collect(),
        tensors,
        pending: pending.into_iter().map(AtomicUsize::new).collect(),
        inflight: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        claimed: (0..n).map(|_| AtomicBool::new(false)).collect(),
        cvs: (0..n).map(|_| OnceLock::new()).collect(),
        failed: OnceLock::new(),
    })
}
