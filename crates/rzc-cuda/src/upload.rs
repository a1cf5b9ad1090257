//! Uploading an opened buffer's tensors to one device allocation, and the
//! tensors of that allocation as DLPack tensors.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys;
use rzc_core::dlpack::{
    self, DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned, TensorDesc,
};
use rzc_core::{ErrorKind as CoreKind, Weights};

use crate::driver::PrimaryContext;
use crate::error::{fail, ErrorKind, Result};
use crate::layout::{self, DeviceTensor, Layout};
use crate::memory::DeviceMemory;
use crate::share::{self, Attached, Content, Fallback, Readback, ShareOptions, Sharing};
use crate::staging::{self, Staging};
use crate::stream::Stream;

/// Upload settings.
#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Bytes per chunk (registration unit, bounce buffer size).
    pub chunk_bytes: usize,
    /// Source staging.
    pub staging: Staging,
    /// Host threads registering or filling bounce buffers.
    pub threads: usize,
    /// The stream to copy on; NULL for a private one. Either way the copy has
    /// completed when `upload` returns.
    pub stream: sys::CUstream,
    /// Share one allocation with the other processes of this user that
    /// upload the same buffer under the same key to the same GPU.
    pub share: Option<ShareOptions>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            chunk_bytes: 64 << 20,
            staging: Staging::Auto,
            threads: std::thread::available_parallelism()
                .map(|n| n.get().min(8))
                .unwrap_or(4),
            stream: std::ptr::null_mut(),
            share: None,
        }
    }
}

/// The tensors of an opened buffer, on one device, in one allocation.
pub struct DeviceWeights {
    memory: Arc<DeviceMemory>,
    tensors: Vec<DeviceTensor>,
    staging: Option<Staging>,
    copies: usize,
    seconds: f64,
    fallback: Option<Fallback>,
    note: String,
    readback: Option<Readback>,
    dir_note: String,
}

/// How this process came by its memory.
struct Obtained {
    memory: Arc<DeviceMemory>,
    /// How it staged the copy; `None` when it copied nothing.
    staging: Option<Staging>,
    fallback: Option<Fallback>,
    readback: Option<Readback>,
    dir_note: String,
}

/// Uploads every tensor of `w` to device `ordinal`: one allocation in the
/// device's primary context, each tensor at a 256-byte aligned offset. With
/// `opts.share`, processes that upload the same content under the same key
/// to the same GPU share one allocation (see [`crate::share`]); where
/// sharing does not apply the upload is private and
/// [`DeviceWeights::fallback`] says why. The copy has completed when this
/// returns; on an error nothing is left behind (no allocation,
/// registration, pinned buffer or stream).
pub fn upload(w: &Weights, ordinal: i32, opts: &UploadOptions) -> Result<DeviceWeights> {
    let started = Instant::now();
    if opts.chunk_bytes == 0 || opts.threads == 0 {
        fail!(
            CoreKind::InvalidArgument,
            "chunk_bytes and threads must be positive"
        );
    }
    let plan = layout::plan(w.bytes().as_ptr() as usize, w.tensors());
    let ctx = Arc::new(PrimaryContext::retain(ordinal)?);
    let got = match &opts.share {
        Some(share) => shared(w, ctx, &plan, opts, share)?,
        None => {
            let (memory, staging) = private(ctx, &plan, opts)?;
            Obtained {
                memory,
                staging: Some(staging),
                fallback: None,
                readback: None,
                dir_note: String::new(),
            }
        }
    };
    Ok(DeviceWeights {
        memory: got.memory,
        tensors: plan.tensors,
        staging: got.staging,
        copies: plan.ops.len(),
        seconds: started.elapsed().as_secs_f64(),
        note: got
            .fallback
            .as_ref()
            .map(Fallback::note)
            .unwrap_or_default(),
        fallback: got.fallback,
        readback: got.readback,
        dir_note: got.dir_note,
    })
}

/// This process's own memory, filled; the staging used.
fn private(
    ctx: Arc<PrimaryContext>,
    plan: &Layout,
    opts: &UploadOptions,
) -> Result<(Arc<DeviceMemory>, Staging)> {
    let memory = DeviceMemory::new(ctx, plan.size)?;
    let staging = copy(&memory, plan, opts)?;
    Ok((Arc::new(memory), staging))
}

/// The shared memory of `w`'s content: imported, or uploaded here and
/// published; a private upload where sharing does not apply.
fn shared(
    w: &Weights,
    ctx: Arc<PrimaryContext>,
    plan: &Layout,
    opts: &UploadOptions,
    share: &ShareOptions,
) -> Result<Obtained> {
    let content = Content {
        size: plan.size,
        // Computed here (reading every byte) unless the caller vouches.
        digest: share.digest.unwrap_or_else(|| w.content_digest(false)),
        tensors: &plan.tensors,
        host: (0..w.len())
            .map(|i| w.data(i))
            .collect::<rzc_core::Result<_>>()?,
    };
    let (attached, dir_note) = share::attach(&ctx, &content, share)?;
    let (memory, staging, fallback, readback) = match attached {
        Attached::Found { memory, readback } => (memory, None, None, readback),
        Attached::Upload { memory, publish } => {
            let staging = copy(&memory, plan, opts)?;
            let (memory, fallback) = publish.publish(memory);
            (memory, Some(staging), fallback, None)
        }
        Attached::Private(why) => {
            let (memory, staging) = private(ctx, plan, opts)?;
            (memory, Some(staging), Some(why), None)
        }
    };
    Ok(Obtained {
        memory,
        staging,
        fallback,
        readback,
        dir_note,
    })
}

/// Fills `memory` with the planned copies, staged as `opts` says; the
/// staging that was used.
fn copy(memory: &DeviceMemory, plan: &Layout, opts: &UploadOptions) -> Result<Staging> {
    let ctx = memory.context();
    let dst = memory.ptr();
    let (chunk, threads) = (opts.chunk_bytes, opts.threads);
    ctx.with(|| {
        let stream = Stream::new(opts.stream)?;
        let registered = || staging::registered(ctx, dst, &plan.ops, chunk, threads, &stream);
        let pinned = || staging::pinned(ctx, dst, &plan.ops, chunk, threads, &stream);
        match opts.staging {
            Staging::Register => registered().map(|_| Staging::Register),
            Staging::Pinned => pinned().map(|_| Staging::Pinned),
            Staging::Pageable => {
                staging::pageable(dst, &plan.ops, &stream).map(|_| Staging::Pageable)
            }
            Staging::Auto => match registered() {
                Ok(()) => Ok(Staging::Register),
                // Registration refused (read-only pages without read-only
                // registration, pages registered in another way, too much to
                // pin): bounce buffers need a few chunks of pinned memory only.
                Err(e) if matches!(e.kind(), ErrorKind::Cuda | ErrorKind::OutOfMemory) => {
                    pinned().map(|_| Staging::Pinned)
                }
                Err(e) => Err(e),
            },
        }
    })
}

impl std::fmt::Debug for DeviceWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWeights")
            .field("ordinal", &self.ordinal())
            .field("tensors", &self.tensors.len())
            .field("nbytes", &self.alloc().size())
            .field("staging", &self.staging)
            .finish()
    }
}

impl DeviceWeights {
    fn alloc(&self) -> &DeviceMemory {
        &self.memory
    }

    /// The tensors, in the order of the source's table.
    pub fn tensors(&self) -> &[DeviceTensor] {
        &self.tensors
    }

    /// Device address of the allocation.
    pub fn device_ptr(&self) -> u64 {
        self.alloc().ptr()
    }

    /// Bytes of the allocation (tensors plus alignment padding).
    pub fn nbytes(&self) -> usize {
        self.alloc().size()
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.alloc().context().ordinal()
    }

    /// How this process staged the source; `None` when it copied nothing
    /// (it imported another process's upload).
    pub fn staging(&self) -> Option<Staging> {
        self.staging
    }

    /// How this process came by the memory: its own, uploaded and shared,
    /// or imported.
    pub fn sharing(&self) -> Sharing {
        self.memory.sharing()
    }

    /// Whether the device maps the memory read-only in this process.
    pub fn read_only(&self) -> bool {
        self.alloc().read_only()
    }

    /// Why a requested share did not happen (`None` when it did, or was not
    /// asked for).
    pub fn fallback(&self) -> Option<&Fallback> {
        self.fallback.as_ref()
    }

    /// The fallback's note (empty when there is none).
    pub fn note(&self) -> &str {
        &self.note
    }

    /// What this process read back to verify memory it imported (`None`
    /// when it imported nothing).
    pub fn readback(&self) -> Option<Readback> {
        self.readback
    }

    /// Which rendezvous directories were passed over and why (empty when
    /// the first choice was usable or no share was asked for).
    pub fn share_dir_note(&self) -> &str {
        &self.dir_note
    }

    /// Host-to-device copies the upload was planned as (before cutting them
    /// into chunks): 1 when the source's tensors were 256 bytes apart.
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// Seconds the upload took, allocation included.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    fn tensor(&self, index: usize) -> Result<&DeviceTensor> {
        match self.tensors.get(index) {
            Some(t) => Ok(t),
            None => fail!(
                CoreKind::OutOfRange,
                "tensor index {index} is out of range ({} tensors)",
                self.tensors.len()
            ),
        }
    }

    /// Device address of tensor `index`.
    pub fn data_ptr(&self, index: usize) -> Result<u64> {
        Ok(self.alloc().ptr() + self.tensor(index)?.offset as u64)
    }

    /// Copies tensor `index` back to host memory `dst` (exactly its size), for
    /// checking and debugging. Synchronous.
    pub fn read(&self, index: usize, dst: &mut [u8]) -> Result<()> {
        let t = self.tensor(index)?;
        if dst.len() != t.nbytes {
            fail!(
                CoreKind::InvalidArgument,
                "tensor {:?} has {} bytes; the destination has {}",
                t.name,
                t.nbytes,
                dst.len()
            );
        }
        self.alloc().read(t.offset, dst)
    }

    fn desc(&self, index: usize) -> Result<TensorDesc<'_>> {
        let t = self.tensor(index)?;
        let Some(dtype) = t.dtype.to_dlpack() else {
            fail!(
                CoreKind::UnsupportedDtype,
                "tensor {:?} has dtype {}, which DLPack consumers cannot take",
                t.name,
                t.dtype
            );
        };
        Ok(TensorDesc {
            data: (self.alloc().ptr() + t.offset as u64) as usize as *mut _,
            device: DLDevice {
                device_type: DLDeviceType::kDLCUDA,
                device_id: self.ordinal(),
            },
            dtype,
            shape: &t.shape,
        })
    }

    /// DLPack flags that tell the truth: a private upload is this process's
    /// own copy (`IS_COPIED`); shared memory is not, and is `READ_ONLY` where
    /// the device maps it so.
    fn dlpack_flags(&self) -> u64 {
        let mut flags = 0;
        if self.sharing() == Sharing::Private {
            flags |= dlpack::DLPACK_FLAG_BITMASK_IS_COPIED;
        }
        if self.read_only() {
            flags |= dlpack::DLPACK_FLAG_BITMASK_READ_ONLY;
        }
        flags
    }

    /// Exports tensor `index` as a versioned DLPack tensor (kDLCUDA) that
    /// keeps the device memory alive (see [`DeviceWeights::dlpack_flags`]
    /// for its flags).
    pub fn to_dlpack(&self, index: usize) -> Result<*mut DLManagedTensorVersioned> {
        let desc = self.desc(index)?;
        Ok(dlpack::export_versioned(
            self.memory.clone(),
            &desc,
            self.dlpack_flags(),
        ))
    }

    /// Same as [`DeviceWeights::to_dlpack`] in the legacy form.
    pub fn to_dlpack_legacy(&self, index: usize) -> Result<*mut DLManagedTensor> {
        let desc = self.desc(index)?;
        Ok(dlpack::export_legacy(self.memory.clone(), &desc))
    }
}
