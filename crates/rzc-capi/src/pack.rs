//! `rzc_pack_plan`: lays tensors out as one aligned safetensors buffer in
//! memory the caller allocates (plan, allocate `total_size`, write).

use std::collections::BTreeMap;
use std::ffi::c_char;

use rzc_core::pack::{PackOptions, Plan, TensorSpec};
use rzc_core::Dtype;

use crate::handle::{slice, str_n, Extensible, Handle};
use crate::status::{ffi_boundary, ffi_value_boundary, rzc_status, Failure, RZC_INVALID_ARGUMENT};
use crate::weights::{rzc_digest, rzc_metadata_entry};

/// A tensor to pack.
#[repr(C)]
pub struct rzc_pack_tensor {
    /// Name, `name_len` bytes of UTF-8 (need not be NUL-terminated).
    pub name: *const c_char,
    /// Length of `name` in bytes.
    pub name_len: usize,
    /// An `rzc_dtype` value (an integer here so that a bad value is an error,
    /// not undefined behaviour).
    pub dtype: u32,
    /// Number of dimensions.
    pub ndim: u32,
    /// `ndim` extents.
    pub shape: *const i64,
    /// The tensor's bytes, compact row-major, read by `rzc_pack_plan_write`.
    /// May be NULL when the caller fills the data itself after
    /// `rzc_pack_plan_write_layout`.
    pub data: *const u8,
    /// Size of `data` in bytes; must equal what dtype and shape need.
    pub nbytes: u64,
}

/// Layout options. Initialise as
/// `rzc_pack_options o = {.struct_nbytes = sizeof(rzc_pack_options)};`
/// (every other field zero: its default), then set what you need; NULL
/// options mean the defaults (alignment 64, no guard bytes).
#[repr(C)]
pub struct rzc_pack_options {
    /// `sizeof(rzc_pack_options)` as the caller was compiled: lets the struct
    /// grow in later versions without breaking callers.
    pub struct_nbytes: usize,
    /// Power of two; every tensor's data starts at a multiple of it from the
    /// buffer start. 0 means the default, 64.
    pub alignment: u64,
    /// Bytes belonging to no tensor before the first tensor and after the
    /// last one (e.g. 4096, so that a reader can write-protect every page
    /// holding tensor data). 0 for none.
    pub guard_nbytes: u64,
    /// 1: reserve room in the header's metadata (`rzc.data_blake3`) for the
    /// digest of the data section, which `rzc_pack_seal` writes once the
    /// buffer is filled. 0: none.
    pub reserve_digest: u32,
}

// SAFETY: all-zero is valid (the defaults); the first field is
// `struct_nbytes`.
unsafe impl Extensible for rzc_pack_options {
    const NAME: &'static str = "rzc_pack_options";
    // Callers compiled before `reserve_digest` existed pass a shorter struct.
    const MIN_NBYTES: usize = std::mem::offset_of!(rzc_pack_options, reserve_digest);
}

/// A computed layout (opaque). Holds the data pointers it was given: they must
/// stay valid until `rzc_pack_plan_write` returns.
pub struct rzc_pack_plan {
    _private: [u8; 0],
}

pub struct PlanState {
    plan: Plan,
    data: Vec<(*const u8, usize)>,
}

// SAFETY: the pointers are the caller's tensors, only ever read (by the
// writes, whose contract keeps them valid and unchanged while they run):
// reading them on any thread, or on several at once, is sound.
unsafe impl Send for PlanState {}
// SAFETY: as above; a shared `PlanState` hands out nothing but reads.
unsafe impl Sync for PlanState {}

impl Handle for rzc_pack_plan {
    type Rust = PlanState;
}

impl PlanState {
    /// Each tensor's bytes, from the pointers given to `rzc_pack_plan_new`.
    ///
    /// # Safety
    /// Those pointers are still valid (the contract of the writes).
    unsafe fn sources(&self) -> crate::status::FfiResult<Vec<&[u8]>> {
        let mut data = Vec::with_capacity(self.data.len());
        for (i, &(ptr, n)) in self.data.iter().enumerate() {
            if ptr.is_null() && n > 0 {
                return Err(Failure::null(&format!("tensors[{i}].data")));
            }
            // SAFETY: the caller's promise, forwarded.
            data.push(unsafe { slice(ptr, n, "data")? });
        }
        Ok(data)
    }
}

/// Plans the layout of `tensors_len` tensors (kept in the given order) and
/// `metadata_len` `__metadata__` entries. On success `*out` receives a plan to
/// free with `rzc_pack_plan_free`.
///
/// # Safety
/// `tensors` points to `tensors_len` entries and `metadata` to `metadata_len`
/// (either may be NULL when its count is 0); `options` is NULL or valid;
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_plan_new(
    tensors: *const rzc_pack_tensor,
    tensors_len: usize,
    metadata: *const rzc_metadata_entry,
    metadata_len: usize,
    options: *const rzc_pack_options,
    out: *mut *mut rzc_pack_plan,
) -> rzc_status {
    ffi_boundary! {
        let out = out!(out);
        let inputs = slice_arg!(tensors, tensors_len);
        let mut meta = BTreeMap::new();
        for m in slice_arg!(metadata, metadata_len) {
            // SAFETY: the export's contract: every entry's strings are valid.
            let k = unsafe { str_n(m.key, m.key_len, "metadata key")? };
            // SAFETY: as above.
            let v = unsafe { str_n(m.value, m.value_len, "metadata value")? };
            meta.insert(k.to_owned(), v.to_owned());
        }
        let mut opts = PackOptions::default();
        if let Some(o) = options_arg!(options) {
            if o.alignment != 0 {
                opts.alignment = usize::try_from(o.alignment).map_err(|_| Failure::new(RZC_INVALID_ARGUMENT, "alignment too large"))?;
            }
            opts.guard_bytes = usize::try_from(o.guard_nbytes).map_err(|_| Failure::new(RZC_INVALID_ARGUMENT, "guard_nbytes too large"))?;
            opts.reserve_digest = o.reserve_digest != 0;
        }
        let mut specs = Vec::with_capacity(inputs.len());
        let mut data = Vec::with_capacity(inputs.len());
        for (i, t) in inputs.iter().enumerate() {
            // SAFETY: the export's contract: every tensor's name and shape
            // pointers are valid for their lengths.
            let name = unsafe { str_n(t.name, t.name_len, "tensor name")? };
            let dtype = Dtype::from_u32(t.dtype).ok_or_else(|| {
                Failure::new(crate::status::RZC_UNSUPPORTED_DTYPE, format!("tensor {i} ({name:?}): {} is not an rzc_dtype value", t.dtype))
            })?;
            // SAFETY: as above.
            let shape = unsafe { slice(t.shape, t.ndim as usize, "tensor shape")? };
            specs.push(TensorSpec { name, dtype, shape });
            data.push((t.data, t.nbytes as usize));
        }
        let plan = Plan::new(&specs, &meta, &opts)?;
        for (i, &(_, n)) in data.iter().enumerate() {
            if n != plan.nbytes(i)? {
                return Err(Failure::new(
                    RZC_INVALID_ARGUMENT,
                    format!("tensor {i} ({:?}): nbytes is {n}, its shape and dtype need {}", specs[i].name, plan.nbytes(i)?),
                ));
            }
        }
        out.write(rzc_pack_plan::into_raw(PlanState { plan, data }))
    }
}

/// Size in bytes of the buffer the plan writes (0 for a NULL plan).
///
/// # Safety
/// `plan` is NULL or a live plan.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_plan_nbytes(plan: *const rzc_pack_plan) -> u64 {
    ffi_value_boundary!(
        0,
        borrow_or_none!(rzc_pack_plan, plan)
            .map(|p| p.plan.total_size() as u64)
            .unwrap_or(0)
    )
}

/// Byte offset of tensor `index`'s data from the buffer start.
///
/// # Safety
/// `plan` is a live plan; `offset_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_plan_offset(
    plan: *const rzc_pack_plan,
    index: usize,
    offset_out: *mut u64,
) -> rzc_status {
    ffi_boundary! {
        let p = borrow!(rzc_pack_plan, plan);
        let out = out!(offset_out);
        out.write(p.plan.offset(index)? as u64)
    }
}

/// Writes the header and zeroes the padding into `dst`, leaving each tensor's
/// data region (`rzc_pack_plan_offset`) for the caller to fill.
///
/// # Safety
/// `plan` is a live plan; `dst` points to `dst_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_plan_write_layout(
    plan: *const rzc_pack_plan,
    dst: *mut u8,
    dst_len: usize,
) -> rzc_status {
    ffi_boundary! {
        let p = borrow!(rzc_pack_plan, plan);
        p.plan.write_layout(bytes_mut_arg!(dst, dst_len))?;
        Ok(())
    }
}

/// Writes the whole buffer into `dst`: header, padding, and every tensor's
/// data copied from the pointers given to `rzc_pack_plan_new`.
///
/// # Safety
/// `plan` is a live plan whose data pointers are still valid; `dst` points to
/// `dst_len` writable bytes that do not overlap them.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_plan_write(
    plan: *const rzc_pack_plan,
    dst: *mut u8,
    dst_len: usize,
) -> rzc_status {
    ffi_boundary! {
        let p = borrow!(rzc_pack_plan, plan);
        // SAFETY: the export's contract: the plan's data pointers are valid.
        let data = unsafe { p.sources()? };
        p.plan.write(bytes_mut_arg!(dst, dst_len), &data)?;
        Ok(())
    }
}

/// Copies every tensor's data into `dst`, whose layout is written already
/// (`rzc_pack_plan_write_layout`, then `rzc_pack_sealer_new` on it), on
/// every core, hashing each block as it completes (`rzc_pack_sealer_copy`).
/// Then call `rzc_pack_sealer_finish`.
///
/// # Safety
/// As `rzc_pack_plan_write`; `sealer` is a live sealer of `dst`.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_plan_write_sealing(
    plan: *const rzc_pack_plan,
    dst: *mut u8,
    dst_len: usize,
    sealer: *const crate::seal::rzc_pack_sealer,
) -> rzc_status {
    ffi_boundary! {
        let p = borrow!(rzc_pack_plan, plan);
        let s = borrow!(crate::seal::rzc_pack_sealer, sealer);
        crate::handle::not_null(dst, "dst")?;
        if !s.seals(dst.cast_const(), dst_len) {
            return Err(Failure::new(RZC_INVALID_ARGUMENT, "this sealer was made for another buffer"));
        }
        if dst_len < p.plan.total_size() {
            return Err(Failure::new(crate::status::RZC_BUFFER_TOO_SMALL, format!("destination is {dst_len} bytes; the plan needs {}", p.plan.total_size())));
        }
        // SAFETY: the export's contract: the plan's data pointers are valid.
        let sources = unsafe { p.sources()? };
        let mut copies = Vec::with_capacity(sources.len());
        for (i, src) in sources.into_iter().enumerate() {
            copies.push(rzc_core::seal::Piece { src: src.as_ptr() as usize as u64, dst_offset: p.plan.offset(i)? as u64, nbytes: src.len() as u64 });
        }
        // SAFETY: the plan's sources (slices: never NULL), valid for the call (above).
        Ok(unsafe { s.copy(&copies, 0) }?)
    }
}

/// Seals a filled buffer planned with `reserve_digest`: computes the BLAKE3
/// digest of its data section (on every core when it is large), writes it
/// into the header's `rzc.data_blake3` metadata, and writes the buffer's
/// content digest (which covers every byte: see `rzc_weights_content_digest`)
/// to `*out`. Fails, changing nothing, on a buffer that is not valid or has
/// no room reserved.
///
/// # Safety
/// `dst` points to `dst_len` writable bytes that no one else uses meanwhile;
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_seal(
    dst: *mut u8,
    dst_len: usize,
    out: *mut rzc_digest,
) -> rzc_status {
    ffi_boundary! {
        let out = out!(out);
        let digest = rzc_core::digest::seal(bytes_mut_arg!(dst, dst_len))?;
        out.write(rzc_digest { bytes: digest })
    }
}

/// Frees a plan; NULL is a no-op.
///
/// # Safety
/// `plan` is NULL or a plan not yet freed, which no other thread is using
/// (nor will: the one call on a plan that may not overlap others).
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_plan_free(plan: *mut rzc_pack_plan) {
    ffi_value_boundary!((), free_handle!(rzc_pack_plan, plan))
}
