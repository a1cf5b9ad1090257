//! The content identity of a buffer: a digest of every byte of it.
//!
//! Processes that share one device copy of a buffer must hold the same
//! bytes; a sampled hash cannot promise that (two checkpoints of one model
//! that differ in one row look alike). The identity is therefore computed
//! over everything, once, where the buffer is sealed:
//!
//! - the *data digest* is BLAKE3 of the data section (every tensor byte and
//!   every padding byte after the header), the same value `b3sum` prints for
//!   those bytes. Sealing writes it into the header's metadata under
//!   [`DATA_DIGEST_KEY`], in place of a placeholder the plan reserved;
//! - the *content digest* is BLAKE3, in its key-derivation mode (so that it
//!   cannot be confused with a plain hash of some other input), of the
//!   header's bytes followed by the data digest. It covers every byte: the
//!   header directly, the data through its digest.
//!
//! BLAKE3 because it is a cryptographic hash (no one can make two buffers
//! with one digest) that runs at memory speed: 4.6 GB/s on one core of the
//! project's machine, 8 GB/s on its two (`bench_seal` prints the cost).

use crate::{fail, header, Result, Weights};

/// Metadata key of the data digest (64 lowercase hex digits).
pub const DATA_DIGEST_KEY: &str = "rzc.data_blake3";
/// The placeholder a plan puts under [`DATA_DIGEST_KEY`] until sealing
/// writes the digest over it (same length, so no offset moves).
pub const DATA_DIGEST_PLACEHOLDER: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// A 32-byte BLAKE3 digest.
pub type Digest = [u8; 32];

/// Context string of the content digest (BLAKE3 key derivation).
const CONTENT_CONTEXT: &str = "ray-zerocopy 2026-11 content digest v1";
/// Below this, hashing on several threads costs more than it saves.
const PARALLEL_MIN: usize = 8 << 20;

/// BLAKE3 of `bytes`, on every core when it is large.
pub fn blake3(bytes: &[u8]) -> Digest {
    let mut h = blake3::Hasher::new();
    if bytes.len() >= PARALLEL_MIN {
        h.update_rayon(bytes);
    } else {
        h.update(bytes);
    }
    *h.finalize().as_bytes()
}

/// Blocks of a data section hashed apart: each is a whole BLAKE3 subtree,
/// so that the blocks can be hashed in any order, on any thread, while the
/// bytes are still in cache from the copy that wrote them, and their
/// chaining values joined into the same digest as one pass over the bytes.
/// 1 MiB: the L2 cache of a core, and 1,024 chunks, enough for BLAKE3's
/// widest SIMD.
pub mod blocks {
    use blake3::hazmat::{
        left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt,
        Mode,
    };

    pub use blake3::hazmat::ChainingValue as Cv;

    /// Bytes per block (a power of two, a multiple of BLAKE3's 1 KiB chunk).
    pub const LEN: usize = 1 << 20;

    /// How many blocks an input of `len` bytes is hashed in with blocks of
    /// `block` bytes: 0 when it fits one block (it is then hashed whole:
    /// a single block would be the root, which has no chaining value).
    pub fn count(len: usize, block: usize) -> usize {
        debug_assert!(block.is_power_of_two() && block >= blake3::CHUNK_LEN);
        if len <= block {
            0
        } else {
            len.div_ceil(block)
        }
    }

    /// The chaining value of block `index`, `bytes` (its whole length: the
    /// last block may be short), of an input hashed in blocks of `block`
    /// bytes that has more than one block.
    pub fn cv(bytes: &[u8], index: usize, block: usize) -> ChainingValue {
        let mut h = blake3::Hasher::new();
        h.set_input_offset((index * block) as u64);
        h.update(bytes);
        h.finalize_non_root()
    }

    /// BLAKE3 of an input of `len` bytes from its blocks' chaining values
    /// (`cvs[i]` of block `i`; `count(len, block)` of them, at least 2),
    /// joined as BLAKE3's tree joins them: a subtree's left child is the
    /// largest power of two of chunks below its length, so every split of a
    /// span longer than one block falls on a block boundary.
    pub fn root(cvs: &[ChainingValue], len: usize, block: usize) -> [u8; 32] {
        assert!(cvs.len() >= 2 && cvs.len() == count(len, block));
        fn subtree(cvs: &[ChainingValue], at: usize, len: usize, block: usize) -> ChainingValue {
            if len <= block {
                return cvs[at / block];
            }
            let left = left_subtree_len(len as u64) as usize;
            let (l, r) = (
                subtree(cvs, at, left, block),
                subtree(cvs, at + left, len - left, block),
            );
            merge_subtrees_non_root(&l, &r, Mode::Hash)
        }
        let left = left_subtree_len(len as u64) as usize;
        let (l, r) = (
            subtree(cvs, 0, left, block),
            subtree(cvs, left, len - left, block),
        );
        *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
    }
}

/// The content digest of a buffer whose header is `header` (the bytes
/// before its data section) and whose data section has digest `data`.
pub fn content_digest(header: &[u8], data: &Digest) -> Digest {
    let mut h = blake3::Hasher::new_derive_key(CONTENT_CONTEXT);
    h.update(&(header.len() as u64).to_le_bytes());
    h.update(header);
    h.update(data);
    *h.finalize().as_bytes()
}

/// Lowercase hex of a digest.
pub fn to_hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Digest> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

/// Seals a packed buffer: computes the digest of its data section, writes
/// it over the placeholder of [`DATA_DIGEST_KEY`] in its header, and returns
/// the content digest of the result. Fails, changing nothing, when the
/// buffer is not valid or its header has no placeholder (plan it with
/// `PackOptions::reserve_digest`).
pub fn seal(buffer: &mut [u8]) -> Result<Digest> {
    let start = sealable(buffer)?;
    let data = blake3(&buffer[start..]);
    write_at(buffer, start, &data)
}

/// Where the data section of `buffer` starts, once its header is checked
/// to be valid and to reserve room for the data digest.
pub fn sealable(buffer: &[u8]) -> Result<usize> {
    Ok(sealable_header(buffer)?.data_start)
}

/// [`sealable`], giving the whole parsed header (for a caller that needs
/// its tensors too: the header is read once).
pub fn sealable_header(buffer: &[u8]) -> Result<header::Header> {
    let parsed = header::parse(buffer)?;
    if parsed.metadata.get(DATA_DIGEST_KEY).map(String::as_str) != Some(DATA_DIGEST_PLACEHOLDER) {
        fail!(
            InvalidArgument,
            "the buffer's header reserves no place for its digest (metadata {DATA_DIGEST_KEY:?} = 64 zeros)"
        );
    }
    Ok(parsed)
}

/// Writes `data` (the digest of the data section, computed by the caller)
/// over the placeholder in `buffer`'s header and returns the content
/// digest. Fails, changing nothing, as [`seal`] does.
pub fn write_data_digest(buffer: &mut [u8], data: &Digest) -> Result<Digest> {
    let start = sealable(buffer)?;
    write_at(buffer, start, data)
}

/// [`write_data_digest`] for a buffer whose data section was hashed from
/// byte `data_start` on: fails, changing nothing, when its header now puts
/// the data section elsewhere (it was rewritten while the data was hashed).
pub fn write_data_digest_from(
    buffer: &mut [u8],
    data_start: usize,
    data: &Digest,
) -> Result<Digest> {
    let start = sealable(buffer)?;
    if start != data_start {
        fail!(
            InvalidArgument,
            "the buffer's header changed while it was sealed: its data section now starts at byte {start}, not {data_start}"
        );
    }
    write_at(buffer, start, data)
}

/// [`write_data_digest`] for a buffer [`sealable`] checked: its data
/// section starts at `start`.
fn write_at(buffer: &mut [u8], start: usize, data: &Digest) -> Result<Digest> {
    // The metadata is written by serde_json, compactly: `"key":"value"`.
    let needle = format!("\"{DATA_DIGEST_KEY}\":\"{DATA_DIGEST_PLACEHOLDER}\"");
    let Some(at) = find(&buffer[..start], needle.as_bytes()) else {
        fail!(
            InvalidArgument,
            "the header's {DATA_DIGEST_KEY:?} entry is not written compactly"
        );
    };
    let value_at = at + DATA_DIGEST_KEY.len() + 4;
    buffer[value_at..value_at + 64].copy_from_slice(to_hex(data).as_bytes());
    Ok(content_digest(&buffer[..start], data))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Weights {
    /// The digest of the data section that the header claims
    /// ([`DATA_DIGEST_KEY`]), if it has a well-formed one. A claim: only
    /// [`Weights::data_digest`] reads the data.
    pub fn claimed_data_digest(&self) -> Option<Digest> {
        // The placeholder of a buffer planned but never sealed claims nothing.
        self.metadata()
            .get(DATA_DIGEST_KEY)
            .filter(|s| s.as_str() != DATA_DIGEST_PLACEHOLDER)
            .and_then(|s| from_hex(s))
    }

    /// BLAKE3 of the data section, read in full (on every core when large).
    pub fn data_digest(&self) -> Digest {
        blake3(&self.bytes()[self.data_start()..])
    }

    /// The content digest. With `trust_claim`, the data digest is the one the
    /// header claims when it has one (hashing the header only: what a loader
    /// of a buffer sealed by this library does); otherwise, or without a
    /// claim, the data is read in full.
    pub fn content_digest(&self, trust_claim: bool) -> Digest {
        let data = match self.claimed_data_digest() {
            Some(d) if trust_claim => d,
            _ => self.data_digest(),
        };
        content_digest(&self.bytes()[..self.data_start()], &data)
    }

    /// Whether the data section's digest is the one its header claims (reads
    /// every byte). `None` when the header claims none.
    pub fn verify_data_digest(&self) -> Option<bool> {
        self.claimed_data_digest().map(|d| d == self.data_digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::{PackOptions, Plan, TensorSpec};
    use crate::Dtype;
    use std::collections::BTreeMap;

    /// `values` packed as tensor "w" with metadata `a = b`, room reserved
    /// for the digest when `reserve`; not sealed.
    fn packed_with(values: &[f32], reserve: bool) -> Vec<u8> {
        let shape = [values.len() as i64];
        let specs = [TensorSpec {
            name: "w",
            dtype: Dtype::F32,
            shape: &shape,
        }];
        let meta = BTreeMap::from([("a".to_string(), "b".to_string())]);
        let opts = PackOptions {
            reserve_digest: reserve,
            ..Default::default()
        };
        let plan = Plan::new(&specs, &meta, &opts).unwrap();
        let mut buf = vec![0u8; plan.total_size()];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        plan.write(&mut buf, &[&bytes]).unwrap();
        buf
    }

    fn packed(values: &[f32]) -> Vec<u8> {
        packed_with(values, true)
    }

    fn four_floats(reserve: bool) -> Vec<u8> {
        packed_with(&[1.0; 4], reserve)
    }

    #[test]
    fn sealing_writes_the_data_digest_and_returns_the_content_digest() {
        let mut buf = packed(&[1.0; 1000]);
        let c = seal(&mut buf).unwrap();
        let w = Weights::from_vec(buf.clone()).unwrap();
        let d = w.claimed_data_digest().expect("a claim");
        assert_eq!(
            d,
            *blake3::hash(&buf[w.data_start()..]).as_bytes(),
            "plain BLAKE3 of the data"
        );
        assert_eq!(w.verify_data_digest(), Some(true));
        assert_eq!(w.content_digest(true), c);
        assert_eq!(w.content_digest(false), c);
        assert_eq!(w.metadata()["a"], "b", "other metadata kept");
    }

    #[test]
    fn one_changed_byte_anywhere_changes_the_content_digest() {
        let mut a = packed(&[1.0; 1000]);
        let mut values = vec![1.0; 1000];
        values[517] = 1.0000001;
        let mut b = packed(&values);
        assert_ne!(seal(&mut a).unwrap(), seal(&mut b).unwrap());
        // A changed byte after sealing: the claim no longer holds.
        let at = a.len() - 100;
        a[at] ^= 1;
        let w = Weights::from_vec(a).unwrap();
        assert_eq!(w.verify_data_digest(), Some(false));
        assert_ne!(w.content_digest(false), w.content_digest(true));
    }

    /// Hashing in blocks gives plain BLAKE3 for every length around the
    /// tree's joins (small blocks, so that inputs of many blocks stay small).
    #[test]
    fn blocks_join_into_plain_blake3() {
        let data: Vec<u8> = (0..40_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for block in [1024usize, 2048, 4096] {
            for len in [
                0,
                1,
                1023,
                1024,
                1025,
                2047,
                2048,
                2049,
                3 * 1024 + 7,
                4096,
                4097,
                8191,
                8192,
                12_289,
                20_480,
                39_999,
            ] {
                let input = &data[..len];
                let want = *blake3::hash(input).as_bytes();
                let n = blocks::count(len, block);
                if n == 0 {
                    assert!(len <= block);
                    continue;
                }
                // Hashed out of order, as threads finish them.
                let mut cvs = vec![[0u8; 32]; n];
                for i in (0..n).rev() {
                    let end = ((i + 1) * block).min(len);
                    cvs[i] = blocks::cv(&input[i * block..end], i, block);
                }
                assert_eq!(
                    blocks::root(&cvs, len, block),
                    want,
                    "len {len}, block {block}"
                );
            }
        }
        assert_eq!(blocks::count(blocks::LEN, blocks::LEN), 0);
        assert_eq!(blocks::count(blocks::LEN + 1, blocks::LEN), 2);
    }

    #[test]
    fn a_placeholder_claims_nothing_and_a_copied_claim_is_refused() {
        let w = Weights::from_vec(four_floats(true)).unwrap(); // planned, never sealed
        assert_eq!(w.claimed_data_digest(), None);
        assert_eq!(w.content_digest(true), w.content_digest(false));
        let copied = BTreeMap::from([(DATA_DIGEST_KEY.to_string(), "ab".repeat(32))]);
        let shape = [4i64];
        let specs = [TensorSpec {
            name: "w",
            dtype: Dtype::F32,
            shape: &shape,
        }];
        let e = Plan::new(&specs, &copied, &PackOptions::default()).unwrap_err();
        assert!(e.message().contains("reserved"), "{}", e.message());
    }

    #[test]
    fn a_buffer_without_a_placeholder_is_refused_unchanged() {
        let mut buf = four_floats(false);
        let before = buf.clone();
        let e = seal(&mut buf).unwrap_err();
        assert!(e.message().contains(DATA_DIGEST_KEY), "{}", e.message());
        assert_eq!(buf, before);
        let w = Weights::from_vec(buf).unwrap();
        assert_eq!(w.claimed_data_digest(), None);
        assert_eq!(w.verify_data_digest(), None);
    }
}
