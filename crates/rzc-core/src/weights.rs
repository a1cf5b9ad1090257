//! An opened safetensors buffer: the bytes' owner plus the parsed tensor table.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use crate::dlpack::{
    self, DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned, TensorDesc,
};
use crate::header::{self, TensorMeta};
use crate::platform::{GuardState, WriteGuard};
use crate::storage::{self, Borrowed, Bytes, Storage};
use crate::{fail, Result};

/// How to open a buffer. `OpenOptions::default()` guards nothing and calls
/// nothing back.
#[derive(Default)]
pub struct OpenOptions {
    /// Make every whole page of the buffer (tensor data and header) read-only
    /// in this process while the buffer is open (the handle or any exported tensor alive), so that a
    /// write through a tensor faults in the writer instead of changing memory
    /// that other processes share. Needs a page of non-tensor bytes before the
    /// first and after the last tensor (`PackOptions::guard_bytes`).
    pub write_protect: bool,
    /// Called once when the last user of the bytes is gone (the handle and
    /// every exported tensor), after the protection is lifted: the owner of
    /// borrowed memory learns when it may let go. Never called when opening
    /// fails.
    pub on_release: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("write_protect", &self.write_protect)
            .field("on_release", &self.on_release.is_some())
            .finish()
    }
}

/// An owner wrapped with what opening added: the write guard, lifted first
/// when the last reference goes, then the release callback.
struct Opened {
    inner: Storage,
    guard: Option<WriteGuard>,
    on_release: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Bytes for Opened {
    fn bytes(&self) -> &[u8] {
        self.inner.bytes()
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        // Writable again before the owner may hand the memory back.
        drop(self.guard.take());
        let release = self
            .on_release
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(release) = release {
            release();
        }
    }
}

/// An opened, validated safetensors buffer.
pub struct Weights {
    storage: Storage,
    tensors: Vec<TensorMeta>,
    /// Built on the first lookup by name: a load never needs it.
    by_name: OnceLock<HashMap<String, usize>>,
    metadata: BTreeMap<String, String>,
    data_start: usize,
    data_end: usize,
    guard_state: Option<GuardState>,
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
    /// Validates the bytes `owner` keeps alive and opens them with `options`.
    /// Nothing of `options` takes effect unless the whole header is valid.
    pub fn open(owner: Storage, options: OpenOptions) -> Result<Weights> {
        let header = header::parse(owner.bytes())?;
        let guard = match (options.write_protect, header.tensor_span()) {
            (true, Some((start, end))) => WriteGuard::protect(owner.bytes(), start..end)?,
            _ => None,
        };
        let guard_state = guard.as_ref().map(WriteGuard::state);
        let storage: Storage = if guard.is_none() && options.on_release.is_none() {
            owner
        } else {
            Arc::new(Opened {
                inner: owner,
                guard,
                on_release: Mutex::new(options.on_release),
            })
        };
        let mut weights = Weights::with_header(storage, header);
        weights.guard_state = guard_state;
        Ok(weights)
    }

    /// Opens memory the caller owns (see [`Borrowed::new`]) without copying.
    pub fn open_borrowed(bytes: Borrowed, options: OpenOptions) -> Result<Weights> {
        Weights::open(Arc::new(bytes), options)
    }

    /// Opens a buffer the weights take ownership of.
    pub fn from_vec(bytes: Vec<u8>) -> Result<Weights> {
        Weights::open(Arc::new(bytes), OpenOptions::default())
    }

    /// Memory-maps a file read-only. The file must not change while mapped.
    pub fn open_file(path: &Path) -> Result<Weights> {
        Weights::open(storage::map_file(path)?, OpenOptions::default())
    }

    fn with_header(owner: Storage, header: header::Header) -> Weights {
        let data_end = owner.bytes().len();
        let tensors: Vec<TensorMeta> = header
            .tensors
            .into_iter()
            .filter(|t| !t.name.starts_with(crate::pack::PAD_PREFIX))
            .collect();
        Weights {
            storage: owner,
            tensors,
            by_name: OnceLock::new(),
            metadata: header.metadata,
            data_start: header.data_start,
            data_end,
            guard_state: None,
        }
    }

    /// How this handle's write guard holds: `None` when it was opened
    /// without `write_protect` (or holds no tensors).
    pub fn guard_state(&self) -> Option<GuardState> {
        self.guard_state
    }

    /// The whole buffer (header included).
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
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
        let by_name = self.by_name.get_or_init(|| {
            self.tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect()
        });
        match by_name.get(name) {
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

    /// Exports tensors `indices` as [`Weights::to_dlpack`] does, all or none:
    /// on an error no tensor is created.
    pub fn to_dlpack_many(&self, indices: &[usize]) -> Result<Vec<*mut DLManagedTensorVersioned>> {
        self.export_many(indices, |owner, desc| {
            dlpack::export_versioned(owner, desc, dlpack::DLPACK_FLAG_BITMASK_READ_ONLY)
        })
    }

    /// `export` of tensors `indices`, all or none: every index is checked
    /// (and every description made) before the first tensor is created.
    fn export_many<T>(
        &self,
        indices: &[usize],
        export: impl Fn(Storage, &TensorDesc<'_>) -> *mut T,
    ) -> Result<Vec<*mut T>> {
        let descs = indices
            .iter()
            .map(|&i| self.cpu_desc(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(descs
            .into_iter()
            .map(|(desc, owner)| export(owner, &desc))
            .collect())
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

    /// [`Weights::to_dlpack_legacy`] of tensors `indices`, all or none: on
    /// an error no tensor is created.
    pub fn to_dlpack_legacy_many(&self, indices: &[usize]) -> Result<Vec<*mut DLManagedTensor>> {
        self.export_many(indices, dlpack::export_legacy)
    }
}
