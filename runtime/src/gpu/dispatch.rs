//! Kernels as values: a [`Dispatch`] is one compute dispatch with its pipeline, its bind
//! group and its workgroup counts, built once when a plan is made and encoded any number of
//! times. Many dispatches are encoded into one compute pass and submitted together.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use super::context::Context;
use super::pipeline::PipelineKey;
use super::tensor::Tensor;
use super::wait::scoped;
use crate::error::{Error, Result};

/// A uniform struct shared by Rust and WGSL. Implemented by the [`crate::uniform!`] macro,
/// which also records the field list so a test can check the WGSL declaration matches.
pub trait Uniform: bytemuck::Pod {
    /// Struct name, as declared in WGSL.
    const NAME: &'static str;
    /// (field name, Rust type name) in declaration order.
    const FIELDS: &'static [(&'static str, &'static str)];
}

/// Declares a `#[repr(C)]` uniform struct of 32-bit scalars whose WGSL twin is checked by
/// the shader-layout test.
#[macro_export]
macro_rules! uniform {
    ($(#[$m:meta])* $vis:vis struct $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        #[allow(missing_docs)] // fields mirror the WGSL struct of the same name
        $vis struct $name { $($(#[$fm])* pub $f: $t),* }
        impl $crate::gpu::Uniform for $name {
            const NAME: &'static str = stringify!($name);
            const FIELDS: &'static [(&'static str, &'static str)] = &[$((stringify!($f), stringify!($t))),*];
        }
    };
}

/// One compute dispatch, ready to encode.
#[derive(Clone)]
pub struct Dispatch {
    pub(crate) pipeline: Arc<wgpu::ComputePipeline>,
    pub(crate) bind_group: wgpu::BindGroup,
    pub(crate) groups: [u32; 3],
    /// Kernel name, for profiling and counts.
    pub name: &'static str,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dispatch({}, {:?})", self.name, self.groups)
    }
}

/// A resource bound to a binding slot.
pub enum Bind<'a> {
    /// A tensor as a storage buffer.
    T(&'a Tensor),
    /// A uniform buffer.
    U(&'a wgpu::Buffer),
    /// Nothing at this binding index (the entry point does not use it).
    Skip,
}

/// Splits `n` workgroups into an (x, y) grid within the per-dimension limit; shaders
/// recover the flat index as `wg.x + wg.y * nwg.x`.
pub fn grid(ctx: &Context, n: u32) -> Result<[u32; 3]> {
    let max = ctx.caps().max_workgroups_per_dim.max(1);
    if n <= max {
        return Ok([n.max(1), 1, 1]);
    }
    let y = n.div_ceil(max);
    if y > max {
        return Err(Error::Limit {
            what: "workgroups in one dispatch".into(),
            needed: n as u64,
            limit: max as u64 * max as u64,
        });
    }
    Ok([n.div_ceil(y), y, 1])
}

impl Context {
    /// Creates a uniform buffer holding `value` (plan time, not the hot path).
    pub fn uniform<U: super::Uniform>(&self, value: &U) -> wgpu::Buffer {
        self.device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(U::NAME),
                contents: bytemuck::bytes_of(value),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// Builds a dispatch of pipeline `key`, binding `binds[i]` at binding `i` of group 0.
    pub fn dispatch(
        &self,
        name: &'static str,
        key: &PipelineKey,
        binds: &[Bind<'_>],
        groups: [u32; 3],
    ) -> Result<Dispatch> {
        let max = self.caps().max_workgroups_per_dim;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Limit {
                what: format!("{name}: workgroups per dimension {groups:?}"),
                needed: groups.iter().copied().max().unwrap_or(0) as u64,
                limit: max as u64,
            });
        }
        for b in binds {
            if let Bind::T(t) = b {
                if t.bytes() > self.caps().max_binding {
                    return Err(Error::Limit {
                        what: format!("{name}: binding of {:?} {:?}", t.dtype(), t.shape()),
                        needed: t.bytes(),
                        limit: self.caps().max_binding,
                    });
                }
            }
        }
        let pipeline = self.inner.pipelines.get(self.device(), key)?;
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry<'_>> = binds
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let resource = match b {
                    Bind::T(t) => t.binding(),
                    Bind::U(u) => u.as_entire_binding(),
                    Bind::Skip => return None,
                };
                Some(wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource,
                })
            })
            .collect();
        let (bind_group, error) = scoped(self.device(), wgpu::ErrorFilter::Validation, || {
            self.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(name),
                layout: &layout,
                entries: &entries,
            })
        });
        if let Some(e) = error {
            return Err(Error::Internal(format!("{name}: bind group: {e}")));
        }
        Ok(Dispatch {
            pipeline,
            bind_group,
            groups,
            name,
        })
    }

    /// Encodes `ops` into one compute pass of `encoder`.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder, ops: &[Dispatch]) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        for op in ops {
            pass.set_pipeline(&op.pipeline);
            pass.set_bind_group(0, &op.bind_group, &[]);
            pass.dispatch_workgroups(op.groups[0], op.groups[1], op.groups[2]);
        }
    }

    /// Encodes `ops` in one command buffer and submits it (does not wait).
    pub fn submit(&self, ops: &[Dispatch]) {
        let mut enc = self
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        self.encode(&mut enc, ops);
        self.queue().submit([enc.finish()]);
    }

    /// Runs `ops` one per submission, waiting for each, and returns the wall time per
    /// kernel name as (name, count, seconds), slowest first. Profiling only: the waits add
    /// their own overhead.
    pub fn profile(&self, ops: &[Dispatch]) -> Result<Vec<(String, usize, f64)>> {
        let mut by: Vec<(String, usize, f64)> = Vec::new();
        for op in ops {
            let t = web_time::Instant::now();
            self.run(std::slice::from_ref(op))?;
            let s = t.elapsed().as_secs_f64();
            match by.iter_mut().find(|(n, _, _)| n == op.name) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += s;
                }
                None => by.push((op.name.to_string(), 1, s)),
            }
        }
        by.sort_by(|a, b| b.2.total_cmp(&a.2));
        Ok(by)
    }

    /// Submits `ops` and waits for them to finish.
    pub fn run(&self, ops: &[Dispatch]) -> Result<()> {
        self.submit(ops);
        self.sync()
    }
}
