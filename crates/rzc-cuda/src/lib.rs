//! Device layer of ray-zerocopy: uploads an opened safetensors buffer to a
//! CUDA device through the driver API (cudarc, loaded at run time), into one
//! allocation in the device's primary context, and exports the tensors as
//! kDLCUDA DLPack tensors. Without a CUDA driver every entry point returns a
//! "no CUDA" error; nothing panics.
//!
//! A reader's path: [`layout`] is the arithmetic (where tensors go, how copies
//! are cut), `driver` the checked calls and the primary context, [`Error`]
//! the device's failures next to the core's; the owners of driver objects,
//! each released by `Drop`: `stream` (stream, event, the drain guard),
//! `host` (pinned buffers, registrations), `vmm` (shareable physical
//! memory) and `memory` (the one owner of device memory); `staging` the
//! three ways bytes reach the device, `share` one device copy per GPU for
//! every process that loads the same buffer, `upload` the whole operation
//! and the resulting [`DeviceWeights`].
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod driver;
mod error;
mod host;
pub mod layout;
mod memory;
mod share;
mod staging;
mod stream;
mod upload;
mod vmm;

pub use driver::{device_count, library_present};
pub use error::{Error, ErrorKind, Result};
pub use layout::{DeviceTensor, DEVICE_ALIGNMENT};
pub use share::{Fallback, Readback, ShareOptions, Sharing};
pub use staging::Staging;
pub use upload::{upload, DeviceWeights, UploadOptions};
