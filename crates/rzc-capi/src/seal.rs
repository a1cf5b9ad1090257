//! `rzc_pack_sealer`: the digest of a buffer's data section, computed while
//! the buffer is being filled, on every core there is. The sealer itself
//! (blocks hashed as they become final, fills on several threads) is
//! `rzc_core::seal`; these calls are its C shell.

use std::os::fd::BorrowedFd;

use rzc_core::seal::{Piece, Sealer};

use crate::handle::Handle;
use crate::status::{
    ffi_boundary, ffi_value_boundary, rzc_status, Failure, FfiResult, RZC_INVALID_ARGUMENT,
};
use crate::weights::rzc_digest;

/// A digest being computed while its buffer is filled (opaque).
pub struct rzc_pack_sealer {
    _private: [u8; 0],
}

impl Handle for rzc_pack_sealer {
    type Rust = Sealer;
}

/// One tensor for `rzc_pack_sealer_copy`: its bytes, and where they go.
#[repr(C)]
pub struct rzc_pack_copy {
    /// The tensor's bytes, `nbytes` of them (NULL only when 0), outside the
    /// sealer's buffer.
    pub src: *const u8,
    /// Offset of the tensor's data in the buffer (`rzc_pack_plan_offset`).
    pub dst_offset: u64,
    /// Size in bytes; must be the tensor's.
    pub nbytes: u64,
}

/// One tensor for `rzc_pack_sealer_read`: where its bytes are in the file,
/// and where they go.
#[repr(C)]
pub struct rzc_pack_read {
    /// Offset of the tensor's bytes in the file.
    pub src_offset: u64,
    /// Offset of the tensor's data in the buffer (`rzc_pack_plan_offset`).
    pub dst_offset: u64,
    /// Size in bytes; must be the tensor's.
    pub nbytes: u64,
}

/// `copies` filled into `sealer`'s buffer: a NULL source with bytes is the
/// C caller's `RZC_NULL_ARGUMENT`, as for any argument (the core refuses it
/// too, as an invalid argument).
///
/// # Safety
/// Every source with bytes is `nbytes` readable bytes, unchanged during the call.
unsafe fn copy(sealer: &Sealer, copies: &[rzc_pack_copy], threads: usize) -> FfiResult<()> {
    let mut pieces = Vec::with_capacity(copies.len());
    for (i, c) in copies.iter().enumerate() {
        if c.nbytes > 0 && c.src.is_null() {
            return Err(Failure::null(&format!("copies[{i}].src")));
        }
        pieces.push(Piece {
            src: c.src as usize as u64,
            dst_offset: c.dst_offset,
            nbytes: c.nbytes,
        });
    }
    // SAFETY: the sources are the caller's, as above.
    Ok(unsafe { sealer.copy(&pieces, threads) }?)
}

/// Starts computing the digest of the data section of `dst`, a buffer
/// planned with `reserve_digest` whose layout is written already
/// (`rzc_pack_plan_write_layout`: the header, and the padding between and
/// around the tensors, neither of which may change afterwards), with a
/// thread of its own. Then fill in the tensors' data, with
/// `rzc_pack_sealer_copy` or `rzc_pack_sealer_read`, or by writing it and calling
/// `rzc_pack_sealer_advance` as it becomes final, and call
/// `rzc_pack_sealer_finish`.
///
/// # Safety
/// `dst` points to `dst_len` writable bytes (`rzc_pack_sealer_finish` writes
/// the digest into the header), every one written at least once (zeros will
/// do: a tensor left unfilled is hashed as it stands), that stay valid
/// until the sealer is freed. Until then the caller writes no byte of the
/// header or the padding, none of a tensor named in a
/// `rzc_pack_sealer_copy` or `rzc_pack_sealer_read`, none below a value it
/// passed to `rzc_pack_sealer_advance`, and none once
/// `rzc_pack_sealer_finish` may run; and reads no byte that may still be
/// written. `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_new(
    dst: *mut u8,
    dst_len: usize,
    out: *mut *mut rzc_pack_sealer,
) -> rzc_status {
    ffi_boundary! {
        let out = out!(out);
        crate::handle::not_null(dst, "dst")?;
        // SAFETY: the contract above is `Sealer::new`'s.
        let sealer = unsafe { Sealer::new(dst, dst_len) }?;
        out.write(rzc_pack_sealer::into_raw(sealer))
    }
}

/// Declares the bytes of the buffer below `upto` final: no one writes them
/// any more. `upto` is a prefix: where several threads fill the buffer, it
/// is the start of the first part any of them is still writing, not the
/// end of one thread's own part. Calls may come in any order, and from
/// several threads at once; the largest counts. A block that a running
/// `rzc_pack_sealer_copy` is writing waits for that copy.
///
/// # Safety
/// `sealer` is a live sealer.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_advance(
    sealer: *const rzc_pack_sealer,
    upto: usize,
) -> rzc_status {
    ffi_boundary! {
        let s = borrow!(rzc_pack_sealer, sealer);
        s.advance(upto);
        Ok(())
    }
}

/// Copies `copies_len` whole tensors into the sealer's buffer, on up to
/// `threads` threads (0: one per core; a small copy runs on the calling
/// thread), hashing every block of the buffer whose bytes this completes
/// while it is still in cache. Each tensor is named by its offset and size
/// in the buffer's layout; a tensor may be copied once, and not below the
/// bytes declared final. Nothing is copied when one entry is refused.
/// Several calls may run at once, for different tensors.
///
/// # Safety
/// `sealer` is a live sealer; `copies` points to `copies_len` entries (NULL
/// only when 0) whose sources stay readable and unchanged during the call.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_copy(
    sealer: *const rzc_pack_sealer,
    copies: *const rzc_pack_copy,
    copies_len: usize,
    threads: u32,
) -> rzc_status {
    ffi_boundary! {
        let s = borrow!(rzc_pack_sealer, sealer);
        let copies = slice_arg!(copies, copies_len);
        // SAFETY: the sources are readable and unchanged (the contract above).
        unsafe { copy(s, copies, threads as usize) }
    }
}

/// Reads `reads_len` whole tensors from the open file `fd` into the
/// sealer's buffer with pread(2), as `rzc_pack_sealer_copy` copies them from
/// memory: on up to `threads` threads, each block hashed as it completes,
/// each tensor named by its offset and size in the buffer's layout and read
/// once, nothing read when one entry is refused. Reading, not mapping, the
/// file means that a file cut short while it is read is an error
/// (`RZC_IO`, naming the entry and the file's size) instead of a SIGBUS;
/// the sealer then refuses to go on or to finish, since its buffer is not
/// whole (another fill running at that moment is refused as well).
/// Whether the file's bytes are still those its header was read from is the
/// caller's to check (its identity, size and times, before and after).
///
/// # Safety
/// `sealer` is a live sealer; `reads` points to `reads_len` entries (NULL
/// only when 0). `fd` is open for reading and names the same file for the
/// whole call (no other thread closes it meanwhile); it is only read from
/// (pread: its file offset does not move), and not closed.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_read(
    sealer: *const rzc_pack_sealer,
    fd: i32,
    reads: *const rzc_pack_read,
    reads_len: usize,
    threads: u32,
) -> rzc_status {
    ffi_boundary! {
        let s = borrow!(rzc_pack_sealer, sealer);
        let reads = slice_arg!(reads, reads_len);
        if fd < 0 {
            return Err(Failure::new(RZC_INVALID_ARGUMENT, format!("fd {fd} is not a file descriptor")));
        }
        // SAFETY: the caller's contract: `fd` is open, and names the same
        // file, for the whole call.
        let file = unsafe { BorrowedFd::borrow_raw(fd) };
        let pieces: Vec<Piece> = reads
            .iter()
            .map(|r| Piece { src: r.src_offset, dst_offset: r.dst_offset, nbytes: r.nbytes })
            .collect();
        Ok(s.read(file, &pieces, threads as usize)?)
    }
}

/// Declares the whole buffer final, completes the digest of its data
/// section (on every core), writes it into the header (`rzc.data_blake3`)
/// and writes the buffer's content digest to `*out` (the same as
/// `rzc_pack_seal` gives). The sealer is then spent: free it. A
/// `rzc_pack_sealer_copy` or `rzc_pack_sealer_read` running on another
/// thread is waited for, and later ones are refused.
///
/// # Safety
/// `sealer` is a live sealer; the bytes the caller writes into its buffer
/// itself are final (no such write runs meanwhile);
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_finish(
    sealer: *const rzc_pack_sealer,
    out: *mut rzc_digest,
) -> rzc_status {
    ffi_boundary! {
        let out = out!(out);
        let s = borrow!(rzc_pack_sealer, sealer);
        out.write(rzc_digest { bytes: s.finish()? })
    }
}

/// Frees a sealer (stopping its thread when unfinished); NULL is a no-op.
///
/// # Safety
/// `sealer` is NULL or a sealer not yet freed, which no other thread is
/// using (nor will: the one call on a sealer that may not overlap others).
#[no_mangle]
pub unsafe extern "C" fn rzc_pack_sealer_free(sealer: *mut rzc_pack_sealer) {
    ffi_value_boundary!((), free_handle!(rzc_pack_sealer, sealer))
}
