//! How the source reaches the device: three strategies over the same copy
//! plan ([`crate::layout`]).
//!
//! The source is usually Ray's object store: shared, pageable memory. A
//! plain copy from pageable memory runs at a fraction of the link's speed
//! (the driver stages it through its own pinned buffers), so an upload
//! either registers the source with the driver (page-locks it in place, in
//! page-aligned chunks, several threads at once, each chunk's copies issued
//! as soon as it is registered) or copies through pinned bounce buffers that
//! several threads fill while the previous buffer is in flight. Each
//! strategy returns once every copy has completed, and releases what it
//! made only after the stream has drained.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUdevice_attribute, CUdeviceptr};

use crate::driver::PrimaryContext;
use crate::host::{PinnedBuffer, Registration};
use crate::layout::{self, CopyOp, PAGE};
use crate::stream::{Drain, Event, Stream};

/// How the source reaches the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staging {
    /// Register the source; fall back to pinned bounce buffers if refused.
    Auto,
    /// Register the source in place (read-only where the device supports it).
    Register,
    /// Copy through pinned bounce buffers.
    Pinned,
    /// Copy straight from pageable memory (the slow path; for comparison).
    Pageable,
}

/// Runs `f` on every item from `threads` threads (the calling one among
/// them), each with `ctx` current; stops at the first error and returns it.
/// A helper thread the system refuses to start is one fewer helper, not a
/// panic (`Scope::spawn` panics there), as in the sealer's `fan_out`. A
/// scope here, unlike there, as the work borrows the context and the items:
/// it gives a C caller's thread a Rust thread handle (freed when that
/// thread ends), which an upload, far rarer than a seal, can afford.
fn parallel<T: Sync>(
    ctx: &PrimaryContext,
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let stop = || failed.lock().map(|g| g.is_some()).unwrap_or(true);
    let work = || {
        let r = ctx.with(|| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= items.len() || stop() {
                return Ok(());
            }
            f(&items[i])?;
        });
        if let Err(e) = r {
            failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads.clamp(1, items.len().max(1)) {
            let started = std::thread::Builder::new()
                .name("rzc-upload".into())
                .spawn_scoped(s, work);
            if started.is_err() {
                break;
            }
        }
        work();
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Registers the source chunk by chunk (read-only where the device allows)
/// and copies from it in place.
pub fn registered(
    ctx: &PrimaryContext,
    dst: CUdeviceptr,
    ops: &[CopyOp],
    chunk: usize,
    threads: usize,
    stream: &Stream,
) -> Result<()> {
    let regions = layout::regions(ops, chunk.max(PAGE) / PAGE * PAGE);
    let read_only = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED)
        .unwrap_or(0)
        == 1;
    // Portable: valid in every context, so that uploads of one buffer to
    // several GPUs at once can share a registration (see `Registration`).
    let flags = sys::CU_MEMHOSTREGISTER_PORTABLE
        | if read_only {
            sys::CU_MEMHOSTREGISTER_READ_ONLY
        } else {
            0
        };
    let registrations: Mutex<Vec<Registration>> = Mutex::new(Vec::with_capacity(regions.len()));
    // Dropped first: the copies drain before any registration is undone.
    let drain = Drain(stream);
    parallel(ctx, threads, &regions, |r| {
        let mut held = Registration::hold(r.start, r.end, Some(flags))?;
        registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(&mut held.registrations);
        for c in &r.copies {
            // SAFETY: the region is registered (or page-locked already), or
            // read where registrations of other bounds hold its pages, and
            // stays so until `drain` has synchronized the stream.
            unsafe { stream.copy_in(dst + c.dst as u64, c.src, c.len) }?;
        }
        Ok(())
    })?;
    drain.0.synchronize()
}

/// Copies through up to three pinned bounce buffers: buffer k is filled (by
/// several threads) while buffer k-1 is in flight.
pub fn pinned(
    ctx: &PrimaryContext,
    dst: CUdeviceptr,
    ops: &[CopyOp],
    chunk: usize,
    threads: usize,
    stream: &Stream,
) -> Result<()> {
    let capacity = chunk.max(PAGE);
    let batches = layout::batches(ops, capacity);
    let mut buffers: Vec<(PinnedBuffer, Event)> = Vec::new();
    for _ in 0..batches.len().clamp(1, 3) {
        buffers.push((PinnedBuffer::new(capacity)?, Event::new()?));
    }
    // Dropped first: no copy reads a buffer when it is freed.
    let drain = Drain(stream);
    for (k, batch) in batches.iter().enumerate() {
        let (buffer, done) = &buffers[k % buffers.len()];
        done.synchronize()?; // its previous load has reached the device
        let base = buffer.addr();
        parallel(
            ctx,
            threads,
            &layout::fill_items(batch, threads, 1 << 20),
            |&(src, off, len)| {
                // SAFETY: `src` is `len` readable bytes of the source; `off + len`
                // is inside the buffer (a batch fits it) and the items of a batch
                // do not overlap; no copy reads the buffer (waited above).
                unsafe {
                    std::ptr::copy_nonoverlapping(src as *const u8, (base + off) as *mut u8, len)
                };
                Ok(())
            },
        )?;
        // SAFETY: the buffer holds `batch.len` bytes and is not touched again
        // until `done` has been reached; the destination lies in the allocation.
        unsafe { stream.copy_in(dst + batch.dst as u64, base, batch.len) }?;
        done.record(stream)?;
    }
    drain.0.synchronize()
}

/// Copies straight from the (pageable) source. Another upload of this
/// process may have registered pages of it meanwhile: a copy from them is
/// a late one that reads them when it runs, so the upload holds those
/// registrations until its copies have completed, and issues its copies
/// before anyone can register or unregister pages of the source.
pub fn pageable(dst: CUdeviceptr, ops: &[CopyOp], stream: &Stream) -> Result<()> {
    let start = ops.iter().map(|c| c.src).min().unwrap_or(0) / PAGE * PAGE;
    let end = ops.iter().map(|c| c.src + c.len).max().unwrap_or(0);
    let mut registrations = Vec::new();
    // Dropped before the registrations: the copies drain before they go.
    let drain = Drain(stream);
    if end > start {
        // Dropped at the end of this block (also on an error), before any
        // registration: the lock is let go first.
        let mut held = Registration::hold(start, end.next_multiple_of(PAGE), None)?;
        registrations.append(&mut held.registrations);
        for c in ops {
            // SAFETY: the source buffer outlives the upload (the caller's
            // weights), and what of it is registered stays so until `drain`
            // has synchronized the stream; the destination lies in the
            // allocation.
            unsafe { stream.copy_in(dst + c.dst as u64, c.src, c.len) }?;
        }
    }
    drain.0.synchronize()
}
