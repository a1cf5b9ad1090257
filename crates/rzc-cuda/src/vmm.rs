//! Virtual memory management: physical device memory that another process
//! can import (exported as a POSIX file descriptor), mapped at a reserved
//! address. Every call here runs with the owning context current.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use cudarc::driver::sys::{self, CUdeviceptr, CUmemAccess_flags, CUmemGenericAllocationHandle};

use crate::driver::{Checked, PrimaryContext};
use crate::error::{ErrorKind, Result};

/// Whether the device can share memory between processes: virtual memory
/// management with POSIX file-descriptor handles.
pub fn shareable(ctx: &PrimaryContext) -> Result<bool> {
    use sys::CUdevice_attribute::*;
    Ok(
        ctx.attribute(CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED)? == 1
            && ctx.attribute(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)? == 1,
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

/// New physical memory of `size` bytes (a multiple of the granularity) on
/// device `ordinal`, exportable as a descriptor: its handle.
pub fn create(size: usize, ordinal: i32) -> Result<CUmemGenericAllocationHandle> {
    let prop = properties(ordinal);
    let mut handle = 0;
    // SAFETY: `prop` describes pinned device memory exportable as a POSIX
    // file descriptor; writes one handle.
    unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) }.or_fail("cuMemCreate")?;
    Ok(handle)
}

/// The handle of the physical memory another process exported as `fd`.
pub fn import(fd: BorrowedFd<'_>) -> Result<CUmemGenericAllocationHandle> {
    let mut handle = 0;
    // SAFETY: `fd` is a live descriptor (borrowed for the call); the driver
    // reads it and writes one handle; the descriptor stays the caller's.
    unsafe {
        sys::cuMemImportFromShareableHandle(
            &mut handle,
            fd.as_raw_fd() as isize as *mut c_void,
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        )
    }
    .or_fail("cuMemImportFromShareableHandle")?;
    Ok(handle)
}

/// Exports physical memory `handle` as a POSIX file descriptor another
/// process can import. The caller keeps the handle alive during the call.
pub fn export_fd(ctx: &PrimaryContext, handle: CUmemGenericAllocationHandle) -> Result<OwnedFd> {
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
        // SAFETY: on success the driver hands over a new descriptor, owned by
        // nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// Grants device `ordinal` `flags` on the mapped range `[va, va + size)`.
pub fn set_access(
    va: CUdeviceptr,
    size: usize,
    ordinal: i32,
    flags: CUmemAccess_flags,
) -> Result<()> {
    let desc = sys::CUmemAccessDesc {
        location: location(ordinal),
        flags,
    };
    // SAFETY: reads one descriptor naming this device; the driver checks
    // that the range is mapped.
    unsafe { sys::cuMemSetAccess(va, size, &desc, 1) }.or_fail("cuMemSetAccess")
}

fn location(ordinal: i32) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: ordinal,
    }
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

/// The steps of mapping physical memory that were done, undone in reverse
/// on drop: while a mapping is being built (an error undoes what succeeded)
/// and when its owner releases it.
pub struct Mapping {
    handle: CUmemGenericAllocationHandle,
    reserved: Option<(CUdeviceptr, usize)>,
    mapped: bool,
}

impl Mapping {
    /// Takes ownership of `handle` (the caller's new handle), reserves an
    /// address range, maps the handle there and grants device `ordinal` the
    /// first of `flags` the driver accepts: the mapping, its address and the
    /// flags granted. On an error what was done is undone and the handle
    /// released.
    pub fn map(
        handle: CUmemGenericAllocationHandle,
        size: usize,
        ordinal: i32,
        flags: &[CUmemAccess_flags],
    ) -> Result<(Mapping, CUdeviceptr, CUmemAccess_flags)> {
        let mut steps = Mapping {
            handle,
            reserved: None,
            mapped: false,
        };
        let mut va = 0;
        // SAFETY: reserves a fresh range of `size` bytes; writes one address.
        unsafe { sys::cuMemAddressReserve(&mut va, size, 0, 0, 0) }
            .or_fail("cuMemAddressReserve")?;
        steps.reserved = Some((va, size));
        // SAFETY: the range was just reserved and `handle` holds `size` bytes.
        unsafe { sys::cuMemMap(va, size, 0, handle, 0) }.or_fail("cuMemMap")?;
        steps.mapped = true;
        let mut last = None;
        for &f in flags {
            match set_access(va, size, ordinal, f) {
                Ok(()) => return Ok((steps, va, f)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            crate::error::Error::new(
                ErrorKind::Core(rzc_core::ErrorKind::InvalidArgument),
                "no access flags to map with",
            )
        }))
    }
}

impl Mapping {
    /// The physical memory's handle (to export it), valid while `self` lives.
    pub fn handle(&self) -> CUmemGenericAllocationHandle {
        self.handle
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: each step is undone only if it was done, once, with the
        // values it was done with; the owner's context is current.
        unsafe {
            if let (true, Some((va, size))) = (self.mapped, self.reserved) {
                let _ = sys::cuMemUnmap(va, size);
            }
            if let Some((va, size)) = self.reserved {
                let _ = sys::cuMemAddressFree(va, size);
            }
            let _ = sys::cuMemRelease(self.handle);
        }
    }
}
