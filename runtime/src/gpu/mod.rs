//! The device layer: adapter choice, device creation with the adapter's real limits and
//! optional features, a buffer pool, a pipeline cache keyed by shader + override constants,
//! a reused readback path, tensors, and dispatches encoded into one command buffer.

mod context;
mod dispatch;
mod pipeline;
mod pool;
mod preprocess;
mod select;
mod tensor;
mod wait;

pub use context::{list_adapters, Capabilities, Context, ContextOptions, DeviceInfo};
pub use dispatch::{grid, Bind, Dispatch, Uniform};
pub use pipeline::PipelineKey;
pub use preprocess::{preprocess, ShaderDefs};
pub use select::{AdapterSelector, BackendChoice};
pub use tensor::{numel, DType, DeviceBuffer, Tensor};
pub use wait::blocking;

#[cfg(test)]
mod tests;
