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
//! Every candidate is opened `O_RDONLY` (a fresh open of the file, whatever
//! the mode of the descriptor it comes through) and kept only if `fstat`
//! names the mapping's file: the check after the open closes the window in
//! which a descriptor number is closed and reused.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

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
    sources.iter().find_map(|source| match source {
        Source::OwnFds => in_fd_dir(Path::new("/proc/self/fd"), vma),
        Source::ParentFds => {
            // SAFETY: getppid has no preconditions.
            let ppid = unsafe { libc::getppid() };
            in_fd_dir(Path::new(&format!("/proc/{ppid}/fd")), vma)
        }
        Source::MapFiles => open_if_same(
            Path::new(&format!(
                "/proc/self/map_files/{:x}-{:x}",
                vma.start, vma.end
            )),
            vma,
        ),
    })
}

fn in_fd_dir(dir: &Path, vma: &Vma) -> Option<File> {
    std::fs::read_dir(dir).ok()?.find_map(|entry| {
        let path = entry.ok()?.path();
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
