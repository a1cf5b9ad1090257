//! The tensors of an opened `rzc_weights` as DLPack tensors, without copies.

use rzc_core::dlpack::{DLManagedTensor, DLManagedTensorVersioned};

use super::rzc_weights;
use crate::status::{ffi_boundary, rzc_status};

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
        let h = borrow!(rzc_weights, w);
        let out = out!(out);
        out.write(h.weights.to_dlpack(index)?)
    }
}

/// Exports the tensors `indices[0 .. indices_len)` as versioned DLPack
/// tensors, as `rzc_weights_to_dlpack` does one: `tensors_out[k]` receives
/// tensor `indices[k]`. One call for a whole model instead of one per tensor.
/// All or nothing: on failure (an index out of range, a dtype DLPack cannot
/// carry) no tensor is created and nothing is written.
///
/// # Safety
/// `w` is a live handle; `indices` points to `indices_len` indices and
/// `tensors_out` has room for as many pointers (either may be NULL when
/// `indices_len` is 0).
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_to_dlpack_many(
    w: *const rzc_weights,
    indices: *const usize,
    indices_len: usize,
    tensors_out: *mut *mut DLManagedTensorVersioned,
) -> rzc_status {
    ffi_boundary! {
        let h = borrow!(rzc_weights, w);
        let out = out_slice!(tensors_out, indices_len);
        let indices = slice_arg!(indices, indices_len);
        // As many tensors as `tensors_out` has room for: the write cannot fail.
        out.write(h.weights.to_dlpack_many(indices)?.into_iter(), "tensors_out")
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
        let h = borrow!(rzc_weights, w);
        let out = out!(out);
        out.write(h.weights.to_dlpack_legacy(index)?)
    }
}

/// `rzc_weights_to_dlpack_legacy` of the tensors `indices[0 .. indices_len)`
/// in one call, as `rzc_weights_to_dlpack_many` does for the versioned form
/// (for consumers such as JAX that take only the legacy one): all or
/// nothing.
///
/// # Safety
/// As `rzc_weights_to_dlpack_many`.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_to_dlpack_legacy_many(
    w: *const rzc_weights,
    indices: *const usize,
    indices_len: usize,
    tensors_out: *mut *mut DLManagedTensor,
) -> rzc_status {
    ffi_boundary! {
        let h = borrow!(rzc_weights, w);
        let out = out_slice!(tensors_out, indices_len);
        let indices = slice_arg!(indices, indices_len);
        // As many tensors as `tensors_out` has room for: the write cannot fail.
        out.write(h.weights.to_dlpack_legacy_many(indices)?.into_iter(), "tensors_out")
    }
}

/// Exports the whole data section (everything after the header) as one
/// read-only 1-D `U8` versioned DLPack tensor. Tensor `i` lies at byte
/// `info.data - (layout.bytes + layout.data_start)` of it (see
/// `rzc_weights_get_layout`): a consumer can cut every tensor out of this one
/// export as a view.
///
/// # Safety
/// `w` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_data_to_dlpack(
    w: *const rzc_weights,
    out: *mut *mut DLManagedTensorVersioned,
) -> rzc_status {
    ffi_boundary! {
        let h = borrow!(rzc_weights, w);
        let out = out!(out);
        out.write(h.weights.data_section_to_dlpack())
    }
}
