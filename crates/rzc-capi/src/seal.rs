//! `rzc_pack_sealer`: the digest of a buffer's data section, computed on a
//! thread of its own while the buffer is being filled, so that sealing costs
//! little more than the fill. The filler says how far the bytes are final
//! (`rzc_pack_sealer_advance`); the thread hashes up to there and waits for
//! more; `rzc_pack_sealer_finish` hashes the rest on every core, writes the
//! digest into the header and returns the content digest.
//!
//! The thread reads memory the caller owns through a raw pointer: only bytes
//! the caller declared final, and only until `finish` or `free` returns.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rzc_core::digest::{self, Digest};

use crate::handle::Handle;
use crate::status::{ffi_boundary, ffi_value_boundary, rzc_status, Failure, RZC_INVALID_ARGUMENT};
use crate::weights::rzc_digest;

/// Bytes hashed between two looks at the watermark.
const STEP: usize = 1 << 20;

/// A digest being computed while its buffer is filled (opaque).
pub struct rzc_pack_sealer {
    _private: [u8; 0],
}

/// What the hashing thread and the filler share.
struct Shared {
    /// Bytes below this are final.
    upto: AtomicUsize,
    /// Stop early (the sealer was freed unfinished).
    cancel: AtomicBool,
    wake: Condvar,
    lock: Mutex<()>,
}

/// The caller's buffer, read by the hashing thread.
#[derive(Clone, Copy)]
struct Region {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the thread reads only bytes the caller declared final (they are
// no longer written) while the caller keeps the buffer alive (until the
// sealer is finished or freed, both of which join the thread).
unsafe impl Send for Region {}
// SAFETY: a shared `Region` is an address and a length, read by the calls
// on the sealer (`rzc_pack_sealer_*` take a const sealer), which read or
// write the buffer only as their contracts allow.
unsafe impl Sync for Region {}

pub struct Sealer {
    shared: Arc<Shared>,
    region: Region,
    data_start: usize,
    /// The thread, with what it has hashed so far: `(hasher, position)`.
    thread: Mutex<Option<JoinHandle<(blake3::Hasher, usize)>>>,
}

impl Handle for rzc_pack_sealer {
    type Rust = Sealer;
}

fn hash_behind(shared: &Shared, region: Region, start: usize) -> (blake3::Hasher, usize) {
    let mut hasher = blake3::Hasher::new();
    let mut pos = start;
    loop {
        let upto = shared.upto.load(Ordering::Acquire).min(region.len);
        if shared.cancel.load(Ordering::Acquire) || pos >= region.len {
            return (hasher, pos);
        }
        if upto > pos {
            let end = upto.min(pos + STEP);
            // SAFETY: `[pos, end)` lies in the caller's buffer below the
            // watermark (final, no longer written; the Acquire load above
            // orders these reads after the caller's writes), and the buffer
            // outlives this thread (see `Region`).
            let bytes = unsafe { std::slice::from_raw_parts(region.ptr.add(pos), end - pos) };
            hasher.update(bytes);
            pos = end;
            continue;
        }
        let guard = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
        // Re-checked under the lock: `advance` notifies under it.
        if shared.upto.load(Ordering::Acquire) <= pos && !shared.cancel.load(Ordering::Acquire) {
            let _ = shared.wake.wait_timeout(guard, Duration::from_millis(50));
        }
    }
}

impl Sealer {
    /// Whether this sealer hashes the buffer at `ptr` of `len` bytes.
    pub fn seals(&self, ptr: *const u8, len: usize) -> bool {
        self.region.ptr == ptr && self.region.len == len
    }

    /// Bytes below `upto` are final.
    pub fn advance(&self, upto: usize) {
        let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.upto.fetch_max(upto, Ordering::Release);
        self.shared.wake.notify_one();
    }

    /// Stops the thread where it is and returns what it hashed (the rest
    /// is hashed on every core by the caller); `None` when it was stopped
    /// before.
    fn stop(&self) -> Option<(blake3::Hasher, usize)> {
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.cancel.store(true, Ordering::Release);
            self.shared.wake.notify_one();
        }
        let t = self
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        t.join().ok()
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Starts computing the digest of the data section of `dst`, a buffer
/// planned with `reserve_digest` whose header is written already
/// (`rzc_pack_plan_write_layout`), on a thread of its own. Then fill the
/// buffer, calling `rzc_pack_sealer_advance` as its bytes become final, and
/// `rzc_pack_sealer_finish`.
///
/// # Safety
/// `dst` points to `dst_len` writable bytes (`rzc_pack_sealer_finish` writes
/// the digest into the header) that stay valid until the sealer is finished
/// or freed; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_new(
    dst: *mut u8,
    dst_len: usize,
    out: *mut *mut rzc_pack_sealer,
) -> rzc_status {
    ffi_boundary! {
        let out = out!(out);
        crate::handle::not_null(dst, "dst")?;
        // SAFETY: `dst_len` readable bytes per the caller; only the header
        // is read here, which the caller has written.
        let bytes = unsafe { std::slice::from_raw_parts(dst, dst_len) };
        let data_start = digest::sealable(bytes)?;
        let shared = Arc::new(Shared {
            upto: AtomicUsize::new(data_start),
            cancel: AtomicBool::new(false),
            wake: Condvar::new(),
            lock: Mutex::new(()),
        });
        let region = Region { ptr: dst.cast_const(), len: dst_len };
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rzc-seal".into())
            .spawn(move || {
                let region = region;
                hash_behind(&for_thread, region, data_start)
            })
            .map_err(|e| Failure::new(RZC_INVALID_ARGUMENT, format!("cannot start the hashing thread: {e}")))?;
        out.write(rzc_pack_sealer::into_raw(Sealer { shared, region, data_start, thread: Mutex::new(Some(thread)) }))
    }
}

/// Declares the bytes of the buffer below `upto` final: the caller writes
/// them no more. Calls may come in any order, and from several threads at
/// once (the threads filling the buffer); the largest counts.
///
/// # Safety
/// `sealer` is a live sealer.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_advance(
    sealer: *const rzc_pack_sealer,
    upto: usize,
) -> rzc_status {
    ffi_boundary! {
        let s = borrow!(rzc_pack_sealer, sealer);
        s.advance(upto);
        Ok(())
    }
}

/// Declares the whole buffer final, completes the digest of its data
/// section (on every core), writes it into the header (`rzc.data_blake3`)
/// and writes the buffer's content digest to `*out` (the same as
/// `rzc_pack_seal` gives). The sealer is then spent: free it.
///
/// # Safety
/// `sealer` is a live sealer; nothing else uses its buffer meanwhile (every
/// `rzc_pack_sealer_advance` has returned); `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_finish(
    sealer: *const rzc_pack_sealer,
    out: *mut rzc_digest,
) -> rzc_status {
    ffi_boundary! {
        let out = out!(out);
        let s = borrow!(rzc_pack_sealer, sealer);
        let Some((mut hasher, pos)) = s.stop() else {
            return Err(Failure::new(RZC_INVALID_ARGUMENT, "this sealer is finished already"));
        };
        let Region { ptr, len } = s.region;
        // SAFETY: the thread is joined; the caller declared every byte final
        // and lets no one else use the buffer during this call, and the
        // buffer is writable (it was planned and filled by the caller).
        let buffer = unsafe { std::slice::from_raw_parts_mut(ptr.cast_mut(), len) };
        hasher.update_rayon(&buffer[pos.max(s.data_start)..]);
        let data: Digest = *hasher.finalize().as_bytes();
        out.write(rzc_digest { bytes: digest::write_data_digest(buffer, &data)? })
    }
}

/// Frees a sealer (stopping its thread when unfinished); NULL is a no-op.
///
/// # Safety
/// `sealer` is NULL or a sealer not yet freed, which no other thread is
/// using (nor will: the one call on a sealer that may not overlap others).
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_free(sealer: *mut rzc_pack_sealer) {
    ffi_value_boundary!((), free_handle!(rzc_pack_sealer, sealer))
}
