//! `rzc_device_weights`: an opened buffer's tensors uploaded to one CUDA
//! device allocation.

use std::ffi::{c_char, c_void};

use rzc_core::dlpack::{DLManagedTensor, DLManagedTensorVersioned};
use rzc_core::Dtype;
use rzc_cuda::{DeviceWeights, ShareOptions, Sharing, Staging, UploadOptions};

use crate::handle::{read_options, Extensible, Handle, Out, OutExtensible};
use crate::status::{ffi_boundary, ffi_value_boundary, rzc_status, Failure, RZC_INVALID_ARGUMENT};
use crate::weights::{rzc_digest, rzc_weights};

/// Let the library choose: register the source, fall back to pinned bounce
/// buffers when the driver refuses.
pub const RZC_STAGING_AUTO: u32 = 0;
/// Register (page-lock) the source in place, read-only where supported.
pub const RZC_STAGING_REGISTER: u32 = 1;
/// Copy through pinned bounce buffers filled by several threads.
pub const RZC_STAGING_PINNED: u32 = 2;
/// Copy straight from pageable memory (slow; for comparison).
pub const RZC_STAGING_PAGEABLE: u32 = 3;
/// Reported by `rzc_device_weights_info` only: this process copied nothing,
/// it mapped memory another process uploaded (`RZC_SHARING_IMPORTED`).
pub const RZC_STAGING_NONE: u32 = 4;

/// `rzc_device_info.sharing`: this process's own upload, shared with no one.
pub const RZC_SHARING_PRIVATE: u32 = 0;
/// `rzc_device_info.sharing`: this process uploaded the shared allocation.
pub const RZC_SHARING_UPLOADED: u32 = 1;
/// `rzc_device_info.sharing`: this process mapped the allocation another
/// process uploaded (no copy).
pub const RZC_SHARING_IMPORTED: u32 = 2;

/// `rzc_device_info.fallback`: the share happened, or none was asked for.
pub const RZC_SHARE_FALLBACK_NONE: u32 = 0;
/// The device cannot share memory between processes (no virtual memory
/// management with POSIX descriptors), or cannot say.
pub const RZC_SHARE_FALLBACK_UNSUPPORTED: u32 = 1;
/// No rendezvous directory of this user closed to others could be had.
pub const RZC_SHARE_FALLBACK_NO_DIRECTORY: u32 = 2;
/// The process serving the key runs as another user.
pub const RZC_SHARE_FALLBACK_OTHER_USER: u32 = 3;
/// The serving process accepted the connection but did not answer in time.
pub const RZC_SHARE_FALLBACK_SILENT: u32 = 4;
/// Another buffer (another content digest) is shared under the key.
pub const RZC_SHARE_FALLBACK_OTHER_CONTENT: u32 = 5;
/// The driver refused to import the shared memory.
pub const RZC_SHARE_FALLBACK_IMPORT_FAILED: u32 = 6;
/// The shared memory, read back, differed from this process's buffer.
pub const RZC_SHARE_FALLBACK_MISMATCH: u32 = 7;
/// Another process's upload was still in progress after `share_wait_ms`.
pub const RZC_SHARE_FALLBACK_WAITED: u32 = 8;
/// The lock file or the socket could not be used.
pub const RZC_SHARE_FALLBACK_RENDEZVOUS: u32 = 9;
/// Shareable device memory could not be made.
pub const RZC_SHARE_FALLBACK_NOT_SHAREABLE: u32 = 10;

/// The name of an `RZC_SHARE_FALLBACK_*` code in lower case without the
/// prefix (`"mismatch"`, ...), or NULL for an unknown code.
#[no_mangle]
pub extern "C" fn rzc_share_fallback_name(code: u32) -> *const c_char {
    let name: &'static [u8] = match code {
        RZC_SHARE_FALLBACK_NONE => b"none\0",
        RZC_SHARE_FALLBACK_UNSUPPORTED => b"unsupported\0",
        RZC_SHARE_FALLBACK_NO_DIRECTORY => b"no_directory\0",
        RZC_SHARE_FALLBACK_OTHER_USER => b"other_user\0",
        RZC_SHARE_FALLBACK_SILENT => b"silent\0",
        RZC_SHARE_FALLBACK_OTHER_CONTENT => b"other_content\0",
        RZC_SHARE_FALLBACK_IMPORT_FAILED => b"import_failed\0",
        RZC_SHARE_FALLBACK_MISMATCH => b"mismatch\0",
        RZC_SHARE_FALLBACK_WAITED => b"waited\0",
        RZC_SHARE_FALLBACK_RENDEZVOUS => b"rendezvous\0",
        RZC_SHARE_FALLBACK_NOT_SHAREABLE => b"not_shareable\0",
        _ => return std::ptr::null(),
    };
    name.as_ptr().cast()
}

/// Options of `rzc_device_weights_upload`. Initialise as
/// `rzc_upload_options o = {.struct_nbytes = sizeof(rzc_upload_options)};`
/// (every other field zero: its default), then set what you need.
#[repr(C)]
pub struct rzc_upload_options {
    /// `sizeof(rzc_upload_options)` as the caller was compiled: lets the
    /// struct grow in later versions without breaking callers.
    pub struct_nbytes: usize,
    /// Bytes per chunk (registration unit, bounce buffer size); 0 = 64 MiB.
    pub chunk_nbytes: u64,
    /// One of `RZC_STAGING_*`; 0 = `RZC_STAGING_AUTO`.
    pub staging: u32,
    /// Host threads registering or filling bounce buffers; 0 = up to 8.
    pub threads: u32,
    /// A `CUstream` to copy on, or NULL for a private one. Either way the
    /// copy has completed when `rzc_device_weights_upload` returns.
    pub stream: *mut c_void,
    /// Share one device allocation with every process of this user on this
    /// machine that uploads the same buffer under the same key (`share_key_len`
    /// bytes of UTF-8) to the same physical GPU; NULL for a private upload.
    /// Where sharing does not apply (no virtual memory management, another
    /// buffer under the key, ...) the upload is private and
    /// `rzc_device_info.note` says why.
    pub share_key: *const c_char,
    /// Length of `share_key` in bytes.
    pub share_key_len: usize,
    /// Milliseconds to wait for another process's upload in progress under
    /// the same key before uploading privately; 0 = 30000.
    pub share_wait_ms: u32,
    /// The buffer's content digest (`rzc_weights_content_digest`) when the
    /// caller already knows it, or NULL: it is then computed from every byte.
    /// Processes share only when their digests are equal.
    pub share_digest: *const rzc_digest,
    /// A directory to meet the other processes in (`share_dir_len` bytes of
    /// UTF-8), tried after `$XDG_RUNTIME_DIR/ray-zerocopy`; NULL for the
    /// default. It is used only if it is a directory of this user closed to
    /// others (created mode 0700 when missing).
    pub share_dir: *const c_char,
    /// Length of `share_dir` in bytes.
    pub share_dir_len: usize,
}

// SAFETY: all-zero is valid (defaults, NULL stream); the first field is
// `struct_nbytes`.
unsafe impl Extensible for rzc_upload_options {
    const NAME: &'static str = "rzc_upload_options";
    // Callers compiled before `share_digest` existed pass a shorter struct.
    const MIN_NBYTES: usize = std::mem::offset_of!(rzc_upload_options, share_digest);
}

/// What an upload did. Initialise as
/// `rzc_device_info i = {.struct_nbytes = sizeof(rzc_device_info)};` before
/// `rzc_device_weights_info` fills it: it may grow in later versions.
#[repr(C)]
pub struct rzc_device_info {
    /// `sizeof(rzc_device_info)` as the caller was compiled.
    pub struct_nbytes: usize,
    /// Device address of the single allocation (a `CUdeviceptr`).
    pub device_ptr: u64,
    /// Bytes of the allocation: tensor bytes plus alignment padding.
    pub nbytes: u64,
    /// Device ordinal.
    pub ordinal: i32,
    /// The `RZC_STAGING_*` mode this process used (`RZC_STAGING_NONE` when
    /// it copied nothing).
    pub staging: u32,
    /// Seconds the upload took, allocation included.
    pub seconds: f64,
    /// Host-to-device copies the upload was planned as: 1 when the source's
    /// tensors lie 256 bytes apart (buffers this project packs), else one per
    /// tensor.
    pub copies: u64,
    /// One of `RZC_SHARING_*`.
    pub sharing: u32,
    /// 1 when the device maps the memory read-only in this process.
    pub read_only: u32,
    /// Why a requested share did not happen, `note_len` bytes of UTF-8 valid
    /// while the handle lives (empty when it did, or was not asked for).
    pub note: *const c_char,
    /// Length of `note` in bytes.
    pub note_len: usize,
    /// Why a requested share did not happen, as a code: one of
    /// `RZC_SHARE_FALLBACK_*` (`RZC_SHARE_FALLBACK_NONE` when it did, or was
    /// not asked for); `rzc_share_fallback_name` names it.
    pub fallback: u32,
    /// Rendezvous directories passed over on the way to the one used, and
    /// why (`dir_note_len` bytes of UTF-8, valid while the handle lives;
    /// empty when the first choice was usable).
    pub dir_note: *const c_char,
    /// Length of `dir_note` in bytes.
    pub dir_note_len: usize,
    /// Bytes this process read back from device memory it imported, to
    /// check them against its own buffer (0 when it imported nothing).
    pub verified_nbytes: u64,
    /// Device-to-host copies that read-back took.
    pub verified_copies: u64,
}

/// One tensor of an upload. `name` points into the handle (valid until it is
/// freed) and is not NUL-terminated: use `name_len`.
#[repr(C)]
pub struct rzc_device_tensor_info {
    /// Tensor name, `name_len` bytes of UTF-8.
    pub name: *const c_char,
    /// Length of `name` in bytes.
    pub name_len: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Number of dimensions.
    pub ndim: u32,
    /// `ndim` extents.
    pub shape: *const i64,
    /// Device address of the first byte (a `CUdeviceptr`; host code cannot
    /// read it), 256-byte aligned.
    pub device_ptr: u64,
    /// Size in bytes.
    pub nbytes: u64,
}

// SAFETY: all-zero is valid (plain numbers); the first field is
// `struct_nbytes`.
unsafe impl Extensible for rzc_device_info {
    const NAME: &'static str = "rzc_device_info";
    // Callers compiled before `fallback` existed pass a shorter struct.
    const MIN_NBYTES: usize = std::mem::offset_of!(rzc_device_info, fallback);
}

/// Tensors uploaded to a CUDA device (opaque). Read-only after creation.
pub struct rzc_device_weights {
    _private: [u8; 0],
}

impl Handle for rzc_device_weights {
    type Rust = DeviceWeights;
}

/// Number of CUDA devices this process can see. Fails with `RZC_NO_CUDA`
/// (and a message saying why) when no CUDA driver can be loaded.
///
/// # Safety
/// `count_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_cuda_count_devices(count_out: *mut i32) -> rzc_status {
    ffi_boundary! {
        let out = unsafe { Out::new(count_out, "count_out")? };
        out.write(rzc_cuda::device_count()?)
    }
}

/// Uploads every tensor of `w` to CUDA device `ordinal`: ONE allocation in
/// the device's primary context (the one torch, JAX and CuPy use), each
/// tensor at a 256-byte aligned offset. The copy has completed when this
/// returns; `w` may then be freed. `options` may be NULL.
///
/// Errors: `RZC_NO_CUDA` (no driver or no device), `RZC_BAD_DEVICE` (bad
/// ordinal), `RZC_OUT_OF_MEMORY` (device memory, or page-locked host memory
/// for bounce buffers), `RZC_CUDA_ERROR` (anything else the driver reports),
/// `RZC_INVALID_ARGUMENT` (bad options), each with a message.
///
/// # Safety
/// `w` is a live handle; `options` is NULL or valid; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_upload(
    w: *const rzc_weights,
    ordinal: i32,
    options: *const rzc_upload_options,
    out: *mut *mut rzc_device_weights,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        let out = unsafe { Out::new(out, "out")? };
        let mut opts = UploadOptions::default();
        if let Some(o) = unsafe { read_options(options)? } {
            if o.chunk_nbytes != 0 {
                opts.chunk_bytes = usize::try_from(o.chunk_nbytes).map_err(|_| Failure::new(RZC_INVALID_ARGUMENT, "chunk_nbytes too large"))?;
            }
            if o.threads != 0 {
                opts.threads = o.threads as usize;
            }
            opts.staging = match o.staging {
                RZC_STAGING_AUTO => Staging::Auto,
                RZC_STAGING_REGISTER => Staging::Register,
                RZC_STAGING_PINNED => Staging::Pinned,
                RZC_STAGING_PAGEABLE => Staging::Pageable,
                other => return Err(Failure::new(RZC_INVALID_ARGUMENT, format!("unknown staging mode {other}"))),
            };
            opts.stream = o.stream.cast();
            if !o.share_key.is_null() || o.share_key_len != 0 {
                let key = unsafe { crate::handle::str_n(o.share_key, o.share_key_len, "share_key")? };
                let wait_ms = if o.share_wait_ms == 0 { 30_000 } else { o.share_wait_ms };
                let digest = if o.share_digest.is_null() { None } else { Some(unsafe { *o.share_digest }.bytes) };
                let dir = if o.share_dir.is_null() && o.share_dir_len == 0 {
                    None
                } else {
                    Some(std::path::PathBuf::from(unsafe { crate::handle::str_n(o.share_dir, o.share_dir_len, "share_dir")? }))
                };
                opts.share = Some(ShareOptions { key: key.to_owned(), wait: std::time::Duration::from_millis(wait_ms.into()), digest, dir });
            }
        }
        let dev = rzc_cuda::upload(&w.weights, ordinal, &opts)?;
        out.write(rzc_device_weights::into_raw(dev))
    }
}

/// Number of tensors (0 for NULL).
///
/// # Safety
/// `dev` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_len(dev: *const rzc_device_weights) -> usize {
    ffi_value_boundary!(
        0,
        unsafe { rzc_device_weights::borrow(dev, "dev") }
            .map(|d| d.tensors().len())
            .unwrap_or(0)
    )
}

/// Describes the upload (allocation, size, staging used, time taken).
///
/// # Safety
/// `dev` is a live handle; `out` points to an `rzc_device_info` whose
/// `struct_nbytes` is set.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_info(
    dev: *const rzc_device_weights,
    out: *mut rzc_device_info,
) -> rzc_status {
    ffi_boundary! {
        let d = unsafe { rzc_device_weights::borrow(dev, "dev")? };
        let out = unsafe { OutExtensible::new(out, "out")? };
        let staging = match d.staging() {
            None => RZC_STAGING_NONE,
            Some(Staging::Auto) => RZC_STAGING_AUTO,
            Some(Staging::Register) => RZC_STAGING_REGISTER,
            Some(Staging::Pinned) => RZC_STAGING_PINNED,
            Some(Staging::Pageable) => RZC_STAGING_PAGEABLE,
        };
        let sharing = match d.sharing() {
            Sharing::Private => RZC_SHARING_PRIVATE,
            Sharing::Uploaded => RZC_SHARING_UPLOADED,
            Sharing::Imported => RZC_SHARING_IMPORTED,
        };
        out.write(rzc_device_info {
            struct_nbytes: std::mem::size_of::<rzc_device_info>(),
            device_ptr: d.device_ptr(),
            nbytes: d.nbytes() as u64,
            ordinal: d.ordinal(),
            staging,
            seconds: d.seconds(),
            copies: d.copies() as u64,
            sharing,
            read_only: u32::from(d.read_only()),
            note: d.note().as_ptr().cast(),
            note_len: d.note().len(),
            fallback: d.fallback().map_or(RZC_SHARE_FALLBACK_NONE, |f| f.code()),
            dir_note: d.share_dir_note().as_ptr().cast(),
            dir_note_len: d.share_dir_note().len(),
            verified_nbytes: d.readback().map_or(0, |r| r.bytes as u64),
            verified_copies: d.readback().map_or(0, |r| r.copies as u64),
        })
    }
}

/// Describes tensor `index` of the upload (same order as the source's table).
///
/// # Safety
/// `dev` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_get(
    dev: *const rzc_device_weights,
    index: usize,
    out: *mut rzc_device_tensor_info,
) -> rzc_status {
    ffi_boundary! {
        let d = unsafe { rzc_device_weights::borrow(dev, "dev")? };
        let out = unsafe { Out::new(out, "out")? };
        let device_ptr = d.data_ptr(index)?;
        let t = &d.tensors()[index];
        out.write(rzc_device_tensor_info {
            name: t.name.as_ptr().cast(),
            name_len: t.name.len(),
            dtype: t.dtype,
            ndim: t.shape.len() as u32,
            shape: t.shape.as_ptr(),
            device_ptr,
            nbytes: t.nbytes as u64,
        })
    }
}

/// Copies tensor `index` back into host memory `dst` of exactly its size
/// (`rzc_device_weights_get`'s `nbytes`), synchronously: for checking what
/// an upload wrote, and for debugging.
///
/// # Safety
/// `dev` is a live handle; `dst` points to `dst_len` writable bytes (may be
/// NULL when `dst_len` is 0).
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_read(
    dev: *const rzc_device_weights,
    index: usize,
    dst: *mut u8,
    dst_len: usize,
) -> rzc_status {
    ffi_boundary! {
        let d = unsafe { rzc_device_weights::borrow(dev, "dev")? };
        if dst.is_null() && dst_len > 0 {
            return Err(Failure::null("dst"));
        }
        let dst: &mut [u8] = if dst_len == 0 {
            &mut []
        } else {
            // SAFETY: non-NULL, `dst_len` writable bytes per the contract.
            unsafe { std::slice::from_raw_parts_mut(dst, dst_len) }
        };
        d.read(index, dst)?;
        Ok(())
    }
}

/// Exports tensor `index` (same order as the source's table) as a versioned
/// DLPack tensor: kDLCUDA, `device_id` = the ordinal, data inside the single
/// allocation. Its flags say what the memory is: `DLPACK_FLAG_BITMASK_IS_COPIED`
/// only for a private upload (`RZC_SHARING_PRIVATE`: this process's own
/// copy), not for shared memory (uploaded for sharing, or imported);
/// `DLPACK_FLAG_BITMASK_READ_ONLY` when the device maps the memory read-only
/// in this process (`rzc_device_info.read_only`). The tensor keeps the
/// allocation alive after `rzc_device_weights_free`.
///
/// # Safety
/// `dev` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_to_dlpack(
    dev: *const rzc_device_weights,
    index: usize,
    out: *mut *mut DLManagedTensorVersioned,
) -> rzc_status {
    ffi_boundary! {
        let d = unsafe { rzc_device_weights::borrow(dev, "dev")? };
        let out = unsafe { Out::new(out, "out")? };
        out.write(d.to_dlpack(index)?)
    }
}

/// Same as `rzc_device_weights_to_dlpack` in the legacy form (for JAX and
/// CuPy versions that take only it), which has no flags: check
/// `rzc_device_info.read_only` before writing through it.
///
/// # Safety
/// `dev` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_to_dlpack_legacy(
    dev: *const rzc_device_weights,
    index: usize,
    out: *mut *mut DLManagedTensor,
) -> rzc_status {
    ffi_boundary! {
        let d = unsafe { rzc_device_weights::borrow(dev, "dev")? };
        let out = unsafe { Out::new(out, "out")? };
        out.write(d.to_dlpack_legacy(index)?)
    }
}

/// Frees the handle; the allocation lives on while exported tensors do.
/// NULL is a no-op.
///
/// # Safety
/// `dev` is NULL or a handle not yet freed.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_free(dev: *mut rzc_device_weights) {
    ffi_value_boundary!((), unsafe { rzc_device_weights::free(dev) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rzc_cuda::Fallback;
    use std::ffi::CStr;

    /// The device layer's codes are the header's constants, by name.
    #[test]
    fn fallback_codes_are_the_headers() {
        let d = std::time::Duration::from_secs(1);
        let s = String::new;
        let cases = [
            (
                Fallback::Unsupported(s()),
                RZC_SHARE_FALLBACK_UNSUPPORTED,
                "unsupported",
            ),
            (
                Fallback::NoDirectory(s()),
                RZC_SHARE_FALLBACK_NO_DIRECTORY,
                "no_directory",
            ),
            (
                Fallback::OtherUser(s()),
                RZC_SHARE_FALLBACK_OTHER_USER,
                "other_user",
            ),
            (
                Fallback::Silent {
                    socket: s(),
                    waited: d,
                },
                RZC_SHARE_FALLBACK_SILENT,
                "silent",
            ),
            (
                Fallback::OtherContent,
                RZC_SHARE_FALLBACK_OTHER_CONTENT,
                "other_content",
            ),
            (
                Fallback::ImportFailed(s()),
                RZC_SHARE_FALLBACK_IMPORT_FAILED,
                "import_failed",
            ),
            (
                Fallback::Mismatch(s()),
                RZC_SHARE_FALLBACK_MISMATCH,
                "mismatch",
            ),
            (Fallback::Waited(d), RZC_SHARE_FALLBACK_WAITED, "waited"),
            (
                Fallback::Rendezvous(s()),
                RZC_SHARE_FALLBACK_RENDEZVOUS,
                "rendezvous",
            ),
            (
                Fallback::NotShareable(s()),
                RZC_SHARE_FALLBACK_NOT_SHAREABLE,
                "not_shareable",
            ),
        ];
        for (f, code, name) in cases {
            assert_eq!(f.code(), code, "{f:?}");
            // SAFETY: a static NUL-terminated string for every known code.
            let got = unsafe { CStr::from_ptr(rzc_share_fallback_name(code)) };
            assert_eq!(got.to_str().unwrap(), name);
        }
        assert!(rzc_share_fallback_name(99).is_null());
    }
}
