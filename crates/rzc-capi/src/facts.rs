//! Sizes that callers need to lay out buffers the way the library expects,
//! exported so that bindings read them from here instead of keeping copies.
//! Each is tied at compile time to the constant the library itself uses.

/// Alignment of every tensor's data when `rzc_pack_options.alignment` is 0.
pub const RZC_PACK_DEFAULT_ALIGNMENT: u64 = 64;
/// Alignment of every tensor in an uploaded device allocation. A buffer packed
/// with this alignment has the device layout as its host layout, so an upload
/// is one contiguous copy.
pub const RZC_DEVICE_ALIGNMENT: u64 = 256;
/// Non-tensor bytes a buffer needs before its first and after its last tensor
/// (`rzc_pack_options.guard_nbytes`) for `RZC_OPEN_WRITE_PROTECT`: one page,
/// so that every page holding tensor data can be protected without touching
/// memory outside the buffer.
pub const RZC_PACK_GUARD_NBYTES: u64 = 4096;
/// Largest header (the JSON after the 8-byte length) a buffer may have, as in
/// the official implementation: a reader that fetches a header itself (with
/// read(2), say) need not fetch a longer one, which is refused anyway.
pub const RZC_MAX_HEADER_NBYTES: u64 = 100_000_000;

const _: () = assert!(RZC_PACK_DEFAULT_ALIGNMENT as usize == rzc_core::pack::DEFAULT_ALIGNMENT);
const _: () = assert!(RZC_DEVICE_ALIGNMENT as usize == rzc_cuda::layout::DEVICE_ALIGNMENT);
const _: () = assert!(RZC_PACK_GUARD_NBYTES as usize == rzc_cuda::layout::PAGE);
const _: () = assert!(RZC_MAX_HEADER_NBYTES == rzc_core::header::MAX_HEADER_LEN);
