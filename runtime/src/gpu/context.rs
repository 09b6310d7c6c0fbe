//! The device context: instance, adapter, device and queue, the capabilities Ember uses,
//! and the shared caches (pipelines, buffer pool, readback staging).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::pipeline::PipelineCache;
use super::pool::BufferPool;
use super::select::{self, AdapterSelector, BackendChoice};
use crate::error::{Error, Result};

/// How to create a [`Context`].
#[derive(Debug, Clone, Default)]
pub struct ContextOptions {
    /// Graphics API filter.
    pub backend: BackendChoice,
    /// Which adapter among those allowed.
    pub adapter: AdapterSelector,
    /// Do not use SHADER_F16 even when the adapter has it (the f32 fallbacks run instead).
    pub disable_f16: bool,
    /// Do not use subgroup operations even when the adapter has them.
    pub disable_subgroups: bool,
    /// Request WebGPU's default limits instead of the adapter's real ones (as a browser or an
    /// older phone would give), to prove the kernels work under them.
    pub webgpu_default_limits: bool,
    /// Pretend the largest storage-buffer binding is this many bytes (tests of tensor splitting).
    pub max_binding_override: Option<u64>,
    /// Upper bound on bytes Ember allocates on the device; `None` = the adapter's own limits.
    pub memory_budget: Option<u64>,
}

impl ContextOptions {
    /// Options from the environment: `EMBER_BACKEND` (vulkan|metal|dx12|gl|any),
    /// `EMBER_ADAPTER` (index or name substring), `EMBER_NO_F16=1`, `EMBER_NO_SUBGROUPS=1`,
    /// `EMBER_WEBGPU_LIMITS=1`, `EMBER_MAX_BINDING=<bytes>`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let flag = |k: &str| var(k).is_some_and(|v| v != "0" && !v.eq_ignore_ascii_case("false"));
        let backend = match var("EMBER_BACKEND") {
            Some(v) => BackendChoice::parse(&v)?,
            None => BackendChoice::Any,
        };
        let adapter = var("EMBER_ADAPTER")
            .map(|v| AdapterSelector::parse(&v))
            .unwrap_or_default();
        let max_binding_override = match var("EMBER_MAX_BINDING") {
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                Error::InvalidArgument(format!("EMBER_MAX_BINDING={v:?} is not a byte count"))
            })?),
            None => None,
        };
        Ok(ContextOptions {
            backend,
            adapter,
            disable_f16: flag("EMBER_NO_F16"),
            disable_subgroups: flag("EMBER_NO_SUBGROUPS"),
            webgpu_default_limits: flag("EMBER_WEBGPU_LIMITS"),
            max_binding_override,
            memory_budget: None,
        })
    }
}

/// What the device can do, as Ember uses it. Kernels choose variants from this.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    /// SHADER_F16 is enabled: f16 arithmetic and storage in WGSL.
    pub f16: bool,
    /// Subgroup operations are enabled.
    pub subgroups: bool,
    /// Smallest subgroup size the adapter reports.
    pub subgroup_min_size: u32,
    /// Largest subgroup size the adapter reports.
    pub subgroup_max_size: u32,
    /// Timestamp queries are enabled (kernel timing in benchmarks).
    pub timestamps: bool,
    /// Largest storage-buffer binding Ember will create (may be lowered by options).
    pub max_binding: u64,
    /// Largest buffer.
    pub max_buffer: u64,
    /// Workgroup (shared) memory per workgroup, bytes.
    pub max_workgroup_storage: u32,
    /// Invocations per workgroup.
    pub max_invocations: u32,
    /// Workgroups per dispatch dimension.
    pub max_workgroups_per_dim: u32,
    /// Storage buffers per shader stage.
    pub max_storage_buffers: u32,
    /// The device is a CPU implementation (lavapipe, SwiftShader, llvmpipe GL): kernels that
    /// favour wide SIMD over many threads are picked.
    pub cpu_device: bool,
}

/// Adapter facts for `ember info`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// `vulkan`, `metal`, `dx12`, `gl` or `webgpu`.
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `Cpu`, ...
    pub device_type: String,
    /// PCI vendor id.
    pub vendor: u32,
    /// PCI device id.
    pub device: u32,
    /// Driver name.
    pub driver: String,
    /// Driver version text.
    pub driver_info: String,
    /// Every feature the adapter offers.
    pub adapter_features: Vec<String>,
    /// The features Ember enabled on the device.
    pub enabled_features: Vec<String>,
    /// The limits the device was created with.
    pub limits: wgpu::Limits,
}

fn feature_names(f: wgpu::Features) -> Vec<String> {
    let mut v: Vec<String> = f
        .features_webgpu
        .iter_names()
        .map(|(n, _)| n.to_string())
        .chain(f.features_wgpu.iter_names().map(|(n, _)| n.to_string()))
        .collect();
    v.sort();
    v
}

fn backend_name(b: wgpu::Backend) -> &'static str {
    match b {
        wgpu::Backend::Vulkan => "vulkan",
        wgpu::Backend::Metal => "metal",
        wgpu::Backend::Dx12 => "dx12",
        wgpu::Backend::Gl => "gl",
        wgpu::Backend::BrowserWebGpu => "webgpu",
        wgpu::Backend::Noop => "noop",
    }
}

pub(crate) struct Inner {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) caps: Capabilities,
    pub(crate) info: DeviceInfo,
    pub(crate) pipelines: PipelineCache,
    pub(crate) pool: BufferPool,
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) staging: Mutex<Option<wgpu::Buffer>>,
    pub(crate) budget: Option<u64>,
    pub(crate) allocated: AtomicU64,
    pub(crate) uncaptured: Arc<Mutex<Vec<String>>>,
    _adapter: wgpu::Adapter,
    _instance: wgpu::Instance,
}

/// A GPU device and everything shared by the models and sessions that use it.
///
/// Cheap to clone (a reference count); `Send + Sync`.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("adapter", &self.inner.info.name)
            .field("backend", &self.inner.info.backend)
            .finish()
    }
}

/// Lists every adapter wgpu finds for `backend`, in enumeration order.
pub fn list_adapters(backend: BackendChoice) -> Vec<wgpu::AdapterInfo> {
    let instance = make_instance(backend);
    pollster::block_on(instance.enumerate_adapters(backend.backends()))
        .iter()
        .map(|a| a.get_info())
        .collect()
}

fn make_instance(backend: BackendChoice) -> wgpu::Instance {
    wgpu::Instance::new(instance_descriptor(backend.backends()))
}

/// The instance options: the given backends, and wgpu's debugging flags from the build
/// (validation in debug builds) overridden by `WGPU_VALIDATION` / `WGPU_DEBUG`, so that a
/// run can hand the Vulkan validation layer's reports to the layer's own output
/// (`WGPU_VALIDATION=0` with `VK_INSTANCE_LAYERS`) or turn validation on in a release build.
fn instance_descriptor(backends: wgpu::Backends) -> wgpu::InstanceDescriptor {
    wgpu::InstanceDescriptor {
        backends,
        flags: wgpu::InstanceFlags::from_build_config().with_env(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    }
}

impl Context {
    /// Creates a context from [`ContextOptions::from_env`].
    pub fn new() -> Result<Self> {
        Self::with_options(ContextOptions::from_env()?)
    }

    /// Creates a context with explicit options (blocking; use [`Context::with_options_async`]
    /// on the web).
    pub fn with_options(opts: ContextOptions) -> Result<Self> {
        pollster::block_on(Self::with_options_async(opts))
    }

    /// Async form of [`Context::with_options`].
    pub async fn with_options_async(opts: ContextOptions) -> Result<Self> {
        // With no backend named, try the primary APIs first and fall back to GL only when
        // they find nothing (GL probing is slow, and noisy on machines without a display).
        let (instance, adapters) = if opts.backend == BackendChoice::Any {
            let primary = wgpu::Instance::new(instance_descriptor(
                wgpu::Backends::all() - wgpu::Backends::GL,
            ));
            let found = primary.enumerate_adapters(wgpu::Backends::all()).await;
            if found.is_empty() {
                let gl = make_instance(BackendChoice::Gl);
                let found = gl.enumerate_adapters(wgpu::Backends::GL).await;
                (gl, found)
            } else {
                (primary, found)
            }
        } else {
            let inst = make_instance(opts.backend);
            let found = inst.enumerate_adapters(opts.backend.backends()).await;
            (inst, found)
        };
        let adapter = select::pick(adapters, opts.backend, &opts.adapter)?;
        let ainfo = adapter.get_info();
        let afeatures = adapter.features();
        let alimits = adapter.limits();

        let mut wanted = wgpu::Features::empty();
        if !opts.disable_f16 {
            wanted |= wgpu::Features::SHADER_F16;
        }
        if !opts.disable_subgroups {
            wanted |= wgpu::Features::SUBGROUP;
        }
        wanted |= wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let features = afeatures & wanted;

        let limits = if opts.webgpu_default_limits {
            // WebGPU's defaults, but never above what the adapter has.
            let d = wgpu::Limits::default();
            if d.check_limits(&alimits) {
                d
            } else {
                d.or_worse_values_from(&alimits)
            }
        } else {
            alimits.clone()
        };

        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("ember"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Device(format!("creating a device on {}: {e}", ainfo.name)))?;

        // wgpu panics on errors nobody captured; Ember records them instead and turns them
        // into `Error`s at the next synchronization point.
        let uncaptured = Arc::new(Mutex::new(Vec::<String>::new()));
        {
            let sink = uncaptured.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                log::error!("wgpu: {e}");
                if let Ok(mut v) = sink.lock() {
                    v.push(e.to_string());
                }
            }));
        }

        let max_binding = {
            let real = limits.max_storage_buffer_binding_size;
            match opts.max_binding_override {
                Some(o) => o.clamp(256, real),
                None => real,
            }
        };
        let caps = Capabilities {
            f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: ainfo.subgroup_min_size,
            subgroup_max_size: ainfo.subgroup_max_size,
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            max_binding,
            max_buffer: limits.max_buffer_size,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
            cpu_device: ainfo.device_type == wgpu::DeviceType::Cpu,
        };
        let info = DeviceInfo {
            name: ainfo.name.clone(),
            backend: backend_name(ainfo.backend).into(),
            device_type: format!("{:?}", ainfo.device_type),
            vendor: ainfo.vendor,
            device: ainfo.device,
            driver: ainfo.driver.clone(),
            driver_info: ainfo.driver_info.clone(),
            adapter_features: feature_names(afeatures),
            enabled_features: feature_names(features),
            limits,
        };
        log::info!(
            "ember: using {} ({}, {}), f16={}, subgroups={}",
            info.name,
            info.backend,
            info.driver_info,
            caps.f16,
            caps.subgroups
        );
        Ok(Context {
            inner: Arc::new(Inner {
                device,
                queue,
                caps,
                info,
                pipelines: PipelineCache::default(),
                pool: BufferPool::default(),
                #[cfg(not(target_arch = "wasm32"))]
                staging: Mutex::new(None),
                budget: opts.memory_budget,
                allocated: AtomicU64::new(0),
                uncaptured,
                _adapter: adapter,
                _instance: instance,
            }),
        })
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// What the device can do.
    pub fn caps(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// Adapter facts (name, backend, driver, features, limits).
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// Bytes currently allocated through this context (tensors, pooled buffers).
    pub fn allocated_bytes(&self) -> u64 {
        self.inner.allocated.load(Ordering::Relaxed)
    }

    /// Number of pipelines compiled so far (a hot path must not change it).
    pub fn pipelines_compiled(&self) -> usize {
        self.inner.pipelines.len()
    }

    /// Blocks until the GPU has finished all submitted work, and reports any device error
    /// recorded since the last check.
    pub fn sync(&self) -> Result<()> {
        self.inner
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for the GPU: {e}")))?;
        self.take_device_error()
    }

    /// Returns the first error wgpu reported outside an error scope, if any.
    pub(crate) fn take_device_error(&self) -> Result<()> {
        let mut v = self
            .inner
            .uncaptured
            .lock()
            .map_err(|_| Error::Internal("device error log poisoned".into()))?;
        if v.is_empty() {
            Ok(())
        } else {
            let msg = v.join("; ");
            v.clear();
            Err(Error::Device(msg))
        }
    }

    /// Reserves `bytes` against the memory budget; released by [`Context::release_bytes`].
    pub(crate) fn reserve_bytes(&self, bytes: u64, what: &str) -> Result<()> {
        let prev = self.inner.allocated.fetch_add(bytes, Ordering::Relaxed);
        if let Some(budget) = self.inner.budget {
            if prev + bytes > budget {
                self.inner.allocated.fetch_sub(bytes, Ordering::Relaxed);
                return Err(Error::OutOfMemory(format!(
                    "{what} needs {bytes} bytes; {prev} of the {budget}-byte budget are in use"
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn release_bytes(&self, bytes: u64) {
        self.inner.allocated.fetch_sub(bytes, Ordering::Relaxed);
    }
}
