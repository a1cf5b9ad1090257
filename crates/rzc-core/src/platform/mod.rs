//! What the core needs from the operating system to guard shared weights:
//! page protection ([`WriteGuard`]) with a read-only re-mapping of shared
//! memory ([`descriptor`] finds the file), a SIGSEGV handler that explains a write
//! the guard stopped ([`fault`]), reading this process's mappings
//! ([`maps`]), and reading a file at an offset for the sealer ([`pread`]).
//! Linux only, like Ray's shared-memory object store.
//!
//! This is one of the core's four places with `unsafe` code (see `lib.rs`):
//! every libc call is here.

mod descriptor;
mod fault;
mod maps;
mod pread;
mod protect;

pub use pread::{read_exact_at, readable};
pub use protect::{GuardState, WriteGuard};

/// The size of a memory page.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}
