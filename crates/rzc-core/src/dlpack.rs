//! DLPack 1.1 data structures (the standard names, laid out as in `dlpack.h`)
//! and a generic exporter whose deleter owns what the tensor points into.
//!
//! The exporter is the one place in the core with `extern "C"` code: the
//! deleter is part of the DLPack contract, and both the CPU path and the CUDA
//! path share it, so it lives next to the structs it frees.

use std::ffi::c_void;

/// DLPack ABI major version implemented here.
pub const DLPACK_MAJOR_VERSION: u32 = 1;
/// DLPack ABI minor version implemented here.
pub const DLPACK_MINOR_VERSION: u32 = 1;
/// Flag: the tensor's memory must not be written by the consumer.
pub const DLPACK_FLAG_BITMASK_READ_ONLY: u64 = 1 << 0;
/// Flag: the producer copied the data, so the consumer owns a private copy.
pub const DLPACK_FLAG_BITMASK_IS_COPIED: u64 = 1 << 1;
/// Flag: sub-byte dtypes are padded to whole bytes.
pub const DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED: u64 = 1 << 2;

/// The DLPack ABI version of a `DLManagedTensorVersioned`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLPackVersion {
    /// Major version; a consumer refuses a different major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// Kind of device a DLPack tensor lives on.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DLDeviceType {
    /// Host memory.
    kDLCPU = 1,
    /// CUDA device memory.
    kDLCUDA = 2,
    /// Pinned CUDA host memory.
    kDLCUDAHost = 3,
    /// OpenCL device memory.
    kDLOpenCL = 4,
    /// Vulkan buffer.
    kDLVulkan = 7,
    /// Metal buffer.
    kDLMetal = 8,
    /// Verilog simulator buffer.
    kDLVPI = 9,
    /// ROCm device memory.
    kDLROCM = 10,
    /// Pinned ROCm host memory.
    kDLROCMHost = 11,
    /// Reserved extension device type.
    kDLExtDev = 12,
    /// CUDA managed (unified) memory.
    kDLCUDAManaged = 13,
    /// oneAPI unified shared memory.
    kDLOneAPI = 14,
    /// WebGPU buffer.
    kDLWebGPU = 15,
    /// Qualcomm Hexagon DSP.
    kDLHexagon = 16,
    /// Microsoft MAIA device.
    kDLMAIA = 17,
}

/// A device: its type and ordinal.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDevice {
    /// The kind of device.
    pub device_type: DLDeviceType,
    /// The device ordinal (0 for the CPU).
    pub device_id: i32,
}

/// Type codes of `DLDataType::code`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DLDataTypeCode {
    /// Signed integer.
    kDLInt = 0,
    /// Unsigned integer.
    kDLUInt = 1,
    /// IEEE float.
    kDLFloat = 2,
    /// Opaque handle.
    kDLOpaqueHandle = 3,
    /// bfloat16.
    kDLBfloat = 4,
    /// Complex number (two floats).
    kDLComplex = 5,
    /// Boolean.
    kDLBool = 6,
    /// FP8 e3m4.
    kDLFloat8_e3m4 = 7,
    /// FP8 e4m3.
    kDLFloat8_e4m3 = 8,
    /// FP8 e4m3 with bias 11, finite, unsigned zero.
    kDLFloat8_e4m3b11fnuz = 9,
    /// FP8 e4m3, finite.
    kDLFloat8_e4m3fn = 10,
    /// FP8 e4m3, finite, unsigned zero.
    kDLFloat8_e4m3fnuz = 11,
    /// FP8 e5m2.
    kDLFloat8_e5m2 = 12,
    /// FP8 e5m2, finite, unsigned zero.
    kDLFloat8_e5m2fnuz = 13,
    /// FP8 e8m0, finite, unsigned.
    kDLFloat8_e8m0fnu = 14,
    /// FP6 e2m3, finite.
    kDLFloat6_e2m3fn = 15,
    /// FP6 e3m2, finite.
    kDLFloat6_e3m2fn = 16,
    /// FP4 e2m1, finite.
    kDLFloat4_e2m1fn = 17,
}

/// An element type: a `DLDataTypeCode`, a bit width and a lane count.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDataType {
    /// A `DLDataTypeCode` value.
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes per element (1 for scalars).
    pub lanes: u16,
}

/// A tensor: pointer, device, dtype, shape and strides, owned by someone else.
#[repr(C)]
#[derive(Debug)]
pub struct DLTensor {
    /// Start of the allocation the tensor lives in (the tensor starts at
    /// `data + byte_offset`).
    pub data: *mut c_void,
    /// Where `data` lives.
    pub device: DLDevice,
    /// Number of dimensions (0 for a scalar).
    pub ndim: i32,
    /// Element type.
    pub dtype: DLDataType,
    /// `ndim` extents.
    pub shape: *mut i64,
    /// `ndim` strides in elements, or NULL for a compact row-major tensor.
    pub strides: *mut i64,
    /// Offset in bytes from `data` to the first element.
    pub byte_offset: u64,
}

/// Legacy (pre-1.0) managed tensor, still the only form some consumers take.
#[repr(C)]
#[derive(Debug)]
pub struct DLManagedTensor {
    /// The tensor.
    pub dl_tensor: DLTensor,
    /// Producer's context; opaque to the consumer.
    pub manager_ctx: *mut c_void,
    /// Called once by the consumer when it no longer needs the tensor.
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// Versioned (DLPack >= 1.0) managed tensor.
#[repr(C)]
#[derive(Debug)]
pub struct DLManagedTensorVersioned {
    /// ABI version of this struct.
    pub version: DLPackVersion,
    /// Producer's context; opaque to the consumer.
    pub manager_ctx: *mut c_void,
    /// Called once by the consumer when it no longer needs the tensor.
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    /// `DLPACK_FLAG_BITMASK_*` bits.
    pub flags: u64,
    /// The tensor.
    pub dl_tensor: DLTensor,
}

/// What a DLPack export needs to describe one tensor.
pub struct TensorDesc<'a> {
    /// First byte of the tensor.
    pub data: *mut c_void,
    /// Where the bytes live.
    pub device: DLDevice,
    /// Element type.
    pub dtype: DLDataType,
    /// Extents.
    pub shape: &'a [i64],
}

// The managed struct comes first so that a pointer to it is a pointer to the
// whole holder: the deleter recovers the holder without a lookup.
#[repr(C)]
struct Holder<M, O> {
    managed: M,
    shape: Box<[i64]>,
    owner: O,
}

fn dl_tensor(desc: &TensorDesc<'_>, shape: &mut [i64]) -> DLTensor {
    DLTensor {
        data: desc.data,
        device: desc.device,
        ndim: desc.shape.len() as i32,
        dtype: desc.dtype,
        shape: shape.as_mut_ptr(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    }
}

unsafe extern "C" fn delete_holder<M, O>(managed: *mut M) {
    if managed.is_null() {
        return;
    }
    // A panic in `O`'s destructor must not unwind into the consumer's C frame.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `managed` came from `Box::into_raw` of a `Holder<M, O>` whose
        // first field is the managed struct (see `export_*`), and DLPack calls
        // the deleter exactly once.
        drop(unsafe { Box::from_raw(managed.cast::<Holder<M, O>>()) });
    }));
}

/// The two managed-tensor forms, built the same way.
trait Managed: Sized {
    fn new(tensor: DLTensor, deleter: unsafe extern "C" fn(*mut Self), flags: u64) -> Self;
    fn set_context(&mut self, ctx: *mut c_void);
}

impl Managed for DLManagedTensorVersioned {
    fn new(dl_tensor: DLTensor, deleter: unsafe extern "C" fn(*mut Self), flags: u64) -> Self {
        DLManagedTensorVersioned {
            version: DLPackVersion {
                major: DLPACK_MAJOR_VERSION,
                minor: DLPACK_MINOR_VERSION,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(deleter),
            flags,
            dl_tensor,
        }
    }
    fn set_context(&mut self, ctx: *mut c_void) {
        self.manager_ctx = ctx;
    }
}

impl Managed for DLManagedTensor {
    fn new(dl_tensor: DLTensor, deleter: unsafe extern "C" fn(*mut Self), _flags: u64) -> Self {
        DLManagedTensor {
            dl_tensor,
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(deleter),
        }
    }
    fn set_context(&mut self, ctx: *mut c_void) {
        self.manager_ctx = ctx;
    }
}

fn export<M: Managed, O: Send + 'static>(owner: O, desc: &TensorDesc<'_>, flags: u64) -> *mut M {
    let mut shape: Box<[i64]> = desc.shape.into();
    let managed = M::new(dl_tensor(desc, &mut shape), delete_holder::<M, O>, flags);
    let holder = Box::into_raw(Box::new(Holder {
        managed,
        shape,
        owner,
    }));
    // SAFETY: `holder` is a fresh, valid allocation.
    unsafe { (*holder).managed.set_context(holder.cast()) };
    holder.cast()
}

/// Exports a tensor as a `DLManagedTensorVersioned` that keeps `owner` alive
/// until its deleter runs. `owner` must keep `desc.data` valid.
pub fn export_versioned<O: Send + 'static>(
    owner: O,
    desc: &TensorDesc<'_>,
    flags: u64,
) -> *mut DLManagedTensorVersioned {
    export(owner, desc, flags)
}

/// Exports a tensor as a legacy `DLManagedTensor` that keeps `owner` alive
/// until its deleter runs. The legacy form has no flags: a consumer cannot
/// learn that the memory is read-only.
pub fn export_legacy<O: Send + 'static>(owner: O, desc: &TensorDesc<'_>) -> *mut DLManagedTensor {
    export(owner, desc, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};
    use std::sync::Arc;

    // Layout as in dlpack.h on 64-bit targets.
    #[test]
    fn layout_matches_dlpack_h() {
        assert_eq!(size_of::<DLDevice>(), 8);
        assert_eq!(size_of::<DLDataType>(), 4);
        assert_eq!(size_of::<DLTensor>(), 48);
        assert_eq!(offset_of!(DLTensor, device), 8);
        assert_eq!(offset_of!(DLTensor, ndim), 16);
        assert_eq!(offset_of!(DLTensor, dtype), 20);
        assert_eq!(offset_of!(DLTensor, shape), 24);
        assert_eq!(offset_of!(DLTensor, strides), 32);
        assert_eq!(offset_of!(DLTensor, byte_offset), 40);
        assert_eq!(size_of::<DLManagedTensor>(), 64);
        assert_eq!(offset_of!(DLManagedTensor, deleter), 56);
        assert_eq!(size_of::<DLManagedTensorVersioned>(), 80);
        assert_eq!(offset_of!(DLManagedTensorVersioned, manager_ctx), 8);
        assert_eq!(offset_of!(DLManagedTensorVersioned, deleter), 16);
        assert_eq!(offset_of!(DLManagedTensorVersioned, flags), 24);
        assert_eq!(offset_of!(DLManagedTensorVersioned, dl_tensor), 32);
        assert_eq!(align_of::<DLManagedTensorVersioned>(), 8);
    }

    #[test]
    fn deleter_releases_owner() {
        let owner = Arc::new(vec![1u8; 16]);
        let desc = TensorDesc {
            data: owner.as_ptr() as *mut c_void,
            device: DLDevice {
                device_type: DLDeviceType::kDLCPU,
                device_id: 0,
            },
            dtype: DLDataType {
                code: 1,
                bits: 8,
                lanes: 1,
            },
            shape: &[4, 4],
        };
        let v = export_versioned(owner.clone(), &desc, DLPACK_FLAG_BITMASK_READ_ONLY);
        let l = export_legacy(owner.clone(), &desc);
        assert_eq!(Arc::strong_count(&owner), 3);
        // SAFETY: both exports are live until their deleters run below.
        unsafe {
            assert_eq!((*v).dl_tensor.ndim, 2);
            assert_eq!(*(*v).dl_tensor.shape.add(1), 4);
            assert_eq!((*v).manager_ctx, v.cast());
            ((*v).deleter.unwrap())(v);
            ((*l).deleter.unwrap())(l);
        }
        assert_eq!(Arc::strong_count(&owner), 1);
    }
}
