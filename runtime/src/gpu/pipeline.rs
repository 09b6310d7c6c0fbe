//! Pipeline cache: one compiled compute pipeline per (shader, entry point, flags, override
//! constants). Pipelines are created when a plan is built, never in a hot loop; the count is
//! exposed so tests can prove it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::preprocess::{preprocess, ShaderDefs};
use super::wait::scoped;
use crate::error::{Error, Result};

/// Identifies one specialization of one kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// Shader family (file name without `.wgsl`), see [`crate::shaders`].
    pub shader: &'static str,
    /// Entry point.
    pub entry: &'static str,
    /// Preprocessor names defined for this variant.
    pub defs: ShaderDefs,
    /// Override constants, as (name, f64 bits), sorted by name.
    pub constants: Vec<(&'static str, u64)>,
}

impl PipelineKey {
    /// A key with no flags and no constants.
    pub fn new(shader: &'static str, entry: &'static str) -> Self {
        PipelineKey {
            shader,
            entry,
            defs: ShaderDefs::none(),
            constants: Vec::new(),
        }
    }

    /// Defines preprocessor name `name` when `on`.
    pub fn def(mut self, name: &'static str, on: bool) -> Self {
        self.defs = self.defs.with(name, on);
        self
    }

    /// Adds an override constant.
    pub fn constant(mut self, name: &'static str, value: f64) -> Self {
        self.constants.retain(|(n, _)| *n != name);
        self.constants.push((name, value.to_bits()));
        self.constants.sort_by_key(|(n, _)| *n);
        self
    }

    /// The override constants as wgpu wants them.
    pub fn constant_values(&self) -> Vec<(&'static str, f64)> {
        self.constants
            .iter()
            .map(|&(n, b)| (n, f64::from_bits(b)))
            .collect()
    }
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<(&'static str, ShaderDefs), Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

fn lock_err<T>(_: T) -> Error {
    Error::Internal("pipeline cache lock poisoned".into())
}

impl PipelineCache {
    pub(crate) fn len(&self) -> usize {
        self.pipelines.lock().map(|p| p.len()).unwrap_or(0)
    }

    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.pipelines.lock().map_err(lock_err)?.get(key) {
            return Ok(p.clone());
        }
        let module = self.module(device, key.shader, &key.defs)?;
        let constants = key.constant_values();
        let (pipeline, error) = scoped(device, wgpu::ErrorFilter::Validation, || {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    // Kernels initialise the workgroup memory they read.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        });
        if let Some(e) = error {
            return Err(Error::Internal(format!(
                "creating pipeline {}::{} {:?} {:?}: {e}",
                key.shader, key.entry, key.defs, key.constants
            )));
        }
        let p = Arc::new(pipeline);
        self.pipelines
            .lock()
            .map_err(lock_err)?
            .insert(key.clone(), p.clone());
        Ok(p)
    }

    fn module(
        &self,
        device: &wgpu::Device,
        shader: &'static str,
        defs: &ShaderDefs,
    ) -> Result<Arc<wgpu::ShaderModule>> {
        let mkey = (shader, defs.clone());
        if let Some(m) = self.modules.lock().map_err(lock_err)?.get(&mkey) {
            return Ok(m.clone());
        }
        let src = crate::shaders::source(shader)
            .ok_or_else(|| Error::Internal(format!("no shader named {shader}")))?;
        let text = preprocess(shader, src, defs)?;
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(shader),
            source: wgpu::ShaderSource::Wgsl(text.into()),
        };
        // SAFETY: every kernel checks shapes and sizes on the CPU before it is dispatched
        // (see `kernels`), and each shader guards its own index arithmetic against the sizes
        // in its uniform, so naga's extra bounds-check code is redundant; dropping it made
        // tiled kernels ~1.5x faster on lavapipe. `EMBER_SHADER_CHECKS=1` keeps the checks.
        let checks = std::env::var_os("EMBER_SHADER_CHECKS").is_some_and(|v| v != "0");
        let (module, error) = scoped(device, wgpu::ErrorFilter::Validation, || {
            if checks {
                device.create_shader_module(desc)
            } else {
                unsafe {
                    device
                        .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
                }
            }
        });
        if let Some(e) = error {
            return Err(Error::Internal(format!("compiling shader {shader}: {e}")));
        }
        let m = Arc::new(module);
        self.modules
            .lock()
            .map_err(lock_err)?
            .insert(mkey, m.clone());
        Ok(m)
    }
}
