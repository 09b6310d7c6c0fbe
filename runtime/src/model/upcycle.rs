//! Sparse upcycling: a dense Llama-family GGUF becomes a Mixture-of-Experts GGUF whose `E`
//! experts all start as copies of each layer's feed-forward, behind a new router (Komatsuzaki
//! et al., "Sparse Upcycling", 2022). The copies keep the file's quantized blocks byte for
//! byte, so with renormalized top-k weights (which sum to 1) the new model computes exactly
//! the dense one until its experts are trained apart. The output is laid out as llama.cpp
//! lays out Mixtral (`llama` architecture, `ffn_{gate,up,down}_exps` 3-D tensors, an f32
//! `ffn_gate_inp` router), so llama.cpp can run it too.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::gguf::{GgufFile, GgufWriter, TensorType, Value};
use crate::kernels::moe::{check_top_k, Gating};
use crate::model::config::{Arch, ModelConfig, MoeConfig};
use crate::model::count_params;
use crate::util::Rng;

/// How to upcycle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpcycleOptions {
    /// Experts per layer.
    pub experts: usize,
    /// Experts each token uses.
    pub top_k: usize,
    /// Standard deviation of the router's random initial weights (0: all zero, so every
    /// token takes the first k experts until the router is trained).
    pub router_std: f32,
    /// Seed of the router's weights.
    pub seed: u64,
}

impl Default for UpcycleOptions {
    fn default() -> Self {
        UpcycleOptions {
            experts: 8,
            top_k: 2,
            router_std: 0.02,
            seed: 0,
        }
    }
}

/// What [`upcycle_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct UpcycleReport {
    /// Layers converted.
    pub layers: usize,
    /// Parameters of the dense source.
    pub dense_params: u64,
    /// Parameters of the MoE (every expert).
    pub moe_params: u64,
    /// Parameters one token uses.
    pub active_params: u64,
}

/// Writes `dst`: the dense Llama/Mistral GGUF `src` with every layer's feed-forward turned
/// into `o.experts` copies behind a router that picks `o.top_k` of them. The write is
/// atomic; `src` is only read.
///
/// Errors: [`Error::Unsupported`] for a source that is not a dense Llama-family model (or
/// is already a MoE); [`Error::InvalidArgument`] for a top-k outside `1..=experts`; the
/// errors of reading and writing GGUF files.
pub fn upcycle_gguf(src: &Path, dst: &Path, o: &UpcycleOptions) -> Result<UpcycleReport> {
    check_top_k(o.experts, o.top_k)?;
    if !(o.router_std.is_finite() && o.router_std >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "router standard deviation {}",
            o.router_std
        )));
    }
    let f = GgufFile::open(src)?;
    let cfg = ModelConfig::from_gguf(&f)?;
    if cfg.moe.is_some() || !matches!(cfg.arch, Arch::Llama | Arch::Mistral) {
        return Err(Error::Unsupported(format!(
            "{}: upcycling needs a dense llama or mistral model, not {}{}",
            src.display(),
            cfg.arch.name(),
            if cfg.moe.is_some() {
                " (already MoE)"
            } else {
                ""
            }
        )));
    }
    let arch = f.architecture()?.to_string();
    let (e, hidden, ff) = (o.experts, cfg.hidden, cfg.ff);
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.add(k.clone(), v.clone());
    }
    w.add(format!("{arch}.expert_count"), Value::U32(e as u32));
    w.add(
        format!("{arch}.expert_used_count"),
        Value::U32(o.top_k as u32),
    );
    w.add(
        format!("{arch}.expert_feed_forward_length"),
        Value::U32(ff as u32),
    );
    w.add(
        "general.name",
        Value::String(format!("{}-upcycled-{e}x-top{}", cfg.name, o.top_k)),
    );
    let ffn = |name: &str| -> Option<(usize, &'static str)> {
        let rest = name.strip_prefix("blk.")?;
        let (layer, what) = rest.split_once('.')?;
        let kind = match what {
            "ffn_gate.weight" => "ffn_gate_exps.weight",
            "ffn_up.weight" => "ffn_up_exps.weight",
            "ffn_down.weight" => "ffn_down_exps.weight",
            _ => return None,
        };
        Some((layer.parse().ok()?, kind))
    };
    let mut rng = Rng::new(o.seed);
    for t in f.tensors() {
        let data = f.tensor_data(t)?;
        match ffn(&t.name) {
            None => {
                w.add_tensor(t.name.clone(), &t.dims, t.ty, data.to_vec());
            }
            Some((layer, kind)) => {
                let mut dims = t.dims.clone();
                dims.push(e as u64);
                w.add_tensor(format!("blk.{layer}.{kind}"), &dims, t.ty, data.repeat(e));
                if kind == "ffn_gate_exps.weight" {
                    let router: Vec<u8> = (0..e * hidden)
                        .flat_map(|_| (rng.normal() * o.router_std).to_le_bytes())
                        .collect();
                    w.add_tensor(
                        format!("blk.{layer}.ffn_gate_inp.weight"),
                        &[hidden as u64, e as u64],
                        TensorType::F32,
                        router,
                    );
                }
            }
        }
    }
    w.write_to(dst)?;
    let mut moe = cfg.clone();
    moe.moe = Some(MoeConfig {
        n_experts: e,
        top_k: o.top_k,
        expert_ff: ff,
        gating: Gating::SoftmaxRenorm,
        shared_ff: 0,
    });
    Ok(UpcycleReport {
        layers: cfg.n_layers,
        dense_params: count_params(&cfg, false),
        moe_params: count_params(&moe, false),
        active_params: count_params(&moe, true),
    })
}
