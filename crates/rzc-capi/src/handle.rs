//! Conversions between C arguments and Rust values: opaque handles, checked
//! out-parameters, borrowed slices and strings, and option structs that can
//! grow.

use std::mem::size_of;
use std::ptr::NonNull;

use crate::status::{Failure, FfiResult, RZC_BUFFER_TOO_SMALL, RZC_INVALID_ARGUMENT};

/// A C handle type whose pointers point to a boxed `Self::Rust`.
///
/// The header promises that the functions taking a `const` handle may run on
/// several threads at once on one handle, and that a handle may be used and
/// freed on any thread: every export borrows the object behind a handle as a
/// shared `&Self::Rust` (only `free` takes it whole), so the promise holds
/// where `Self::Rust` is `Sync` and `Send`, which this bound makes the
/// compiler check for every handle type.
pub trait Handle {
    type Rust: Send + Sync;

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

/// An out-parameter, checked for NULL when it is made. Every export makes its
/// `Out`s first, before it creates anything, so a NULL out-pointer is reported
/// before any work (and never leaves an object behind that nobody can free);
/// the value is written with [`Out::write`], only on success.
pub struct Out<T> {
    ptr: NonNull<T>,
}

impl<T> Out<T> {
    /// Checks `ptr`; `arg` names the argument in the error.
    ///
    /// # Safety
    /// `ptr` is NULL or valid for a write of a `T` until the export returns.
    pub unsafe fn new(ptr: *mut T, arg: &str) -> FfiResult<Out<T>> {
        NonNull::new(ptr)
            .map(|ptr| Out { ptr })
            .ok_or_else(|| Failure::null(arg))
    }

    /// Writes the result.
    pub fn write(self, value: T) -> FfiResult {
        // SAFETY: non-NULL and valid for a write (`Out::new`'s contract).
        unsafe { self.ptr.as_ptr().write(value) };
        Ok(())
    }
}

/// A caller's array to fill: `ptr` with room for `len` elements.
pub struct OutSlice<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> OutSlice<T> {
    /// Checks the array (NULL only when `len` is 0).
    ///
    /// # Safety
    /// `ptr` is NULL or valid for writes of `len` elements until the export
    /// returns.
    pub unsafe fn new(ptr: *mut T, len: usize, arg: &str) -> FfiResult<OutSlice<T>> {
        if ptr.is_null() && len > 0 {
            return Err(Failure::null(arg));
        }
        Ok(OutSlice { ptr, len })
    }

    /// The whole array, for a callee that fills it (bytes copied into it).
    /// Valid until the export returns, as `OutSlice::new`'s contract says.
    pub fn into_slice<'a>(self) -> &'a mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: non-NULL (checked in `new` when `len > 0`) and valid for
        // `len` writes until the export returns (`new`'s contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Writes `values` to the start of the array, or fails with
    /// `RZC_BUFFER_TOO_SMALL` (writing nothing) when they do not fit.
    pub fn write(self, values: impl ExactSizeIterator<Item = T>, arg: &str) -> FfiResult {
        let n = values.len();
        if n > self.len {
            return Err(Failure::new(
                RZC_BUFFER_TOO_SMALL,
                format!("`{arg}` has room for {} entries, {n} are needed", self.len),
            ));
        }
        for (i, v) in values.enumerate() {
            // SAFETY: i < n <= len, valid per `OutSlice::new`'s contract.
            unsafe { self.ptr.add(i).write(v) };
        }
        Ok(())
    }
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

/// A mutable byte slice from a C pointer and length; NULL is refused.
///
/// # Safety
/// `ptr` is NULL or points to `len` writable bytes that nothing else uses
/// while the slice lives.
pub unsafe fn slice_mut<'a>(ptr: *mut u8, len: usize, arg: &str) -> FfiResult<&'a mut [u8]> {
    not_null(ptr, arg)?;
    // SAFETY: non-NULL, writable and unshared per the caller.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

fn utf8<'a>(bytes: &'a [u8], arg: &str) -> FfiResult<&'a str> {
    std::str::from_utf8(bytes)
        .map_err(|_| Failure::new(RZC_INVALID_ARGUMENT, format!("`{arg}` is not valid UTF-8")))
}

/// A `&str` from a pointer and byte length, checked as UTF-8.
///
/// # Safety
/// As for [`slice`].
pub unsafe fn str_n<'a>(ptr: *const std::ffi::c_char, len: usize, arg: &str) -> FfiResult<&'a str> {
    // SAFETY: forwarded.
    utf8(unsafe { slice(ptr.cast::<u8>(), len, arg)? }, arg)
}

/// A `&str` from a NUL-terminated C string, checked as UTF-8.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string that outlives `'a`.
pub unsafe fn c_str<'a>(ptr: *const std::ffi::c_char, arg: &str) -> FfiResult<&'a str> {
    not_null(ptr, arg)?;
    // SAFETY: non-NULL and NUL-terminated per the caller.
    utf8(unsafe { std::ffi::CStr::from_ptr(ptr) }.to_bytes(), arg)
}

/// A struct passed by pointer that may grow in later versions: its first
/// field is `size_t struct_nbytes`, set by the caller to the `sizeof` it was
/// compiled with. This is the scheme of the Linux kernel's extensible
/// structs (`openat2`, `clone3`): fields are only ever appended; the library
/// reads what the caller's size covers and takes zeros (the defaults) for
/// the rest; a caller built against a newer header may pass a larger struct
/// as long as the fields this library does not know are zero.
///
/// # Safety
/// An all-zero `Self` is a valid value, and the first field is a `usize`.
pub unsafe trait Extensible: Sized {
    /// The C type name, for messages.
    const NAME: &'static str;
    /// The size of the first published version: never changes.
    const MIN_NBYTES: usize;

    /// All fields zero (their defaults).
    fn zeroed() -> Self {
        // SAFETY: all-zero is valid (the trait's contract).
        unsafe { std::mem::zeroed() }
    }
}

/// How many bytes of a caller's `T` at `ptr` this library may use, after
/// checking its `struct_nbytes`.
///
/// # Safety
/// `ptr` is non-NULL and points to at least `struct_nbytes` readable bytes
/// (and at least one `usize`).
unsafe fn usable<T: Extensible>(ptr: *const T) -> FfiResult<usize> {
    // SAFETY: the first field is a usize (the trait's contract).
    let declared = unsafe { ptr.cast::<usize>().read() };
    let ours = size_of::<T>();
    if declared < T::MIN_NBYTES {
        return Err(Failure::new(
            RZC_INVALID_ARGUMENT,
            format!(
                "{}.struct_nbytes is {declared}; set it to sizeof({}) ({ours} in this library's rzc.h)",
                T::NAME,
                T::NAME
            ),
        ));
    }
    if declared > ours {
        // SAFETY: the caller's struct has `declared` readable bytes.
        let extra =
            unsafe { std::slice::from_raw_parts(ptr.cast::<u8>().add(ours), declared - ours) };
        if extra.iter().any(|&b| b != 0) {
            return Err(Failure::new(
                RZC_INVALID_ARGUMENT,
                format!(
                    "{} is {declared} bytes and sets fields this library ({}, {ours} bytes) does not know: \
                     the program was built against a newer rzc.h than the library it runs with",
                    T::NAME,
                    env!("CARGO_PKG_VERSION")
                ),
            ));
        }
    }
    Ok(declared.min(ours))
}

/// Reads a caller's extensible options struct; NULL gives `None`.
///
/// # Safety
/// `ptr` is NULL or points to at least `struct_nbytes` readable bytes.
pub unsafe fn read_options<T: Extensible>(ptr: *const T) -> FfiResult<Option<T>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL, readable per the caller.
    let n = unsafe { usable(ptr)? };
    let mut value = T::zeroed();
    // SAFETY: both sides have at least `n` bytes and do not overlap; any
    // prefix of a valid T over zeros is valid (all fields take zero, and a
    // caller's value in each field it sets).
    unsafe {
        std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&mut value as *mut T).cast::<u8>(), n)
    };
    Ok(Some(value))
}

/// An extensible struct the library fills in: checked when made, written
/// (as much of it as the caller's `struct_nbytes` covers) on success.
pub struct OutExtensible<T> {
    ptr: NonNull<T>,
    nbytes: usize,
}

impl<T: Extensible> OutExtensible<T> {
    /// # Safety
    /// `ptr` is NULL or points to a caller's struct of `struct_nbytes`
    /// readable and writable bytes.
    pub unsafe fn new(ptr: *mut T, arg: &str) -> FfiResult<OutExtensible<T>> {
        let ptr = NonNull::new(ptr).ok_or_else(|| Failure::null(arg))?;
        // SAFETY: forwarded.
        let nbytes = unsafe { usable(ptr.as_ptr())? };
        Ok(OutExtensible { ptr, nbytes })
    }

    /// Writes `value` except its `struct_nbytes`, which stays the caller's.
    pub fn write(self, value: T) -> FfiResult {
        let skip = size_of::<usize>();
        // SAFETY: `nbytes` bytes of the caller's struct are writable and
        // `value` has at least as many.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&value as *const T).cast::<u8>().add(skip),
                self.ptr.as_ptr().cast::<u8>().add(skip),
                self.nbytes - skip,
            )
        };
        Ok(())
    }
}

// The argument side of every export, one line per argument. Each macro takes
// the parameter itself (its name becomes the argument's name in the error
// message) and `?`s the failure out of the export's `ffi_boundary!` body.
// Every export states, in its `# Safety` section, that its pointer arguments
// are NULL or valid as the macro used for them needs: that contract is what
// each `SAFETY:` below relies on, written once here instead of at each of the
// ~40 call sites.

/// `&Rust` behind handle argument `$arg` of C type `$ty`; NULL fails with
/// `RZC_NULL_ARGUMENT`.
macro_rules! borrow {
    ($ty:ty, $arg:ident) => {
        // SAFETY: the export's contract: `$arg` is NULL or a live handle of
        // this type, used read-only by this call.
        unsafe { <$ty as $crate::handle::Handle>::borrow($arg, stringify!($arg))? }
    };
}

/// Like [`borrow!`], for the value-returning exports: `Option<&Rust>`.
macro_rules! borrow_or_none {
    ($ty:ty, $arg:ident) => {
        // SAFETY: as for `borrow!`.
        unsafe { <$ty as $crate::handle::Handle>::borrow($arg, stringify!($arg)) }.ok()
    };
}

/// An [`Out`] for out-parameter `$arg`, checked for NULL now.
macro_rules! out {
    ($arg:ident) => {
        // SAFETY: the export's contract: `$arg` is NULL or valid for a write
        // until the export returns.
        unsafe { $crate::handle::Out::new($arg, stringify!($arg))? }
    };
}

/// An [`OutSlice`] for the caller's array `$arg` of `$len` elements.
macro_rules! out_slice {
    ($arg:ident, $len:expr) => {
        // SAFETY: the export's contract: `$arg` has room for `$len` elements
        // (NULL only when `$len` is 0).
        unsafe { $crate::handle::OutSlice::new($arg, $len, stringify!($arg))? }
    };
}

/// An extensible struct the export fills in ([`OutExtensible`]).
macro_rules! out_extensible {
    ($arg:ident) => {
        // SAFETY: the export's contract: `$arg` is NULL or a caller's struct
        // of `struct_nbytes` readable and writable bytes.
        unsafe { $crate::handle::OutExtensible::new($arg, stringify!($arg))? }
    };
}

/// `&[T]` from pointer argument `$arg` and its element count `$len`.
macro_rules! slice_arg {
    ($arg:ident, $len:expr) => {
        // SAFETY: the export's contract: `$arg` points to `$len` valid
        // elements (NULL only when `$len` is 0) that outlive the call.
        unsafe { $crate::handle::slice($arg, $len, stringify!($arg))? }
    };
}

/// `&str` from a NUL-terminated UTF-8 argument.
macro_rules! c_str_arg {
    ($arg:ident) => {
        // SAFETY: the export's contract: `$arg` is NULL or NUL-terminated.
        unsafe { $crate::handle::c_str($arg, stringify!($arg))? }
    };
}

/// `&str` from a UTF-8 argument given by pointer and byte length.
macro_rules! str_arg {
    ($arg:ident, $len:expr) => {
        // SAFETY: the export's contract: `$arg` points to `$len` readable
        // bytes (NULL only when `$len` is 0).
        unsafe { $crate::handle::str_n($arg, $len, stringify!($arg))? }
    };
}

/// `Option<T>` from an extensible options struct argument (NULL: `None`).
macro_rules! options_arg {
    ($arg:ident) => {
        // SAFETY: the export's contract: `$arg` is NULL or points to
        // `struct_nbytes` readable bytes.
        unsafe { $crate::handle::read_options($arg)? }
    };
}

/// `&mut [u8]` from a writable buffer argument `$arg` of `$len` bytes.
macro_rules! bytes_mut_arg {
    ($arg:ident, $len:expr) => {
        // SAFETY: the export's contract: `$arg` points to `$len` writable
        // bytes that nothing else uses during the call.
        unsafe { $crate::handle::slice_mut($arg, $len, stringify!($arg))? }
    };
}

/// Frees handle argument `$arg` of C type `$ty` (NULL is a no-op).
macro_rules! free_handle {
    ($ty:ty, $arg:ident) => {
        // SAFETY: the export's contract: `$arg` is NULL or a handle of this
        // type not yet freed, which no other thread is using.
        unsafe { <$ty as $crate::handle::Handle>::free($arg) }
    };
}
