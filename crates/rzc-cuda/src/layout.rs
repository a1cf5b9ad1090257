//! The arithmetic of an upload, with no driver in sight: where each tensor
//! goes in the device allocation, which host ranges are copied where, how
//! copies are cut to fit registration chunks and bounce buffers.
//!
//! Addresses here are plain integers: host addresses of the source buffer
//! and byte offsets into the device allocation.

use rzc_core::{Dtype, TensorMeta};

/// Alignment of every tensor in the device allocation.
pub const DEVICE_ALIGNMENT: usize = 256;
/// Host page size assumed for registration (the driver registers pages).
pub const PAGE: usize = 4096;

/// One tensor of an upload.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// A host-to-device copy: `len` bytes from host address `src` to offset
/// `dst` of the allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyOp {
    /// Host address of the first byte.
    pub src: usize,
    /// Offset in the device allocation.
    pub dst: usize,
    /// Bytes.
    pub len: usize,
}

/// Where everything goes.
#[derive(Debug)]
pub struct Layout {
    /// Every tensor, in the order of the source's table.
    pub tensors: Vec<DeviceTensor>,
    /// The copies that fill the allocation.
    pub ops: Vec<CopyOp>,
    /// Bytes of the allocation.
    pub size: usize,
}

/// Lays out `tensors` (of a buffer at host address `base`) in one device
/// allocation, each at a multiple of [`DEVICE_ALIGNMENT`].
///
/// When every tensor sits at a multiple of 256 bytes from the first one (the
/// buffers this project seals are packed that way), the device allocation is
/// the host range as it is, and the upload is one contiguous copy. Otherwise
/// each tensor is placed at the next multiple of 256 and copied on its own.
pub fn plan(base: usize, tensors: &[TensorMeta]) -> Layout {
    let first = tensors.iter().map(|t| t.offset).min().unwrap_or(0);
    let last = tensors
        .iter()
        .map(|t| t.offset + t.nbytes)
        .max()
        .unwrap_or(0);
    let contiguous = tensors
        .iter()
        .all(|t| (t.offset - first) % DEVICE_ALIGNMENT == 0);
    let mut out = Vec::with_capacity(tensors.len());
    let mut ops = Vec::new();
    let mut size = 0usize;
    for t in tensors {
        let offset = if contiguous {
            t.offset - first
        } else {
            let o = size.next_multiple_of(DEVICE_ALIGNMENT);
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
        out.push(DeviceTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            offset,
            nbytes: t.nbytes,
        });
    }
    if contiguous && last > first {
        ops.push(CopyOp {
            src: base + first,
            dst: 0,
            len: last - first,
        });
    }
    Layout {
        tensors: out,
        ops,
        size,
    }
}

/// Cuts copies at `chunk`-aligned host addresses, so that each piece lies in
/// one chunk of the source.
pub fn split(ops: &[CopyOp], chunk: usize) -> Vec<CopyOp> {
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

/// A page-aligned host range registered as a unit, and the copies from it.
#[derive(Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte (page-aligned).
    pub start: usize,
    /// One past the last byte (page-aligned).
    pub end: usize,
    /// Copies whose source lies inside `[start, end)`.
    pub copies: Vec<CopyOp>,
}

/// Groups copies into registration regions: one per `chunk`-aligned piece
/// of the source (`chunk` a multiple of [`PAGE`]), each covering exactly the
/// pages its copies touch. Two regions never share a page, so each can be
/// registered on its own thread, and its copies issued as soon as it is.
pub fn regions(ops: &[CopyOp], chunk: usize) -> Vec<Region> {
    debug_assert!(chunk % PAGE == 0);
    let mut by_chunk: std::collections::BTreeMap<usize, Region> = Default::default();
    for p in split(ops, chunk) {
        let r = by_chunk.entry(p.src / chunk).or_insert(Region {
            start: usize::MAX,
            end: 0,
            copies: Vec::new(),
        });
        r.start = r.start.min(p.src / PAGE * PAGE);
        r.end = r.end.max((p.src + p.len).next_multiple_of(PAGE));
        r.copies.push(p);
    }
    by_chunk.into_values().collect()
}

/// One bounce-buffer load: `len` bytes that land at `dst` of the allocation,
/// gathered from the host pieces `(src, offset in the buffer, len)`.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    /// Offset in the device allocation.
    pub dst: usize,
    /// Bytes in the buffer.
    pub len: usize,
    /// Host pieces and where they go in the buffer.
    pub pieces: Vec<(usize, usize, usize)>,
}

/// Packs copies into loads of at most `capacity` bytes, each landing on one
/// contiguous device range: a copy continues the current load where its
/// destination continues it, as far as the load has room.
pub fn batches(ops: &[CopyOp], capacity: usize) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    for op in ops {
        let mut done = 0;
        while done < op.len {
            let dst = op.dst + done;
            let room = match out.last() {
                Some(b) if b.dst + b.len == dst && b.len < capacity => capacity - b.len,
                _ => {
                    out.push(Batch {
                        dst,
                        len: 0,
                        pieces: Vec::new(),
                    });
                    capacity
                }
            };
            let b = out.last_mut().expect("a batch");
            let len = room.min(op.len - done);
            b.pieces.push((op.src + done, b.len, len));
            b.len += len;
            done += len;
        }
    }
    out
}

/// Cuts a batch's pieces into work items of at least `min_len` bytes (and
/// about `len / threads`), for copying into the buffer on several threads.
pub fn fill_items(batch: &Batch, threads: usize, min_len: usize) -> Vec<(usize, usize, usize)> {
    let step = (batch.len / threads.max(1)).max(min_len).max(1);
    batch
        .pieces
        .iter()
        .flat_map(|&(src, off, len)| {
            (0..len)
                .step_by(step)
                .map(move |a| (src + a, off + a, step.min(len - a)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, offset: usize, nbytes: usize) -> TensorMeta {
        TensorMeta {
            name: name.into(),
            dtype: Dtype::U8,
            shape: vec![nbytes as i64],
            offset,
            nbytes,
        }
    }

    #[test]
    fn tensors_256_apart_are_one_copy() {
        let ts = [
            meta("a", 4096, 300),
            meta("b", 4096 + 512, 256),
            meta("c", 4096 + 768, 0),
        ];
        let l = plan(1 << 20, &ts);
        assert_eq!(
            l.ops,
            vec![CopyOp {
                src: (1 << 20) + 4096,
                dst: 0,
                len: 768
            }]
        );
        assert_eq!(
            l.tensors.iter().map(|t| t.offset).collect::<Vec<_>>(),
            vec![0, 512, 768]
        );
        assert_eq!(l.size, 768);
    }

    #[test]
    fn tensors_not_256_apart_are_placed_and_copied_one_by_one() {
        let ts = [
            meta("a", 64, 100),
            meta("b", 192, 10),
            meta("empty", 256, 0),
        ];
        let l = plan(0, &ts);
        assert_eq!(
            l.tensors.iter().map(|t| t.offset).collect::<Vec<_>>(),
            vec![0, 256, 512]
        );
        assert!(l.tensors.iter().all(|t| t.offset % DEVICE_ALIGNMENT == 0));
        assert_eq!(
            l.ops,
            vec![
                CopyOp {
                    src: 64,
                    dst: 0,
                    len: 100
                },
                CopyOp {
                    src: 192,
                    dst: 256,
                    len: 10
                }
            ]
        );
        assert_eq!(l.size, 512, "the empty tensor sits at the end");
    }

    #[test]
    fn split_stays_inside_chunks() {
        let parts = split(
            &[CopyOp {
                src: 1000,
                dst: 0,
                len: 10_000,
            }],
            4096,
        );
        assert_eq!(parts.iter().map(|p| p.len).sum::<usize>(), 10_000);
        for p in &parts {
            assert_eq!(p.src / 4096, (p.src + p.len - 1) / 4096);
            assert_eq!(p.dst, p.src - 1000);
        }
    }

    #[test]
    fn regions_cover_their_copies_and_never_share_a_page() {
        let ops = [
            CopyOp {
                src: 5000,
                dst: 0,
                len: 3 * 8192,
            },
            CopyOp {
                src: 40_000,
                dst: 30_000,
                len: 10,
            },
        ];
        let rs = regions(&ops, 8192);
        for w in rs.windows(2) {
            assert!(w[0].end <= w[1].start);
        }
        for r in &rs {
            assert!(r.start % PAGE == 0 && r.end % PAGE == 0);
            for c in &r.copies {
                assert!(r.start <= c.src && c.src + c.len <= r.end);
            }
        }
        let copied: usize = rs.iter().flat_map(|r| &r.copies).map(|c| c.len).sum();
        assert_eq!(copied, 3 * 8192 + 10);
    }

    #[test]
    fn batches_fill_buffers_with_contiguous_destinations() {
        let ops = [
            CopyOp {
                src: 0,
                dst: 0,
                len: 100,
            },
            CopyOp {
                src: 1000,
                dst: 100,
                len: 50,
            }, // continues the device range
            CopyOp {
                src: 2000,
                dst: 400,
                len: 10,
            }, // does not: new batch
            CopyOp {
                src: 5000,
                dst: 410,
                len: 300,
            }, // larger than what is left: split
        ];
        let bs = batches(&ops, 256);
        assert_eq!(
            bs[0],
            Batch {
                dst: 0,
                len: 150,
                pieces: vec![(0, 0, 100), (1000, 100, 50)]
            }
        );
        assert_eq!(bs[1].dst, 400);
        for b in &bs {
            assert!(b.len <= 256);
            assert_eq!(b.pieces.iter().map(|p| p.2).sum::<usize>(), b.len);
        }
        assert_eq!(bs.iter().map(|b| b.len).sum::<usize>(), 460);
        let items = fill_items(&bs[0], 2, 16);
        assert_eq!(items.iter().map(|i| i.2).sum::<usize>(), 150);
        assert!(items.iter().all(|&(_, off, len)| off + len <= 150));
    }
}
