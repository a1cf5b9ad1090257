//! A stream, the guard that drains it, and an event: the ordering of the
//! asynchronous copies an upload queues. Constructors and destructors run
//! with the stream's context current (the upload pushes it for the whole
//! operation, and on every worker thread).
//!
//! Order matters on the way out, as it does on a GPU: copies in flight read
//! registrations and pinned buffers and write device memory. A [`Drain`]
//! guard, declared after the resources a stream's copies use, synchronizes
//! the stream before any of them is released, on success and on every error
//! path alike.

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdeviceptr};

use crate::driver::Checked;
use crate::error::Result;

/// A stream: a private one (destroyed on drop) or the caller's.
pub struct Stream {
    raw: sys::CUstream,
    owned: bool,
}

// SAFETY: the driver accepts work for one stream from several threads (each
// with the stream's context current); the handle is never mutated.
unsafe impl Send for Stream {}
// SAFETY: as above: shared references only queue work and synchronize.
unsafe impl Sync for Stream {}

impl Stream {
    /// The caller's stream `given`, or a new non-blocking one when NULL.
    pub fn new(given: sys::CUstream) -> Result<Stream> {
        if !given.is_null() {
            return Ok(Stream {
                raw: given,
                owned: false,
            });
        }
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking)
            .or_fail("cuStreamCreate")?;
        Ok(Stream { raw, owned: true })
    }

    /// The raw handle.
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: the stream is live: ours until drop, or the caller's, who
        // keeps it alive for the whole upload (the C API's contract).
        unsafe { result::stream::synchronize(self.raw) }.or_fail("cuStreamSynchronize")
    }

    /// Queues a copy of `src` to device address `dst`. The caller keeps `src`
    /// readable until the stream has passed this copy (a [`Drain`] does).
    ///
    /// # Safety
    /// `src` points to `len` readable bytes that stay valid until the copy
    /// has executed; `[dst, dst + len)` lies in device memory of the current
    /// context.
    pub unsafe fn copy_in(&self, dst: CUdeviceptr, src: usize, len: usize) -> Result<()> {
        // SAFETY: `src` is `len` readable bytes (this function's contract).
        let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
        // SAFETY: source and destination as the contract says; the stream is
        // live (see `synchronize`).
        unsafe { result::memcpy_htod_async(dst, bytes, self.raw) }.or_fail("cuMemcpyHtoDAsync")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: our own stream, destroyed once; work still queued on it
            // completes (the driver defers the destruction).
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

/// Synchronizes a stream when dropped: declared after the resources its
/// copies use, it drains them before those are released.
pub struct Drain<'a>(pub &'a Stream);

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        // Already reported where the caller synchronized itself; on an error
        // path nothing better can be done than to wait.
        let _ = self.0.synchronize();
    }
}

/// An event without timing, destroyed on drop.
pub struct Event(sys::CUevent);

impl Event {
    /// A new event.
    pub fn new() -> Result<Event> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .or_fail("cuEventCreate")
    }

    /// Marks the point `stream` has reached.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: our live event; a live stream of the current context.
        unsafe { result::event::record(self.0, stream.raw()) }.or_fail("cuEventRecord")
    }

    /// Waits until the stream has passed the last recorded point (at once
    /// when never recorded).
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: our live event.
        unsafe { result::event::synchronize(self.0) }.or_fail("cuEventSynchronize")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: our own event, destroyed once.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}
