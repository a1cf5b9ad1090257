//! Owners of the bytes an opened buffer reads: an owned vector, a mapped
//! file, or memory borrowed from the caller.
//!
//! This is one of the core's three places with `unsafe` code (see `lib.rs`):
//! borrowed memory is a raw pointer that the caller promises to keep valid,
//! and mapping a file is `unsafe` in memmap2 because another process could
//! change the file underneath.

use std::path::Path;
use std::sync::Arc;

use crate::{fail, Error, ErrorKind, Result};

/// Something that owns a byte buffer and keeps it at a fixed address.
pub trait Bytes: Send + Sync + 'static {
    /// The bytes; the same address every call.
    fn bytes(&self) -> &[u8];
}

/// Shared owner of an opened buffer: the handle and every exported tensor hold
/// one reference, so the bytes outlive whichever goes last.
pub type Storage = Arc<dyn Bytes>;

impl Bytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Bytes for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Memory owned by the caller, who promises to keep it alive and unchanged
/// for as long as this value (and so every handle or tensor holding it)
/// exists.
#[derive(Debug)]
pub struct Borrowed {
    ptr: *const u8,
    len: usize,
}

impl Borrowed {
    /// Borrows `len` bytes at `ptr`. NULL is accepted only with `len == 0`.
    ///
    /// # Safety
    /// The memory must stay valid for reads and unmodified until the returned
    /// value is dropped (when it is opened: until the weights and every tensor
    /// exported from them are gone).
    pub unsafe fn new(ptr: *const u8, len: usize) -> Result<Borrowed> {
        if ptr.is_null() && len != 0 {
            fail!(InvalidArgument, "data is NULL but its length is {len}");
        }
        Ok(Borrowed { ptr, len })
    }
}

// SAFETY: the memory is only ever read, and `Borrowed::new`'s caller keeps it
// valid and unchanged for the value's lifetime, whichever thread holds it.
unsafe impl Send for Borrowed {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for Borrowed {}

impl Bytes for Borrowed {
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: non-NULL (checked in `new`) and valid per `new`'s contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Maps the file at `path` read-only. An empty file gives an empty buffer
/// (mmap refuses empty files; the parser gives the real diagnosis). Only a
/// regular file (or a link to one) is mapped: the file is opened
/// `O_NONBLOCK`, since opening a FIFO for reading otherwise waits for a
/// writer, forever when none comes, and what the open descriptor is gets
/// checked before anything is read.
pub fn map_file(path: &Path) -> Result<Storage> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("{}: {e}", path.display()));
    let not_regular = |kind: std::fs::FileType| -> Result<()> {
        if kind.is_file() {
            return Ok(());
        }
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        fail!(Io, "{} is {what}, not a safetensors file", path.display());
    };
    // The path first: a device is refused without being opened (opening
    // some has effects); then the open descriptor, which no rename changes.
    not_regular(std::fs::metadata(path).map_err(io)?.file_type())?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    not_regular(meta.file_type())?;
    if meta.len() == 0 {
        return Ok(Arc::new(Vec::new()));
    }
    // SAFETY: mapped read-only; a file changed by someone else while mapped
    // is the documented misuse, as with every mmap reader.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    Ok(Arc::new(map))
}
