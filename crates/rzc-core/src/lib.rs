//! Core of ray-zerocopy.
//!
//! Turns a safetensors buffer (borrowed memory, an owned vector or a mapped
//! file) into a validated tensor table whose entries point into the buffer,
//! exports tensors as DLPack without copying, write-protects the pages it
//! shares, and lays out tensors as a standard, aligned safetensors buffer
//! ([`pack`]).
//!
//! Safe code, with four fenced exceptions, each a module whose very purpose
//! is a contract the compiler cannot check:
//! - [`dlpack`]: DLPack hands out raw pointers and a C deleter that frees them;
//! - [`seal`]: a buffer the caller owns, filled and hashed by several threads
//!   at once, each byte written by one;
//! - `storage`: memory borrowed from the caller (a raw pointer kept valid by
//!   the caller's promise) and memory-mapped files;
//! - `platform`: page protection, the SIGSEGV handler, libc calls.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod digest;
#[allow(unsafe_code)] // raw pointers and deleters are the DLPack contract
pub mod dlpack;
mod dtype;
mod error;
pub mod header;
pub mod pack;
#[allow(unsafe_code)] // libc: mprotect, sigaction, write(2) in a signal handler, pread(2)
mod platform;
#[allow(unsafe_code)] // the caller's buffer, written by several threads at once
pub mod seal;
#[allow(unsafe_code)] // borrowed raw memory and mmap
mod storage;
mod weights;

pub use dtype::Dtype;
pub use error::{Error, ErrorKind, Result};
pub use header::TensorMeta;
pub use platform::GuardState;
pub use storage::{not_regular, open_regular, Borrowed};
pub use weights::{OpenOptions, Weights};
