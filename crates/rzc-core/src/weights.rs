//! An opened safetensors buffer: the bytes' owner plus the parsed tensor table.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::dlpack::{
    self, DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned, TensorDesc,
};
use crate::header::{self, TensorMeta};
use crate::{fail, Error, ErrorKind, Result};

/// Prefix of the padding entries the packer inserts to align tensor data.
/// Entries with this prefix are part of the file (so that any reader sees a
/// standard, hole-free buffer) but are not listed in the tensor table.
pub const PAD_PREFIX: &str = "__rzc_pad__.";

/// Something that owns a byte buffer and keeps it at a fixed address.
pub trait Bytes: Send + Sync + 'static {
    /// The bytes; the same address every call.
    fn bytes(&self) -> &[u8];
}

impl Bytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Bytes for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Memory owned by the caller, who promises to keep it alive and unchanged for
/// as long as the weights or any tensor exported from them exist.
struct Borrowed {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the caller of `Weights::from_borrowed` promises the memory stays
// valid and unmodified; it is only ever read.
unsafe impl Send for Borrowed {}
unsafe impl Sync for Borrowed {}

impl Bytes for Borrowed {
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: see `Weights::from_borrowed`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Shared owner of an opened buffer: the handle and every exported tensor hold
/// one reference, so the bytes outlive whichever goes last.
pub type Storage = Arc<dyn Bytes>;

/// An opened, validated safetensors buffer.
pub struct Weights {
    storage: Storage,
    tensors: Vec<TensorMeta>,
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    data_start: usize,
    data_end: usize,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("len", &self.tensors.len())
            .field("bytes", &self.bytes().len())
            .finish()
    }
}

impl Weights {
    /// Opens bytes that `owner` keeps alive.
    pub fn from_owner(owner: Storage) -> Result<Weights> {
        let header = header::parse(owner.bytes())?;
        Ok(Weights::with_header(owner, header))
    }

    /// Validates `bytes` and only when they are valid calls `make_owner` (with
    /// the parsed header) for the owner that keeps them alive (which must own
    /// exactly these bytes).
    /// An owner with side effects on drop (a release callback) is thus never
    /// created for a buffer that fails to open.
    pub fn from_validated(
        bytes: &[u8],
        make_owner: impl FnOnce(&header::Header) -> Result<Storage>,
    ) -> Result<Weights> {
        let header = header::parse(bytes)?;
        let owner = make_owner(&header)?;
        assert!(
            std::ptr::eq(owner.bytes().as_ptr(), bytes.as_ptr())
                && owner.bytes().len() == bytes.len(),
            "the owner must own the validated bytes"
        );
        Ok(Weights::with_header(owner, header))
    }

    fn with_header(owner: Storage, header: header::Header) -> Weights {
        let data_end = owner.bytes().len();
        let tensors: Vec<TensorMeta> = header
            .tensors
            .into_iter()
            .filter(|t| !t.name.starts_with(PAD_PREFIX))
            .collect();
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Weights {
            storage: owner,
            tensors,
            by_name,
            metadata: header.metadata,
            data_start: header.data_start,
            data_end,
        }
    }

    /// Opens a copy-free view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The memory must stay valid and unmodified until the weights and every
    /// tensor exported from them are dropped.
    pub unsafe fn from_borrowed(ptr: *const u8, len: usize) -> Result<Weights> {
        if ptr.is_null() && len != 0 {
            fail!(InvalidArgument, "data is NULL but len is {len}");
        }
        Weights::from_owner(Arc::new(Borrowed { ptr, len }))
    }

    /// Opens a buffer the weights take ownership of.
    pub fn from_vec(bytes: Vec<u8>) -> Result<Weights> {
        Weights::from_owner(Arc::new(bytes))
    }

    /// Memory-maps a file read-only. The file must not change while mapped.
    pub fn open_file(path: &Path) -> Result<Weights> {
        let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("{}: {e}", path.display()));
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            // mmap refuses empty files; the parser gives the real diagnosis.
            return Weights::from_vec(Vec::new());
        }
        // SAFETY: mapped read-only; a file changed by someone else while
        // mapped is the documented misuse, as with every mmap reader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Weights::from_owner(Arc::new(map))
    }

    /// The whole buffer (header included).
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The shared owner of the bytes.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Offset of the data section (the end of the header).
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Offset one past the end of the data section.
    pub fn data_end(&self) -> usize {
        self.data_end
    }

    /// Tensors (padding entries excluded), in the order of their data.
    pub fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the buffer holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor at `index`.
    pub fn get(&self, index: usize) -> Result<&TensorMeta> {
        match self.tensors.get(index) {
            Some(t) => Ok(t),
            None => fail!(
                OutOfRange,
                "tensor index {index} is out of range (the buffer holds {} tensors)",
                self.tensors.len()
            ),
        }
    }

    /// Index of the tensor called `name`.
    pub fn find(&self, name: &str) -> Result<usize> {
        match self.by_name.get(name) {
            Some(&i) => Ok(i),
            None => fail!(NotFound, "no tensor named {name:?}"),
        }
    }

    /// Bytes of the tensor at `index`.
    pub fn data(&self, index: usize) -> Result<&[u8]> {
        let t = self.get(index)?;
        Ok(&self.bytes()[t.offset..t.offset + t.nbytes])
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn cpu_desc(&self, index: usize) -> Result<(TensorDesc<'_>, Storage)> {
        let t = self.get(index)?;
        let Some(dtype) = t.dtype.to_dlpack() else {
            fail!(
                UnsupportedDtype,
                "tensor {:?} has dtype {}, a packed sub-byte type that DLPack consumers cannot take",
                t.name,
                t.dtype
            );
        };
        let desc = TensorDesc {
            data: self.bytes()[t.offset..].as_ptr() as *mut _,
            device: DLDevice {
                device_type: DLDeviceType::kDLCPU,
                device_id: 0,
            },
            dtype,
            shape: &t.shape,
        };
        Ok((desc, self.storage.clone()))
    }

    /// Exports tensor `index` zero-copy as a read-only versioned DLPack tensor
    /// that keeps the bytes alive until its deleter runs.
    pub fn to_dlpack(&self, index: usize) -> Result<*mut DLManagedTensorVersioned> {
        let (desc, owner) = self.cpu_desc(index)?;
        Ok(dlpack::export_versioned(
            owner,
            &desc,
            dlpack::DLPACK_FLAG_BITMASK_READ_ONLY,
        ))
    }

    /// Exports the whole data section (from the end of the header to the end
    /// of the buffer) as one read-only 1-D `U8` DLPack tensor: a consumer can
    /// cut every tensor out of it as a view, at `offset - data_start`.
    pub fn data_section_to_dlpack(&self) -> *mut DLManagedTensorVersioned {
        let len = (self.data_end - self.data_start) as i64;
        let desc = TensorDesc {
            data: self.bytes()[self.data_start..].as_ptr() as *mut _,
            device: DLDevice {
                device_type: DLDeviceType::kDLCPU,
                device_id: 0,
            },
            dtype: crate::Dtype::U8.to_dlpack().expect("U8"),
            shape: &[len],
        };
        dlpack::export_versioned(
            self.storage.clone(),
            &desc,
            dlpack::DLPACK_FLAG_BITMASK_READ_ONLY,
        )
    }

    /// Same as [`Weights::to_dlpack`] in the legacy (unversioned) form.
    pub fn to_dlpack_legacy(&self, index: usize) -> Result<*mut DLManagedTensor> {
        let (desc, owner) = self.cpu_desc(index)?;
        Ok(dlpack::export_legacy(owner, &desc))
    }
}
