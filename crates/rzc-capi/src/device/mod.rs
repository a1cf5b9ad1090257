//! `rzc_device_weights`: an opened buffer's tensors uploaded to one CUDA
//! device allocation. This file uploads, describes tensors, exports and
//! frees; `options` holds the upload's options, `info` what an upload did.

use std::ffi::c_char;

use rzc_core::dlpack::{DLManagedTensor, DLManagedTensorVersioned};
use rzc_core::Dtype;
use rzc_cuda::{DeviceWeights, UploadOptions};

use crate::handle::Handle;
use crate::status::{ffi_boundary, ffi_value_boundary, rzc_status};
use crate::weights::rzc_weights;

mod info;
mod options;

pub use info::*;
pub use options::*;

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
        let out = out!(count_out);
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
        let w = borrow!(rzc_weights, w);
        let out = out!(out);
        let opts = match options_arg!(options) {
            // SAFETY: the export's contract: the options' pointers are valid.
            Some(o) => unsafe { o.to_rust()? },
            None => UploadOptions::default(),
        };
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
        borrow_or_none!(rzc_device_weights, dev)
            .map(|d| d.tensors().len())
            .unwrap_or(0)
    )
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
        let d = borrow!(rzc_device_weights, dev);
        let out = out!(out);
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
        let d = borrow!(rzc_device_weights, dev);
        let dst = out_slice!(dst, dst_len);
        d.read(index, dst.into_slice())?;
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
        let d = borrow!(rzc_device_weights, dev);
        let out = out!(out);
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
        let d = borrow!(rzc_device_weights, dev);
        let out = out!(out);
        out.write(d.to_dlpack_legacy(index)?)
    }
}

/// Frees the handle; the allocation lives on while exported tensors do.
/// NULL is a no-op.
///
/// # Safety
/// `dev` is NULL or a handle not yet freed, which no other thread is using
/// (nor will: the one call on a handle that may not overlap others).
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_free(dev: *mut rzc_device_weights) {
    ffi_value_boundary!((), free_handle!(rzc_device_weights, dev))
}
