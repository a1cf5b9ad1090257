//! Conversions between opaque C handles and the Rust objects behind them, and
//! the checks for NULL arguments.

use crate::status::{Failure, FfiResult};

/// A C handle type whose pointers point to a boxed `Self::Rust`.
pub trait Handle {
    type Rust;

    /// Moves `value` to the heap and gives its handle to C.
    fn into_raw(value: Self::Rust) -> *mut Self
    where
        Self: Sized,
    {
        Box::into_raw(Box::new(value)).cast()
    }

    /// Borrows the object behind `ptr`; `arg` names the argument in the error.
    ///
    /// # Safety
    /// `ptr` is NULL or came from `into_raw` and has not been freed.
    unsafe fn borrow<'a>(ptr: *const Self, arg: &str) -> FfiResult<&'a Self::Rust>
    where
        Self: Sized,
    {
        // SAFETY: guaranteed by the caller.
        unsafe { ptr.cast::<Self::Rust>().as_ref() }.ok_or_else(|| Failure::null(arg))
    }

    /// Frees the object behind `ptr`; NULL is a no-op.
    ///
    /// # Safety
    /// `ptr` is NULL or came from `into_raw` and has not been freed.
    unsafe fn free(ptr: *mut Self)
    where
        Self: Sized,
    {
        if !ptr.is_null() {
            // SAFETY: guaranteed by the caller.
            drop(unsafe { Box::from_raw(ptr.cast::<Self::Rust>()) });
        }
    }
}

/// Writes `value` to the out-parameter `out`, failing on NULL.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
pub unsafe fn write_out<T>(out: *mut T, arg: &str, value: T) -> FfiResult {
    if out.is_null() {
        return Err(Failure::null(arg));
    }
    // SAFETY: non-NULL and valid per the caller.
    unsafe { out.write(value) };
    Ok(())
}

/// Fails with `RZC_NULL_ARGUMENT` when `ptr` is NULL.
pub fn not_null<T>(ptr: *const T, arg: &str) -> FfiResult {
    if ptr.is_null() {
        Err(Failure::null(arg))
    } else {
        Ok(())
    }
}

/// A slice from a C pointer and count; NULL is allowed when `len` is 0.
///
/// # Safety
/// When `len > 0`, `ptr` points to `len` valid `T`s that outlive `'a`.
pub unsafe fn slice<'a, T>(ptr: *const T, len: usize, arg: &str) -> FfiResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    not_null(ptr, arg)?;
    // SAFETY: non-NULL and valid per the caller.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A `&str` from a pointer and byte length, checked as UTF-8.
///
/// # Safety
/// As for [`slice`].
pub unsafe fn str_n<'a>(ptr: *const std::ffi::c_char, len: usize, arg: &str) -> FfiResult<&'a str> {
    // SAFETY: forwarded.
    let bytes = unsafe { slice(ptr.cast::<u8>(), len, arg)? };
    std::str::from_utf8(bytes).map_err(|_| {
        Failure::new(
            crate::status::RZC_INVALID_ARGUMENT,
            format!("`{arg}` is not valid UTF-8"),
        )
    })
}

/// A `&str` from a NUL-terminated C string, checked as UTF-8.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string that outlives `'a`.
pub unsafe fn c_str<'a>(ptr: *const std::ffi::c_char, arg: &str) -> FfiResult<&'a str> {
    not_null(ptr, arg)?;
    // SAFETY: non-NULL and NUL-terminated per the caller.
    let c = unsafe { std::ffi::CStr::from_ptr(ptr) };
    c.to_str().map_err(|_| {
        Failure::new(
            crate::status::RZC_INVALID_ARGUMENT,
            format!("`{arg}` is not valid UTF-8"),
        )
    })
}
