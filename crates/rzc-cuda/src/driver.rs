//! Panic-free access to the CUDA driver: is the library there, driver errors
//! as errors of the right class, devices, and the primary context.
//!
//! Calls go through cudarc's `result` layer, which checks every `CUresult`;
//! the raw `sys` layer is used only where `result` has no function (pushing
//! and popping contexts, host registration, virtual memory management).
//! cudarc loads libcuda lazily and panics when it is absent (and when a
//! symbol is missing from an old driver), so every entry point first checks
//! that the library loads, and the callers keep a panic boundary around
//! driver calls.

use std::sync::OnceLock;

use crate::error::{Error, ErrorKind, Result};
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys::{self, CUresult};

/// Whether libcuda could be loaded in this process (checked once).
pub fn library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the driver library.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// Text of a driver error: its name and description.
fn describe(e: DriverError) -> String {
    let text = |s: std::result::Result<&std::ffi::CStr, DriverError>| {
        s.map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into())
    };
    format!("{} ({})", text(e.error_name()), text(e.error_string()))
}

/// The error class of a driver error.
fn kind(r: CUresult) -> ErrorKind {
    use sys::cudaError_enum::*;
    match r {
        CUDA_ERROR_OUT_OF_MEMORY => ErrorKind::OutOfMemory,
        CUDA_ERROR_NO_DEVICE | CUDA_ERROR_NOT_INITIALIZED | CUDA_ERROR_STUB_LIBRARY => {
            ErrorKind::NoCuda
        }
        CUDA_ERROR_INVALID_DEVICE => ErrorKind::BadDevice,
        _ => ErrorKind::Cuda,
    }
}

/// A driver error as an error of the matching class; `what` names the
/// failed operation.
pub fn error(e: DriverError, what: &str) -> Error {
    Error::new(kind(e.0), format!("{what} failed: {}", describe(e)))
}

/// `Result` of a `result`-layer call, with the failed operation named.
pub trait Checked<T> {
    /// Turns a driver error into ours, saying that `what` failed.
    fn or_fail(self, what: &str) -> Result<T>;
}

impl<T> Checked<T> for std::result::Result<T, DriverError> {
    fn or_fail(self, what: &str) -> Result<T> {
        self.map_err(|e| error(e, what))
    }
}

impl Checked<()> for CUresult {
    fn or_fail(self, what: &str) -> Result<()> {
        self.result().or_fail(what)
    }
}

/// Loads and initialises the driver, or says why it cannot.
pub fn init() -> Result<()> {
    if !library_present() {
        return Err(Error::new(
            ErrorKind::NoCuda,
            "no CUDA driver: libcuda.so could not be loaded in this process (no NVIDIA driver, or it is not on the library path)",
        ));
    }
    static INIT: OnceLock<std::result::Result<(), (ErrorKind, String)>> = OnceLock::new();
    INIT.get_or_init(|| {
        result::init()
            .or_fail("cuInit")
            .map_err(|e| (e.kind(), e.message().to_owned()))
    })
    .clone()
    .map_err(|(k, m)| Error::new(k, m))
}

/// Number of CUDA devices visible to this process.
pub fn device_count() -> Result<i32> {
    init()?;
    result::device::get_count().or_fail("cuDeviceGetCount")
}

/// The device handle of `ordinal`, checked against the device count.
pub fn device(ordinal: i32) -> Result<sys::CUdevice> {
    let n = device_count()?;
    if n == 0 {
        return Err(Error::new(
            ErrorKind::NoCuda,
            "the CUDA driver reports no device",
        ));
    }
    if ordinal < 0 || ordinal >= n {
        return Err(Error::new(
            ErrorKind::BadDevice,
            format!("device ordinal {ordinal} is out of range: this process sees {n} CUDA device(s) (0..{})", n - 1),
        ));
    }
    result::device::get(ordinal).or_fail("cuDeviceGet")
}

/// A retained primary context: the one the CUDA runtime (torch, JAX, CuPy)
/// uses, so memory allocated in it is theirs to use. Released on drop.
#[derive(Debug)]
pub struct PrimaryContext {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    ordinal: i32,
}

// SAFETY: a CUDA context handle may be made current on any thread; this type
// only ever pushes it for the duration of a call.
unsafe impl Send for PrimaryContext {}
// SAFETY: as above; shared references only push and pop it.
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    /// Retains device `ordinal`'s primary context.
    pub fn retain(ordinal: i32) -> Result<PrimaryContext> {
        let dev = device(ordinal)?;
        // SAFETY: `dev` came from `cuDeviceGet`.
        let ctx =
            unsafe { result::primary_ctx::retain(dev) }.or_fail("cuDevicePrimaryCtxRetain")?;
        Ok(PrimaryContext { dev, ctx, ordinal })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// Runs `f` with this context current on the calling thread, restoring
    /// whatever was current before.
    pub fn with<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: `ctx` is retained (valid until drop); `result` has no push.
        unsafe { sys::cuCtxPushCurrent_v2(self.ctx) }.or_fail("cuCtxPushCurrent")?;
        let out = f();
        let mut popped = std::ptr::null_mut();
        // SAFETY: pops what was pushed above, on the same thread.
        let pop = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) }.or_fail("cuCtxPopCurrent");
        out.and_then(|v| pop.map(|_| v))
    }

    /// An integer attribute of the device.
    pub fn attribute(&self, attr: sys::CUdevice_attribute) -> Result<i32> {
        // SAFETY: `dev` came from `cuDeviceGet`.
        unsafe { result::device::get_attribute(self.dev, attr) }.or_fail("cuDeviceGetAttribute")
    }
}

impl PrimaryContext {
    /// The device's UUID: the same physical GPU has the same UUID in every
    /// process, whatever its ordinal there (`CUDA_VISIBLE_DEVICES`).
    pub fn uuid(&self) -> Result<[u8; 16]> {
        let u = result::device::get_uuid(self.dev).or_fail("cuDeviceGetUuid")?;
        Ok(u.bytes.map(|b| b as u8))
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `retain`. An error (the driver shut
        // down at exit) has nowhere to go.
        let _ = unsafe { result::primary_ctx::release(self.dev) };
    }
}
