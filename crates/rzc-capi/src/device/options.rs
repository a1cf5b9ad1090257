//! The options of `rzc_device_weights_upload` and the staging modes.

use std::ffi::{c_char, c_void};

use rzc_cuda::{ShareOptions, Staging, UploadOptions};

use crate::handle::{str_n, Extensible};
use crate::status::{Failure, FfiResult, RZC_INVALID_ARGUMENT};
use crate::weights::rzc_digest;

/// Let the library choose: register the source, fall back to pinned bounce
/// buffers when the driver refuses.
pub const RZC_STAGING_AUTO: u32 = 0;
/// Register (page-lock) the source in place, read-only where supported.
pub const RZC_STAGING_REGISTER: u32 = 1;
/// Copy through pinned bounce buffers filled by several threads.
pub const RZC_STAGING_PINNED: u32 = 2;
/// Copy straight from pageable memory (slow; for comparison).
pub const RZC_STAGING_PAGEABLE: u32 = 3;
/// Reported by `rzc_device_weights_info` only: this process copied nothing,
/// it mapped memory another process uploaded (`RZC_SHARING_IMPORTED`).
pub const RZC_STAGING_NONE: u32 = 4;

/// Options of `rzc_device_weights_upload`. Initialise as
/// `rzc_upload_options o = {.struct_nbytes = sizeof(rzc_upload_options)};`
/// (every other field zero: its default), then set what you need.
#[repr(C)]
pub struct rzc_upload_options {
    /// `sizeof(rzc_upload_options)` as the caller was compiled: lets the
    /// struct grow in later versions without breaking callers.
    pub struct_nbytes: usize,
    /// Bytes per chunk (registration unit, bounce buffer size); 0 = 64 MiB.
    pub chunk_nbytes: u64,
    /// One of `RZC_STAGING_*`; 0 = `RZC_STAGING_AUTO`.
    pub staging: u32,
    /// Host threads registering or filling bounce buffers; 0 = up to 8.
    pub threads: u32,
    /// A `CUstream` to copy on, or NULL for a private one. Either way the
    /// copy has completed when `rzc_device_weights_upload` returns.
    pub stream: *mut c_void,
    /// Share one device allocation with every process of this user on this
    /// machine that uploads the same buffer under the same key (`share_key_len`
    /// bytes of UTF-8) to the same physical GPU; NULL for a private upload.
    /// Where sharing does not apply (no virtual memory management, another
    /// buffer under the key, ...) the upload is private and
    /// `rzc_device_info.note` says why.
    pub share_key: *const c_char,
    /// Length of `share_key` in bytes.
    pub share_key_len: usize,
    /// Milliseconds to wait for another process's upload in progress under
    /// the same key before uploading privately; 0 = 30000.
    pub share_wait_ms: u32,
    /// The buffer's content digest (`rzc_weights_content_digest`) when the
    /// caller already knows it, or NULL: it is then computed from every byte.
    /// Processes share only when their digests are equal.
    pub share_digest: *const rzc_digest,
    /// A directory to meet the other processes in (`share_dir_len` bytes of
    /// UTF-8), tried after `$XDG_RUNTIME_DIR/ray-zerocopy`; NULL for the
    /// default. It is used only if it is a directory of this user closed to
    /// others (created mode 0700 when missing).
    pub share_dir: *const c_char,
    /// Length of `share_dir` in bytes.
    pub share_dir_len: usize,
    /// Nonzero: share even where the device maps the memory writable in some
    /// process, so that one process's in-place write changes every process's
    /// weights. 0 (the default): every process that shares maps the memory
    /// read-only; where the driver will not, the upload is private
    /// (`RZC_SHARE_FALLBACK_NOT_READ_ONLY`). Uploads that allow writable
    /// sharing never share with uploads that do not.
    pub share_writable: u32,
}

// SAFETY: all-zero is valid (defaults, NULL stream); the first field is
// `struct_nbytes`.
unsafe impl Extensible for rzc_upload_options {
    const NAME: &'static str = "rzc_upload_options";
    // Callers compiled before `share_digest` existed pass a shorter struct.
    const MIN_NBYTES: usize = std::mem::offset_of!(rzc_upload_options, share_digest);
}

impl rzc_upload_options {
    /// The device layer's options.
    ///
    /// # Safety
    /// `share_key`, `share_digest` and `share_dir` are NULL or valid for
    /// their lengths.
    pub(super) unsafe fn to_rust(&self) -> FfiResult<UploadOptions> {
        let mut opts = UploadOptions::default();
        if self.chunk_nbytes != 0 {
            opts.chunk_bytes = usize::try_from(self.chunk_nbytes)
                .map_err(|_| Failure::new(RZC_INVALID_ARGUMENT, "chunk_nbytes too large"))?;
        }
        if self.threads != 0 {
            opts.threads = self.threads as usize;
        }
        opts.staging = match self.staging {
            RZC_STAGING_AUTO => Staging::Auto,
            RZC_STAGING_REGISTER => Staging::Register,
            RZC_STAGING_PINNED => Staging::Pinned,
            RZC_STAGING_PAGEABLE => Staging::Pageable,
            other => {
                return Err(Failure::new(
                    RZC_INVALID_ARGUMENT,
                    format!("unknown staging mode {other}"),
                ))
            }
        };
        opts.stream = self.stream.cast();
        if !self.share_key.is_null() || self.share_key_len != 0 {
            // SAFETY: this function's contract.
            opts.share = Some(unsafe { self.share()? });
        }
        Ok(opts)
    }

    /// The sharing options (a key is given).
    ///
    /// # Safety
    /// As for [`Self::to_rust`].
    unsafe fn share(&self) -> FfiResult<ShareOptions> {
        // SAFETY: this function's contract.
        let key = unsafe { str_n(self.share_key, self.share_key_len, "share_key")? };
        let wait_ms = if self.share_wait_ms == 0 {
            30_000
        } else {
            self.share_wait_ms
        };
        // SAFETY: this function's contract: NULL or a valid digest.
        let digest = unsafe { self.share_digest.as_ref() }.map(|d| d.bytes);
        let dir = if self.share_dir.is_null() && self.share_dir_len == 0 {
            None
        } else {
            // SAFETY: this function's contract.
            let dir = unsafe { str_n(self.share_dir, self.share_dir_len, "share_dir")? };
            Some(std::path::PathBuf::from(dir))
        };
        Ok(ShareOptions {
            key: key.to_owned(),
            wait: std::time::Duration::from_millis(wait_ms.into()),
            digest,
            dir,
            writable: self.share_writable != 0,
        })
    }
}
