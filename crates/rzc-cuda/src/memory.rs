//! [`DeviceMemory`]: the one owner of device memory, whichever way it was
//! made (this process's own allocation, shareable memory it created, memory
//! another process exported), released in its context when the last owner
//! (the handle, or a tensor exported from it) is gone.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdeviceptr, CUmemAccess_flags::*};
use rzc_core::ErrorKind as CoreKind;

use crate::driver::{Checked, PrimaryContext};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::share::server::Server;
use crate::share::Sharing;
use crate::vmm::{self, Mapping};

/// How the memory was made, and what releases it.
enum Backing {
    /// `cuMemAlloc`: this process's own, shared with no one.
    Plain,
    /// Physical memory mapped at the address: created here (`imported ==
    /// false`, exportable to other processes) or imported from another
    /// process's export.
    Mapped { mapping: Mapping, imported: bool },
}

/// Device memory in a primary context. For shared memory, this process's
/// server of it goes first: nothing is exported from memory being released.
pub struct DeviceMemory {
    server: Option<Server>,
    ctx: Arc<PrimaryContext>,
    ptr: CUdeviceptr,
    size: usize,
    backing: Backing,
    read_only: bool,
    /// Made shareable but kept from other processes (see [`Self::keep_private`]).
    kept: bool,
}

// SAFETY: a device address, a physical memory handle and their retained
// context may be used from any thread (each call pushes the context).
unsafe impl Send for DeviceMemory {}
// SAFETY: as above; shared references only read the memory (and export it).
unsafe impl Sync for DeviceMemory {}

impl DeviceMemory {
    /// `size` bytes (at least one) of this process's own memory on `ctx`'s
    /// device.
    pub fn new(ctx: Arc<PrimaryContext>, size: usize) -> Result<DeviceMemory> {
        let ptr = ctx
            .with(|| {
                // SAFETY: allocates in the current context; the address is
                // used only on success.
                unsafe { result::malloc_sync(size.max(1)) }.or_fail("cuMemAlloc")
            })
            .map_err(|e| out_of_memory(e, size, &ctx))?;
        Ok(DeviceMemory::owning(ctx, ptr, size, Backing::Plain, false))
    }

    /// `size` bytes (a multiple of [`vmm::shareable_size`]) of new physical
    /// memory that other processes can import, mapped read-write here.
    pub fn new_shareable(ctx: Arc<PrimaryContext>, size: usize) -> Result<DeviceMemory> {
        let ordinal = ctx.ordinal();
        let (mapping, ptr, _) = ctx
            .with(|| {
                let handle = vmm::create(size, ordinal)?;
                Mapping::map(handle, size, ordinal, &[CU_MEM_ACCESS_FLAGS_PROT_READWRITE])
            })
            .map_err(|e| out_of_memory(e, size, &ctx))?;
        let backing = Backing::Mapped {
            mapping,
            imported: false,
        };
        Ok(DeviceMemory::owning(ctx, ptr, size, backing, false))
    }

    /// Imports the physical memory another process exported as `fd` (`size`
    /// bytes) and maps it here, read-only where the driver allows it.
    pub fn import(
        ctx: Arc<PrimaryContext>,
        fd: BorrowedFd<'_>,
        size: usize,
    ) -> Result<DeviceMemory> {
        let ordinal = ctx.ordinal();
        let (mapping, ptr, granted) = ctx.with(|| {
            let handle = vmm::import(fd)?;
            let flags = [
                CU_MEM_ACCESS_FLAGS_PROT_READ,
                CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            ];
            Mapping::map(handle, size, ordinal, &flags)
        })?;
        let backing = Backing::Mapped {
            mapping,
            imported: true,
        };
        let read_only = granted == CU_MEM_ACCESS_FLAGS_PROT_READ;
        Ok(DeviceMemory::owning(ctx, ptr, size, backing, read_only))
    }

    fn owning(
        ctx: Arc<PrimaryContext>,
        ptr: CUdeviceptr,
        size: usize,
        backing: Backing,
        read_only: bool,
    ) -> DeviceMemory {
        DeviceMemory {
            server: None,
            ctx,
            ptr,
            size,
            backing,
            read_only,
            kept: false,
        }
    }

    /// What a serving thread needs to export this memory: the context, and
    /// the physical memory handle (mapped memory only). The handle stays
    /// valid only while this memory lives.
    pub fn exporter(&self) -> Result<(Arc<PrimaryContext>, sys::CUmemGenericAllocationHandle)> {
        let Backing::Mapped { mapping, .. } = &self.backing else {
            fail!(
                CoreKind::InvalidArgument,
                "only mapped memory can be exported"
            );
        };
        Ok((self.ctx.clone(), mapping.handle()))
    }

    /// Keeps `server` (of this memory) running while the memory lives.
    pub fn serve(&mut self, server: Server) {
        self.server = Some(server);
    }

    /// Makes this process's own mapping read-only on the device (after the
    /// upload wrote it), or says why the driver would not.
    pub fn make_read_only(&mut self) -> Result<()> {
        if matches!(self.backing, Backing::Plain) {
            fail!(
                CoreKind::InvalidArgument,
                "only mapped memory can be made read-only"
            );
        }
        let (ptr, size, ordinal) = (self.ptr, self.size, self.ctx.ordinal());
        self.ctx
            .with(|| vmm::set_access(ptr, size, ordinal, CU_MEM_ACCESS_FLAGS_PROT_READ))?;
        self.read_only = true;
        Ok(())
    }

    /// Keeps memory made shareable from other processes: it is never
    /// exported, and reports itself as this process's own.
    pub fn keep_private(&mut self) {
        self.kept = true;
    }

    /// How this process came by the memory.
    pub fn sharing(&self) -> Sharing {
        match self.backing {
            Backing::Plain => Sharing::Private,
            Backing::Mapped { .. } if self.kept => Sharing::Private,
            Backing::Mapped {
                imported: false, ..
            } => Sharing::Uploaded,
            Backing::Mapped { imported: true, .. } => Sharing::Imported,
        }
    }

    /// Whether the device maps this memory read-only in this process.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The context the memory lives in.
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

    /// Copies `dst.len()` bytes from `offset` of the memory to host memory,
    /// synchronously (for checking what was uploaded or mapped).
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(dst.len())
            .map_or(true, |end| end > self.size)
        {
            fail!(
                CoreKind::InvalidArgument,
                "bytes {offset}..+{} are not inside the {}-byte allocation",
                dst.len(),
                self.size
            );
        }
        if dst.is_empty() {
            return Ok(());
        }
        let src = self.ptr + offset as u64;
        self.ctx.with(|| {
            // SAFETY: `[src, src + len)` lies in the memory (checked above),
            // which `self` keeps alive; `dst` is a host buffer of that length.
            unsafe { result::memcpy_dtoh_sync(dst, src) }.or_fail("cuMemcpyDtoH")
        })
    }
}

/// An allocation's out-of-memory error, saying how much was asked of which
/// device.
fn out_of_memory(e: Error, size: usize, ctx: &PrimaryContext) -> Error {
    if e.kind() != ErrorKind::OutOfMemory {
        return e;
    }
    Error::new(
        ErrorKind::OutOfMemory,
        format!(
            "{size} bytes of device memory on cuda:{}: {}",
            ctx.ordinal(),
            e.message()
        ),
    )
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // The server first: it must not export memory being released.
        drop(self.server.take());
        // Errors here (the driver already shut down at exit) have nowhere to
        // go; the memory goes with the context.
        let ptr = self.ptr;
        let backing = std::mem::replace(&mut self.backing, Backing::Plain);
        let _ = self.ctx.with(|| {
            match backing {
                // SAFETY: allocated by `new` in this context, freed once (the
                // backing was taken out of `self`).
                Backing::Plain => unsafe { result::free_sync(ptr) }.or_fail("cuMemFree"),
                Backing::Mapped { mapping, .. } => {
                    drop(mapping);
                    Ok(())
                }
            }
        });
    }
}
