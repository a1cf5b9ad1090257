//! Safe core of ray-zerocopy.
//!
//! Turns a safetensors buffer (borrowed memory, an owned vector or a mapped
//! file) into a validated tensor table whose entries point into the buffer,
//! exports tensors as DLPack without copying, and lays out tensors as a
//! standard, aligned safetensors buffer ([`pack`]).

pub mod dlpack;
mod dtype;
mod error;
pub mod guard;
pub mod header;
pub mod pack;
mod weights;

pub use dtype::Dtype;
pub use error::{Error, ErrorKind, Result};
pub use header::TensorMeta;
pub use weights::{Bytes, Storage, Weights, PAD_PREFIX};

/// The library version, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
