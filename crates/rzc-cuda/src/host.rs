//! Host memory the device copies from: pinned bounce buffers, and
//! registrations that page-lock the source in place. Constructors and
//! destructors run with the upload's context current.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Condvar, Mutex, MutexGuard};

use cudarc::driver::result;
use cudarc::driver::sys;

use crate::driver::Checked;
use crate::error::Result;

/// Page-locked host memory, freed on drop.
pub struct PinnedBuffer {
    ptr: *mut u8,
}

// SAFETY: plain host memory; the threads that fill it write disjoint ranges
// (see `staging::pinned`).
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above; shared references only hand out the address.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// `len` bytes of pinned memory.
    pub fn new(len: usize) -> Result<PinnedBuffer> {
        // SAFETY: allocates in the current context; the pointer is used only
        // if the driver reports success.
        let ptr = unsafe { result::malloc_host(len, 0) }
            .or_fail("cuMemHostAlloc (pinned bounce buffer)")?;
        Ok(PinnedBuffer { ptr: ptr.cast() })
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> usize {
        self.ptr as usize
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by `cuMemHostAlloc`, freed once; no copy reads it
        // any more (the owner drains the stream first).
        let _ = unsafe { result::free_host(self.ptr.cast::<c_void>()) };
    }
}

/// Host ranges this process registered, by start: `(end, users)`, where
/// `users == 0` marks a registration in progress. Ranges never overlap.
///
/// Two uploads of one buffer at once (two threads, two GPUs) copy from the
/// same pages, and a copy the driver issues from page-locked memory reads
/// it when it runs, not when it is issued: so no upload may unregister
/// pages while another upload's copies from them may still be queued. Each
/// upload holds (counts itself a user of) every registration of this
/// process that its copies read from, from before it issues them until its
/// stream has drained; the last user unregisters. An upload registering a
/// chunk registered already with the same bounds joins it; one whose copies
/// read pages registered with other bounds (another chunk size, a pageable
/// upload) holds those registrations and issues its copies under the lock,
/// so that no registration appears under them unheld.
struct Registry {
    ranges: Mutex<BTreeMap<usize, (usize, usize)>>,
    /// Signalled when a registration in progress succeeded or failed.
    settled: Condvar,
}

static REGISTRY: Registry = Registry {
    ranges: Mutex::new(BTreeMap::new()),
    settled: Condvar::new(),
};

type Ranges = MutexGuard<'static, BTreeMap<usize, (usize, usize)>>;

fn ranges() -> Ranges {
    // A panic elsewhere cannot leave the map inconsistent: every change is
    // one insert or remove.
    REGISTRY.ranges.lock().unwrap_or_else(|p| p.into_inner())
}

/// The registered ranges overlapping `[start, end)`: `(start, end, users)`.
fn overlaps(reg: &Ranges, start: usize, end: usize) -> Vec<(usize, usize, usize)> {
    // Ranges do not overlap, so those that overlap `[start, end)` are the
    // last ones that start before `end`, as far back as they end after
    // `start`.
    reg.range(..end)
        .rev()
        .take_while(|(_, (e, _))| *e > start)
        .map(|(s, (e, users))| (*s, *e, *users))
        .collect()
}

/// A host range registered (page-locked) with the driver, shared by the
/// uploads of this process that use it; unregistered when the last one is
/// done.
pub struct Registration(usize);

/// What an upload holds while it copies from a host range: the
/// registrations its copies read from, to keep (in a list dropped only
/// after its stream has drained), and, when its copies must be issued
/// before anyone registers or unregisters pages there, the registry's lock:
/// issue them, then drop the `Holding`.
pub struct Holding {
    // Dropped first (fields drop in order): a registration dropped with
    // the lock held would wait for it forever.
    _lock: Option<Ranges>,
    pub registrations: Vec<Registration>,
}

impl Registration {
    /// For copies from `[start, end)` (whole pages): with `register` (its
    /// flags), registers the range or joins this process's registration of
    /// exactly that range; without, or where registrations of this process
    /// with other bounds overlap the range, holds those and keeps the lock
    /// (see [`Holding`]). A range page-locked by someone else (pinned by its
    /// owner) is copied from as it is: nothing to hold or undo.
    pub fn hold(start: usize, end: usize, register: Option<u32>) -> Result<Holding> {
        let mut reg = ranges();
        loop {
            let over = overlaps(&reg, start, end);
            // One being registered (by another upload): wait until it settles.
            if over.iter().any(|&(_, _, users)| users == 0) {
                reg = REGISTRY
                    .settled
                    .wait(reg)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            match (register, over.as_slice()) {
                (Some(_), &[(s, e, _)]) if s == start && e == end => {
                    return Ok(Holding {
                        registrations: vec![join(&mut reg, s)],
                        _lock: None,
                    });
                }
                (Some(flags), []) => {
                    reg.insert(start, (end, 0));
                    drop(reg);
                    return Ok(Holding {
                        registrations: register_new(start, end, flags)?.into_iter().collect(),
                        _lock: None,
                    });
                }
                _ => {
                    let registrations = over.iter().map(|&(s, _, _)| join(&mut reg, s)).collect();
                    return Ok(Holding {
                        registrations,
                        _lock: Some(reg),
                    });
                }
            }
        }
    }
}

/// Counts one more user of the registration starting at `start`.
fn join(reg: &mut Ranges, start: usize) -> Registration {
    if let Some((_, users)) = reg.get_mut(&start) {
        *users += 1;
    }
    Registration(start)
}

/// Registers `[start, end)`, marked in progress in the registry by the
/// caller, with the lock released: registering takes long, and other
/// chunks register at the same time.
fn register_new(start: usize, end: usize, flags: u32) -> Result<Option<Registration>> {
    // SAFETY: the caller's whole pages, mapped for as long as the
    // registration lives; `result` has no function for this call.
    let r = unsafe { sys::cuMemHostRegister_v2(start as *mut c_void, end - start, flags) };
    let mut reg = ranges();
    let out = match r {
        sys::cudaError_enum::CUDA_SUCCESS => {
            reg.insert(start, (end, 1));
            Ok(Some(Registration(start)))
        }
        other => {
            reg.remove(&start);
            match other {
                sys::cudaError_enum::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => Ok(None),
                _ => other.or_fail("cuMemHostRegister").map(|_| None),
            }
        }
    };
    REGISTRY.settled.notify_all();
    out
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut reg = ranges();
        let Some((_, users)) = reg.get_mut(&self.0) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            reg.remove(&self.0);
            // SAFETY: registered by `register_new`, still mapped (registrations go
            // before the buffer's owner releases it); no upload uses it any
            // more. Under the lock: nobody registers the range meanwhile.
            let _ = unsafe { sys::cuMemHostUnregister(self.0 as *mut c_void) };
        }
    }
}
