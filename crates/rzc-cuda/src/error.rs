//! Errors of the device layer: the core's errors (bad argument, index out of
//! range, ...) and the device's own classes, which the core knows nothing
//! of. The C layer maps each class to one status code.

/// The class of a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No CUDA driver could be loaded, or it reports no device.
    NoCuda,
    /// The CUDA driver reported an error.
    Cuda,
    /// Device memory, or page-locked host memory, could not be allocated.
    OutOfMemory,
    /// A device ordinal that does not name a device.
    BadDevice,
    /// A failure of the core's kind (a bad argument, an index out of range, ...).
    Core(rzc_core::ErrorKind),
}

impl From<rzc_core::ErrorKind> for ErrorKind {
    fn from(k: rzc_core::ErrorKind) -> ErrorKind {
        ErrorKind::Core(k)
    }
}

/// An error with its class and a message that names the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// Makes an error of `kind` with `message`.
    pub fn new(kind: impl Into<ErrorKind>, message: impl Into<String>) -> Error {
        Error {
            kind: kind.into(),
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

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<rzc_core::Error> for Error {
    fn from(e: rzc_core::Error) -> Error {
        Error::new(e.kind(), e.message())
    }
}

/// Shorthand result type of the device layer.
pub type Result<T> = std::result::Result<T, Error>;

/// `return Err(Error::new(kind, format!(...)))`; `kind` is one of this
/// layer's kinds or a core kind.
macro_rules! fail {
    ($kind:expr, $($arg:tt)+) => {
        return Err($crate::error::Error::new($kind, format!($($arg)+)))
    };
}
pub(crate) use fail;
