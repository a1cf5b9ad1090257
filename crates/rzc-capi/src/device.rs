//! `rzc_device_weights`: an opened buffer's tensors uploaded to one CUDA
//! device allocation.

use std::ffi::c_void;

use rzc_core::dlpack::{DLManagedTensor, DLManagedTensorVersioned};
use rzc_cuda::{DeviceWeights, Staging, UploadOptions};

use crate::handle::{write_out, Handle};
use crate::status::{ffi_boundary, ffi_value_boundary, rzc_status, Failure, RZC_INVALID_ARGUMENT};
use crate::weights::rzc_weights;

/// Let the library choose: register the source, fall back to pinned bounce
/// buffers when the driver refuses.
pub const RZC_STAGING_AUTO: u32 = 0;
/// Register (page-lock) the source in place, read-only where supported.
pub const RZC_STAGING_REGISTER: u32 = 1;
/// Copy through pinned bounce buffers filled by several threads.
pub const RZC_STAGING_PINNED: u32 = 2;
/// Copy straight from pageable memory (slow; for comparison).
pub const RZC_STAGING_PAGEABLE: u32 = 3;

/// Options of `rzc_device_upload`. Zero-initialise, then set what you need:
/// zero fields take their defaults.
#[repr(C)]
pub struct rzc_upload_options {
    /// Bytes per chunk (registration unit, bounce buffer size); 0 = 64 MiB.
    pub chunk_bytes: u64,
    /// One of `RZC_STAGING_*`; 0 = `RZC_STAGING_AUTO`.
    pub staging: u32,
    /// Host threads registering or filling bounce buffers; 0 = up to 8.
    pub threads: u32,
    /// A `CUstream` to copy on, or NULL for a private one. Either way the
    /// copy has completed when `rzc_device_upload` returns.
    pub stream: *mut c_void,
}

/// What an upload did.
#[repr(C)]
pub struct rzc_device_info {
    /// Device address of the single allocation (a `CUdeviceptr`).
    pub device_ptr: u64,
    /// Bytes of the allocation: tensor bytes plus alignment padding.
    pub nbytes: u64,
    /// Device ordinal.
    pub ordinal: i32,
    /// The `RZC_STAGING_*` mode that was used.
    pub staging: u32,
    /// Seconds the upload took, allocation included.
    pub seconds: f64,
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
pub unsafe extern "C" fn rzc_cuda_device_count(count_out: *mut i32) -> rzc_status {
    ffi_boundary! {
        crate::handle::not_null(count_out, "count_out")?;
        let n = rzc_cuda::device_count()?;
        unsafe { write_out(count_out, "count_out", n) }
    }
}

/// Uploads every tensor of `w` to CUDA device `ordinal`: ONE allocation in
/// the device's primary context (the one torch, JAX and CuPy use), each
/// tensor at a 256-byte aligned offset. The copy has completed when this
/// returns; `w` may then be freed. `options` may be NULL.
///
/// Errors: `RZC_NO_CUDA` (no driver or no device), `RZC_BAD_DEVICE` (bad
/// ordinal), `RZC_OUT_OF_MEMORY` (device memory), `RZC_CUDA_ERROR` (anything
/// else the driver reports), each with a message.
///
/// # Safety
/// `w` is a live handle; `options` is NULL or valid; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_upload(
    w: *const rzc_weights,
    ordinal: i32,
    options: *const rzc_upload_options,
    out: *mut *mut rzc_device_weights,
) -> rzc_status {
    ffi_boundary! {
        let w = unsafe { rzc_weights::borrow(w, "w")? };
        crate::handle::not_null(out, "out")?;
        let mut opts = UploadOptions::default();
        if let Some(o) = unsafe { options.as_ref() } {
            if o.chunk_bytes != 0 {
                opts.chunk_bytes = usize::try_from(o.chunk_bytes).map_err(|_| Failure::new(RZC_INVALID_ARGUMENT, "chunk_bytes too large"))?;
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
        }
        let dev = rzc_cuda::upload(w, ordinal, &opts)?;
        unsafe { write_out(out, "out", rzc_device_weights::into_raw(dev)) }
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
/// `dev` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_info(
    dev: *const rzc_device_weights,
    out: *mut rzc_device_info,
) -> rzc_status {
    ffi_boundary! {
        let d = unsafe { rzc_device_weights::borrow(dev, "dev")? };
        let staging = match d.staging() {
            Staging::Auto => RZC_STAGING_AUTO,
            Staging::Register => RZC_STAGING_REGISTER,
            Staging::Pinned => RZC_STAGING_PINNED,
            Staging::Pageable => RZC_STAGING_PAGEABLE,
        };
        let info = rzc_device_info { device_ptr: d.device_ptr(), nbytes: d.nbytes() as u64, ordinal: d.ordinal(), staging, seconds: d.seconds() };
        unsafe { write_out(out, "out", info) }
    }
}

/// Exports tensor `index` (same order as the source's table) as a versioned
/// DLPack tensor: kDLCUDA, `device_id` = the ordinal, data inside the single
/// allocation, `DLPACK_FLAG_BITMASK_IS_COPIED` set. The tensor keeps the
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
        crate::handle::not_null(out, "out")?;
        unsafe { write_out(out, "out", d.to_dlpack(index)?) }
    }
}

/// Same as `rzc_device_weights_to_dlpack` in the legacy form (for JAX and
/// CuPy versions that take only it).
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
        crate::handle::not_null(out, "out")?;
        unsafe { write_out(out, "out", d.to_dlpack_legacy(index)?) }
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
