//! Host memory the device copies from: pinned bounce buffers, and
//! registrations that page-lock the source in place. Constructors and
//! destructors run with the upload's context current.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Condvar, Mutex, MutexGuard};

use cudarc::driver::result;
use cudarc::driver::sys;

use crate::driver::Checked;
use crate::error::{Error, ErrorKind, Result};

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
/// `users == 0` marks a registration in progress. Two uploads of one buffer
/// at once (two threads, two GPUs) register the same chunks: the second uses
/// the first's registration, and the last user unregisters it. Without the
/// count the first upload would unregister pages the second still copies
/// from.
struct Registry {
    ranges: Mutex<BTreeMap<usize, (usize, usize)>>,
    /// Signalled when a registration in progress succeeded or failed.
    settled: Condvar,
}

static REGISTRY: Registry = Registry {
    ranges: Mutex::new(BTreeMap::new()),
    settled: Condvar::new(),
};

fn ranges() -> MutexGuard<'static, BTreeMap<usize, (usize, usize)>> {
    // A panic elsewhere cannot leave the map inconsistent: every change is
    // one insert or remove.
    REGISTRY.ranges.lock().unwrap_or_else(|p| p.into_inner())
}

/// A host range registered (page-locked) with the driver, shared by the
/// uploads of this process that use it; unregistered when the last one is
/// done.
pub struct Registration(usize);

impl Registration {
    /// Registers `[start, start + len)` (whole pages) with `flags`, or joins
    /// this process's registration of exactly that range. `None` when the
    /// range is page-locked by someone else already (pinned by its owner):
    /// the caller copies from it as it is, and there is nothing to undo.
    pub fn new(start: usize, len: usize, flags: u32) -> Result<Option<Registration>> {
        let end = start + len;
        let mut reg = ranges();
        loop {
            match reg.get_mut(&start) {
                Some((e, users)) if *e == end && *users > 0 => {
                    *users += 1;
                    return Ok(Some(Registration(start)));
                }
                // Being registered by another upload: wait until it settles.
                Some((e, 0)) if *e == end => {
                    reg = REGISTRY
                        .settled
                        .wait(reg)
                        .unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                _ => {}
            }
            if reg
                .range(..end)
                .next_back()
                .is_some_and(|(_, (e, _))| *e > start)
            {
                return Err(Error::new(
                    ErrorKind::Cuda,
                    "cuMemHostRegister: the range overlaps a registration of another upload in progress in this process \
                     (with other chunk boundaries)",
                ));
            }
            reg.insert(start, (end, 0));
            break;
        }
        // Not under the lock: registering takes long, and other chunks
        // register at the same time.
        drop(reg);
        // SAFETY: the caller's whole pages, mapped for as long as the
        // registration lives; `result` has no function for this call.
        let r = unsafe { sys::cuMemHostRegister_v2(start as *mut c_void, len, flags) };
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
            // SAFETY: registered by `new`, still mapped (registrations go
            // before the buffer's owner releases it); no upload uses it any
            // more. Under the lock: nobody registers the range meanwhile.
            let _ = unsafe { sys::cuMemHostUnregister(self.0 as *mut c_void) };
        }
    }
}
