//! `rzc_weights`: an opened safetensors buffer and its tensor table.

use std::ffi::{c_char, c_void};
use std::path::Path;
use std::sync::Arc;

use rzc_core::dlpack::{DLManagedTensor, DLManagedTensorVersioned};
use rzc_core::guard::WriteGuard;
use rzc_core::{Bytes, Dtype, Weights};

use crate::handle::{c_str, str_n, write_out, Handle};
use crate::status::{ffi_boundary, ffi_value_boundary, rzc_status, Failure, RZC_INVALID_ARGUMENT};

/// An opened, validated safetensors buffer (opaque). Read-only after opening:
/// every call taking a `const rzc_weights *` may run on several threads.
pub struct rzc_weights {
    _private: [u8; 0],
}

impl Handle for rzc_weights {
    type Rust = Weights;
}

/// One tensor of an opened buffer. Every pointer stays valid until the handle
/// is freed.
#[repr(C)]
pub struct rzc_tensor_info {
    /// Tensor name, `name_len` bytes of UTF-8. It is followed by a NUL, but a
    /// name may itself contain NUL bytes: use `name_len`.
    pub name: *const c_char,
    /// Length of `name` in bytes.
    pub name_len: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Number of dimensions (0 for a scalar).
    pub ndim: u32,
    /// `ndim` extents.
    pub shape: *const i64,
    /// First byte of the tensor, inside the opened buffer (no copy).
    pub data: *const u8,
    /// Size of the tensor in bytes.
    pub nbytes: u64,
}

/// One `__metadata__` entry. The strings are UTF-8, not NUL-terminated.
#[repr(C)]
pub struct rzc_metadata_entry {
    /// Key bytes.
    pub key: *const c_char,
    /// Length of `key` in bytes.
    pub key_len: usize,
    /// Value bytes.
    pub value: *const c_char,
    /// Length of `value` in bytes.
    pub value_len: usize,
}

/// Opens `len` bytes at `data` as a safetensors buffer without copying them.
///
/// The whole header is validated before this returns. The handle borrows the
/// bytes: the caller keeps them alive and unchanged until the handle and every
/// tensor exported from it are freed. On success `*out` receives a handle to
/// free with `rzc_weights_free`.
///
/// # Safety
/// `data` points to `len` readable bytes (it may be NULL when `len` is 0);
/// `out` is valid for a write.
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

/// Options of `rzc_weights_open_memory_ex`. Zero-initialise, then set fields.
#[repr(C)]
pub struct rzc_open_options {
    /// Called once when the buffer is no longer used (may be NULL).
    pub release: rzc_release_fn,
    /// Passed to `release`.
    pub release_ctx: *mut c_void,
    /// `RZC_OPEN_*` bits.
    pub flags: u32,
}

/// Flag of `rzc_open_options`: make the pages holding tensor data read-only
/// in this process while the buffer is open (any handle or tensor alive), so
/// that a write through a tensor faults in the writer instead of changing
/// memory other processes share. Needs a page of non-tensor bytes before the
/// first and after the last tensor (`rzc_pack_options.guard_bytes`), else
/// the open fails with `RZC_INVALID_ARGUMENT`. Protection is lifted before
/// `release` runs.
pub const RZC_OPEN_WRITE_PROTECT: u32 = 1;

/// Borrowed bytes whose owner is told, through its callback, when the last
/// reference is dropped.
struct Released {
    ptr: *const u8,
    len: usize,
    release: rzc_release_fn,
    ctx: *mut c_void,
    guard: Option<WriteGuard>,
}

// SAFETY: the caller of `rzc_weights_open_memory_ex` keeps the bytes valid and
// unchanged until `release` runs, and the callback may run on any thread.
unsafe impl Send for Released {}
unsafe impl Sync for Released {}

impl Bytes for Released {
    fn bytes(&self) -> &[u8] {
        // SAFETY: see above; `ptr` is non-NULL (checked at open).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        // Writable again before the owner may hand the memory back.
        drop(self.guard.take());
        if let Some(release) = self.release {
            // SAFETY: the caller's callback, called exactly once.
            unsafe { release(self.ctx) };
        }
    }
}

/// Same as `rzc_weights_open_memory`, with options: `RZC_OPEN_WRITE_PROTECT`
/// in `options->flags` write-protects the tensor pages while open; and when
/// `options->release` is set the
/// library calls it once the handle and every tensor exported from it are
/// gone: the caller's owner of the bytes (e.g. a Python object holding Ray's
/// shared-memory buffer) can live exactly as long as it is needed. When the
/// call fails, `release` is not called and the caller still owns the bytes.
/// NULL `options` behaves as `rzc_weights_open_memory`.
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
        crate::handle::not_null(out, "out")?;
        crate::handle::not_null(data, "data")?;
        let (release, ctx, flags) = match unsafe { options.as_ref() } {
            Some(o) => (o.release, o.release_ctx, o.flags),
            None => (None, std::ptr::null_mut(), 0),
        };
        if flags & !RZC_OPEN_WRITE_PROTECT != 0 {
            return Err(Failure::new(RZC_INVALID_ARGUMENT, format!("unknown open flags {flags:#x}")));
        }
        // SAFETY: the caller keeps `len` bytes at `data` alive until `release`.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        let w = Weights::from_validated(bytes, |header| {
            let guard = match (flags & RZC_OPEN_WRITE_PROTECT != 0, header.tensor_span()) {
                (true, Some((start, end))) => WriteGuard::protect(bytes, start, end)?,
                _ => None,
            };
            Ok(Arc::new(Released { ptr: data, len, release, ctx, guard }))
        })?;
        unsafe { write_out(out, "out", rzc_weights::into_raw(w)) }
    }
}

/// Memory-maps the file at `path` (UTF-8, NUL-terminated) read-only and opens
/// it. The file must not be modified while it is open.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_open_file(
    path: *const c_char,
    out: *mut *mut rzc_weights,
) -> rzc_status {
    ffi_boundary! {
        crate::handle::not_null(out, "out")?;
        let path = unsafe { c_str(path, "path")? };
        let w = Weights::open_file(Path::new(path))?;
        unsafe { write_out(out, "out", rzc_weights::into_raw(w)) }
    }
}

/// Frees a handle. Tensors exported with `rzc_weights_to_dlpack` stay valid:
/// they keep the buffer alive until their own deleters run. NULL is a no-op.
///
/// # Safety
/// `w` is NULL or a handle not yet freed.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_free(w: *mut rzc_weights) {
    ffi_value_boundary!((), unsafe { rzc_weights::free(w) })
}

/// Number of tensors in the buffer (0 for a NULL handle).
///
/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_len(w: *const rzc_weights) -> usize {
    ffi_value_boundary!(
        0,
        unsafe { rzc_weights::borrow(w, "w") }
            .map(Weights::len)
            .unwrap_or(0)
    )
}

/// Describes tensor `index` (0-based, in the order of the data).
///
/// # Safety
/// `w` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_get(
    w: *const rzc_weights,
    index: usize,
    out: *mut rzc_tensor_info,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        crate::handle::not_null(out, "out")?;
        let t = w.get(index)?;
        let info = rzc_tensor_info {
            name: t.name_nul.as_ptr().cast(),
            name_len: t.name.len(),
            dtype: t.dtype,
            ndim: t.shape.len() as u32,
            shape: t.shape.as_ptr(),
            data: w.data(index)?.as_ptr(),
            nbytes: t.nbytes as u64,
        };
        unsafe { write_out(out, "out", info) }
    }
}

/// Finds the index of the tensor called `name` (NUL-terminated UTF-8).
///
/// # Safety
/// `w` is a live handle; `name` is NUL-terminated; `index_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_find(
    w: *const rzc_weights,
    name: *const c_char,
    index_out: *mut usize,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        let name = unsafe { c_str(name, "name")? };
        unsafe { write_out(index_out, "index_out", w.find(name)?) }
    }
}

/// Same as `rzc_weights_find`, for a name given by pointer and byte length
/// (names may contain NUL bytes).
///
/// # Safety
/// `w` is a live handle; `name` points to `name_len` bytes; `index_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_find_n(
    w: *const rzc_weights,
    name: *const c_char,
    name_len: usize,
    index_out: *mut usize,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        let name = unsafe { str_n(name, name_len, "name")? };
        unsafe { write_out(index_out, "index_out", w.find(name)?) }
    }
}

/// Exports tensor `index` as a versioned DLPack tensor (kDLCPU, compact
/// row-major with NULL strides, `DLPACK_FLAG_BITMASK_READ_ONLY` set) whose
/// data points into the buffer: no copy. The tensor keeps the buffer's storage
/// alive, so `rzc_weights_free` may come before its deleter. The consumer calls
/// `(*out)->deleter(*out)` exactly once (or `rzc_dlpack_versioned_free`).
///
/// Fails with `RZC_UNSUPPORTED_DTYPE` for the packed sub-byte floats.
///
/// # Safety
/// `w` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_to_dlpack(
    w: *const rzc_weights,
    index: usize,
    out: *mut *mut DLManagedTensorVersioned,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        crate::handle::not_null(out, "out")?;
        unsafe { write_out(out, "out", w.to_dlpack(index)?) }
    }
}

/// Same as `rzc_weights_to_dlpack` in the legacy, unversioned form, for
/// consumers that only take it. The legacy form cannot say "read-only": the
/// consumer must not write through it.
///
/// # Safety
/// `w` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_to_dlpack_legacy(
    w: *const rzc_weights,
    index: usize,
    out: *mut *mut DLManagedTensor,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        crate::handle::not_null(out, "out")?;
        unsafe { write_out(out, "out", w.to_dlpack_legacy(index)?) }
    }
}

/// Exports the whole data section (everything after the header) as one
/// read-only 1-D `U8` versioned DLPack tensor. Tensor `i` lies at byte
/// `info.data - data_start` of it (see `rzc_weights_layout`): a consumer can
/// cut every tensor out of this one export as a view.
///
/// # Safety
/// `w` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_data_to_dlpack(
    w: *const rzc_weights,
    out: *mut *mut DLManagedTensorVersioned,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        unsafe { write_out(out, "out", w.data_section_to_dlpack()) }
    }
}

/// Number of `__metadata__` entries (0 for a NULL handle).
///
/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_metadata_len(w: *const rzc_weights) -> usize {
    ffi_value_boundary!(
        0,
        unsafe { rzc_weights::borrow(w, "w") }
            .map(|w| w.metadata().len())
            .unwrap_or(0)
    )
}

/// Reads `__metadata__` entry `index` (entries sorted by key).
///
/// # Safety
/// `w` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_metadata_get(
    w: *const rzc_weights,
    index: usize,
    out: *mut rzc_metadata_entry,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        crate::handle::not_null(out, "out")?;
        let Some((k, v)) = w.metadata().iter().nth(index) else {
            return Err(crate::status::Failure::new(
                crate::status::RZC_OUT_OF_RANGE,
                format!("metadata index {index} is out of range (the buffer has {} entries)", w.metadata().len()),
            ));
        };
        let entry = rzc_metadata_entry { key: k.as_ptr().cast(), key_len: k.len(), value: v.as_ptr().cast(), value_len: v.len() };
        unsafe { write_out(out, "out", entry) }
    }
}

/// Looks up the `__metadata__` value of `key` (NUL-terminated UTF-8); the
/// value is written as pointer and length, valid until the handle is freed.
///
/// # Safety
/// `w` is a live handle; `key` is NUL-terminated; the outs are valid for writes.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_metadata_find(
    w: *const rzc_weights,
    key: *const c_char,
    value_out: *mut *const c_char,
    value_len_out: *mut usize,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        let key = unsafe { c_str(key, "key")? };
        crate::handle::not_null(value_out, "value_out")?;
        crate::handle::not_null(value_len_out, "value_len_out")?;
        let Some(v) = w.metadata().get(key) else {
            return Err(crate::status::Failure::new(crate::status::RZC_NOT_FOUND, format!("no metadata key {key:?}")));
        };
        unsafe {
            write_out(value_out, "value_out", v.as_ptr().cast())?;
            write_out(value_len_out, "value_len_out", v.len())
        }
    }
}

/// Where the buffer's tensor data lies: `*data_start_out` and `*data_end_out`
/// receive byte offsets from the buffer start (header excluded), and
/// `*bytes_out` and `*len_out` the whole buffer. Any out may be NULL.
///
/// # Safety
/// `w` is a live handle; each non-NULL out is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_layout(
    w: *const rzc_weights,
    bytes_out: *mut *const u8,
    len_out: *mut usize,
    data_start_out: *mut usize,
    data_end_out: *mut usize,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        unsafe {
            if !bytes_out.is_null() { *bytes_out = w.bytes().as_ptr(); }
            if !len_out.is_null() { *len_out = w.bytes().len(); }
            if !data_start_out.is_null() { *data_start_out = w.data_start(); }
            if !data_end_out.is_null() { *data_end_out = w.data_end(); }
        }
        Ok(())
    }
}
