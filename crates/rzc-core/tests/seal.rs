//! The sealer hashes a buffer while it is filled, and gives the digest a
//! plain seal of the same bytes gives, whichever way the bytes arrive: copied
//! from memory on several threads, read from a file, or written by the
//! caller and declared final; a fill it cannot complete is refused, and so
//! is the seal after it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;

use rzc_core::digest;
use rzc_core::pack::{PackOptions, Plan, TensorSpec};
use rzc_core::seal::{Piece, Sealer};
use rzc_core::{Dtype, ErrorKind};

/// Tensors of 3 MiB, 1 byte, nothing and 2.5 MiB: blocks of 1 MiB, some
/// shared by two tensors, and an empty tensor.
fn tensors() -> Vec<(String, Vec<i64>, Vec<u8>)> {
    [3 << 20, 1, 0, 5 << 19]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let bytes = (0..n).map(|b| (b * 131 + i * 7) as u8).collect();
            (format!("t{i}"), vec![n as i64], bytes)
        })
        .collect()
}

fn plan(items: &[(String, Vec<i64>, Vec<u8>)]) -> Plan {
    let specs: Vec<TensorSpec<'_>> = items
        .iter()
        .map(|(n, s, _)| TensorSpec {
            name: n,
            dtype: Dtype::U8,
            shape: s,
        })
        .collect();
    let opts = PackOptions {
        reserve_digest: true,
        ..PackOptions::default()
    };
    Plan::new(&specs, &BTreeMap::new(), &opts).unwrap()
}

/// The buffer filled and sealed in one pass: what every sealer must match.
fn expected(items: &[(String, Vec<i64>, Vec<u8>)]) -> (Vec<u8>, digest::Digest) {
    let plan = plan(items);
    let mut buf = vec![0u8; plan.total_size()];
    let data: Vec<&[u8]> = items.iter().map(|t| t.2.as_slice()).collect();
    plan.write(&mut buf, &data).unwrap();
    let d = digest::seal(&mut buf).unwrap();
    (buf, d)
}

/// A buffer with its layout written, ready for a sealer.
fn laid_out(plan: &Plan) -> Vec<u8> {
    let mut buf = vec![0u8; plan.total_size()];
    plan.write_layout(&mut buf).unwrap();
    buf
}

/// The tensors' bytes one after another in a new file named `name`, and
/// the reads that fill `plan`'s buffer from it: the file's path, its
/// handle (open for writing only), each tensor's offset in it, the reads.
fn written_to_file(
    items: &[(String, Vec<i64>, Vec<u8>)],
    plan: &Plan,
    name: &str,
) -> (std::path::PathBuf, std::fs::File, Vec<u64>, Vec<Piece>) {
    let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    let mut at = Vec::new();
    for t in items {
        at.push(file.metadata().unwrap().len());
        file.write_all(&t.2).unwrap();
    }
    let reads = items
        .iter()
        .enumerate()
        .map(|(i, t)| Piece {
            src: at[i],
            dst_offset: plan.offset(i).unwrap() as u64,
            nbytes: t.2.len() as u64,
        })
        .collect();
    (path, file, at, reads)
}

#[test]
fn copies_on_any_number_of_threads_give_the_plain_seal() {
    let items = tensors();
    let (want, digest) = expected(&items);
    let plan = plan(&items);
    for threads in [1, 2, 0] {
        let mut buf = laid_out(&plan);
        // SAFETY: `buf` outlives the sealer and is touched only by it.
        let sealer = unsafe { Sealer::new(buf.as_mut_ptr(), buf.len()) }.unwrap();
        let copies: Vec<Piece> = items
            .iter()
            .enumerate()
            .map(|(i, t)| Piece {
                src: t.2.as_ptr() as u64,
                dst_offset: plan.offset(i).unwrap() as u64,
                nbytes: t.2.len() as u64,
            })
            .collect();
        // Two calls, for different tensors.
        // SAFETY: the sources are `items`' bytes, alive and unchanged.
        unsafe { sealer.copy(&copies[..2], threads) }.unwrap();
        // SAFETY: as above.
        unsafe { sealer.copy(&copies[2..], threads) }.unwrap();
        assert_eq!(sealer.finish().unwrap(), digest, "{threads} thread(s)");
        drop(sealer);
        assert!(buf == want, "{threads} thread(s): the buffer differs");
    }
}

#[test]
fn reads_from_a_file_give_the_plain_seal_and_a_short_file_is_refused() {
    let items = tensors();
    let (want, digest) = expected(&items);
    let plan = plan(&items);
    let (path, written, at, reads) = written_to_file(&items, &plan, "rzc-seal-test");
    drop(written);
    let file = std::fs::File::open(&path).unwrap();
    let mut buf = laid_out(&plan);
    // SAFETY: `buf` outlives the sealer and is touched only by it.
    let sealer = unsafe { Sealer::new(buf.as_mut_ptr(), buf.len()) }.unwrap();
    sealer.read(file.as_fd(), &reads, 0).unwrap();
    assert_eq!(sealer.finish().unwrap(), digest);
    drop(sealer);
    assert!(buf == want, "the buffer differs");

    // The file cut short: the read says so, and the seal is refused.
    let short = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    short.set_len(at[3] + 10).unwrap();
    let mut buf = laid_out(&plan);
    // SAFETY: as above.
    let sealer = unsafe { Sealer::new(buf.as_mut_ptr(), buf.len()) }.unwrap();
    let e = sealer.read(file.as_fd(), &reads, 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.message().contains("reads[3]"), "{e}");
    assert!(e.message().contains("shorter than its header says"), "{e}");
    let e = sealer.finish().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("cannot be sealed"), "{e}");
    drop(sealer);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bytes_written_by_the_caller_and_declared_final_give_the_plain_seal() {
    let items = tensors();
    let (want, digest) = expected(&items);
    let plan = plan(&items);
    let mut buf = laid_out(&plan);
    let (ptr, len) = (buf.as_mut_ptr(), buf.len());
    // SAFETY: `buf` outlives the sealer; it is written below only through
    // `ptr`, each part before it is declared final.
    let sealer = unsafe { Sealer::new(ptr, len) }.unwrap();
    for (i, t) in items.iter().enumerate() {
        let at = plan.offset(i).unwrap();
        // SAFETY: tensor `i`'s bytes, in the buffer, not yet declared final.
        unsafe { std::ptr::copy_nonoverlapping(t.2.as_ptr(), ptr.add(at), t.2.len()) };
        sealer.advance(at + t.2.len());
    }
    assert_eq!(sealer.finish().unwrap(), digest);
    drop(sealer);
    assert!(buf == want, "the buffer differs");
}

#[test]
fn fills_the_layout_does_not_name_are_refused_and_change_nothing() {
    let items = tensors();
    let plan = plan(&items);
    let mut buf = laid_out(&plan);
    let (base, len) = (buf.as_mut_ptr(), buf.len());
    // SAFETY: `buf` outlives the sealer and is touched only by it.
    let sealer = unsafe { Sealer::new(base, len) }.unwrap();
    let piece = |i: usize, nbytes: u64| Piece {
        src: items[i].2.as_ptr() as u64,
        dst_offset: plan.offset(i).unwrap() as u64,
        nbytes,
    };
    let refused = |copies: &[Piece], needle: &str| {
        // SAFETY: every source is `items`' bytes, alive and unchanged.
        let e = unsafe { sealer.copy(copies, 0) }.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.message().contains(needle), "{needle:?} not in {e}");
    };
    refused(&[piece(0, 5)], "is 3145728 bytes, not 5");
    refused(&[piece(0, 3 << 20), piece(0, 3 << 20)], "named twice");
    let mut off = piece(1, 1);
    off.dst_offset += 1;
    refused(&[off], "no tensor's data starts at offset");
    let mut null = piece(1, 1);
    null.src = 0;
    refused(&[null], "copies[0].src is NULL");
    let inside = Piece {
        src: base as u64 + plan.data_start() as u64,
        ..piece(1, 1)
    };
    refused(&[inside], "overlaps the sealer's buffer");
    // None of these took a tensor: each is filled once now, then refused.
    // SAFETY: as above.
    unsafe { sealer.copy(&[piece(0, 3 << 20), piece(1, 1), piece(3, 5 << 19)], 0) }.unwrap();
    refused(&[piece(1, 1)], "filled already");
    sealer.finish().unwrap();
    let e = sealer.finish().unwrap_err();
    assert!(e.message().contains("finished already"), "{e}");
}

#[test]
fn finish_waits_for_a_fill_running_on_another_thread() {
    // One 64 MiB tensor copied on one thread (tens of ms), finish() called
    // on another while it runs. finish() waits for the copy and gives the
    // full buffer's digest, or (where it came first) refuses the copy and
    // seals the buffer without it; never a digest of bytes being written.
    let items = vec![("big".to_string(), vec![64 << 20], vec![7u8; 64 << 20])];
    let (want, digest) = expected(&items);
    let plan = plan(&items);
    let empty_digest = {
        let mut buf = laid_out(&plan);
        digest::seal(&mut buf).unwrap()
    };
    let mut overlapped = 0;
    for round in 0..20 {
        let mut buf = laid_out(&plan);
        // SAFETY: `buf` outlives the sealer and is touched only by it.
        let sealer = unsafe { Sealer::new(buf.as_mut_ptr(), buf.len()) }.unwrap();
        let copy = [Piece {
            src: items[0].2.as_ptr() as u64,
            dst_offset: plan.offset(0).unwrap() as u64,
            nbytes: items[0].2.len() as u64,
        }];
        let starting = std::sync::Barrier::new(2);
        let (copied, sealed) = std::thread::scope(|scope| {
            let copier = scope.spawn(|| {
                starting.wait();
                // SAFETY: the source is `items`' bytes, alive and unchanged.
                unsafe { sealer.copy(&copy, 1) }
            });
            starting.wait();
            std::thread::sleep(std::time::Duration::from_millis(2));
            let sealed = sealer.finish().unwrap();
            (copier.join().unwrap(), sealed)
        });
        drop(sealer);
        match copied {
            Ok(()) => {
                assert_eq!(
                    sealed, digest,
                    "round {round}: the digest of a buffer still being filled"
                );
                assert!(buf == want, "round {round}: the buffer differs");
                overlapped += 1;
            }
            Err(e) => {
                assert!(e.message().contains("finished already"), "{e}");
                assert_eq!(sealed, empty_digest, "round {round}");
            }
        }
        if overlapped >= 3 {
            break;
        }
    }
    assert!(overlapped > 0, "finish() never came while the copy ran");
}

#[test]
fn a_descriptor_that_cannot_be_read_is_refused_and_the_sealer_goes_on() {
    let items = tensors();
    let (want, digest) = expected(&items);
    let plan = plan(&items);
    let (path, file, _, reads) = written_to_file(&items, &plan, "rzc-seal-test-fd"); // open for writing only
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    let o_path = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&path)
            .unwrap()
    };
    let mut buf = laid_out(&plan);
    // SAFETY: `buf` outlives the sealer and is touched only by it.
    let sealer = unsafe { Sealer::new(buf.as_mut_ptr(), buf.len()) }.unwrap();
    for (fd, needle) in [
        (file.as_fd(), "open for writing only"),
        (dir.as_fd(), "is a directory"),
        (o_path.as_fd(), "O_PATH"),
    ] {
        let e = sealer.read(fd, &reads, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.message().contains(needle), "{needle:?} not in {e}");
    }
    // Nothing was taken, and the sealer was not marked failed.
    let readable = std::fs::File::open(&path).unwrap();
    sealer.read(readable.as_fd(), &reads, 0).unwrap();
    assert_eq!(sealer.finish().unwrap(), digest);
    drop(sealer);
    assert!(buf == want, "the buffer differs");
    std::fs::remove_file(&path).unwrap();
}
