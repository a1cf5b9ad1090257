//! Parsing and full validation of a safetensors header.
//!
//! Layout: an 8-byte little-endian header length `n`, `n` bytes of UTF-8 JSON
//! (optionally padded with spaces), then the data section. Every check runs
//! before any tensor is handed out, with overflow-checked arithmetic, and each
//! failure names the problem.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::{fail, Dtype, Error, ErrorKind, Result};

/// Largest header accepted, as in the official implementation.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Name of the header entry that carries string metadata.
pub const METADATA_KEY: &str = "__metadata__";

/// One tensor as described by the header, with absolute offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Extents (all non-negative).
    pub shape: Vec<i64>,
    /// Offset of the first byte from the start of the buffer.
    pub offset: usize,
    /// Size in bytes.
    pub nbytes: usize,
}

/// A validated header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Tensors in the order of their data.
    pub tensors: Vec<TensorMeta>,
    /// The `__metadata__` map (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section from the start of the buffer.
    pub data_start: usize,
}

#[derive(Deserialize)]
struct RawTensor<'a> {
    /// Borrowed from the header text (dtype names have no escapes): no
    /// allocation per tensor.
    #[serde(borrow)]
    dtype: std::borrow::Cow<'a, str>,
    shape: Vec<i64>,
    data_offsets: (u64, u64),
}

struct RawHeader<'a> {
    tensors: Vec<(String, RawTensor<'a>)>,
    metadata: BTreeMap<String, String>,
}

// A visitor rather than a map type: a JSON object may repeat a key, and a
// repeated tensor name must be an error (checked in `parse`), not a silent
// overwrite.
impl<'de: 'a, 'a> Deserialize<'de> for RawHeader<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawHeader<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawHeader<'a>, A::Error> {
                let mut tensors = Vec::new();
                let mut metadata = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == METADATA_KEY {
                        if metadata.is_some() {
                            return Err(de::Error::custom("`__metadata__` appears twice"));
                        }
                        metadata = Some(map.next_value::<BTreeMap<String, String>>()?);
                    } else {
                        let entry = map
                            .next_value::<RawTensor>()
                            .map_err(|e| de::Error::custom(format!("tensor {key:?}: {e}")))?;
                        tensors.push((key, entry));
                    }
                }
                Ok(RawHeader {
                    tensors,
                    metadata: metadata.unwrap_or_default(),
                })
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl Header {
    /// Byte range `[start, end)` from the buffer start spanned by the tensors
    /// (padding entries excluded); `None` when there are none.
    pub fn tensor_span(&self) -> Option<(usize, usize)> {
        let real = self
            .tensors
            .iter()
            .filter(|t| !t.name.starts_with(crate::pack::PAD_PREFIX));
        let start = real.clone().map(|t| t.offset).min()?;
        let end = real.map(|t| t.offset + t.nbytes).max()?;
        Some((start, end))
    }
}

/// Reads and validates the header of `buf`, a whole safetensors buffer.
pub fn parse(buf: &[u8]) -> Result<Header> {
    let (text, data_start) = header_text(buf)?;
    let raw: RawHeader = serde_json::from_str(text).map_err(|e| {
        Error::new(
            ErrorKind::BadFormat,
            format!("header is not a valid safetensors JSON header: {e}"),
        )
    })?;
    check_unique_names(&raw.tensors)?;
    let (tensors, mut spans) = describe(raw.tensors)?;
    // Sorted by offset, the data section must be covered exactly.
    spans.sort_unstable();
    check_coverage(&spans, &tensors, (buf.len() - data_start) as u64)?;
    Ok(Header {
        tensors: in_data_order(tensors, &spans, data_start),
        metadata: raw.metadata,
        data_start,
    })
}

/// The header's JSON text and the offset of the data section after it.
fn header_text(buf: &[u8]) -> Result<(&str, usize)> {
    let len = buf.len() as u64;
    if len < 8 {
        fail!(
            BadFormat,
            "buffer is {len} bytes; a safetensors buffer starts with an 8-byte header length"
        );
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        fail!(
            BadFormat,
            "header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes"
        );
    }
    if n > len - 8 {
        fail!(
            BadFormat,
            "header length {n} runs past the end of the {len}-byte buffer"
        );
    }
    let data_start = 8 + n as usize;
    let text = std::str::from_utf8(&buf[8..data_start]).map_err(|e| {
        Error::new(
            ErrorKind::BadFormat,
            format!(
                "header is not valid UTF-8 (at header byte {})",
                e.valid_up_to()
            ),
        )
    })?;
    if !text.starts_with('{') {
        fail!(BadFormat, "header does not start with a JSON object ('{{')");
    }
    Ok((text, data_start))
}

/// A repeated tensor name is an error: readers differ on which entry counts.
fn check_unique_names(tensors: &[(String, RawTensor<'_>)]) -> Result<()> {
    let mut names = HashSet::with_capacity(tensors.len());
    for (name, _) in tensors {
        if !names.insert(name.as_str()) {
            fail!(
                BadFormat,
                "header is not a valid safetensors JSON header: tensor name {name:?} appears twice"
            );
        }
    }
    Ok(())
}

/// Where a tensor's data lies in the data section: `(begin, end, index)`.
type Span = (u64, u64, usize);

/// Each entry checked on its own (known dtype, size against shape), with
/// its span `(begin, end, index)` in the data section.
fn describe(raw: Vec<(String, RawTensor<'_>)>) -> Result<(Vec<TensorMeta>, Vec<Span>)> {
    let mut tensors = Vec::with_capacity(raw.len());
    let mut spans = Vec::with_capacity(raw.len());
    for (name, t) in raw {
        let Some(dtype) = Dtype::from_name(&t.dtype) else {
            fail!(
                UnsupportedDtype,
                "tensor {name:?} has unknown dtype {:?}",
                t.dtype
            );
        };
        let nbytes = checked_nbytes(&name, dtype, &t.shape)?;
        let (begin, end) = t.data_offsets;
        if begin > end {
            fail!(
                BadFormat,
                "tensor {name:?}: data_offsets [{begin}, {end}] end before they begin"
            );
        }
        if end - begin != nbytes {
            fail!(
                BadFormat,
                "tensor {name:?}: shape {:?} of {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] span {}",
                t.shape,
                end - begin
            );
        }
        spans.push((begin, end, tensors.len()));
        tensors.push(TensorMeta {
            name,
            dtype,
            shape: t.shape,
            offset: 0,
            nbytes: nbytes as usize,
        });
    }
    Ok((tensors, spans))
}

/// Sorted `spans` cover `[0, data_len)` exactly: each tensor starts where
/// the previous one ended, and the last ends at the buffer's end.
fn check_coverage(spans: &[Span], tensors: &[TensorMeta], data_len: u64) -> Result<()> {
    let mut cursor = 0u64;
    let mut prev: Option<usize> = None;
    for &(begin, end, i) in spans {
        let name = &tensors[i].name;
        if end > data_len {
            fail!(
                BadFormat,
                "tensor {name:?}: data_offsets [{begin}, {end}] run past the end of the {data_len}-byte data section"
            );
        }
        if begin > cursor {
            fail!(BadFormat, "hole in the data section: bytes [{cursor}, {begin}) before tensor {name:?} belong to no tensor");
        }
        if begin < cursor {
            let other = prev.map(|p| tensors[p].name.as_str()).unwrap_or("");
            fail!(BadFormat, "tensor {name:?} overlaps tensor {other:?} (data_offsets start at {begin}, before {cursor})");
        }
        cursor = end;
        prev = Some(i);
    }
    if cursor != data_len {
        fail!(
            BadFormat,
            "{} trailing bytes after the last tensor belong to no tensor",
            data_len - cursor
        );
    }
    Ok(())
}

/// The tensors in the order of their data, with absolute offsets.
fn in_data_order(tensors: Vec<TensorMeta>, spans: &[Span], data_start: usize) -> Vec<TensorMeta> {
    let mut tensors: Vec<Option<TensorMeta>> = tensors.into_iter().map(Some).collect();
    spans
        .iter()
        .map(|&(begin, _, i)| {
            let mut t = tensors[i].take().expect("each index once");
            t.offset = data_start + begin as usize;
            t
        })
        .collect()
}

/// `product(shape) * size(dtype)` with every step checked.
pub fn checked_nbytes(name: &str, dtype: Dtype, shape: &[i64]) -> Result<u64> {
    let mut numel: u64 = 1;
    for &d in shape {
        if d < 0 {
            fail!(
                BadFormat,
                "tensor {name:?}: dimension {d} in shape {shape:?} is negative"
            );
        }
        numel = match numel.checked_mul(d as u64) {
            Some(n) => n,
            None => fail!(
                BadFormat,
                "tensor {name:?}: shape {shape:?} overflows 64 bits"
            ),
        };
    }
    let Some(bits) = numel.checked_mul(u64::from(dtype.bits())) else {
        fail!(
            BadFormat,
            "tensor {name:?}: shape {shape:?} of {dtype} overflows 64 bits"
        );
    };
    if bits % 8 != 0 {
        fail!(
            BadFormat,
            "tensor {name:?}: {numel} elements of {dtype} do not fill whole bytes"
        );
    }
    if bits / 8 > isize::MAX as u64 {
        fail!(
            BadFormat,
            "tensor {name:?}: shape {shape:?} of {dtype} is larger than the address space"
        );
    }
    Ok(bits / 8)
}
