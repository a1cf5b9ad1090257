//! Reading this process's memory mappings from `/proc/self/maps`.

use crate::{Error, ErrorKind, Result};

/// Whether every page of `[lo, hi)` is mapped writable in this process.
/// `None` when part of the range is not mapped.
///
/// The kernel writes that file as it is read and lists mappings by address,
/// so reading stops at the first mapping past the range: a process with
/// torch loaded has hundreds of mappings, and generating all of them costs
/// about a millisecond.
pub fn writable(lo: usize, hi: usize) -> Result<Option<bool>> {
    use std::io::BufRead;
    let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("/proc/self/maps: {e}"));
    let file = std::fs::File::open("/proc/self/maps").map_err(io)?;
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
}
