//! Finding a read-only descriptor of the file behind a shared mapping.
//!
//! Ray's plasma client maps the object store's file and closes it, and the
//! file is unlinked: no path names it and this process holds no descriptor
//! of it. Other ways reach the same file: the raylet, which starts every
//! Ray worker, holds it open, and `/proc/PID/fd/N` of a process of the same
//! user opens with ptrace READ access only (which Yama does not restrict);
//! `/proc/self/map_files` opens the mapping itself but needs
//! `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`.
//!
//! A descriptor directory is searched by name first: `readlink` of
//! `/proc/PID/fd/N` gives the name the kernel keeps for the open file
//! without reaching the file system that holds it, and only a descriptor
//! named like the mapping's file goes further. A `stat` or an `open` of any
//! other would reach its file system, and one on a hung NFS or FUSE mount
//! (gcsfuse in a Ray Data worker) blocks. The mapping's name comes from
//! `readlink` of `/proc/self/map_files/<start>-<end>` (allowed without
//! privileges since Linux 4.3), else from its line of `/proc/self/maps`;
//! without a name no descriptor directory is searched. A descriptor that
//! reaches the file under another name (a hard link, a bind mount) is not
//! found; the raylet's descriptor and a worker's mapping are the same open
//! file (passed over a Unix socket), so their names agree.
//!
//! Every candidate is opened `O_RDONLY` (a fresh open of the file, whatever
//! the mode of the descriptor it comes through) and kept only if `fstat`
//! names the mapping's file (device and inode): the name only narrows the
//! search, and the check after the open closes the window in which a
//! descriptor number is closed and reused or its file renamed.

use std::fs::File;
use std::io::BufRead;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::maps::Vma;

/// Where to look for the file, in the order [`ALL`] tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This process's descriptors (a memfd, a file the caller keeps open).
    OwnFds,
    /// The parent process's descriptors (the raylet, for a Ray worker).
    ParentFds,
    /// `/proc/self/map_files/<start>-<end>` (root or checkpoint-restore).
    MapFiles,
}

/// Every source, cheapest and most likely first.
pub const ALL: &[Source] = &[Source::OwnFds, Source::ParentFds, Source::MapFiles];

/// A descriptor of the file `vma` maps, opened read-only, from the first of
/// `sources` that has one.
pub fn open_read_only(vma: &Vma, sources: &[Source]) -> Option<File> {
    let mut names = Names::new(vma);
    sources.iter().find_map(|source| match source {
        Source::OwnFds => names.search(Path::new("/proc/self/fd")),
        Source::ParentFds => {
            // SAFETY: getppid has no preconditions.
            let ppid = unsafe { libc::getppid() };
            names.search(Path::new(&format!("/proc/{ppid}/fd")))
        }
        Source::MapFiles => open_if_same(&map_files(vma), vma),
    })
}

/// The names a descriptor of the mapping's file may have, each read when
/// first needed: the `map_files` link's, then, where a directory had no
/// descriptor of that name, the one on the mapping's line of `maps`. The
/// two agree on every file system but a stacked one: on overlayfs a
/// mapping's file can be named by its backing path in one and by the
/// overlay's path in the other.
struct Names<'a> {
    vma: &'a Vma,
    first: Option<Option<Name>>,
    second: Option<Option<Name>>,
}

impl<'a> Names<'a> {
    fn new(vma: &'a Vma) -> Names<'a> {
        Names {
            vma,
            first: None,
            second: None,
        }
    }

    fn search(&mut self, dir: &Path) -> Option<File> {
        let vma = self.vma;
        let first = self.first.get_or_insert_with(|| Name::of(vma));
        if let Some(found) = first.as_ref().and_then(|n| in_fd_dir(dir, n, vma)) {
            return Some(found);
        }
        if first.as_ref().is_some_and(|n| n.newlines_escaped) {
            return None; // the first name already is the maps line's
        }
        let second = self.second.get_or_insert_with(|| Name::in_maps(vma));
        in_fd_dir(dir, second.as_ref()?, vma)
    }
}

fn map_files(vma: &Vma) -> PathBuf {
    PathBuf::from(format!(
        "/proc/self/map_files/{:x}-{:x}",
        vma.start, vma.end
    ))
}

/// The name of a mapping's file as the kernel writes it (`d_path`): what a
/// `/proc/PID/fd/N` link to the same open file reads, in this process's
/// view of the mounts.
struct Name {
    path: Vec<u8>,
    /// Read from the text of `/proc/self/maps`, which writes a newline in a
    /// name as `\012` (and nothing else differently).
    newlines_escaped: bool,
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Name")
            .field("path", &String::from_utf8_lossy(&self.path))
            .field("newlines_escaped", &self.newlines_escaped)
            .finish()
    }
}

impl Name {
    /// The name of the file `vma` maps; `None` when neither
    /// `/proc/self/map_files` nor `/proc/self/maps` gives one.
    fn of(vma: &Vma) -> Option<Name> {
        match std::fs::read_link(map_files(vma)) {
            Ok(link) => Some(Name {
                path: link.into_os_string().into_vec(),
                newlines_escaped: false,
            }),
            Err(_) => Self::in_maps(vma),
        }
    }

    /// The name on the line of `/proc/self/maps` that lists `vma`.
    fn in_maps(vma: &Vma) -> Option<Name> {
        let file = File::open("/proc/self/maps").ok()?;
        let mut lines = std::io::BufReader::with_capacity(4096, file).split(b'\n');
        let path = lines.find_map(|line| {
            let line = line.ok()?;
            let ([range, _, _, dev, inode], path) = split_line(&line)?;
            let (a, b) = std::str::from_utf8(range).ok()?.split_once('-')?;
            let (a, b) = (
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            );
            let (major, minor) = std::str::from_utf8(dev).ok()?.split_once(':')?;
            let dev = (
                u32::from_str_radix(major, 16).ok()?,
                u32::from_str_radix(minor, 16).ok()?,
            );
            let inode: u64 = std::str::from_utf8(inode).ok()?.parse().ok()?;
            let listed = (a..b).contains(&vma.start) && dev == vma.dev && inode == vma.inode;
            (listed && !path.is_empty()).then(|| path.to_vec())
        })?;
        Some(Name {
            path,
            newlines_escaped: true,
        })
    }
}

/// The five fields of a line of `/proc/self/maps` and the name after them
/// (empty for anonymous memory). Fields are separated by one space, the
/// name by padding.
fn split_line(line: &[u8]) -> Option<([&[u8]; 5], &[u8])> {
    let mut rest = line;
    let mut fields: [&[u8]; 5] = [&[]; 5];
    for field in &mut fields {
        let end = rest.iter().position(|&c| c == b' ').unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        *field = &rest[..end];
        rest = &rest[end..];
        let skip = rest.iter().position(|&c| c != b' ').unwrap_or(rest.len());
        rest = &rest[skip..];
    }
    Some((fields, rest))
}

/// What the kernel appends to the name of an unlinked file.
const DELETED: &[u8] = b" (deleted)";

/// Whether a descriptor whose `/proc` link reads `link` may be one of the
/// file named `name`: the same name, but for the " (deleted)" the kernel
/// appends once the file is unlinked (which it may have been between the
/// two readings). Sockets, pipes and other files never match; two files of
/// the same name may (memfds, a file replaced under its name), which the
/// device and inode tell apart.
fn may_name(link: &[u8], name: &Name) -> bool {
    fn bare(mut p: &[u8]) -> &[u8] {
        while let Some(q) = p.strip_suffix(DELETED) {
            p = q;
        }
        p
    }
    if name.newlines_escaped && link.contains(&b'\n') {
        let escaped = link
            .split(|&c| c == b'\n')
            .collect::<Vec<_>>()
            .join(&b"\\012"[..]);
        return bare(&escaped) == bare(&name.path);
    }
    bare(link) == bare(&name.path)
}

#[cfg(test)]
thread_local! {
    /// How many descriptors this thread's searches stat'ed.
    static STATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn in_fd_dir(dir: &Path, name: &Name, vma: &Vma) -> Option<File> {
    std::fs::read_dir(dir).ok()?.find_map(|entry| {
        let path = entry.ok()?.path();
        // readlink of a /proc link reads the name the kernel keeps; stat or
        // open would reach the file's file system, which may hang.
        let link = std::fs::read_link(&path).ok()?;
        if !may_name(link.as_os_str().as_bytes(), name) {
            return None;
        }
        #[cfg(test)]
        STATED.with(|n| n.set(n.get() + 1));
        // stat through the link names the file it leads to, without opening
        // it (opening a device or a FIFO could have effects).
        let meta = std::fs::metadata(&path).ok()?;
        if !same_file(&meta, vma) {
            return None;
        }
        open_if_same(&path, vma)
    })
}

fn open_if_same(path: &Path, vma: &Vma) -> Option<File> {
    // O_NONBLOCK and O_NOCTTY: should the number have been reused for a FIFO
    // or a terminal since the stat, opening it neither blocks nor adopts it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    same_file(&file.metadata().ok()?, vma).then_some(file)
}

fn same_file(meta: &std::fs::Metadata, vma: &Vma) -> bool {
    meta.file_type().is_file()
        && meta.ino() == vma.inode
        && (libc::major(meta.dev()), libc::minor(meta.dev())) == vma.dev
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn name(path: &[u8], newlines_escaped: bool) -> Name {
        Name {
            path: path.to_vec(),
            newlines_escaped,
        }
    }

    #[test]
    fn a_link_matches_the_name_of_the_mapping_only() {
        let plasma = name(b"/dev/shm/plasmaXYZ (deleted)", false);
        assert!(may_name(b"/dev/shm/plasmaXYZ (deleted)", &plasma));
        // Unlinked between the two readings, either way round.
        assert!(may_name(b"/dev/shm/plasmaXYZ", &plasma));
        assert!(may_name(
            b"/dev/shm/plasmaXYZ (deleted)",
            &name(b"/dev/shm/plasmaXYZ", false)
        ));
        assert!(may_name(
            b"/dev/shm/plasmaXYZ",
            &name(b"/dev/shm/plasmaXYZ", false)
        ));
        // A name that itself ends in " (deleted)", unlinked or not.
        let odd = name(b"/tmp/x (deleted) (deleted)", false);
        assert!(may_name(b"/tmp/x (deleted) (deleted)", &odd));
        assert!(may_name(b"/tmp/x (deleted)", &odd));
        for other in [
            &b"/dev/shm/plasmaXY (deleted)"[..],
            b"/dev/shm/plasmaXYZ2 (deleted)",
            b"/dev/shm/plasmaXYZ (deleted)x",
            b"/mnt/gcs/data.parquet",
            b"/dev/shm/plasmaXYZ(deleted)",
            b"socket:[12345]",
            b"pipe:[678]",
            b"anon_inode:[eventfd]",
            b"/dev/null",
            b"",
        ] {
            assert!(
                !may_name(other, &plasma),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        let memfd = name(b"/memfd:rzc (deleted)", false);
        assert!(may_name(b"/memfd:rzc (deleted)", &memfd));
        assert!(!may_name(b"/memfd:rzc2 (deleted)", &memfd));
        // /proc/self/maps writes a newline in a name as \012; a link does not.
        let from_maps = name(b"/dev/shm/a\\012b (deleted)", true);
        assert!(may_name(b"/dev/shm/a\nb (deleted)", &from_maps));
        assert!(may_name(b"/dev/shm/a\\012b (deleted)", &from_maps));
        assert!(!may_name(
            b"/dev/shm/a\nb (deleted)",
            &name(b"/dev/shm/a\\012b", false)
        ));
        assert!(!may_name(b"/dev/shm/a\nc", &from_maps));
    }

    #[test]
    fn splits_a_line_of_maps() {
        let line =
            b"7f00-7f10 rw-s 00003000 fd:1b 123                       /dev/shm/a b (deleted)";
        let (fields, path) = split_line(line).unwrap();
        assert_eq!(
            fields,
            [&b"7f00-7f10"[..], b"rw-s", b"00003000", b"fd:1b", b"123"]
        );
        assert_eq!(path, b"/dev/shm/a b (deleted)");
        let (_, anon) = split_line(b"7f00-7f10 r-xp 00000000 00:00 0").unwrap();
        assert!(anon.is_empty());
        assert!(split_line(b"7f00-7f10 r-xp").is_none());
    }

    /// `len` bytes of `fd` mapped shared, and the mapping as the kernel
    /// lists it.
    fn map(fd: i32, len: usize) -> Vma {
        // SAFETY: maps `len` bytes of an open file shared and read-only;
        // leaked for the test's duration.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = p as usize;
        let vmas = super::super::maps::mappings(start, start + len)
            .unwrap()
            .unwrap();
        assert_eq!(vmas.len(), 1, "{vmas:?}");
        vmas[0]
    }

    fn memfd(name: &str, len: u64) -> File {
        let name = CString::new(name).unwrap();
        // SAFETY: a fresh memfd, owned by the File below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and belongs to nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    /// A name no other test uses, for memfds and files.
    fn unique(what: &str) -> String {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        format!("rzc-descriptor-{what}-{}-{n}", std::process::id())
    }

    /// Searches this process's descriptors; returns what it found and how
    /// many descriptors it stat'ed.
    fn search_own(vma: &Vma) -> (Option<File>, usize) {
        STATED.with(|n| n.set(0));
        let found = open_read_only(vma, &[Source::OwnFds]);
        (found, STATED.with(|n| n.get()))
    }

    fn inode(file: &File) -> u64 {
        file.metadata().unwrap().ino()
    }

    /// Descriptors of other files (a FIFO, a device, a socket, a pipe, a
    /// regular file, another memfd) are passed over on their name alone:
    /// only the mapping's own file is stat'ed. A stat of one on a hung
    /// NFS or FUSE mount would block the search.
    #[test]
    fn finds_a_memfd_and_stats_nothing_else() {
        let page = crate::platform::page_size();
        let dir = std::env::temp_dir().join(unique("dir"));
        std::fs::create_dir(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut pipe = [0; 2];
        // SAFETY: `pipe` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: both ends were just created and belong to nothing else.
        let _pipe = unsafe { (File::from_raw_fd(pipe[0]), File::from_raw_fd(pipe[1])) };
        let _others = (
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
                .unwrap(),
            File::open("/dev/null").unwrap(),
            std::os::unix::net::UnixDatagram::unbound().unwrap(),
            File::create(dir.join("regular")).unwrap(),
            memfd(&unique("other"), page as u64),
        );
        let file = memfd(&unique("mapped"), 2 * page as u64);
        let vma = map(file.as_raw_fd(), 2 * page);
        let (found, stated) = search_own(&vma);
        assert_eq!(found.map(|f| inode(&f)), Some(inode(&file)));
        assert_eq!(stated, 1, "only the mapping's own descriptor is stat'ed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file of the mapping's name but another inode (a memfd of the same
    /// name) is stat'ed, and the device and inode turn it down.
    #[test]
    fn a_file_of_the_same_name_is_told_apart() {
        let page = crate::platform::page_size();
        let same = unique("same");
        let decoy = memfd(&same, page as u64);
        let file = memfd(&same, page as u64);
        let vma = map(file.as_raw_fd(), page);
        let (found, stated) = search_own(&vma);
        assert_eq!(found.map(|f| inode(&f)), Some(inode(&file)));
        assert!((1..=2).contains(&stated), "{stated}");
        drop(decoy);
    }

    /// A file in /dev/shm, as Ray's object store keeps it, found by its
    /// name (read either way) before and after it is unlinked; its name
    /// has a space and a newline, which /proc/self/maps escapes.
    #[test]
    fn finds_a_shared_memory_file_before_and_after_unlink() {
        let page = crate::platform::page_size();
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("{} a\nb", unique("shm")));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(2 * page as u64).unwrap();
        let vma = map(file.as_raw_fd(), 2 * page);
        for unlinked in [false, true] {
            if unlinked {
                std::fs::remove_file(&path).unwrap();
            }
            let from_link = Name::of(&vma).unwrap();
            assert!(!from_link.newlines_escaped);
            assert_eq!(from_link.path.ends_with(DELETED), unlinked);
            let from_maps = Name::in_maps(&vma).unwrap();
            assert!(from_maps.newlines_escaped);
            for name in [&from_link, &from_maps] {
                STATED.with(|n| n.set(0));
                let found = in_fd_dir(Path::new("/proc/self/fd"), name, &vma);
                assert_eq!(found.map(|f| inode(&f)), Some(inode(&file)), "{name:?}");
                assert_eq!(STATED.with(|n| n.get()), 1, "{name:?}");
            }
            let (found, stated) = search_own(&vma);
            assert_eq!(found.map(|f| inode(&f)), Some(inode(&file)));
            assert_eq!(stated, 1);
        }
    }
}
