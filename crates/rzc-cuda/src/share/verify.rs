//! Reading back what was mapped: an importer does not take the server's word
//! that the memory holds its weights. It copies windows of the device memory
//! that it chooses at random (its own seed), at least one in every tensor,
//! back to the host and compares them with its own buffer.
//!
//! A server that hands over any other allocation (garbage, another model,
//! zeros) is caught by the first window of the first tensor that differs.
//! What a sample cannot catch is an allocation that equals the buffer except
//! in a few bytes outside every window; against that stands the content
//! digest, which must match before anything is mapped (see `super`).

use std::hash::{BuildHasher, Hasher};

use crate::layout::DeviceTensor;
use crate::memory::DeviceMemory;

/// Bytes read back per tensor at most (the whole tensor when smaller).
pub const WINDOW: usize = 4096;
/// Windows closer than this are read as one copy.
const MERGE_GAP: usize = 4096;

/// What a verification read.
#[derive(Clone, Copy, Debug, Default)]
pub struct Readback {
    pub bytes: usize,
    pub copies: usize,
}

/// Random numbers from a seed only this process knows (std's hasher keys
/// are drawn from the OS's randomness once per process).
struct Rng {
    state: std::hash::RandomState,
    n: u64,
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.n += 1;
        let mut h = self.state.build_hasher();
        h.write_u64(self.n);
        h.finish()
    }
}

/// The windows to read: `(device offset, host bytes)` for each tensor.
fn windows<'a>(
    tensors: &[DeviceTensor],
    host: &[&'a [u8]],
    rng: &mut Rng,
) -> Vec<(usize, &'a [u8])> {
    let mut out = Vec::with_capacity(tensors.len());
    for (t, h) in tensors.iter().zip(host) {
        if t.nbytes == 0 {
            continue;
        }
        let len = t.nbytes.min(WINDOW);
        let at = (rng.next() % (t.nbytes - len + 1) as u64) as usize;
        out.push((t.offset + at, &h[at..at + len]));
    }
    out.sort_by_key(|w| w.0);
    out
}

/// Compares the device memory of `alloc` with `host[i]` (tensor `i`'s host
/// bytes) in random windows; `Err` names the first tensor that differs or
/// the copy that failed.
pub fn verify(
    alloc: &DeviceMemory,
    tensors: &[DeviceTensor],
    host: &[&[u8]],
) -> Result<Readback, String> {
    let mut rng = Rng {
        state: std::hash::RandomState::new(),
        n: 0,
    };
    let wins = windows(tensors, host, &mut rng);
    let mut done = Readback::default();
    let mut buf = Vec::new();
    let mut i = 0;
    while i < wins.len() {
        // One copy for a run of windows that lie close together.
        let start = wins[i].0;
        let mut j = i + 1;
        let mut end = start + wins[i].1.len();
        while j < wins.len() && wins[j].0 <= end + MERGE_GAP {
            end = end.max(wins[j].0 + wins[j].1.len());
            j += 1;
        }
        buf.resize(end - start, 0);
        alloc
            .read(start, &mut buf)
            .map_err(|e| format!("reading the mapped memory back failed: {}", e.message()))?;
        done.copies += 1;
        done.bytes += buf.len();
        for (off, want) in &wins[i..j] {
            let got = &buf[off - start..off - start + want.len()];
            if got != *want {
                let t = tensors
                    .iter()
                    .find(|t| t.offset <= *off && *off < t.offset + t.nbytes)
                    .map(|t| t.name.as_str())
                    .unwrap_or("?");
                return Err(format!(
                    "the mapped memory differs from this process's weights in tensor {t:?} (a window at device offset {off})"
                ));
            }
        }
        i = j;
    }
    Ok(done)
}
