//! Thin, panic-free access to the CUDA driver: is the library there, turn
//! `CUresult`s into errors of the right class, run work with a device's
//! primary context current.
//!
//! cudarc loads libcuda lazily and panics when it is absent (and when a symbol
//! is missing from an old driver), so every entry point first checks that the
//! library loads and the callers keep a panic boundary around driver calls.

use std::ffi::CStr;
use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUresult};
use rzc_core::{Error, ErrorKind, Result};

/// Whether libcuda could be loaded in this process (checked once).
pub fn library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the driver library.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// Text of a driver error: its name and description.
fn describe(r: CUresult) -> String {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver writes pointers to static strings, or leaves them NULL.
    unsafe {
        sys::cuGetErrorName(r, &mut name);
        sys::cuGetErrorString(r, &mut text);
    }
    let s = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::from("?")
        } else {
            // SAFETY: non-NULL, NUL-terminated static string from the driver.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    format!("{} ({})", s(name), s(text))
}

/// Turns a `CUresult` into an error of the matching class; `what` names the
/// failed operation.
pub fn check(r: CUresult, what: &str) -> Result<()> {
    use sys::cudaError_enum::*;
    let kind = match r {
        CUDA_SUCCESS => return Ok(()),
        CUDA_ERROR_OUT_OF_MEMORY => ErrorKind::OutOfMemory,
        CUDA_ERROR_NO_DEVICE | CUDA_ERROR_NOT_INITIALIZED | CUDA_ERROR_STUB_LIBRARY => {
            ErrorKind::NoCuda
        }
        CUDA_ERROR_INVALID_DEVICE => ErrorKind::BadDevice,
        _ => ErrorKind::Cuda,
    };
    Err(Error::new(kind, format!("{what} failed: {}", describe(r))))
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
    // SAFETY: cuInit(0) may be called any number of times.
    INIT.get_or_init(|| {
        check(unsafe { sys::cuInit(0) }, "cuInit").map_err(|e| (e.kind(), e.message().to_owned()))
    })
    .clone()
    .map_err(|(k, m)| Error::new(k, m))
}

/// Number of CUDA devices visible to this process.
pub fn device_count() -> Result<i32> {
    init()?;
    let mut n = 0;
    // SAFETY: writes one int.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    Ok(n)
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
    let mut dev = 0;
    // SAFETY: ordinal checked above.
    check(
        unsafe { sys::cuDeviceGet(&mut dev, ordinal) },
        "cuDeviceGet",
    )?;
    Ok(dev)
}

/// A retained primary context: the one the CUDA runtime (torch, JAX, CuPy)
/// uses, so memory allocated in it is theirs to use. Released on drop.
pub struct PrimaryContext {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUDA context handle may be used from any thread.
unsafe impl Send for PrimaryContext {}
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    /// Retains device `ordinal`'s primary context.
    pub fn retain(ordinal: i32) -> Result<PrimaryContext> {
        let dev = device(ordinal)?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: `dev` is a valid device.
        check(
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        Ok(PrimaryContext { dev, ctx })
    }

    /// Runs `f` with this context current on the calling thread, restoring
    /// whatever was current before.
    pub fn with<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: `ctx` is retained and valid.
        check(
            unsafe { sys::cuCtxPushCurrent_v2(self.ctx) },
            "cuCtxPushCurrent",
        )?;
        let out = f();
        let mut popped = std::ptr::null_mut();
        // SAFETY: pops what we pushed.
        let pop = check(
            unsafe { sys::cuCtxPopCurrent_v2(&mut popped) },
            "cuCtxPopCurrent",
        );
        out.and_then(|v| pop.map(|_| v))
    }

    /// An integer attribute of the device.
    pub fn attribute(&self, attr: sys::CUdevice_attribute) -> Result<i32> {
        let mut v = 0;
        // SAFETY: writes one int.
        check(
            unsafe { sys::cuDeviceGetAttribute(&mut v, attr, self.dev) },
            "cuDeviceGetAttribute",
        )?;
        Ok(v)
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `retain`.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}
