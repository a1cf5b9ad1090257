//! Status codes, the thread-local error message, and the panic boundary that
//! wraps every export.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::sync::OnceLock;

use rzc_core::ErrorKind;

/// Result of every fallible call. The numbers are stable: a code is never
/// renumbered or reused, and new codes are appended.
///
/// This enum is the one list of statuses: the header's enum, the names
/// `rzc_status_name` returns (the variant names, through `Debug`) and the
/// Python exception classes (matched by name in `ray_zerocopy.errors`) all
/// come from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rzc_status {
    /// Success.
    RZC_OK = 0,
    /// A required pointer argument was NULL.
    RZC_NULL_ARGUMENT = 1,
    /// An argument is out of its documented domain (bad option, non-UTF-8 name, ...).
    RZC_INVALID_ARGUMENT = 2,
    /// The bytes are not a valid safetensors buffer.
    RZC_BAD_FORMAT = 3,
    /// A file could not be opened, read or mapped.
    RZC_IO = 4,
    /// No tensor (or metadata key) of that name.
    RZC_NOT_FOUND = 5,
    /// The dtype is unknown, or cannot be used by this operation.
    RZC_UNSUPPORTED_DTYPE = 6,
    /// An index past the end of a table.
    RZC_OUT_OF_RANGE = 7,
    /// The destination buffer is smaller than needed.
    RZC_BUFFER_TOO_SMALL = 8,
    /// No CUDA driver library could be loaded, or it reports no device.
    RZC_NO_CUDA = 9,
    /// The CUDA driver reported an error.
    RZC_CUDA_ERROR = 10,
    /// Host or device memory could not be allocated.
    RZC_OUT_OF_MEMORY = 11,
    /// The device ordinal names no device.
    RZC_BAD_DEVICE = 12,
    /// A bug inside the library was caught at the boundary (a Rust panic).
    RZC_PANIC = 13,
}

pub use rzc_status::*;

/// The highest code. Codes are numbered 0, 1, 2, ... without gaps (the header
/// test checks the generated enum), so this one bound covers them all.
const LAST: rzc_status = RZC_PANIC;

impl rzc_status {
    /// The code with number `value`, if any.
    pub fn from_u32(value: u32) -> Option<rzc_status> {
        // SAFETY: `rzc_status` is a fieldless repr(C) enum (a C int) whose
        // discriminants are exactly 0..=LAST, and `value` is in that range.
        (value <= LAST as u32).then(|| unsafe { std::mem::transmute::<u32, rzc_status>(value) })
    }

    /// Stable name of the code, e.g. `"RZC_BAD_FORMAT"`.
    pub fn name(self) -> &'static CStr {
        static NAMES: OnceLock<[[u8; 32]; LAST as usize + 1]> = OnceLock::new();
        let names = NAMES.get_or_init(|| {
            std::array::from_fn(|i| {
                let status = rzc_status::from_u32(i as u32).expect("dense codes");
                crate::nul_terminated(&format!("{status:?}"))
            })
        });
        CStr::from_bytes_until_nul(&names[self as usize]).expect("NUL-terminated")
    }
}

/// A failed call: the status to return and the message to leave behind.
#[derive(Debug)]
pub struct Failure {
    pub status: rzc_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: rzc_status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub fn null(arg: &str) -> Failure {
        Failure::new(RZC_NULL_ARGUMENT, format!("argument `{arg}` is NULL"))
    }
}

/// The status of a core error class.
fn core_status(kind: ErrorKind) -> rzc_status {
    match kind {
        ErrorKind::InvalidArgument => RZC_INVALID_ARGUMENT,
        ErrorKind::BadFormat => RZC_BAD_FORMAT,
        ErrorKind::Io => RZC_IO,
        ErrorKind::NotFound => RZC_NOT_FOUND,
        ErrorKind::UnsupportedDtype => RZC_UNSUPPORTED_DTYPE,
        ErrorKind::OutOfRange => RZC_OUT_OF_RANGE,
        ErrorKind::BufferTooSmall => RZC_BUFFER_TOO_SMALL,
    }
}

impl From<rzc_core::Error> for Failure {
    fn from(e: rzc_core::Error) -> Failure {
        Failure::new(core_status(e.kind()), e.message())
    }
}

/// The device layer's classes, with the core's it passes on.
impl From<rzc_cuda::Error> for Failure {
    fn from(e: rzc_cuda::Error) -> Failure {
        use rzc_cuda::ErrorKind as Device;
        let status = match e.kind() {
            Device::NoCuda => RZC_NO_CUDA,
            Device::Cuda => RZC_CUDA_ERROR,
            Device::OutOfMemory => RZC_OUT_OF_MEMORY,
            Device::BadDevice => RZC_BAD_DEVICE,
            Device::Core(kind) => core_status(kind),
        };
        Failure::new(status, e.message())
    }
}

pub type FfiResult<T = ()> = Result<T, Failure>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_message(message: &str) {
    // An interior NUL would truncate the C string; show it instead.
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|m| *m.borrow_mut() = c);
}

/// Pointer to this thread's last message; valid until this thread's next call
/// into the library.
pub fn last_message_ptr() -> *const c_char {
    LAST_ERROR.with(|m| m.borrow().as_ptr())
}

/// Turns the outcome of an export's body into a status, recording the message.
pub fn finish(outcome: std::thread::Result<FfiResult>) -> rzc_status {
    match outcome {
        Ok(Ok(())) => {
            LAST_ERROR.with(|m| {
                if !m.borrow().is_empty() {
                    *m.borrow_mut() = CString::default();
                }
            });
            RZC_OK
        }
        Ok(Err(f)) => {
            set_message(&f.message);
            f.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_message(&format!(
                "internal error (a bug in ray-zerocopy, please report it): {what}"
            ));
            RZC_PANIC
        }
    }
}

/// Runs an export's body behind the panic boundary: a panic becomes
/// `RZC_PANIC`, an error becomes its status, and the message is recorded.
macro_rules! ffi_boundary {
    ($($body:tt)*) => {
        $crate::status::finish(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || -> $crate::status::FfiResult { $($body)* },
        )))
    };
}
pub(crate) use ffi_boundary;

/// Same boundary for the few exports that return a value instead of a status:
/// on a panic they return `$fallback`.
macro_rules! ffi_value_boundary {
    ($fallback:expr, $($body:tt)*) => {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| { $($body)* })).unwrap_or($fallback)
    };
}
pub(crate) use ffi_value_boundary;
