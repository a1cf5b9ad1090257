//! `rzc_weights`: an opened safetensors buffer. This file opens and frees
//! it and says what it is (write guard, content digest); `table` reads its
//! tensor table and metadata, `dlpack` exports its tensors.

use std::ffi::{c_char, c_void};
use std::path::Path;

use rzc_core::{Borrowed, OpenOptions, Weights};

use crate::handle::{Extensible, Handle};
use crate::status::{ffi_boundary, ffi_value_boundary, rzc_status, Failure, RZC_INVALID_ARGUMENT};

mod dlpack;
mod table;

pub use dlpack::*;
pub use table::*;

/// An opened, validated safetensors buffer (opaque). Read-only after opening:
/// every call taking a `const rzc_weights *` may run on several threads.
pub struct rzc_weights {
    _private: [u8; 0],
}

/// What a `rzc_weights` handle points to: the core's weights, plus each
/// tensor name NUL-terminated for C (a C concern, so it lives here).
pub struct WeightsHandle {
    pub weights: Weights,
    /// Every name followed by a NUL, back to back.
    names: Box<[u8]>,
    /// Where each name starts in `names`.
    name_at: Box<[usize]>,
}

impl WeightsHandle {
    fn new(weights: Weights) -> WeightsHandle {
        let mut names = Vec::new();
        let mut name_at = Vec::with_capacity(weights.len());
        for t in weights.tensors() {
            name_at.push(names.len());
            names.extend_from_slice(t.name.as_bytes());
            names.push(0);
        }
        WeightsHandle {
            weights,
            names: names.into(),
            name_at: name_at.into(),
        }
    }

    /// Tensor `index` as C sees it (the index is in range).
    fn info(&self, index: usize) -> rzc_tensor_info {
        let t = &self.weights.tensors()[index];
        rzc_tensor_info {
            name: self.names[self.name_at[index]..].as_ptr().cast(),
            name_len: t.name.len(),
            dtype: t.dtype,
            ndim: t.shape.len() as u32,
            shape: t.shape.as_ptr(),
            data: self.weights.bytes()[t.offset..].as_ptr(),
            nbytes: t.nbytes as u64,
        }
    }
}

impl Handle for rzc_weights {
    type Rust = WeightsHandle;
}

/// Opens `len` bytes at `data` as a safetensors buffer without copying them.
///
/// The whole header is validated before this returns. The handle borrows the
/// bytes: the caller keeps them alive and unchanged until the handle and every
/// tensor exported from it are freed. On success `*out` receives a handle to
/// free with `rzc_weights_free`.
///
/// # Safety
/// `data` points to `len` readable bytes; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_open_memory(
    data: *const u8,
    len: usize,
    out: *mut *mut rzc_weights,
) -> rzc_status {
    // SAFETY: forwarded; NULL options mean no release callback, no flags.
    unsafe { rzc_weights_open_memory_ex(data, len, std::ptr::null(), out) }
}

/// Called exactly once with `ctx` when the last user of a borrowed buffer is
/// gone (the handle and every tensor exported from it). It may run on any
/// thread: whichever frees the last of them.
pub type rzc_release_fn = Option<unsafe extern "C" fn(ctx: *mut c_void)>;

/// Options of `rzc_weights_open_memory_ex`. Initialise as
/// `rzc_open_options o = {.struct_nbytes = sizeof(rzc_open_options)};`
/// (every other field zero: its default), then set what you need.
#[repr(C)]
pub struct rzc_open_options {
    /// `sizeof(rzc_open_options)` as the caller was compiled: lets the struct
    /// grow in later versions without breaking callers.
    pub struct_nbytes: usize,
    /// Called once when the buffer is no longer used (may be NULL).
    pub release: rzc_release_fn,
    /// Passed to `release`.
    pub release_ctx: *mut c_void,
    /// `RZC_OPEN_*` bits.
    pub flags: u32,
}

// SAFETY: all-zero is valid (NULL callback and context, no flags); the first
// field is `struct_nbytes`.
unsafe impl Extensible for rzc_open_options {
    const NAME: &'static str = "rzc_open_options";
    const MIN_NBYTES: usize = std::mem::size_of::<rzc_open_options>();
}

/// Flag of `rzc_open_options`: make every whole page of the buffer (tensor
/// data and header; see `rzc_weights_guard_state`) read-only in this
/// process while the buffer is open (any handle or tensor alive), so that a
/// write through a tensor faults in the writer instead of changing memory
/// other processes share. Needs a page of non-tensor bytes before the
/// first and after the last tensor (`rzc_pack_options.guard_nbytes`), else
/// the open fails with `RZC_INVALID_ARGUMENT`. Protection is lifted before
/// `release` runs.
pub const RZC_OPEN_WRITE_PROTECT: u32 = 1;

/// A C callback and its context, called once when dropped.
struct ReleaseCallback {
    release: unsafe extern "C" fn(*mut c_void),
    ctx: *mut c_void,
}

// SAFETY: the caller of `rzc_weights_open_memory_ex` accepts that `release`
// runs on whichever thread frees the last reference.
unsafe impl Send for ReleaseCallback {}

impl ReleaseCallback {
    fn call(self) {
        // SAFETY: the caller's callback, called exactly once (this consumes
        // the only value holding it).
        unsafe { (self.release)(self.ctx) }
    }
}

/// Same as `rzc_weights_open_memory`, with options: `RZC_OPEN_WRITE_PROTECT`
/// in `options->flags` write-protects the tensor pages while open; and when
/// `options->release` is set the library calls it once the handle and every
/// tensor exported from it are gone: the caller's owner of the bytes (e.g. a
/// Python object holding Ray's shared-memory buffer) can live exactly as long
/// as it is needed. When the call fails, `release` is not called and the
/// caller still owns the bytes. NULL `options` behaves as
/// `rzc_weights_open_memory`.
///
/// # Safety
/// As for `rzc_weights_open_memory`, with the bytes kept valid until
/// `release` runs; `options` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_open_memory_ex(
    data: *const u8,
    len: usize,
    options: *const rzc_open_options,
    out: *mut *mut rzc_weights,
) -> rzc_status {
    ffi_boundary! {
        let out = out!(out);
        crate::handle::not_null(data, "data")?;
        let mut opts = OpenOptions::default();
        if let Some(o) = options_arg!(options) {
            if o.flags & !RZC_OPEN_WRITE_PROTECT != 0 {
                return Err(Failure::new(RZC_INVALID_ARGUMENT, format!("unknown open flags {:#x}", o.flags)));
            }
            opts.write_protect = o.flags & RZC_OPEN_WRITE_PROTECT != 0;
            if let Some(release) = o.release {
                let callback = ReleaseCallback { release, ctx: o.release_ctx };
                opts.on_release = Some(Box::new(move || callback.call()));
            }
        }
        // SAFETY: the caller keeps `len` bytes at `data` alive and unchanged
        // until `release` runs (or, without one, until everything is freed).
        let bytes = unsafe { Borrowed::new(data, len)? };
        let w = Weights::open_borrowed(bytes, opts)?;
        out.write(rzc_weights::into_raw(WeightsHandle::new(w)))
    }
}

/// Memory-maps the file at `path` (UTF-8, NUL-terminated) read-only and opens
/// it. The file must not be modified while it is open: a read past a point
/// where someone else cut it short is SIGBUS, as with every mapping (to copy
/// a file that others may write, read it: `rzc_pack_sealer_read`).
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_open_file(
    path: *const c_char,
    out: *mut *mut rzc_weights,
) -> rzc_status {
    ffi_boundary! {
        let out = out!(out);
        let path = c_str_arg!(path);
        let w = Weights::open_file(Path::new(path))?;
        out.write(rzc_weights::into_raw(WeightsHandle::new(w)))
    }
}

/// Frees a handle. Tensors exported with `rzc_weights_to_dlpack` stay valid:
/// they keep the buffer alive until their own deleters run. NULL is a no-op.
///
/// # Safety
/// `w` is NULL or a handle not yet freed, which no other thread is using
/// (nor will: the one call on a handle that may not overlap others).
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_free(w: *mut rzc_weights) {
    ffi_value_boundary!((), free_handle!(rzc_weights, w))
}

/// `rzc_weights_guard_state`: opened without `write_protect` (or no tensors).
pub const RZC_GUARD_NONE: u32 = 0;
/// Guarded shared memory mapped through a read-only descriptor: a write
/// faults, and the kernel refuses `mprotect(PROT_WRITE)` and
/// `madvise(MADV_REMOVE)` on it.
pub const RZC_GUARD_SEALED: u32 = 1;
/// Guarded memory private to this process: a write faults, and nothing
/// done to it reaches another process.
pub const RZC_GUARD_PRIVATE: u32 = 2;
/// Guarded shared memory made read-only by `mprotect` only (no read-only
/// descriptor of its file was found): a write faults, but this process
/// could still make it writable or punch it out.
pub const RZC_GUARD_MPROTECT: u32 = 3;

/// How firmly the weights refuse writes in this process: one of
/// `RZC_GUARD_*` (`RZC_GUARD_NONE` for NULL).
///
/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_guard_state(w: *const rzc_weights) -> u32 {
    use rzc_core::GuardState;
    ffi_value_boundary!(
        RZC_GUARD_NONE,
        borrow_or_none!(rzc_weights, w)
            .and_then(|h| h.weights.guard_state())
            .map_or(RZC_GUARD_NONE, |s| match s {
                GuardState::Sealed => RZC_GUARD_SEALED,
                GuardState::Private => RZC_GUARD_PRIVATE,
                GuardState::Mprotect => RZC_GUARD_MPROTECT,
            })
    )
}

/// A 32-byte BLAKE3 digest.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rzc_digest {
    /// The digest's bytes.
    pub bytes: [u8; 32],
}

/// The buffer's content digest: BLAKE3 (key derivation mode, context
/// "ray-zerocopy 2026-11 content digest v1") of the header's length (8 bytes,
/// little-endian), the header's bytes and the BLAKE3 digest of the data
/// section. Computed from every byte (`trust_claim` zero), equal content
/// digests mean byte for byte equal buffers. With `trust_claim` nonzero the
/// data digest is the one the header claims (`rzc.data_blake3`, written by
/// `rzc_pack_seal`) when it has one, and only the header is read: use it for
/// buffers this library sealed, not for files from elsewhere, whose claim
/// could be false.
///
/// # Safety
/// `w` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_content_digest(
    w: *const rzc_weights,
    trust_claim: u32,
    out: *mut rzc_digest,
) -> rzc_status {
    ffi_boundary! {
        let h = borrow!(rzc_weights, w);
        let out = out!(out);
        out.write(rzc_digest { bytes: h.weights.content_digest(trust_claim != 0) })
    }
}
