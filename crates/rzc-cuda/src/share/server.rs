//! Serving a device copy: a thread per process that maps it, which serves
//! while it holds the lock of its (key, GPU) and otherwise waits to take the
//! lock over (so when the server dies, another mapper serves).
//!
//! Each connection is answered at once and closed: the peer's uid is
//! checked (`SO_PEERCRED`), a new descriptor of the memory is sent with the
//! 48-byte offer without blocking, and that is all. Nothing the client does
//! (never reading, never closing) can hold the server up.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use cudarc::driver::sys;

use super::inherit::NotInherited;
use super::rendezvous::{try_lock, Paths};
use super::wire::{same_user, send_offer, send_refusal, Offer};
use super::POLL;
use crate::driver::PrimaryContext;
use crate::vmm::export_fd;

/// What the serving thread exports from: the allocation's handle, valid
/// while the memory owning the server lives (the server is stopped first).
/// With `refuse`, it exports nothing and answers every connection with that
/// reason instead (memory that may not be shared).
pub struct Exporter {
    pub ctx: Arc<PrimaryContext>,
    pub handle: sys::CUmemGenericAllocationHandle,
    pub offer: Offer,
    pub refuse: Option<String>,
}

// SAFETY: a context and a physical memory handle may be used from any thread.
unsafe impl Send for Exporter {}

/// This process's share of serving. Stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts serving (with `lock` held) or waiting to serve.
    pub fn start(paths: Paths, lock: Option<NotInherited<File>>, exporter: Exporter) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rzc-share".into())
            .spawn(move || serve(paths, lock, exporter, &flag))
            .ok();
        Server { stop, thread }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    paths: Paths,
    mut lock: Option<NotInherited<File>>,
    exporter: Exporter,
    stop: &AtomicBool,
) {
    let mut failed_binds = 0;
    while !stop.load(Ordering::Acquire) {
        if lock.is_none() {
            lock = try_lock(&paths.lock).ok().flatten().map(NotInherited::new);
            if lock.is_none() {
                std::thread::sleep(POLL);
                continue;
            }
        }
        // We hold the lock: whatever socket file is there is a dead server's.
        let _ = std::fs::remove_file(&paths.sock);
        let Ok(listener) = UnixListener::bind(&paths.sock).map(NotInherited::new) else {
            // Holding the lock without a socket would make every loader
            // wait out its whole wait: after a second of failures, let
            // another process take the lock over.
            failed_binds += 1;
            if failed_binds >= 50 {
                lock = None;
                failed_binds = 0;
            }
            std::thread::sleep(POLL);
            continue;
        };
        failed_binds = 0;
        let listener = listener.get();
        if listener.set_nonblocking(true).is_err() {
            continue;
        }
        while !stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one live descriptor.
            if unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as libc::c_int) } <= 0 {
                continue;
            }
            while let Ok((conn, _)) = listener.accept() {
                answer(&conn, &exporter);
            }
        }
        // The socket file stays: a loader that finds nobody answering waits
        // for another mapper to take over before uploading anew.
    }
    drop(lock); // releases the serving lock
}

/// One connection: the same user is handed a descriptor, anyone else
/// nothing; either way it is closed when this returns.
fn answer(conn: &std::os::unix::net::UnixStream, exporter: &Exporter) {
    if !same_user(conn) {
        return;
    }
    if let Some(why) = &exporter.refuse {
        let _ = send_refusal(conn, why);
        return;
    }
    // The handle is live: the server is stopped before it is released.
    match export_fd(&exporter.ctx, exporter.handle) {
        Ok(fd) => {
            let _ = send_offer(conn, &exporter.offer, fd.as_raw_fd());
        }
        // Said, not left to silence: a client that got nothing would look
        // again and again until its whole wait had passed.
        Err(e) => {
            let _ = send_refusal(conn, driver_reason(e.message()));
        }
    }
}

/// A driver call's error message without the call's name (`"cuX failed:
/// CUDA_ERROR_Y (...)"` becomes `"CUDA_ERROR_Y (...)"`): what a refusal
/// carries, in its 40 bytes, to a client that knows which call it was.
pub fn driver_reason(message: &str) -> &str {
    message.split_once("failed: ").map_or(message, |(_, r)| r)
}
