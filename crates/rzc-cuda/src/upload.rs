//! Uploading an opened buffer's tensors to one device allocation.
//!
//! The source is usually Ray's object store: shared, pageable memory. A
//! plain copy from pageable memory runs at a fraction of the link's speed
//! (the driver stages it through its own pinned buffers), so the upload
//! either registers the source with the driver (page-locks it in place, in
//! page-aligned chunks, several threads at once, each chunk's copy issued as
//! soon as it is registered) or copies through pinned bounce buffers that
//! several threads fill while the previous buffer is in flight. Every copy
//! has completed when `upload` returns, and every registration is undone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::{self, CUdevice_attribute, CUdeviceptr};
use rzc_core::dlpack::{
    self, DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned, TensorDesc,
};
use rzc_core::{Dtype, Error, ErrorKind, Result, Weights};

use crate::driver::{check, PrimaryContext};

/// Alignment of every tensor in the device allocation.
pub const DEVICE_ALIGNMENT: usize = 256;
const PAGE: usize = 4096;

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

/// Upload settings.
#[derive(Clone, Copy, Debug)]
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
        }
    }
}

/// One device allocation, freed (in its context) when the last tensor that
/// points into it is gone.
pub struct DeviceAllocation {
    ctx: PrimaryContext,
    ptr: CUdeviceptr,
    size: usize,
    ordinal: i32,
}

// SAFETY: a device pointer and its context may be used from any thread.
unsafe impl Send for DeviceAllocation {}
unsafe impl Sync for DeviceAllocation {}

impl Drop for DeviceAllocation {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // Errors here (e.g. the driver already shut down at exit) have
            // nowhere to go; the memory goes with the context.
            let _ = self
                .ctx
                .with(|| check(unsafe { sys::cuMemFree_v2(self.ptr) }, "cuMemFree"));
        }
    }
}

/// One tensor of an upload.
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Extents.
    pub shape: Vec<i64>,
    /// Offset from the start of the allocation (a multiple of 256).
    pub offset: usize,
    /// Size in bytes.
    pub nbytes: usize,
}

/// The tensors of an opened buffer, on one device, in one allocation.
pub struct DeviceWeights {
    alloc: Arc<DeviceAllocation>,
    tensors: Vec<DeviceTensor>,
    staging: Staging,
    seconds: f64,
}

struct CopyOp {
    src: usize, // host address
    dst: usize, // offset in the allocation
    len: usize,
}

/// Computes the device layout. When every tensor sits at a multiple of 256
/// from the first one (buffers this project packs), the device copy is the
/// host range as is: one contiguous copy. Otherwise each tensor is placed at
/// the next multiple of 256 and copied on its own.
fn layout(w: &Weights) -> (Vec<DeviceTensor>, Vec<CopyOp>, usize) {
    let ts = w.tensors();
    let base = w.bytes().as_ptr() as usize;
    let first = ts.iter().map(|t| t.offset).min().unwrap_or(0);
    let last = ts.iter().map(|t| t.offset + t.nbytes).max().unwrap_or(0);
    let identity = ts
        .iter()
        .all(|t| (t.offset - first) % DEVICE_ALIGNMENT == 0);
    let mut tensors = Vec::with_capacity(ts.len());
    let mut ops = Vec::new();
    let mut size = 0usize;
    for t in ts {
        let offset = if identity {
            t.offset - first
        } else {
            let o = size.div_ceil(DEVICE_ALIGNMENT) * DEVICE_ALIGNMENT;
            if t.nbytes > 0 {
                ops.push(CopyOp {
                    src: base + t.offset,
                    dst: o,
                    len: t.nbytes,
                });
            }
            o
        };
        size = size.max(offset + t.nbytes);
        tensors.push(DeviceTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            offset,
            nbytes: t.nbytes,
        });
    }
    if identity && last > first {
        ops.push(CopyOp {
            src: base + first,
            dst: 0,
            len: last - first,
        });
    }
    (tensors, ops, size)
}

/// Splits copy operations at `chunk`-aligned host addresses, so that each
/// piece lies in one page-aligned chunk of the source.
fn split(ops: &[CopyOp], chunk: usize) -> Vec<CopyOp> {
    let mut out = Vec::new();
    for op in ops {
        let mut at = 0;
        while at < op.len {
            let src = op.src + at;
            let boundary = (src / chunk + 1) * chunk;
            let len = (boundary - src).min(op.len - at);
            out.push(CopyOp {
                src,
                dst: op.dst + at,
                len,
            });
            at += len;
        }
    }
    out
}

/// Issues one asynchronous host-to-device copy of `op` into the allocation.
fn issue_copy(dst: CUdeviceptr, op: &CopyOp, stream: sys::CUstream) -> Result<()> {
    // SAFETY: `op.src` points to `op.len` readable host bytes kept alive
    // until the stream is drained; the destination lies inside the allocation.
    check(
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst + op.dst as u64, op.src as *const _, op.len, stream)
        },
        "cuMemcpyHtoDAsync",
    )
}

struct Stream {
    raw: sys::CUstream,
    owned: bool,
}

impl Stream {
    fn new(given: sys::CUstream) -> Result<Stream> {
        if !given.is_null() {
            return Ok(Stream {
                raw: given,
                owned: false,
            });
        }
        let mut raw = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        check(
            unsafe { sys::cuStreamCreate(&mut raw, flags) },
            "cuStreamCreate",
        )?;
        Ok(Stream { raw, owned: true })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned {
            unsafe { sys::cuStreamDestroy_v2(self.raw) };
        }
    }
}

/// Sends work items to `threads` threads, each with `ctx` current; stops at
/// the first error.
fn parallel<T: Sync>(
    ctx: &PrimaryContext,
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            s.spawn(|| {
                let r = ctx.with(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= items.len() || failed.lock().map(|g| g.is_some()).unwrap_or(true) {
                        return Ok(());
                    }
                    f(&items[i])?;
                });
                if let Err(e) = r {
                    let mut g = failed.lock().unwrap_or_else(|p| p.into_inner());
                    g.get_or_insert(e);
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Registered source chunks, unregistered on drop (after the stream drained).
struct Registrations(Mutex<Vec<usize>>);

impl Drop for Registrations {
    fn drop(&mut self) {
        for &p in self.0.get_mut().unwrap_or_else(|p| p.into_inner()).iter() {
            unsafe { sys::cuMemHostUnregister(p as *mut _) };
        }
    }
}

fn copy_registered(
    ctx: &PrimaryContext,
    dst: CUdeviceptr,
    ops: &[CopyOp],
    opts: &UploadOptions,
    stream: &Stream,
) -> Result<()> {
    let chunk = opts.chunk_bytes.max(PAGE) / PAGE * PAGE;
    let pieces = split(ops, chunk);
    // Each piece lies inside one chunk-aligned region (see `split`); a
    // region is registered once, over the pages its pieces touch. Chunks are
    // whole pages, so two regions never share a page.
    let mut regions: std::collections::BTreeMap<usize, (usize, usize, Vec<&CopyOp>)> =
        Default::default();
    for p in &pieces {
        let r = regions
            .entry(p.src / chunk)
            .or_insert((usize::MAX, 0, Vec::new()));
        r.0 = r.0.min(p.src / PAGE * PAGE);
        r.1 = r.1.max((p.src + p.len).div_ceil(PAGE) * PAGE);
        r.2.push(p);
    }
    let chunks: Vec<(usize, usize, Vec<&CopyOp>)> = regions.into_values().collect();
    let read_only = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED)
        .unwrap_or(0)
        == 1;
    let flags = if read_only {
        sys::CU_MEMHOSTREGISTER_READ_ONLY
    } else {
        0
    };
    let regs = Registrations(Mutex::new(Vec::new()));
    let raw_stream = stream.raw as usize;
    let issued = parallel(ctx, opts.threads, &chunks, |(start, end, parts)| {
        let r = unsafe { sys::cuMemHostRegister_v2(*start as *mut _, end - start, flags) };
        match r {
            sys::cudaError_enum::CUDA_SUCCESS => regs
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(*start),
            // Already page-locked (pinned by its owner, or registered
            // elsewhere in this process): copy from it as it is.
            sys::cudaError_enum::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => {}
            other => check(other, "cuMemHostRegister")?,
        }
        for p in parts {
            issue_copy(dst, p, raw_stream as sys::CUstream)?;
        }
        Ok(())
    });
    // Drain the copies before the registrations are undone (`regs` drops
    // after this), whether or not every chunk went through.
    let drained = check(
        unsafe { sys::cuStreamSynchronize(stream.raw) },
        "cuStreamSynchronize",
    );
    issued.and(drained)
}

struct Pinned {
    ptr: *mut u8,
    event: sys::CUevent,
}

fn copy_pinned(
    ctx: &PrimaryContext,
    dst: CUdeviceptr,
    ops: &[CopyOp],
    opts: &UploadOptions,
    stream: &Stream,
) -> Result<()> {
    let chunk = opts.chunk_bytes.max(PAGE);
    let total: usize = ops.iter().map(|o| o.len).sum();
    let count = total.div_ceil(chunk).clamp(1, 3);
    let mut bufs: Vec<Pinned> = Vec::with_capacity(count);
    let result = (|| {
        for _ in 0..count {
            let mut p = std::ptr::null_mut();
            check(
                unsafe { sys::cuMemHostAlloc(&mut p, chunk, 0) },
                "cuMemHostAlloc (pinned bounce buffer)",
            )?;
            let mut ev = std::ptr::null_mut();
            let r = unsafe {
                sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            };
            bufs.push(Pinned {
                ptr: p.cast(),
                event: ev,
            });
            check(r, "cuEventCreate")?;
        }
        // Fill buffer k (several threads) while buffer k-1 is in flight.
        let mut k = 0;
        let mut fill: Vec<(usize, usize, usize)> = Vec::new(); // (src, offset in buffer, len)
        let mut used = 0;
        let mut dst_start = None;
        let flush = |fill: &mut Vec<(usize, usize, usize)>,
                     used: &mut usize,
                     dst_start: &mut Option<usize>,
                     k: &mut usize|
         -> Result<()> {
            if *used == 0 {
                return Ok(());
            }
            let b = &bufs[*k % bufs.len()];
            check(
                unsafe { sys::cuEventSynchronize(b.event) },
                "cuEventSynchronize",
            )?;
            let base = b.ptr as usize;
            let pieces: Vec<(usize, usize, usize)> = fill
                .iter()
                .flat_map(|&(src, off, len)| {
                    let step = (len / opts.threads.max(1)).max(1 << 20);
                    (0..len)
                        .step_by(step)
                        .map(move |a| (src + a, off + a, step.min(len - a)))
                })
                .collect();
            parallel(ctx, opts.threads, &pieces, |&(src, off, len)| {
                unsafe {
                    std::ptr::copy_nonoverlapping(src as *const u8, (base + off) as *mut u8, len)
                };
                Ok(())
            })?;
            let d = dst + dst_start.unwrap_or(0) as u64;
            check(
                unsafe { sys::cuMemcpyHtoDAsync_v2(d, b.ptr as *const _, *used, stream.raw) },
                "cuMemcpyHtoDAsync",
            )?;
            check(
                unsafe { sys::cuEventRecord(b.event, stream.raw) },
                "cuEventRecord",
            )?;
            fill.clear();
            *used = 0;
            *dst_start = None;
            *k += 1;
            Ok(())
        };
        // Bounce buffers hold device-contiguous runs: pieces are appended
        // while their destination continues the current run.
        for op in split(ops, chunk) {
            let contiguous = dst_start.map(|s| s + used == op.dst).unwrap_or(true);
            if used + op.len > chunk || !contiguous {
                flush(&mut fill, &mut used, &mut dst_start, &mut k)?;
            }
            dst_start.get_or_insert(op.dst);
            fill.push((op.src, used, op.len));
            used += op.len;
        }
        flush(&mut fill, &mut used, &mut dst_start, &mut k)?;
        check(
            unsafe { sys::cuStreamSynchronize(stream.raw) },
            "cuStreamSynchronize",
        )
    })();
    for b in bufs {
        unsafe {
            if !b.event.is_null() {
                sys::cuEventDestroy_v2(b.event);
            }
            sys::cuMemFreeHost(b.ptr.cast());
        }
    }
    result
}

fn copy_pageable(dst: CUdeviceptr, ops: &[CopyOp], stream: &Stream) -> Result<()> {
    for op in ops {
        issue_copy(dst, op, stream.raw)?;
    }
    check(
        unsafe { sys::cuStreamSynchronize(stream.raw) },
        "cuStreamSynchronize",
    )
}

/// Uploads every tensor of `w` to device `ordinal`: one allocation in the
/// device's primary context, each tensor at a 256-byte aligned offset. The
/// copy has completed when this returns.
pub fn upload(w: &Weights, ordinal: i32, opts: &UploadOptions) -> Result<DeviceWeights> {
    let started = Instant::now();
    if opts.chunk_bytes == 0 || opts.threads == 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "chunk_bytes and threads must be positive",
        ));
    }
    let ctx = PrimaryContext::retain(ordinal)?;
    let (tensors, ops, size) = layout(w);
    let (ptr, staging) = ctx.with(|| {
        let mut ptr: CUdeviceptr = 0;
        check(
            unsafe { sys::cuMemAlloc_v2(&mut ptr, size.max(DEVICE_ALIGNMENT)) },
            "cuMemAlloc",
        )
        .map_err(|e| {
            if e.kind() == ErrorKind::OutOfMemory {
                Error::new(
                    ErrorKind::OutOfMemory,
                    format!(
                        "{} bytes of device memory on cuda:{ordinal}: {}",
                        size,
                        e.message()
                    ),
                )
            } else {
                e
            }
        })?;
        let copied = (|| {
            let stream = Stream::new(opts.stream)?;
            match opts.staging {
                Staging::Register => {
                    copy_registered(&ctx, ptr, &ops, opts, &stream).map(|_| Staging::Register)
                }
                Staging::Pinned => {
                    copy_pinned(&ctx, ptr, &ops, opts, &stream).map(|_| Staging::Pinned)
                }
                Staging::Pageable => copy_pageable(ptr, &ops, &stream).map(|_| Staging::Pageable),
                Staging::Auto => match copy_registered(&ctx, ptr, &ops, opts, &stream) {
                    Ok(()) => Ok(Staging::Register),
                    // Registration refused (read-only pages without read-only
                    // registration, pages registered in another way, too much
                    // to pin): bounce buffers need a few chunks of pinned
                    // memory only.
                    Err(e) if matches!(e.kind(), ErrorKind::Cuda | ErrorKind::OutOfMemory) => {
                        copy_pinned(&ctx, ptr, &ops, opts, &stream).map(|_| Staging::Pinned)
                    }
                    Err(e) => Err(e),
                },
            }
        })();
        match copied {
            Ok(s) => Ok((ptr, s)),
            Err(e) => {
                unsafe { sys::cuMemFree_v2(ptr) };
                Err(e)
            }
        }
    })?;
    Ok(DeviceWeights {
        alloc: Arc::new(DeviceAllocation {
            ctx,
            ptr,
            size,
            ordinal,
        }),
        tensors,
        staging,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl std::fmt::Debug for DeviceWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWeights")
            .field("ordinal", &self.alloc.ordinal)
            .field("tensors", &self.tensors.len())
            .field("nbytes", &self.alloc.size)
            .field("staging", &self.staging)
            .finish()
    }
}

impl DeviceWeights {
    /// The tensors, in the order of the source's table.
    pub fn tensors(&self) -> &[DeviceTensor] {
        &self.tensors
    }

    /// Device address of the allocation.
    pub fn device_ptr(&self) -> u64 {
        self.alloc.ptr
    }

    /// Bytes of the allocation (tensors plus alignment padding).
    pub fn nbytes(&self) -> usize {
        self.alloc.size
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.alloc.ordinal
    }

    /// How the source was staged.
    pub fn staging(&self) -> Staging {
        self.staging
    }

    /// Seconds the upload took, allocation included.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    fn desc(&self, index: usize) -> Result<TensorDesc<'_>> {
        let Some(t) = self.tensors.get(index) else {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "tensor index {index} is out of range ({} tensors)",
                    self.tensors.len()
                ),
            ));
        };
        let Some(dtype) = t.dtype.to_dlpack() else {
            return Err(Error::new(
                ErrorKind::UnsupportedDtype,
                format!(
                    "tensor {:?} has dtype {}, which DLPack consumers cannot take",
                    t.name, t.dtype
                ),
            ));
        };
        Ok(TensorDesc {
            data: (self.alloc.ptr + t.offset as u64) as usize as *mut _,
            device: DLDevice {
                device_type: DLDeviceType::kDLCUDA,
                device_id: self.alloc.ordinal,
            },
            dtype,
            shape: &t.shape,
        })
    }

    /// Exports tensor `index` as a versioned DLPack tensor (kDLCUDA) that
    /// keeps the device allocation alive. The data is this process's own
    /// copy: `IS_COPIED` is set, `READ_ONLY` is not.
    pub fn to_dlpack(&self, index: usize) -> Result<*mut DLManagedTensorVersioned> {
        let desc = self.desc(index)?;
        Ok(dlpack::export_versioned(
            self.alloc.clone(),
            &desc,
            dlpack::DLPACK_FLAG_BITMASK_IS_COPIED,
        ))
    }

    /// Same as [`DeviceWeights::to_dlpack`] in the legacy form.
    pub fn to_dlpack_legacy(&self, index: usize) -> Result<*mut DLManagedTensor> {
        let desc = self.desc(index)?;
        Ok(dlpack::export_legacy(self.alloc.clone(), &desc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_stays_inside_chunks() {
        let ops = [CopyOp {
            src: 1000,
            dst: 0,
            len: 10_000,
        }];
        let parts = split(&ops, 4096);
        assert_eq!(parts.iter().map(|p| p.len).sum::<usize>(), 10_000);
        for p in &parts {
            assert_eq!(p.src / 4096, (p.src + p.len - 1) / 4096);
            assert_eq!(p.dst, p.src - 1000);
        }
    }
}
