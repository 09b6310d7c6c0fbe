//! Choosing a GPU adapter: backend filter (`EMBER_BACKEND`) and adapter selector
//! (`EMBER_ADAPTER`), with a ranking that prefers real GPUs over software rasterizers.

use crate::error::{Error, Result};

/// Which graphics API to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Any backend; the best-ranked adapter wins.
    #[default]
    Any,
    /// Vulkan (Linux, Windows, Android; lavapipe on a machine without a GPU).
    Vulkan,
    /// Metal (macOS, iOS).
    Metal,
    /// Direct3D 12 (Windows).
    Dx12,
    /// OpenGL / OpenGL ES (EGL on Linux and Android, WebGL).
    Gl,
    /// The browser's WebGPU.
    BrowserWebGpu,
}

impl BackendChoice {
    /// Parses `vulkan|metal|dx12|gl|webgpu|any` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "" | "any" | "auto" => BackendChoice::Any,
            "vulkan" | "vk" => BackendChoice::Vulkan,
            "metal" | "mtl" => BackendChoice::Metal,
            "dx12" | "d3d12" => BackendChoice::Dx12,
            "gl" | "gles" | "opengl" => BackendChoice::Gl,
            "webgpu" | "browser" => BackendChoice::BrowserWebGpu,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown backend {other:?}: expected vulkan, metal, dx12, gl, webgpu or any"
                )))
            }
        })
    }

    /// The wgpu backend set this choice allows.
    pub fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Any => wgpu::Backends::all(),
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
            BackendChoice::BrowserWebGpu => wgpu::Backends::BROWSER_WEBGPU,
        }
    }

    /// Lower-case name, as accepted by [`BackendChoice::parse`].
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Any => "any",
            BackendChoice::Vulkan => "vulkan",
            BackendChoice::Metal => "metal",
            BackendChoice::Dx12 => "dx12",
            BackendChoice::Gl => "gl",
            BackendChoice::BrowserWebGpu => "webgpu",
        }
    }
}

/// Which adapter to take among those the backend filter allows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AdapterSelector {
    /// The best-ranked adapter (discrete > integrated > virtual > CPU; Vulkan/Metal/DX12 before GL).
    #[default]
    Best,
    /// The n-th adapter in enumeration order (as listed by `ember info --all`).
    Index(usize),
    /// The first adapter whose name contains this substring (case-insensitive).
    Name(String),
}

impl AdapterSelector {
    /// Parses an index (`"0"`) or a name substring (`"llvmpipe"`).
    pub fn parse(s: &str) -> Self {
        let s = s.trim();
        if s.is_empty() {
            AdapterSelector::Best
        } else if let Ok(i) = s.parse::<usize>() {
            AdapterSelector::Index(i)
        } else {
            AdapterSelector::Name(s.to_string())
        }
    }
}

/// Rank used to order adapters: lower is better.
pub(crate) fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::BrowserWebGpu => 1,
        wgpu::Backend::Gl => 2,
        wgpu::Backend::Noop => 9,
    };
    (ty, backend)
}

/// Text shown when no adapter is found: how to get one.
pub(crate) fn no_adapter_hint() -> String {
    if cfg!(target_os = "linux") {
        "install a GPU driver, or Mesa's CPU Vulkan driver lavapipe \
         (`apt-get install mesa-vulkan-drivers` on Debian/Ubuntu), then retry; \
         EMBER_BACKEND and EMBER_ADAPTER choose among several"
            .into()
    } else if cfg!(target_os = "windows") {
        "install your GPU vendor's driver (Vulkan or Direct3D 12); EMBER_BACKEND and \
         EMBER_ADAPTER choose among several"
            .into()
    } else {
        "this platform's GPU driver is needed (Metal on Apple platforms, Vulkan or GL elsewhere)"
            .into()
    }
}

/// Picks one adapter among `adapters` following `selector`. `adapters` is in enumeration order.
pub(crate) fn pick(
    adapters: Vec<wgpu::Adapter>,
    backend: BackendChoice,
    selector: &AdapterSelector,
) -> Result<wgpu::Adapter> {
    let wanted = match (backend, selector) {
        (BackendChoice::Any, AdapterSelector::Best) => String::new(),
        (b, AdapterSelector::Best) => format!("backend {}", b.name()),
        (b, AdapterSelector::Index(i)) => format!("backend {} adapter #{i}", b.name()),
        (b, AdapterSelector::Name(n)) => format!("backend {} adapter named {n:?}", b.name()),
    };
    let compute_capable: Vec<wgpu::Adapter> = adapters
        .into_iter()
        .filter(|a| {
            a.get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
        })
        .collect();
    let names: Vec<String> = compute_capable
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let info = a.get_info();
            format!("#{i} {} ({:?})", info.name, info.backend)
        })
        .collect();
    let found = match selector {
        AdapterSelector::Best => {
            let mut v = compute_capable;
            v.sort_by_key(|a| rank(&a.get_info()));
            v.into_iter().next()
        }
        AdapterSelector::Index(i) => compute_capable.into_iter().nth(*i),
        AdapterSelector::Name(n) => {
            let n = n.to_ascii_lowercase();
            compute_capable
                .into_iter()
                .find(|a| a.get_info().name.to_ascii_lowercase().contains(&n))
        }
    };
    found.ok_or_else(|| Error::NoAdapter {
        wanted,
        hint: if names.is_empty() {
            no_adapter_hint()
        } else {
            format!("available adapters: {}", names.join(", "))
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backends() {
        assert_eq!(
            BackendChoice::parse("Vulkan").unwrap(),
            BackendChoice::Vulkan
        );
        assert_eq!(BackendChoice::parse("any").unwrap(), BackendChoice::Any);
        assert_eq!(BackendChoice::parse("gl").unwrap(), BackendChoice::Gl);
        assert!(BackendChoice::parse("glide").is_err());
    }

    #[test]
    fn parses_selectors() {
        assert_eq!(AdapterSelector::parse("1"), AdapterSelector::Index(1));
        assert_eq!(
            AdapterSelector::parse("llvm"),
            AdapterSelector::Name("llvm".into())
        );
        assert_eq!(AdapterSelector::parse(""), AdapterSelector::Best);
    }
}
