//! The C ABI of ray-zerocopy. Every `extern "C"` function of the project lives
//! in this crate; the logic lives in `rzc-core` and `rzc-cuda`.
//!
//! Conventions (repeated in the header's preamble): names are
//! `rzc_<type>_<verb>`; arguments are the handle, then inputs, then outputs;
//! outputs are written only on success; every fallible call returns an
//! `rzc_status` and leaves a thread-local message; nothing unwinds across the
//! boundary.
#![allow(non_camel_case_types)]
// Each export documents its contract in a `# Safety` section; the bodies are
// thin and call the helpers in `handle`. Inside them every unsafe operation
// sits in its own `unsafe` block, as in the 2024 edition.
#![allow(clippy::missing_safety_doc)]
#![deny(unsafe_op_in_unsafe_fn)]

#[macro_use]
mod handle;
pub mod device;
mod facts;
pub mod pack;
pub mod seal;
pub mod status;
pub mod weights;

use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

pub use rzc_core::dlpack::{DLManagedTensor, DLManagedTensorVersioned};
use rzc_core::Dtype;
use status::ffi_value_boundary;
pub use status::rzc_status;

/// DLPack major version of the structs in this header.
pub const DLPACK_MAJOR_VERSION: u32 = 1;
/// DLPack minor version of the structs in this header.
pub const DLPACK_MINOR_VERSION: u32 = 1;
/// `DLManagedTensorVersioned::flags` bit: the consumer must not write the memory.
pub const DLPACK_FLAG_BITMASK_READ_ONLY: u64 = 1;
/// `DLManagedTensorVersioned::flags` bit: the data is a private copy.
pub const DLPACK_FLAG_BITMASK_IS_COPIED: u64 = 2;
/// `DLManagedTensorVersioned::flags` bit: sub-byte elements are padded to bytes.
pub const DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED: u64 = 4;

/// Library version as `"MAJOR.MINOR.PATCH"` (static storage).
#[no_mangle]
pub extern "C" fn rzc_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// This thread's message for its most recent failed call: a NUL-terminated
/// string, `""` after a successful call. Valid until this thread's next call
/// into the library.
#[no_mangle]
pub extern "C" fn rzc_last_error_message() -> *const c_char {
    status::last_message_ptr()
}

/// Stable name of a status code (`"RZC_BAD_FORMAT"`), or `"RZC_UNKNOWN"`.
#[no_mangle]
pub extern "C" fn rzc_status_name(status: u32) -> *const c_char {
    match rzc_status::from_u32(status) {
        Some(s) => s.name().as_ptr(),
        None => c"RZC_UNKNOWN".as_ptr(),
    }
}

/// Header spelling of a dtype (`"F32"`, `"BF16"`, ...), or NULL for a value
/// that is not an `rzc_dtype`.
#[no_mangle]
pub extern "C" fn rzc_dtype_name(dtype: u32) -> *const c_char {
    ffi_value_boundary!(
        std::ptr::null(),
        Dtype::from_u32(dtype)
            .map(|d| dtype_c_name(d).as_ptr())
            .unwrap_or(std::ptr::null())
    )
}

/// `name` and a NUL in a fixed array. The tables of names C callers get
/// pointers into are built once into static memory, not the heap: a heap
/// block held until exit is what valgrind (rightly) reports as a leak.
pub(crate) fn nul_terminated<const N: usize>(name: &str) -> [u8; N] {
    assert!(
        name.len() < N && !name.contains('\0'),
        "name {name:?} does not fit"
    );
    let mut out = [0; N];
    out[..name.len()].copy_from_slice(name.as_bytes());
    out
}

/// A dtype's header spelling, NUL-terminated for C (static storage).
fn dtype_c_name(dtype: Dtype) -> &'static CStr {
    static NAMES: OnceLock<[[u8; 16]; 32]> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        std::array::from_fn(|i| nul_terminated(Dtype::from_u32(i as u32).map_or("", Dtype::name)))
    });
    CStr::from_bytes_until_nul(&names[dtype as usize]).expect("NUL-terminated")
}

/// Bits per element of a dtype (4 and 6 for the packed sub-byte floats), or 0
/// for a value that is not an `rzc_dtype`.
#[no_mangle]
pub extern "C" fn rzc_dtype_bits(dtype: u32) -> u32 {
    Dtype::from_u32(dtype).map(Dtype::bits).unwrap_or(0)
}

/// Calls a versioned DLPack tensor's deleter; NULL is a no-op. For callers
/// that hold the pointer but would rather not call through it themselves.
///
/// # Safety
/// `tensor` is NULL or a live tensor whose deleter has not run.
#[no_mangle]
pub unsafe extern "C" fn rzc_dlpack_versioned_free(tensor: *mut DLManagedTensorVersioned) {
    // SAFETY: the caller's contract: NULL or a live tensor.
    if let Some(deleter) = unsafe { tensor.as_ref() }.and_then(|t| t.deleter) {
        // SAFETY: its own deleter, called once (the caller gives it up).
        unsafe { deleter(tensor) }
    }
}

/// Calls a legacy DLPack tensor's deleter; NULL is a no-op.
///
/// # Safety
/// `tensor` is NULL or a live tensor whose deleter has not run.
#[no_mangle]
pub unsafe extern "C" fn rzc_dlpack_legacy_free(tensor: *mut DLManagedTensor) {
    // SAFETY: the caller's contract: NULL or a live tensor.
    if let Some(deleter) = unsafe { tensor.as_ref() }.and_then(|t| t.deleter) {
        // SAFETY: its own deleter, called once (the caller gives it up).
        unsafe { deleter(tensor) }
    }
}

#[cfg(test)]
mod tests {
    use rzc_core::dlpack as core;

    // cbindgen only writes literal constants, so the header's copies are
    // literals; they must agree with the core's.
    #[test]
    fn dlpack_constants_agree_with_the_core() {
        assert_eq!(super::DLPACK_MAJOR_VERSION, core::DLPACK_MAJOR_VERSION);
        assert_eq!(super::DLPACK_MINOR_VERSION, core::DLPACK_MINOR_VERSION);
        assert_eq!(
            super::DLPACK_FLAG_BITMASK_READ_ONLY,
            core::DLPACK_FLAG_BITMASK_READ_ONLY
        );
        assert_eq!(
            super::DLPACK_FLAG_BITMASK_IS_COPIED,
            core::DLPACK_FLAG_BITMASK_IS_COPIED
        );
        assert_eq!(
            super::DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED,
            core::DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED
        );
    }
}
