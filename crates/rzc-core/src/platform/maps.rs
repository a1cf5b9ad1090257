//! Reading this process's memory mappings from `/proc/self/maps`.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::{Error, ErrorKind, Result};

fn io(e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("/proc/self/maps: {e}"))
}

/// One mapping of this process, as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: usize,
    pub end: usize,
    /// `PROT_READ`, `PROT_WRITE`, `PROT_EXEC` bits.
    pub prot: i32,
    /// A shared mapping (`s` in `/proc/self/maps`): writes reach the backing
    /// file (or shared memory) that other processes see.
    pub shared: bool,
    /// Offset in the backing file of the mapping's first byte.
    pub offset: u64,
    /// `(major, minor)` of the backing file's device, as `stat` reports it.
    pub dev: (u32, u32),
    /// The backing file's inode; 0 for anonymous private memory.
    pub inode: u64,
}

/// The mappings covering `[lo, hi)`, in address order, each as the kernel
/// lists it (they may reach past the range). `None` when part of the range
/// is not mapped.
///
/// Asks the kernel about the mappings covering the range one by one
/// (`PROCMAP_QUERY`, Linux 6.11 and later), and reads the text of
/// `/proc/self/maps` on older kernels. The text costs far more: the kernel
/// writes a line per mapping as it is read, and a process with torch loaded
/// has several hundred, so reading it took 0.2 ms of a load of about 6.
pub fn mappings(lo: usize, hi: usize) -> Result<Option<Vec<Vma>>> {
    let file = File::open("/proc/self/maps").map_err(io)?;
    match query(&file, lo, hi) {
        Some(answer) => answer,
        None => read_text(file, lo, hi),
    }
}

/// Whether every page of `[lo, hi)` is mapped writable in this process.
/// `None` when part of the range is not mapped.
#[cfg(test)]
pub fn writable(lo: usize, hi: usize) -> Result<Option<bool>> {
    Ok(mappings(lo, hi)?.map(|v| v.iter().all(|m| m.prot & libc::PROT_WRITE != 0)))
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
/// `vma_flags` bits (`PROCMAP_QUERY_VMA_*`).
const VMA_READABLE: u64 = 0x01;
const VMA_WRITABLE: u64 = 0x02;
const VMA_EXECUTABLE: u64 = 0x04;
const VMA_SHARED: u64 = 0x08;

/// [`mappings`] through `PROCMAP_QUERY`; `None` when the kernel does not
/// know that request.
fn query(file: &File, lo: usize, hi: usize) -> Option<Result<Option<Vec<Vma>>>> {
    let mut covered = lo;
    let mut found = Vec::new();
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
        let bit = |flag: u64, prot: i32| if q.vma_flags & flag != 0 { prot } else { 0 };
        found.push(Vma {
            start: q.vma_start as usize,
            end: q.vma_end as usize,
            prot: bit(VMA_READABLE, libc::PROT_READ)
                | bit(VMA_WRITABLE, libc::PROT_WRITE)
                | bit(VMA_EXECUTABLE, libc::PROT_EXEC),
            shared: q.vma_flags & VMA_SHARED != 0,
            offset: q.vma_offset,
            dev: (q.dev_major, q.dev_minor),
            inode: q.inode,
        });
        covered = q.vma_end as usize;
    }
    Some(Ok(Some(found)))
}

/// [`mappings`] from the text of `/proc/self/maps`. Mappings are listed by
/// address, so reading stops at the first one past the range.
fn read_text(file: File, lo: usize, hi: usize) -> Result<Option<Vec<Vma>>> {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::with_capacity(4096, file).lines();
    let mut covered = lo;
    let mut found = Vec::new();
    while covered < hi {
        let Some(line) = lines.next() else { break };
        let line = line.map_err(io)?;
        let Some(vma) = parse_line(&line) else {
            continue;
        };
        if vma.start >= hi {
            break;
        }
        if vma.end <= covered {
            continue;
        }
        if vma.start > covered {
            return Ok(None); // a gap
        }
        covered = vma.end;
        found.push(vma);
    }
    Ok((covered >= hi).then_some(found))
}

/// One line of `/proc/self/maps`
/// (`7f00-7f10 rw-s 00001000 00:05 123   /dev/shm/x`).
fn parse_line(line: &str) -> Option<Vma> {
    let mut it = line.split_whitespace();
    let (range, perms, offset, dev, inode) =
        (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    let (a, b) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let perms = perms.as_bytes();
    let bit = |i: usize, c: u8, prot: i32| if perms.get(i) == Some(&c) { prot } else { 0 };
    Some(Vma {
        start: usize::from_str_radix(a, 16).ok()?,
        end: usize::from_str_radix(b, 16).ok()?,
        prot: bit(0, b'r', libc::PROT_READ)
            | bit(1, b'w', libc::PROT_WRITE)
            | bit(2, b'x', libc::PROT_EXEC),
        shared: perms.get(3) == Some(&b's'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_line() {
        let vma = parse_line("7f00-7f10 rw-s 00003000 fd:1b 123 /dev/shm/x (deleted)").unwrap();
        assert_eq!(
            vma,
            Vma {
                start: 0x7f00,
                end: 0x7f10,
                prot: libc::PROT_READ | libc::PROT_WRITE,
                shared: true,
                offset: 0x3000,
                dev: (0xfd, 0x1b),
                inode: 123,
            }
        );
        let anon = parse_line("7f00-7f10 r-xp 00000000 00:00 0").unwrap();
        assert_eq!(
            (anon.prot, anon.shared, anon.inode),
            (libc::PROT_READ | libc::PROT_EXEC, false, 0)
        );
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
            let w = text
                .as_ref()
                .map(|v| v.iter().all(|m| m.prot & libc::PROT_WRITE != 0));
            assert_eq!(w, expected, "text, [{lo:#x}, {hi:#x})");
            if ioctl_works {
                assert_eq!(
                    query(&file, lo, hi).unwrap().unwrap(),
                    text,
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

    /// A shared file mapping at an offset: both ways name the file as stat
    /// does (the descriptor search matches on it) and give the offset.
    #[test]
    fn describes_a_shared_file_mapping() {
        use std::os::unix::fs::MetadataExt;
        let page = crate::platform::page_size();
        // SAFETY: a fresh memfd, owned by the File below.
        let fd = unsafe { libc::memfd_create(c"rzc-maps-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(4 * page as u64).unwrap();
        // SAFETY: maps 2 pages of the file from its second page; unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                page as libc::off_t,
            )
        } as usize;
        assert_ne!(base, libc::MAP_FAILED as usize);
        let meta = file.metadata().unwrap();
        let expected = Vma {
            start: base,
            end: base + 2 * page,
            prot: libc::PROT_READ,
            shared: true,
            offset: page as u64,
            dev: (libc::major(meta.dev()), libc::minor(meta.dev())),
            inode: meta.ino(),
        };
        let text = read_text(File::open("/proc/self/maps").unwrap(), base, base + page).unwrap();
        assert_eq!(text, Some(vec![expected]));
        assert_eq!(mappings(base, base + page).unwrap(), Some(vec![expected]));
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(base as *mut _, 2 * page) };
    }
}
