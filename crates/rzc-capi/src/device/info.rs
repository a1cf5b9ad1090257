//! What an upload did (`rzc_device_weights_info`): sharing, the fallback
//! codes with their names, timing and the read-back check.

use std::ffi::c_char;

use rzc_cuda::{Sharing, Staging};

use super::{
    rzc_device_weights, RZC_STAGING_AUTO, RZC_STAGING_NONE, RZC_STAGING_PAGEABLE,
    RZC_STAGING_PINNED, RZC_STAGING_REGISTER,
};
use crate::handle::Extensible;
use crate::status::{ffi_boundary, rzc_status};

/// `rzc_device_info.sharing`: this process's own upload, shared with no one.
pub const RZC_SHARING_PRIVATE: u32 = 0;
/// `rzc_device_info.sharing`: this process uploaded the shared allocation.
pub const RZC_SHARING_UPLOADED: u32 = 1;
/// `rzc_device_info.sharing`: this process mapped the allocation another
/// process uploaded (no copy).
pub const RZC_SHARING_IMPORTED: u32 = 2;

/// `rzc_device_info.fallback`: the share happened, or none was asked for.
pub const RZC_SHARE_FALLBACK_NONE: u32 = 0;
/// The device cannot share memory between processes (no virtual memory
/// management with POSIX descriptors), or cannot say.
pub const RZC_SHARE_FALLBACK_UNSUPPORTED: u32 = 1;
/// No rendezvous directory of this user closed to others could be had.
pub const RZC_SHARE_FALLBACK_NO_DIRECTORY: u32 = 2;
/// The process serving the key runs as another user.
pub const RZC_SHARE_FALLBACK_OTHER_USER: u32 = 3;
/// The serving process accepted the connection but did not answer in time.
pub const RZC_SHARE_FALLBACK_SILENT: u32 = 4;
/// Another buffer (another content digest) is shared under the key.
pub const RZC_SHARE_FALLBACK_OTHER_CONTENT: u32 = 5;
/// The driver refused to import the shared memory.
pub const RZC_SHARE_FALLBACK_IMPORT_FAILED: u32 = 6;
/// The shared memory, read back, differed from this process's buffer.
pub const RZC_SHARE_FALLBACK_MISMATCH: u32 = 7;
/// Another process's upload was still in progress after `share_wait_ms`.
pub const RZC_SHARE_FALLBACK_WAITED: u32 = 8;
/// The lock file or the socket could not be used.
pub const RZC_SHARE_FALLBACK_RENDEZVOUS: u32 = 9;
/// Shareable device memory could not be made.
pub const RZC_SHARE_FALLBACK_NOT_SHAREABLE: u32 = 10;
/// The driver would not map the shared memory read-only in this process,
/// and `share_writable` was 0: one process's in-place write would change
/// every process's weights.
pub const RZC_SHARE_FALLBACK_NOT_READ_ONLY: u32 = 11;

/// The name of an `RZC_SHARE_FALLBACK_*` code in lower case without the
/// prefix (`"mismatch"`, ...), or NULL for an unknown code.
#[no_mangle]
pub extern "C" fn rzc_share_fallback_name(code: u32) -> *const c_char {
    let name: &'static [u8] = match code {
        RZC_SHARE_FALLBACK_NONE => b"none\0",
        RZC_SHARE_FALLBACK_UNSUPPORTED => b"unsupported\0",
        RZC_SHARE_FALLBACK_NO_DIRECTORY => b"no_directory\0",
        RZC_SHARE_FALLBACK_OTHER_USER => b"other_user\0",
        RZC_SHARE_FALLBACK_SILENT => b"silent\0",
        RZC_SHARE_FALLBACK_OTHER_CONTENT => b"other_content\0",
        RZC_SHARE_FALLBACK_IMPORT_FAILED => b"import_failed\0",
        RZC_SHARE_FALLBACK_MISMATCH => b"mismatch\0",
        RZC_SHARE_FALLBACK_WAITED => b"waited\0",
        RZC_SHARE_FALLBACK_RENDEZVOUS => b"rendezvous\0",
        RZC_SHARE_FALLBACK_NOT_SHAREABLE => b"not_shareable\0",
        RZC_SHARE_FALLBACK_NOT_READ_ONLY => b"not_read_only\0",
        _ => return std::ptr::null(),
    };
    name.as_ptr().cast()
}

/// What an upload did. Initialise as
/// `rzc_device_info i = {.struct_nbytes = sizeof(rzc_device_info)};` before
/// `rzc_device_weights_info` fills it: it may grow in later versions.
#[repr(C)]
pub struct rzc_device_info {
    /// `sizeof(rzc_device_info)` as the caller was compiled.
    pub struct_nbytes: usize,
    /// Device address of the single allocation (a `CUdeviceptr`).
    pub device_ptr: u64,
    /// Bytes of the allocation: tensor bytes plus alignment padding.
    pub nbytes: u64,
    /// Device ordinal.
    pub ordinal: i32,
    /// The `RZC_STAGING_*` mode this process used (`RZC_STAGING_NONE` when
    /// it copied nothing).
    pub staging: u32,
    /// Seconds the upload took, allocation included.
    pub seconds: f64,
    /// Host-to-device copies the upload was planned as: 1 when the source's
    /// tensors lie 256 bytes apart (buffers this project packs), else one per
    /// tensor.
    pub copies: u64,
    /// One of `RZC_SHARING_*`.
    pub sharing: u32,
    /// 1 when the device maps the memory read-only in this process.
    pub read_only: u32,
    /// Why a requested share did not happen, `note_len` bytes of UTF-8 valid
    /// while the handle lives (empty when it did, or was not asked for).
    pub note: *const c_char,
    /// Length of `note` in bytes.
    pub note_len: usize,
    /// Why a requested share did not happen, as a code: one of
    /// `RZC_SHARE_FALLBACK_*` (`RZC_SHARE_FALLBACK_NONE` when it did, or was
    /// not asked for); `rzc_share_fallback_name` names it.
    pub fallback: u32,
    /// Rendezvous directories passed over on the way to the one used, and
    /// why (`dir_note_len` bytes of UTF-8, valid while the handle lives;
    /// empty when the first choice was usable).
    pub dir_note: *const c_char,
    /// Length of `dir_note` in bytes.
    pub dir_note_len: usize,
    /// Bytes this process read back from device memory it imported, to
    /// check them against its own buffer (0 when it imported nothing).
    pub verified_nbytes: u64,
    /// Device-to-host copies that read-back took.
    pub verified_copies: u64,
}

// SAFETY: all-zero is valid (plain numbers); the first field is
// `struct_nbytes`.
unsafe impl Extensible for rzc_device_info {
    const NAME: &'static str = "rzc_device_info";
    // Callers compiled before `fallback` existed pass a shorter struct.
    const MIN_NBYTES: usize = std::mem::offset_of!(rzc_device_info, fallback);
}

/// Describes the upload (allocation, size, staging used, time taken).
///
/// # Safety
/// `dev` is a live handle; `out` points to an `rzc_device_info` whose
/// `struct_nbytes` is set.
#[no_mangle]
pub unsafe extern "C" fn rzc_device_weights_info(
    dev: *const rzc_device_weights,
    out: *mut rzc_device_info,
) -> rzc_status {
    ffi_boundary! {
        let d = borrow!(rzc_device_weights, dev);
        let out = out_extensible!(out);
        let staging = match d.staging() {
            None => RZC_STAGING_NONE,
            Some(Staging::Auto) => RZC_STAGING_AUTO,
            Some(Staging::Register) => RZC_STAGING_REGISTER,
            Some(Staging::Pinned) => RZC_STAGING_PINNED,
            Some(Staging::Pageable) => RZC_STAGING_PAGEABLE,
        };
        let sharing = match d.sharing() {
            Sharing::Private => RZC_SHARING_PRIVATE,
            Sharing::Uploaded => RZC_SHARING_UPLOADED,
            Sharing::Imported => RZC_SHARING_IMPORTED,
        };
        out.write(rzc_device_info {
            struct_nbytes: std::mem::size_of::<rzc_device_info>(),
            device_ptr: d.device_ptr(),
            nbytes: d.nbytes() as u64,
            ordinal: d.ordinal(),
            staging,
            seconds: d.seconds(),
            copies: d.copies() as u64,
            sharing,
            read_only: u32::from(d.read_only()),
            note: d.note().as_ptr().cast(),
            note_len: d.note().len(),
            fallback: d.fallback().map_or(RZC_SHARE_FALLBACK_NONE, |f| f.code()),
            dir_note: d.share_dir_note().as_ptr().cast(),
            dir_note_len: d.share_dir_note().len(),
            verified_nbytes: d.readback().map_or(0, |r| r.bytes as u64),
            verified_copies: d.readback().map_or(0, |r| r.copies as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rzc_cuda::Fallback;
    use std::ffi::CStr;

    /// The device layer's codes are the header's constants, by name.
    #[test]
    fn fallback_codes_are_the_headers() {
        let d = std::time::Duration::from_secs(1);
        let s = String::new;
        let cases = [
            (
                Fallback::Unsupported(s()),
                RZC_SHARE_FALLBACK_UNSUPPORTED,
                "unsupported",
            ),
            (
                Fallback::NoDirectory(s()),
                RZC_SHARE_FALLBACK_NO_DIRECTORY,
                "no_directory",
            ),
            (
                Fallback::OtherUser(s()),
                RZC_SHARE_FALLBACK_OTHER_USER,
                "other_user",
            ),
            (
                Fallback::Silent {
                    socket: s(),
                    waited: d,
                },
                RZC_SHARE_FALLBACK_SILENT,
                "silent",
            ),
            (
                Fallback::OtherContent,
                RZC_SHARE_FALLBACK_OTHER_CONTENT,
                "other_content",
            ),
            (
                Fallback::ImportFailed(s()),
                RZC_SHARE_FALLBACK_IMPORT_FAILED,
                "import_failed",
            ),
            (
                Fallback::Mismatch(s()),
                RZC_SHARE_FALLBACK_MISMATCH,
                "mismatch",
            ),
            (Fallback::Waited(d), RZC_SHARE_FALLBACK_WAITED, "waited"),
            (
                Fallback::Rendezvous(s()),
                RZC_SHARE_FALLBACK_RENDEZVOUS,
                "rendezvous",
            ),
            (
                Fallback::NotShareable(s()),
                RZC_SHARE_FALLBACK_NOT_SHAREABLE,
                "not_shareable",
            ),
            (
                Fallback::NotReadOnly(s()),
                RZC_SHARE_FALLBACK_NOT_READ_ONLY,
                "not_read_only",
            ),
        ];
        for (f, code, name) in cases {
            assert_eq!(f.code(), code, "{f:?}");
            // SAFETY: a static NUL-terminated string for every known code.
            let got = unsafe { CStr::from_ptr(rzc_share_fallback_name(code)) };
            assert_eq!(got.to_str().unwrap(), name);
        }
        assert!(rzc_share_fallback_name(99).is_null());
    }
}
