//! Errors of the core: a kind (which maps to one C status code) and a message
//! that names the problem. The core knows nothing of devices: the device
//! layer has its own error type, whose device kinds (no CUDA, driver error,
//! out of memory, bad device) sit next to these. The core allocates host
//! memory only through the standard library, which aborts rather than
//! reports a failure, so no host out-of-memory kind lives here either.

/// The class of a failure. Each class maps to one distinct C status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An argument is out of its documented domain (bad option, bad name).
    InvalidArgument,
    /// The bytes are not a valid safetensors buffer.
    BadFormat,
    /// Reading or mapping a file failed.
    Io,
    /// A tensor name that is not in the buffer.
    NotFound,
    /// A dtype the buffer or the caller names that this operation cannot take.
    UnsupportedDtype,
    /// A tensor index past the end of the table.
    OutOfRange,
    /// A destination smaller than the plan needs.
    BufferTooSmall,
}

/// An error with its class and a human-readable message.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// Makes an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, which names the problem.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Shorthand result type of the core.
pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error::new(kind, format!(...)))`, for early returns.
#[macro_export]
macro_rules! fail {
    ($kind:ident, $($arg:tt)+) => {
        return Err($crate::Error::new($crate::ErrorKind::$kind, format!($($arg)+)))
    };
}
