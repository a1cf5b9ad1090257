//! The tensor table, metadata and layout of an opened `rzc_weights`.

use std::ffi::c_char;

use rzc_core::Dtype;

use super::rzc_weights;
use crate::status::{
    ffi_boundary, ffi_value_boundary, rzc_status, Failure, RZC_NOT_FOUND, RZC_OUT_OF_RANGE,
};

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

/// Where an opened buffer lies and where its tensor data starts and ends.
#[repr(C)]
pub struct rzc_buffer_layout {
    /// First byte of the buffer (the header's length field).
    pub bytes: *const u8,
    /// Length of the whole buffer in bytes.
    pub bytes_len: usize,
    /// Offset of the data section (the end of the header) from `bytes`.
    pub data_start: usize,
    /// Offset one past the end of the data section (= `bytes_len`).
    pub data_end: usize,
}

/// Number of tensors in the buffer (0 for a NULL handle).
///
/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_len(w: *const rzc_weights) -> usize {
    ffi_value_boundary!(
        0,
        borrow_or_none!(rzc_weights, w)
            .map(|h| h.weights.len())
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
        let h = borrow!(rzc_weights, w);
        let out = out!(out);
        h.weights.get(index)?;
        out.write(h.info(index))
    }
}

/// Describes every tensor at once: fills `infos_out[0 .. rzc_weights_len(w))`.
/// One call instead of one per tensor, for callers that want the whole table
/// (a load of a few hundred tensors). Fails with `RZC_BUFFER_TOO_SMALL`,
/// writing nothing, when `infos_len` is less than `rzc_weights_len(w)`.
///
/// # Safety
/// `w` is a live handle; `infos_out` has room for `infos_len` entries (may be
/// NULL when `infos_len` is 0).
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_get_all(
    w: *const rzc_weights,
    infos_out: *mut rzc_tensor_info,
    infos_len: usize,
) -> rzc_status {
    ffi_boundary! {
        let h = borrow!(rzc_weights, w);
        let out = out_slice!(infos_out, infos_len);
        out.write((0..h.weights.len()).map(|i| h.info(i)), "infos_out")
    }
}

/// Number of extents of all tensors together: the sum of every tensor's
/// `ndim`, the room `rzc_weights_get_dims` needs (0 for a NULL handle).
///
/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_dims_len(w: *const rzc_weights) -> usize {
    ffi_value_boundary!(
        0,
        borrow_or_none!(rzc_weights, w)
            .map(|h| h.weights.tensors().iter().map(|t| t.shape.len()).sum())
            .unwrap_or(0)
    )
}

/// Writes every tensor's extents into one array, in the order of the data:
/// tensor 0's `ndim` extents, then tensor 1's, and so on. With the `ndim`
/// column of `rzc_weights_get_all` a caller reads every shape with one call
/// and one copy, instead of following one `shape` pointer per tensor (the
/// cost that dominates reading a table of 20,000 tensors from Python). Fails
/// with `RZC_BUFFER_TOO_SMALL`, writing nothing, when `dims_len` is less
/// than `rzc_weights_dims_len(w)`.
///
/// # Safety
/// `w` is a live handle; `dims_out` has room for `dims_len` values (may be
/// NULL when `dims_len` is 0).
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_get_dims(
    w: *const rzc_weights,
    dims_out: *mut i64,
    dims_len: usize,
) -> rzc_status {
    ffi_boundary! {
        let h = borrow!(rzc_weights, w);
        let out = out_slice!(dims_out, dims_len);
        let tensors = h.weights.tensors();
        let dims: Vec<i64> = tensors.iter().flat_map(|t| t.shape.iter().copied()).collect();
        out.write(dims.into_iter(), "dims_out")
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
        let h = borrow!(rzc_weights, w);
        let out = out!(index_out);
        let name = c_str_arg!(name);
        out.write(h.weights.find(name)?)
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
        let h = borrow!(rzc_weights, w);
        let out = out!(index_out);
        let name = str_arg!(name, name_len);
        out.write(h.weights.find(name)?)
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
        borrow_or_none!(rzc_weights, w)
            .map(|h| h.weights.metadata().len())
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
        let h = borrow!(rzc_weights, w);
        let out = out!(out);
        let meta = h.weights.metadata();
        let Some((k, v)) = meta.iter().nth(index) else {
            return Err(Failure::new(
                RZC_OUT_OF_RANGE,
                format!("metadata index {index} is out of range (the buffer has {} entries)", meta.len()),
            ));
        };
        out.write(rzc_metadata_entry { key: k.as_ptr().cast(), key_len: k.len(), value: v.as_ptr().cast(), value_len: v.len() })
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
        let h = borrow!(rzc_weights, w);
        let value_out = out!(value_out);
        let value_len_out = out!(value_len_out);
        let key = c_str_arg!(key);
        let Some(v) = h.weights.metadata().get(key) else {
            return Err(Failure::new(RZC_NOT_FOUND, format!("no metadata key {key:?}")));
        };
        value_out.write(v.as_ptr().cast())?;
        value_len_out.write(v.len())
    }
}

/// Where the buffer lies and where its tensor data starts and ends.
///
/// # Safety
/// `w` is a live handle; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_weights_get_layout(
    w: *const rzc_weights,
    out: *mut rzc_buffer_layout,
) -> rzc_status {
    ffi_boundary! {
        let h = borrow!(rzc_weights, w);
        let out = out!(out);
        let w = &h.weights;
        out.write(rzc_buffer_layout {
            bytes: w.bytes().as_ptr(),
            bytes_len: w.bytes().len(),
            data_start: w.data_start(),
            data_end: w.data_end(),
        })
    }
}
