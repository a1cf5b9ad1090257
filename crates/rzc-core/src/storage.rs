//! Owners of the bytes an opened buffer reads: an owned vector, a mapped
//! file, or memory borrowed from the caller.
//!
//! This is one of the core's four places with `unsafe` code (see `lib.rs`):
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

/// What a file is when it is not a regular file, for messages ("a FIFO");
/// `None` for a regular file. One list for every reader of files (this
/// crate's [`map_file`], the command line tool's checks), so that they name
/// things alike.
pub fn not_regular(kind: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    Some(if kind.is_file() {
        return None;
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a file"
    })
}

/// `path` opened for reading if it is a regular file (or a link to one);
/// else an `Io` error "PATH: is a FIFO, not a regular file". The path is
/// looked at first, so that a device is refused without being opened
/// (opening some has effects); then the file is opened `O_NONBLOCK` (opening
/// a FIFO for reading otherwise waits for a writer, forever when none comes)
/// and the open descriptor, which no rename changes, is checked again.
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("{}: {e}", path.display()));
    refuse_unless_regular(path, std::fs::metadata(path).map_err(io)?.file_type())?;
    open_checked(path)
}

fn refuse_unless_regular(path: &Path, kind: std::fs::FileType) -> Result<()> {
    match not_regular(kind) {
        None => Ok(()),
        Some(what) => fail!(Io, "{}: is {what}, not a regular file", path.display()),
    }
}

/// The open and the check of the open descriptor of [`open_regular`]: what
/// a look at the path cannot stop (a FIFO put there in between).
fn open_checked(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("{}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    refuse_unless_regular(path, file.metadata().map_err(io)?.file_type())?;
    Ok(file)
}

/// Maps the file at `path` read-only. An empty file gives an empty buffer
/// (mmap refuses empty files; the parser gives the real diagnosis). Only a
/// regular file (or a link to one) is mapped ([`open_regular`]).
pub fn map_file(path: &Path) -> Result<Storage> {
    let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("{}: {e}", path.display()));
    let file = open_regular(path)?;
    let meta = file.metadata().map_err(io)?;
    if meta.len() == 0 {
        return Ok(Arc::new(Vec::new()));
    }
    // SAFETY: mapped read-only; a file changed by someone else while mapped
    // is the documented misuse, as with every mmap reader.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    Ok(Arc::new(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a look at the path cannot stop: a FIFO there when it is opened
    /// is refused at once, not waited on.
    #[test]
    fn a_fifo_is_refused_as_opened() {
        let dir = std::env::temp_dir().join(format!("rzc-core-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("model.safetensors");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(open_checked(&path).map(|_| ()));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO returned within 10 s");
        let e = got.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(
            e.message()
                .ends_with("model.safetensors: is a FIFO, not a regular file"),
            "{}",
            e.message()
        );
        let file = dir.join("index.json");
        std::fs::write(&file, "{}").unwrap();
        assert!(open_checked(&file).is_ok() && open_regular(&file).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
