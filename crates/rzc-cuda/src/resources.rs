//! Owners of driver resources, each released by its `Drop`: a stream, an
//! event, a pinned host buffer, a host registration, a device allocation.
//! Every constructor and destructor must run with the owning context current
//! (the upload pushes it for the whole operation, and on every worker
//! thread), except `DeviceAllocation`, which frees itself in its context.
//!
//! Order matters on the way out, as it does on a GPU: copies in flight read
//! registrations and pinned buffers and write the allocation. A [`Drain`]
//! guard, declared after the resources a stream's copies use, synchronizes
//! the stream before any of them is released, on success and on every error
//! path alike.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdeviceptr};
use rzc_core::{Error, ErrorKind, Result};

use crate::driver::{Checked, PrimaryContext};

/// A stream: a private one (destroyed on drop) or the caller's.
pub struct Stream {
    raw: sys::CUstream,
    owned: bool,
}

// SAFETY: the driver accepts work for one stream from several threads (each
// with the stream's context current); the handle is not mutated.
unsafe impl Send for Stream {}
// SAFETY: as above.
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
        // SAFETY: a live stream of the current context.
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
        // SAFETY: per this function's contract.
        let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
        // SAFETY: as above; the stream is live.
        unsafe { result::memcpy_htod_async(dst, bytes, self.raw) }.or_fail("cuMemcpyHtoDAsync")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: our own stream; queued work still completes.
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
        // SAFETY: live event and stream of the current context.
        unsafe { result::event::record(self.0, stream.raw()) }.or_fail("cuEventRecord")
    }

    /// Waits until the stream has passed the last recorded point (at once
    /// when never recorded).
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        unsafe { result::event::synchronize(self.0) }.or_fail("cuEventSynchronize")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: our own event.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// Page-locked host memory, freed on drop.
pub struct PinnedBuffer {
    ptr: *mut u8,
}

// SAFETY: plain host memory; the threads that fill it write disjoint ranges
// (see `staging::pinned`).
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// `len` bytes of pinned memory.
    pub fn new(len: usize) -> Result<PinnedBuffer> {
        // SAFETY: allocates; the pointer is checked by the driver's status.
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
        // SAFETY: allocated by `cuMemHostAlloc`; no copy reads it any more
        // (the owner drains the stream first).
        let _ = unsafe { result::free_host(self.ptr.cast::<c_void>()) };
    }
}

/// Host ranges this process registered, by start: `(end, users)`, where
/// `users == 0` marks a registration in progress. Two uploads of one buffer
/// at once (two threads, two GPUs) register the same chunks: the second uses
/// the first's registration, and the last user unregisters it. Without the
/// count the first upload would unregister pages the second still copies
/// from.
fn registered() -> &'static Mutex<BTreeMap<usize, (usize, usize)>> {
    static R: OnceLock<Mutex<BTreeMap<usize, (usize, usize)>>> = OnceLock::new();
    R.get_or_init(Default::default)
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
        loop {
            let mut reg = registered().lock().unwrap_or_else(|p| p.into_inner());
            match reg.get_mut(&start) {
                Some((e, users)) if *e == end && *users > 0 => {
                    *users += 1;
                    return Ok(Some(Registration(start)));
                }
                // Being registered by another upload: wait for it.
                Some((e, 0)) if *e == end => {
                    drop(reg);
                    std::thread::sleep(std::time::Duration::from_micros(200));
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
        // SAFETY: the caller's whole pages, mapped for as long as the
        // registration lives; `result` has no function for this call.
        let r = unsafe { sys::cuMemHostRegister_v2(start as *mut c_void, len, flags) };
        let mut reg = registered().lock().unwrap_or_else(|p| p.into_inner());
        match r {
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
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut reg = registered().lock().unwrap_or_else(|p| p.into_inner());
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

/// How an allocation's memory was made.
#[derive(Debug)]
enum Memory {
    /// `cuMemAlloc`: this process's own.
    Plain,
    /// Physical memory (`cuMemCreate`, or imported from another process's
    /// export) mapped at the allocation's address. The handle is kept so that
    /// this process can export the memory in turn.
    Mapped {
        handle: sys::CUmemGenericAllocationHandle,
    },
}

/// One device allocation in a primary context, released in that context when
/// dropped (when the last tensor that points into it is gone).
#[derive(Debug)]
pub struct DeviceAllocation {
    ctx: PrimaryContext,
    ptr: CUdeviceptr,
    size: usize,
    memory: Memory,
    read_only: bool,
}

fn location(ordinal: i32) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: ordinal,
    }
}

fn access(ordinal: i32, flags: sys::CUmemAccess_flags) -> sys::CUmemAccessDesc {
    sys::CUmemAccessDesc {
        location: location(ordinal),
        flags,
    }
}

/// Undoes the steps of mapping physical memory that succeeded, in reverse,
/// unless disarmed (the mapping then belongs to a `DeviceAllocation`).
struct MappingSteps {
    handle: Option<sys::CUmemGenericAllocationHandle>,
    reserved: Option<(CUdeviceptr, usize)>,
    mapped: bool,
}

impl Drop for MappingSteps {
    fn drop(&mut self) {
        // SAFETY: each step is undone only if it was done, once, with the
        // values it was done with; the caller's context is current.
        unsafe {
            if let (true, Some((va, size))) = (self.mapped, self.reserved) {
                let _ = sys::cuMemUnmap(va, size);
            }
            if let Some((va, size)) = self.reserved {
                let _ = sys::cuMemAddressFree(va, size);
            }
            if let Some(h) = self.handle {
                let _ = sys::cuMemRelease(h);
            }
        }
    }
}

impl DeviceAllocation {
    /// `size` bytes (at least one) of this process's own memory on `ctx`'s
    /// device.
    pub fn new(ctx: PrimaryContext, size: usize) -> Result<DeviceAllocation> {
        let ptr = ctx.with(|| {
            // SAFETY: allocates in the current context.
            unsafe { result::malloc_sync(size.max(1)) }.or_fail("cuMemAlloc")
        });
        match ptr {
            Ok(ptr) => Ok(DeviceAllocation {
                ctx,
                ptr,
                size,
                memory: Memory::Plain,
                read_only: false,
            }),
            Err(e) => Err(out_of_memory(e, size, &ctx)),
        }
    }

    /// Whether the device can share memory between processes: virtual memory
    /// management with POSIX file-descriptor handles.
    pub fn shareable(ctx: &PrimaryContext) -> Result<bool> {
        use sys::CUdevice_attribute::*;
        Ok(
            ctx.attribute(CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED)? == 1
                && ctx
                    .attribute(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)?
                    == 1,
        )
    }

    /// The size to create for `size` bytes: a multiple of the device's
    /// allocation granularity.
    pub fn shareable_size(ctx: &PrimaryContext, size: usize) -> Result<usize> {
        let prop = properties(ctx.ordinal());
        let mut granularity = 0usize;
        // SAFETY: reads `prop`, writes one size_t.
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut granularity,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
            )
        }
        .or_fail("cuMemGetAllocationGranularity")?;
        Ok(size.max(1).next_multiple_of(granularity.max(1)))
    }

    /// `size` bytes (a multiple of the granularity) of new physical memory
    /// that other processes can import, mapped read-write here.
    pub fn new_shareable(ctx: PrimaryContext, size: usize) -> Result<DeviceAllocation> {
        let ordinal = ctx.ordinal();
        let made = ctx.with(|| {
            let prop = properties(ordinal);
            let mut handle = 0;
            // SAFETY: `prop` describes pinned device memory exportable as a
            // POSIX file descriptor; writes one handle.
            unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) }.or_fail("cuMemCreate")?;
            let (va, _) = map_owned(
                handle,
                size,
                ordinal,
                &[sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE],
            )?;
            Ok((handle, va))
        });
        match made {
            Ok((handle, ptr)) => Ok(DeviceAllocation {
                ctx,
                ptr,
                size,
                memory: Memory::Mapped { handle },
                read_only: false,
            }),
            Err(e) => Err(out_of_memory(e, size, &ctx)),
        }
    }

    /// Imports the physical memory another process exported as `fd` (`size`
    /// bytes) and maps it here, read-only where the driver allows it.
    pub fn import(
        ctx: PrimaryContext,
        fd: std::os::fd::BorrowedFd<'_>,
        size: usize,
    ) -> Result<DeviceAllocation> {
        use std::os::fd::AsRawFd;
        let ordinal = ctx.ordinal();
        let (handle, ptr, read_only) = ctx.with(|| {
            let mut handle = 0;
            // SAFETY: `fd` is a live descriptor of an exported allocation;
            // the driver reads it and writes one handle (the descriptor stays
            // the caller's).
            unsafe {
                sys::cuMemImportFromShareableHandle(
                    &mut handle,
                    fd.as_raw_fd() as isize as *mut c_void,
                    sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                )
            }
            .or_fail("cuMemImportFromShareableHandle")?;
            // Read-only where the device allows it, else read-write.
            use sys::CUmemAccess_flags::*;
            let (va, granted) = map_owned(
                handle,
                size,
                ordinal,
                &[
                    CU_MEM_ACCESS_FLAGS_PROT_READ,
                    CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
                ],
            )?;
            Ok((handle, va, granted == CU_MEM_ACCESS_FLAGS_PROT_READ))
        })?;
        Ok(DeviceAllocation {
            ctx,
            ptr,
            size,
            memory: Memory::Mapped { handle },
            read_only,
        })
    }

    /// What a serving thread needs to export this memory: its own retain of
    /// the context, and the physical memory handle (a mapped allocation only).
    /// The handle stays valid only while this allocation lives.
    pub fn exporter(&self) -> Result<(PrimaryContext, sys::CUmemGenericAllocationHandle)> {
        let Memory::Mapped { handle } = self.memory else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "only mapped memory can be exported",
            ));
        };
        Ok((PrimaryContext::retain(self.ctx.ordinal())?, handle))
    }

    /// Makes this process's own mapping read-only on the device, where the
    /// driver allows it (after the upload wrote it); whether it did.
    pub fn make_read_only(&mut self) -> bool {
        if !matches!(self.memory, Memory::Mapped { .. }) {
            return false;
        }
        let desc = access(
            self.ctx.ordinal(),
            sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ,
        );
        let (ptr, size) = (self.ptr, self.size);
        // SAFETY: the range is this allocation's mapping.
        self.read_only = self
            .ctx
            .with(|| unsafe { sys::cuMemSetAccess(ptr, size, &desc, 1) }.or_fail("cuMemSetAccess"))
            .is_ok();
        self.read_only
    }

    /// Whether the device maps this memory read-only in this process.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The context the allocation lives in.
    pub fn context(&self) -> &PrimaryContext {
        &self.ctx
    }

    /// Device address of the first byte.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Copies `dst.len()` bytes from `offset` of the allocation to host
    /// memory, synchronously (for checking what was uploaded or mapped).
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(dst.len())
            .map_or(true, |end| end > self.size)
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "bytes {offset}..+{} are not inside the {}-byte allocation",
                    dst.len(),
                    self.size
                ),
            ));
        }
        if dst.is_empty() {
            return Ok(());
        }
        let src = self.ptr + offset as u64;
        self.ctx.with(|| {
            // SAFETY: `[src, src + len)` lies in the allocation (checked
            // above), which `self` keeps alive; `dst` is a host buffer of
            // that length.
            unsafe { result::memcpy_dtoh_sync(dst, src) }.or_fail("cuMemcpyDtoH")
        })
    }
}

/// Exports physical memory `handle` as a POSIX file descriptor another
/// process can import. The caller keeps the handle alive during the call.
pub fn export_fd(
    ctx: &PrimaryContext,
    handle: sys::CUmemGenericAllocationHandle,
) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    ctx.with(|| {
        let mut fd: libc::c_int = -1;
        // SAFETY: a live handle (the caller's promise); writes one int.
        unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut libc::c_int).cast(),
                handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        }
        .or_fail("cuMemExportToShareableHandle")?;
        // SAFETY: a new descriptor the driver handed over to us.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    })
}

/// Pinned device memory on `ordinal`, exportable as a POSIX descriptor.
fn properties(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: all-zero is a valid `CUmemAllocationProp` (plain integers and a
    // NULL pointer); the fields that matter are set below.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes =
        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop.location = location(ordinal);
    prop
}

/// Reserves an address range, maps `handle` there and grants `flags` to the
/// device; undoes whatever succeeded on an error (the handle stays the
/// caller's).
fn map(
    handle: sys::CUmemGenericAllocationHandle,
    size: usize,
    ordinal: i32,
    flags: sys::CUmemAccess_flags,
) -> Result<CUdeviceptr> {
    let mut steps = MappingSteps {
        handle: None,
        reserved: None,
        mapped: false,
    };
    let mut va = 0;
    // SAFETY: reserves a fresh range of `size` bytes; writes one address.
    unsafe { sys::cuMemAddressReserve(&mut va, size, 0, 0, 0) }.or_fail("cuMemAddressReserve")?;
    steps.reserved = Some((va, size));
    // SAFETY: the range was just reserved and `handle` holds `size` bytes.
    unsafe { sys::cuMemMap(va, size, 0, handle, 0) }.or_fail("cuMemMap")?;
    steps.mapped = true;
    let desc = access(ordinal, flags);
    // SAFETY: the range is mapped; `desc` names this device.
    unsafe { sys::cuMemSetAccess(va, size, &desc, 1) }.or_fail("cuMemSetAccess")?;
    // Success: the caller's allocation owns the mapping now.
    std::mem::forget(steps);
    Ok(va)
}

/// Maps a handle the caller just obtained, releasing it if that fails.
fn map_owned(
    handle: sys::CUmemGenericAllocationHandle,
    size: usize,
    ordinal: i32,
    flags: &[sys::CUmemAccess_flags],
) -> Result<(CUdeviceptr, sys::CUmemAccess_flags)> {
    let mut last = None;
    for &f in flags {
        match map(handle, size, ordinal, f) {
            Ok(va) => return Ok((va, f)),
            Err(e) => last = Some(e),
        }
    }
    drop(MappingSteps {
        handle: Some(handle),
        reserved: None,
        mapped: false,
    });
    Err(last
        .unwrap_or_else(|| Error::new(ErrorKind::InvalidArgument, "no access flags to map with")))
}

fn out_of_memory(e: Error, size: usize, ctx: &PrimaryContext) -> Error {
    if e.kind() == ErrorKind::OutOfMemory {
        Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "{size} bytes of device memory on cuda:{}: {}",
                ctx.ordinal(),
                e.message()
            ),
        )
    } else {
        e
    }
}

// SAFETY: a device address, a physical memory handle and their context may
// be used from any thread.
unsafe impl Send for DeviceAllocation {}
// SAFETY: as above; shared references only read them (and export).
unsafe impl Sync for DeviceAllocation {}

impl Drop for DeviceAllocation {
    fn drop(&mut self) {
        // Errors here (the driver already shut down at exit) have nowhere to
        // go; the memory goes with the context.
        let (ptr, size) = (self.ptr, self.size);
        let _ = self.ctx.with(|| {
            match self.memory {
                // SAFETY: allocated by `new` in this context, freed once.
                Memory::Plain => unsafe { result::free_sync(ptr) }.or_fail("cuMemFree"),
                Memory::Mapped { handle } => {
                    drop(MappingSteps {
                        handle: Some(handle),
                        reserved: Some((ptr, size)),
                        mapped: true,
                    });
                    Ok(())
                }
            }
        });
    }
}
