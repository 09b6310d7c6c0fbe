//! The kernel library: one module per WGSL family. Each module checks shapes on the CPU,
//! builds [`Dispatch`](crate::gpu::Dispatch)es (pipelines come from the context's cache),
//! and carries a plain Rust CPU reference that its tests compare the GPU against.

pub mod attention;
pub mod elementwise;
pub mod embed;
pub mod kv;
pub mod lora;
pub mod lora_moe;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod sample;
pub mod selfcheck;
pub mod softmax;
pub mod train;

#[cfg(test)]
mod portability;
#[cfg(test)]
pub(crate) mod testing;

use crate::gpu::Context;

/// Which implementation of a kernel family to use. `Auto` picks by device: the
/// subgroup-shuffle kernels on CPU-like devices with 8-wide subgroups (lavapipe), where
/// workgroup memory is read lane by lane, and the workgroup-memory tiled kernels on GPUs
/// and wherever subgroups are missing. Tests run every variant on the same inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// Choose by device capabilities.
    #[default]
    Auto,
    /// Subgroup-shuffle kernels (needs SUBGROUP with subgroup size 8).
    Subgroup,
    /// Workgroup-memory kernels (runs everywhere).
    Tiled,
}

impl Variant {
    /// Whether the subgroup kernels can run on this device.
    pub fn subgroup_available(ctx: &Context) -> bool {
        let c = ctx.caps();
        c.subgroups && c.subgroup_min_size == 8 && c.subgroup_max_size == 8
    }

    /// Resolves `Auto` for `ctx`.
    pub fn resolve(self, ctx: &Context) -> Variant {
        match self {
            Variant::Auto => {
                if Self::subgroup_available(ctx) && ctx.caps().cpu_device {
                    Variant::Subgroup
                } else {
                    Variant::Tiled
                }
            }
            v => v,
        }
    }

    /// The variants that can run on `ctx` (what the tests compare).
    pub fn all(ctx: &Context) -> Vec<Variant> {
        let mut v = vec![Variant::Tiled];
        if Self::subgroup_available(ctx) {
            v.push(Variant::Subgroup);
        }
        v
    }
}
