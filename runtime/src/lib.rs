//! # Ember
//!
//! An embeddable runtime for running and teaching language models on whatever GPU a device
//! has (Vulkan, Metal, DX12, GL and WebGPU through wgpu), with every kernel written in WGSL.
//!
//! The module tree is the architecture: [`gpu`] (device, buffers, pipelines) carries the
//! [`kernels`] (one module per WGSL family, each with a CPU reference), [`quant`] holds the
//! GGUF block formats and their GPU repacking.
#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
// In the browser wgpu's objects are not Send (JavaScript handles; there is one thread), so
// the Arcs that share them natively are plain reference counts there; and std's File has
// no Drop impl there (no file system).
#![cfg_attr(
    target_arch = "wasm32",
    allow(clippy::arc_with_non_send_sync, clippy::drop_non_drop)
)]

pub mod adapters;
pub mod error;
pub mod format;
pub mod gpu;
pub mod kernels;
pub mod learn;
pub mod model;
pub mod quant;
pub mod session;
pub mod shaders;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, ErrorKind, Result};
pub use gpu::{Context, ContextOptions, Tensor};

/// Ember's version (the crate version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
