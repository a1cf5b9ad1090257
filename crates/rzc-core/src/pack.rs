//! The writer side: lays out tensors as one standard safetensors buffer in
//! memory the caller provides, every tensor's data at an aligned offset.
//!
//! The format forbids holes between tensors, so alignment gaps are filled by
//! small `U8` padding entries named with [`PAD_PREFIX`]: any safetensors reader
//! accepts the buffer, and this library's reader hides those entries. The
//! header is padded with spaces (as the official writer does) so that the data
//! section itself starts at an aligned offset.

use std::collections::{BTreeMap, HashSet};

use crate::header::{checked_nbytes, METADATA_KEY};
use crate::{fail, Dtype, Error, ErrorKind, Result};

/// Prefix of the padding entries the packer inserts to align tensor data.
/// Entries with this prefix are part of the file (so that any reader sees a
/// standard, hole-free buffer) but are not listed in the tensor table.
pub const PAD_PREFIX: &str = "__rzc_pad__.";

/// Default alignment of every tensor's data from the buffer start: JAX adopts
/// 64-byte aligned host memory without copying, and vector loads like it.
pub const DEFAULT_ALIGNMENT: usize = 64;
/// Largest alignment accepted.
pub const MAX_ALIGNMENT: usize = 1 << 20;

/// How to lay out the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackOptions {
    /// Power of two; every tensor's data starts at a multiple of it.
    pub alignment: usize,
    /// Bytes that belong to no tensor before the first tensor and after the
    /// last one (header and padding). A page of each lets a reader protect
    /// every page holding tensor data without touching memory outside the
    /// buffer. 0 for none.
    pub guard_bytes: usize,
    /// Reserve room in the header's metadata for the digest of the data
    /// section, which [`crate::digest::seal`] writes once the data is in
    /// place (see [`crate::digest`]).
    pub reserve_digest: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            alignment: DEFAULT_ALIGNMENT,
            guard_bytes: 0,
            reserve_digest: false,
        }
    }
}

/// A tensor to lay out.
#[derive(Clone, Copy, Debug)]
pub struct TensorSpec<'a> {
    /// Name (unique, not `__metadata__`, not starting with [`PAD_PREFIX`]).
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Extents.
    pub shape: &'a [i64],
}

/// A computed layout: total size, the header bytes and each tensor's offset.
#[derive(Clone, Debug)]
pub struct Plan {
    prefix: Vec<u8>,
    offsets: Vec<usize>,
    nbytes: Vec<usize>,
    pads: Vec<(usize, usize)>,
    total: usize,
}

fn align_up(x: usize, a: usize) -> Option<usize> {
    Some(x.checked_add(a - 1)? & !(a - 1))
}

fn too_big() -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        "the packed buffer would be larger than the address space",
    )
}

/// A header entry: name, dtype, shape and `[begin, end)` in the data section.
type Entry = (String, Dtype, Vec<i64>, usize, usize);

/// Where every tensor and padding entry goes in the data section.
#[derive(Default)]
struct Slots {
    entries: Vec<Entry>,
    offsets: Vec<usize>,
    nbytes: Vec<usize>,
    pads: Vec<(usize, usize)>,
    /// The end of the data section.
    end: usize,
}

impl Slots {
    /// Lays `tensors` out in order, each at a multiple of `alignment`, with
    /// `guard_bytes` of padding after the last.
    fn lay_out(tensors: &[TensorSpec<'_>], alignment: usize, guard_bytes: usize) -> Result<Slots> {
        let mut slots = Slots {
            entries: Vec::with_capacity(tensors.len() + 8),
            ..Slots::default()
        };
        let mut names = HashSet::with_capacity(tensors.len());
        for t in tensors {
            if t.name == METADATA_KEY || t.name.starts_with(PAD_PREFIX) {
                fail!(InvalidArgument, "tensor name {:?} is reserved", t.name);
            }
            if !names.insert(t.name) {
                fail!(InvalidArgument, "tensor name {:?} is given twice", t.name);
            }
            let n = checked_nbytes(t.name, t.dtype, t.shape)
                .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.message()))?
                as usize;
            let begin = align_up(slots.end, alignment).ok_or_else(too_big)?;
            slots.pad_to(begin);
            let end = begin.checked_add(n).ok_or_else(too_big)?;
            slots
                .entries
                .push((t.name.to_owned(), t.dtype, t.shape.to_vec(), begin, end));
            slots.offsets.push(begin);
            slots.nbytes.push(n);
            slots.end = end;
        }
        slots.pad_to(slots.end.checked_add(guard_bytes).ok_or_else(too_big)?);
        Ok(slots)
    }

    /// A padding entry from the current end to `end` (none when equal).
    fn pad_to(&mut self, end: usize) {
        if end > self.end {
            let name = format!("{PAD_PREFIX}{}", self.pads.len());
            self.entries.push((
                name,
                Dtype::U8,
                vec![(end - self.end) as i64],
                self.end,
                end,
            ));
            self.pads.push((self.end, end));
            self.end = end;
        }
    }
}

/// The metadata to write: the caller's, with the digest's placeholder when
/// `reserve_digest`; the reserved key from a caller is refused without it.
fn metadata_to_write<'m>(
    metadata: &'m BTreeMap<String, String>,
    options: &PackOptions,
) -> Result<std::borrow::Cow<'m, BTreeMap<String, String>>> {
    use crate::digest::{DATA_DIGEST_KEY, DATA_DIGEST_PLACEHOLDER};
    if !options.reserve_digest {
        if metadata.contains_key(DATA_DIGEST_KEY) {
            // Copied from another buffer it would claim a digest these bytes
            // do not have.
            fail!(
                InvalidArgument,
                "metadata key {DATA_DIGEST_KEY:?} is reserved for the digest sealing writes: leave it out (or plan with reserve_digest)"
            );
        }
        return Ok(std::borrow::Cow::Borrowed(metadata));
    }
    let mut m = metadata.clone();
    m.insert(
        DATA_DIGEST_KEY.to_owned(),
        DATA_DIGEST_PLACEHOLDER.to_owned(),
    );
    Ok(std::borrow::Cow::Owned(m))
}

/// The header's JSON text.
fn header_json(metadata: &BTreeMap<String, String>, entries: &[Entry]) -> String {
    let mut json = String::with_capacity(64 + entries.len() * 96);
    json.push('{');
    if !metadata.is_empty() {
        json.push_str(&serde_json::to_string(METADATA_KEY).expect("string"));
        json.push(':');
        json.push_str(&serde_json::to_string(metadata).expect("string map"));
    }
    for (name, dtype, shape, begin, end) in entries {
        if json.len() > 1 {
            json.push(',');
        }
        let name = serde_json::to_string(name).expect("string");
        let shape = serde_json::to_string(shape).expect("ints");
        json.push_str(&format!(
            "{name}:{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":[{begin},{end}]}}"
        ));
    }
    json.push('}');
    json
}

/// The bytes before the data section: length, JSON, spaces up to an aligned
/// data start at least `guard_bytes` from the buffer start (so offsets
/// aligned within the data section are aligned from the buffer start too).
fn prefix(json: &str, alignment: usize, guard_bytes: usize) -> Result<Vec<u8>> {
    let step = alignment.max(8);
    let mut data_start = align_up(8 + json.len(), step).ok_or_else(too_big)?;
    if guard_bytes > data_start {
        data_start = align_up(guard_bytes, step).ok_or_else(too_big)?;
    }
    let header_len = data_start - 8;
    if header_len as u64 > crate::header::MAX_HEADER_LEN {
        fail!(
            InvalidArgument,
            "the header would be {header_len} bytes, over the format's limit"
        );
    }
    let mut prefix = Vec::with_capacity(data_start);
    prefix.extend_from_slice(&(header_len as u64).to_le_bytes());
    prefix.extend_from_slice(json.as_bytes());
    prefix.resize(data_start, b' ');
    Ok(prefix)
}

impl Plan {
    /// Plans the layout of `tensors` (in the given order) and `metadata`.
    pub fn new(
        tensors: &[TensorSpec<'_>],
        metadata: &BTreeMap<String, String>,
        options: &PackOptions,
    ) -> Result<Plan> {
        let a = options.alignment;
        if !a.is_power_of_two() || a > MAX_ALIGNMENT {
            fail!(
                InvalidArgument,
                "alignment {a} is not a power of two between 1 and {MAX_ALIGNMENT}"
            );
        }
        let mut slots = Slots::lay_out(tensors, a, options.guard_bytes)?;
        let metadata = metadata_to_write(metadata, options)?;
        let json = header_json(&metadata, &slots.entries);
        let prefix = prefix(&json, a, options.guard_bytes)?;
        let data_start = prefix.len();
        slots.offsets.iter_mut().for_each(|x| *x += data_start);
        for (b, e) in &mut slots.pads {
            *b += data_start;
            *e += data_start;
        }
        let total = data_start.checked_add(slots.end).ok_or_else(too_big)?;
        Ok(Plan {
            prefix,
            offsets: slots.offsets,
            nbytes: slots.nbytes,
            pads: slots.pads,
            total,
        })
    }

    /// Size of the whole buffer in bytes.
    pub fn total_size(&self) -> usize {
        self.total
    }

    /// Offset of the data section from the buffer start.
    pub fn data_start(&self) -> usize {
        self.prefix.len()
    }

    /// Number of tensors planned (padding excluded).
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether no tensors were planned.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Offset of tensor `index`'s data from the buffer start.
    pub fn offset(&self, index: usize) -> Result<usize> {
        match self.offsets.get(index) {
            Some(&o) => Ok(o),
            None => fail!(
                OutOfRange,
                "tensor index {index} is out of range (the plan holds {} tensors)",
                self.offsets.len()
            ),
        }
    }

    /// Size of tensor `index`'s data.
    pub fn nbytes(&self, index: usize) -> Result<usize> {
        self.offset(index).map(|_| self.nbytes[index])
    }

    fn check_dst(&self, dst: &[u8]) -> Result<()> {
        if dst.len() < self.total {
            fail!(
                BufferTooSmall,
                "destination is {} bytes; the plan needs {}",
                dst.len(),
                self.total
            );
        }
        Ok(())
    }

    /// Writes the header and zeroes the padding; tensor data is left to the
    /// caller, at [`Plan::offset`].
    pub fn write_layout(&self, dst: &mut [u8]) -> Result<()> {
        self.check_dst(dst)?;
        dst[..self.prefix.len()].copy_from_slice(&self.prefix);
        for &(b, e) in &self.pads {
            dst[b..e].fill(0);
        }
        Ok(())
    }

    /// Writes the whole buffer: header, padding and each tensor's `data[i]`.
    pub fn write(&self, dst: &mut [u8], data: &[&[u8]]) -> Result<()> {
        self.check_dst(dst)?;
        if data.len() != self.len() {
            fail!(
                InvalidArgument,
                "{} data slices given for {} planned tensors",
                data.len(),
                self.len()
            );
        }
        for (i, d) in data.iter().enumerate() {
            if d.len() != self.nbytes[i] {
                fail!(
                    InvalidArgument,
                    "tensor {i}: {} bytes given, its shape and dtype need {}",
                    d.len(),
                    self.nbytes[i]
                );
            }
        }
        self.write_layout(dst)?;
        for (i, d) in data.iter().enumerate() {
            dst[self.offsets[i]..self.offsets[i] + d.len()].copy_from_slice(d);
        }
        Ok(())
    }
}
