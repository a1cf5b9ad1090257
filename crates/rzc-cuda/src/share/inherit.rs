//! Descriptors a forked child must not keep: the serving lock and the
//! listening socket.
//!
//! A process that serves a device copy may fork (Python's multiprocessing,
//! a DataLoader's workers) without exec, so `O_CLOEXEC` does not apply. The
//! child gets a copy of every descriptor but not the thread that serves:
//! once the parent dies, the child would still hold the lock (an `flock`
//! belongs to the open file, which the child's copy keeps open) and the
//! socket, queueing connections nobody answers. Loaders would then give up
//! after 2 s as if the server were stuck, and no process that maps the
//! memory could take serving over. So a child closes them as it starts
//! (`pthread_atfork`), before the fork returns in it.
//!
//! The descriptors are kept in a fixed table of atomics: the child's handler
//! runs where only async-signal-safe calls are allowed (no lock, no
//! allocation).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

/// Room for the lock and socket of 128 device copies served at once; a
/// descriptor beyond that is not registered, and a child keeps it (as it
/// did before this table existed).
const SLOTS: usize = 256;
const FREE: RawFd = -1;
static HELD: [AtomicI32; SLOTS] = [const { AtomicI32::new(FREE) }; SLOTS];

/// `inner`, whose descriptor a process forked from this one closes at once.
pub struct NotInherited<T: AsRawFd> {
    inner: T,
    slot: Option<usize>,
}

impl<T: AsRawFd> NotInherited<T> {
    pub fn new(inner: T) -> NotInherited<T> {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            // SAFETY: registers a child handler that only swaps atomics and
            // calls close(2), both async-signal-safe.
            unsafe { libc::pthread_atfork(None, None, Some(close_in_child)) };
        });
        let fd = inner.as_raw_fd();
        let slot = HELD.iter().position(|s| {
            s.compare_exchange(FREE, fd, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        NotInherited { inner, slot }
    }

    pub fn get(&self) -> &T {
        &self.inner
    }
}

impl<T: AsRawFd> Drop for NotInherited<T> {
    fn drop(&mut self) {
        // Out of the table before `inner` closes the descriptor (fields drop
        // after this): a fork in between closes nothing that was reused.
        if let Some(i) = self.slot {
            HELD[i].store(FREE, Ordering::Release);
        }
    }
}

extern "C" fn close_in_child() {
    for s in &HELD {
        let fd = s.swap(FREE, Ordering::AcqRel);
        if fd != FREE {
            // SAFETY: a descriptor the parent held when it forked; this
            // child's copy of it is closed once (its slot is now free).
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child forked while a descriptor is registered does not have it; the
    /// parent keeps it, and a dropped one is out of the table.
    #[test]
    fn a_forked_child_closes_what_is_registered() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let held = NotInherited::new(a);
        let fd = held.get().as_raw_fd();
        let slot = held.slot.expect("a free slot");
        // SAFETY: the child only calls fcntl and _exit (async-signal-safe).
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                let open = libc::fcntl(fd, libc::F_GETFD) != -1;
                libc::_exit(if open { 1 } else { 0 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child kept it"
        );
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags, -1, "the parent lost it");
        drop(held);
        // Its slot freed (another thread may have taken it since, with
        // another descriptor: never this one, which the drop closed last).
        assert_ne!(HELD[slot].load(Ordering::Acquire), fd);
    }
}
