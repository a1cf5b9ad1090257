//! Reading this process's memory mappings from `/proc/self/maps`.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::{Error, ErrorKind, Result};

fn io(e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("/proc/self/maps: {e}"))
}

/// Whether every page of `[lo, hi)` is mapped writable in this process.
/// `None` when part of the range is not mapped.
///
/// Asks the kernel about the mappings covering the range one by one
/// (`PROCMAP_QUERY`, Linux 6.11 and later), and reads the text of
/// `/proc/self/maps` on older kernels. The text costs far more: the kernel
/// writes a line per mapping as it is read, and a process with torch loaded
/// has several hundred, so reading it took 0.2 ms of a load of about 6.
pub fn writable(lo: usize, hi: usize) -> Result<Option<bool>> {
    let file = File::open("/proc/self/maps").map_err(io)?;
    match query(&file, lo, hi) {
        Some(answer) => answer,
        None => read_text(file, lo, hi),
    }
}

/// `struct procmap_query` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR(PROCFS_IOCTL_MAGIC = 'f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 = 0xC068_6611;
/// `vma_flags` bit of a writable mapping.
const PROCMAP_QUERY_VMA_WRITABLE: u64 = 0x02;

/// [`writable`] through `PROCMAP_QUERY`; `None` when the kernel does not
/// know that request.
fn query(file: &File, lo: usize, hi: usize) -> Option<Result<Option<bool>>> {
    let mut covered = lo;
    let mut all_writable = true;
    while covered < hi {
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_addr: covered as u64,
            ..Default::default()
        };
        // SAFETY: PROCMAP_QUERY reads and writes one `struct procmap_query`,
        // whose size the struct states; the name and build-id buffers are
        // NULL with sizes 0, so the kernel writes nothing else.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                PROCMAP_QUERY as _,
                &mut q as *mut ProcmapQuery,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Some(Ok(None)), // no mapping covers `covered`
                Some(libc::ENOTTY) | Some(libc::EINVAL) if covered == lo => None, // older kernel
                _ => Some(Err(io(e))),
            };
        }
        all_writable &= q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE != 0;
        covered = q.vma_end as usize;
    }
    Some(Ok(Some(all_writable)))
}

/// [`writable`] from the text of `/proc/self/maps`. Mappings are listed by
/// address, so reading stops at the first one past the range.
fn read_text(file: File, lo: usize, hi: usize) -> Result<Option<bool>> {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::with_capacity(4096, file).lines();
    let mut covered = lo;
    let mut all_writable = true;
    while covered < hi {
        let Some(line) = lines.next() else { break };
        let line = line.map_err(io)?;
        let Some((a, b, perms)) = parse_line(&line) else {
            continue;
        };
        if a >= hi {
            break;
        }
        if b <= covered {
            continue;
        }
        if a > covered {
            return Ok(None); // a gap
        }
        covered = b;
        all_writable &= perms.get(1) == Some(&b'w');
    }
    Ok((covered >= hi).then_some(all_writable))
}

/// `(start, end, permissions)` of one line of `/proc/self/maps`
/// (`7f00-7f10 rw-s ...`).
fn parse_line(line: &str) -> Option<(usize, usize, &[u8])> {
    let mut it = line.split_whitespace();
    let (range, perms) = (it.next()?, it.next()?);
    let (a, b) = range.split_once('-')?;
    Some((
        usize::from_str_radix(a, 16).ok()?,
        usize::from_str_radix(b, 16).ok()?,
        perms.as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_line() {
        let (a, b, p) = parse_line("7f00-7f10 rw-s 00000000 00:05 123 /dev/shm/x").unwrap();
        assert_eq!((a, b, p), (0x7f00, 0x7f10, &b"rw-s"[..]));
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn sees_a_writable_stack_and_an_unmapped_range() {
        let x = 5u64;
        let addr = &x as *const u64 as usize;
        assert_eq!(writable(addr, addr + 8).unwrap(), Some(true));
        assert_eq!(writable(8, 16).unwrap(), None, "page zero is never mapped");
    }

    /// The ioctl and the text agree, on writable, read-only, partly unmapped
    /// and multi-mapping ranges.
    #[test]
    fn the_query_and_the_text_agree() {
        let page = crate::platform::page_size();
        // SAFETY: a fresh anonymous mapping of 3 pages, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        assert_ne!(base, libc::MAP_FAILED as usize);
        // Middle page read-only: three mappings; last page unmapped.
        // SAFETY: pages of the mapping just made.
        unsafe {
            assert_eq!(
                libc::mprotect((base + page) as *mut _, page, libc::PROT_READ),
                0
            );
            assert_eq!(libc::munmap((base + 2 * page) as *mut _, page), 0);
        }
        let ranges = [
            (base, base + page, Some(true)),
            (base + page, base + 2 * page, Some(false)),
            (base, base + 2 * page, Some(false)),
            (base, base + 3 * page, None),
        ];
        let file = File::open("/proc/self/maps").unwrap();
        let ioctl_works = query(&file, base, base + page).is_some();
        for (lo, hi, expected) in ranges {
            let text = read_text(File::open("/proc/self/maps").unwrap(), lo, hi).unwrap();
            assert_eq!(text, expected, "text, [{lo:#x}, {hi:#x})");
            if ioctl_works {
                assert_eq!(
                    query(&file, lo, hi).unwrap().unwrap(),
                    expected,
                    "ioctl, [{lo:#x}, {hi:#x})"
                );
            }
        }
        if !ioctl_works {
            eprintln!(
                "PROCMAP_QUERY is not supported by this kernel: only the text path was checked"
            );
        }
        // SAFETY: the two pages still mapped.
        unsafe { libc::munmap(base as *mut _, 2 * page) };
    }
}
