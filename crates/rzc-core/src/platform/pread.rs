//! Reading a file into memory at a given offset, for the sealer's fills.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Reads `dst.len()` bytes at offset `at` of the open file `fd` into `dst`
/// with pread(2), or says why it cannot: a file that ends first (shorter
/// than its header says, or cut short while it is read) is an error that
/// gives the file's size, not a short tensor. `at + dst.len()` is at most
/// `i64::MAX` (pread takes a signed offset).
pub fn read_exact_at(fd: BorrowedFd<'_>, dst: &mut [u8], at: u64) -> Result<(), String> {
    let (raw, n) = (fd.as_raw_fd(), dst.len());
    let mut done = 0;
    while done < n {
        let pos = at + done as u64;
        // SAFETY: `n - done` writable bytes at `dst + done`, borrowed
        // exclusively; the kernel checks the descriptor.
        let got = unsafe {
            libc::pread(
                raw,
                dst[done..].as_mut_ptr().cast(),
                n - done,
                pos as libc::off_t,
            )
        };
        match got {
            0 => {
                let size = match fstat(raw) {
                    Ok(st) => format!("is {} bytes long", st.st_size),
                    Err(_) => format!("ended at byte {pos}"),
                };
                return Err(format!(
                    "the file {size}: it is shorter than its header says, or was cut short \
                     while it was read"
                ));
            }
            k if k > 0 => done += k as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(format!("cannot read it at offset {pos}: {e}"));
                }
            }
        }
    }
    Ok(())
}

/// Whether `fd` can be read with pread(2) at all: open for reading (not
/// `O_PATH`), and a regular file or a block device (a pipe, a socket or a
/// directory fails every pread). Checked before a fill takes its tensors: a
/// failed read part-way leaves the buffer incomplete, and the sealer
/// refuses to go on.
pub fn readable(fd: BorrowedFd<'_>) -> Result<(), String> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL takes no argument; the kernel checks the descriptor.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(format!(
            "{raw} is not open: {}",
            std::io::Error::last_os_error()
        ));
    }
    if flags & libc::O_ACCMODE == libc::O_WRONLY {
        return Err(format!("{raw} is open for writing only"));
    }
    if flags & libc::O_PATH != 0 {
        // Its access mode reads as read-only, and fstat works; pread does not.
        return Err(format!(
            "{raw} is an O_PATH descriptor, which cannot be read"
        ));
    }
    let st = fstat(raw).map_err(|e| format!("{raw} cannot be examined: {e}"))?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFBLK => Ok(()),
        libc::S_IFDIR => Err(format!("{raw} is a directory, not a file")),
        _ => Err(format!("{raw} is not a regular file (a pipe, a socket or a device cannot be read at an offset)")),
    }
}

/// fstat(2) of the open descriptor `raw`.
fn fstat(raw: std::os::fd::RawFd) -> std::io::Result<libc::stat> {
    // SAFETY: a plain C struct, all zeros a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the struct it is given; the kernel checks
    // the descriptor.
    if unsafe { libc::fstat(raw, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}
