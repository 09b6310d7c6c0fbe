//! Reading weights from GGUF files and HF safetensors directories into host tensors with
//! the model's logical names, checking every shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::gguf::{GgufFile, TensorType};
use crate::model::weights::{HostMatrix, HostTensor};

/// Logical weights of a Llama-family model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightName {
    /// Token embedding table `[vocab][hidden]`.
    Embed,
    /// Final norm `[hidden]`.
    Norm,
    /// Output projection `[vocab][hidden]` (absent when tied).
    LmHead,
    /// Per-layer weights.
    Layer(usize, LayerWeight),
}

/// Weights of one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    /// Norm before attention.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// Query bias.
    QBias,
    /// Key bias.
    KBias,
    /// Value bias.
    VBias,
    /// Norm before the feed-forward.
    FfnNorm,
    /// SwiGLU gate.
    Gate,
    /// SwiGLU up projection.
    Up,
    /// Down projection.
    Down,
    /// RMSNorm on the query projection (OLMoE, Qwen3).
    QNorm,
    /// RMSNorm on the key projection.
    KNorm,
    /// Mixture-of-Experts router, `[n_experts][hidden]`.
    Router,
    /// Every expert's gate projection stacked, `[n_experts * ff][hidden]` (GGUF
    /// `ffn_gate_exps`).
    ExpertsGate,
    /// Every expert's up projection stacked.
    ExpertsUp,
    /// Every expert's down projection stacked, `[n_experts * hidden][ff]`.
    ExpertsDown,
    /// One expert's gate projection, `[ff][hidden]` (HF checkpoints).
    ExpertGate(usize),
    /// One expert's up projection.
    ExpertUp(usize),
    /// One expert's down projection.
    ExpertDown(usize),
    /// The shared expert's gate projection (Qwen2-MoE).
    SharedGate,
    /// The shared expert's up projection.
    SharedUp,
    /// The shared expert's down projection.
    SharedDown,
    /// The shared expert's output gate, `[1][hidden]`.
    SharedRouter,
}

impl WeightName {
    /// The tensor name in a GGUF file (llama.cpp's naming).
    pub fn gguf(self) -> String {
        use LayerWeight::*;
        let (i, w) = match self {
            WeightName::Embed => return "token_embd.weight".into(),
            WeightName::Norm => return "output_norm.weight".into(),
            WeightName::LmHead => return "output.weight".into(),
            WeightName::Layer(i, w) => (i, w),
        };
        let suffix = match w {
            AttnNorm => "attn_norm.weight",
            Q => "attn_q.weight",
            K => "attn_k.weight",
            V => "attn_v.weight",
            O => "attn_output.weight",
            QBias => "attn_q.bias",
            KBias => "attn_k.bias",
            VBias => "attn_v.bias",
            FfnNorm => "ffn_norm.weight",
            Gate => "ffn_gate.weight",
            Up => "ffn_up.weight",
            Down => "ffn_down.weight",
            QNorm => "attn_q_norm.weight",
            KNorm => "attn_k_norm.weight",
            Router => "ffn_gate_inp.weight",
            ExpertsGate => "ffn_gate_exps.weight",
            ExpertsUp => "ffn_up_exps.weight",
            ExpertsDown => "ffn_down_exps.weight",
            SharedGate => "ffn_gate_shexp.weight",
            SharedUp => "ffn_up_shexp.weight",
            SharedDown => "ffn_down_shexp.weight",
            SharedRouter => "ffn_gate_inp_shexp.weight",
            // Early Mixtral GGUFs stored each expert on its own.
            ExpertGate(e) => return format!("blk.{i}.ffn_gate.{e}.weight"),
            ExpertUp(e) => return format!("blk.{i}.ffn_up.{e}.weight"),
            ExpertDown(e) => return format!("blk.{i}.ffn_down.{e}.weight"),
        };
        format!("blk.{i}.{suffix}")
    }

    /// The tensor name in an HF checkpoint (the first of [`WeightName::hf_names`]).
    pub fn hf(self) -> String {
        self.hf_names().swap_remove(0)
    }

    /// The names an HF checkpoint may give the tensor: Mixtral keeps its experts under
    /// `block_sparse_moe` (`w1` gate, `w3` up, `w2` down), the other MoE families under
    /// `mlp`. Stacked expert tensors are a GGUF layout and have no HF name.
    pub fn hf_names(self) -> Vec<String> {
        use LayerWeight::*;
        let (i, w) = match self {
            WeightName::Embed => return vec!["model.embed_tokens.weight".into()],
            WeightName::Norm => return vec!["model.norm.weight".into()],
            WeightName::LmHead => return vec!["lm_head.weight".into()],
            WeightName::Layer(i, w) => (i, w),
        };
        let plain = |name: &str| vec![format!("model.layers.{i}.{name}")];
        let moe = |mixtral: String, other: String| {
            vec![
                format!("model.layers.{i}.block_sparse_moe.{mixtral}"),
                format!("model.layers.{i}.mlp.{other}"),
            ]
        };
        match w {
            AttnNorm => plain("input_layernorm.weight"),
            Q => plain("self_attn.q_proj.weight"),
            K => plain("self_attn.k_proj.weight"),
            V => plain("self_attn.v_proj.weight"),
            O => plain("self_attn.o_proj.weight"),
            QBias => plain("self_attn.q_proj.bias"),
            KBias => plain("self_attn.k_proj.bias"),
            VBias => plain("self_attn.v_proj.bias"),
            FfnNorm => plain("post_attention_layernorm.weight"),
            Gate => plain("mlp.gate_proj.weight"),
            Up => plain("mlp.up_proj.weight"),
            Down => plain("mlp.down_proj.weight"),
            QNorm => plain("self_attn.q_norm.weight"),
            KNorm => plain("self_attn.k_norm.weight"),
            SharedGate => plain("mlp.shared_expert.gate_proj.weight"),
            SharedUp => plain("mlp.shared_expert.up_proj.weight"),
            SharedDown => plain("mlp.shared_expert.down_proj.weight"),
            SharedRouter => plain("mlp.shared_expert_gate.weight"),
            Router => moe("gate.weight".into(), "gate.weight".into()),
            ExpertGate(e) => moe(
                format!("experts.{e}.w1.weight"),
                format!("experts.{e}.gate_proj.weight"),
            ),
            ExpertUp(e) => moe(
                format!("experts.{e}.w3.weight"),
                format!("experts.{e}.up_proj.weight"),
            ),
            ExpertDown(e) => moe(
                format!("experts.{e}.w2.weight"),
                format!("experts.{e}.down_proj.weight"),
            ),
            ExpertsGate | ExpertsUp | ExpertsDown => {
                vec![format!("model.layers.{i}.mlp.experts (stacked)")]
            }
        }
    }
}

/// Something that yields host tensors by logical name.
pub trait WeightSource {
    /// The tensor, or `None` when the file does not have it.
    fn get(&self, name: WeightName) -> Result<Option<HostTensor>>;
    /// The file or directory, for messages.
    fn path(&self) -> &Path;
    /// The name this source gives the weight.
    fn tensor_name(&self, name: WeightName) -> String;
    /// The tensor or an error naming it.
    fn need(&self, name: WeightName) -> Result<HostTensor> {
        self.get(name)?.ok_or_else(|| {
            Error::format(
                Some(self.path()),
                format!("missing tensor {}", self.tensor_name(name)),
            )
        })
    }
}

/// GGUF weights.
pub struct GgufSource<'a> {
    /// The file.
    pub file: &'a GgufFile,
    /// Its path.
    pub path: PathBuf,
}

impl WeightSource for GgufSource<'_> {
    fn get(&self, name: WeightName) -> Result<Option<HostTensor>> {
        let tname = name.gguf();
        let Some(t) = self.file.tensor(&tname) else {
            return Ok(None);
        };
        let rows = t.rows() as usize;
        let cols = t.cols() as usize;
        let data = match t.ty {
            TensorType::F32 | TensorType::BF16 => HostMatrix::F32(self.file.tensor_f32(t)?),
            TensorType::F16 => {
                let b = self.file.tensor_data(t)?;
                HostMatrix::F16(
                    b.chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                )
            }
            TensorType::Quant(q) => HostMatrix::Quant(q, self.file.tensor_data(t)?.to_vec()),
        };
        Ok(Some(HostTensor {
            name: tname,
            source: Some(self.path.clone()),
            rows,
            cols,
            data,
        }))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn tensor_name(&self, name: WeightName) -> String {
        name.gguf()
    }
}

/// An HF checkpoint: `model.safetensors`, or shards listed by
/// `model.safetensors.index.json`, memory-mapped.
pub struct SafetensorsSource {
    dir: PathBuf,
    /// Memory maps of the shard files.
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name -> index into `maps`.
    index: HashMap<String, usize>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is read-only; if another process truncates the file while we read it
    // we may fault, which is the documented risk of memory-mapped model files (llama.cpp
    // and safetensors share it).
    unsafe { memmap2::Mmap::map(&f) }.map_err(io_err(path))
}

impl SafetensorsSource {
    /// Opens the checkpoint in `dir`.
    pub fn open(dir: &Path) -> Result<SafetensorsSource> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = Vec::new();
        let mut wanted: HashMap<String, String> = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(Some(&index_path), format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(Some(&index_path), "no weight_map object"))?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::format(Some(&index_path), format!("{name}: shard is not a string"))
                })?;
                if file.contains('/') || file.contains('\\') || file.contains("..") {
                    return Err(Error::format(
                        Some(&index_path),
                        format!("shard name {file:?} leaves the directory"),
                    ));
                }
                if !files
                    .iter()
                    .any(|f| f.file_name().and_then(|n| n.to_str()) == Some(file))
                {
                    files.push(dir.join(file));
                }
                wanted.insert(name.clone(), file.to_string());
            }
        } else if single.exists() {
            files.push(single);
        } else {
            return Err(Error::format(
                Some(dir),
                "no model.safetensors or model.safetensors.index.json in the directory",
            ));
        }
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let m = map_file(f)?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&m)
                .map_err(|e| Error::format(Some(f), format!("invalid safetensors header: {e}")))?;
            for name in meta.tensors().keys() {
                index.insert(name.clone(), i);
            }
            maps.push((f.clone(), m));
        }
        for (name, file) in &wanted {
            if !index.contains_key(name) {
                return Err(Error::format(
                    Some(&index_path),
                    format!("{name} is not in shard {file}"),
                ));
            }
        }
        Ok(SafetensorsSource {
            dir: dir.to_path_buf(),
            maps,
            index,
        })
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&self, name: WeightName) -> Result<Option<HostTensor>> {
        let Some((tname, &i)) = name
            .hf_names()
            .into_iter()
            .find_map(|n| self.index.get(&n).map(|i| (n, i)))
        else {
            return Ok(None);
        };
        let (path, map) = &self.maps[i];
        let st = safetensors::SafeTensors::deserialize(map)
            .map_err(|e| Error::format(Some(path), format!("invalid safetensors: {e}")))?;
        let t = st
            .tensor(&tname)
            .map_err(|e| Error::format(Some(path), format!("{tname}: {e}")))?;
        let shape = t.shape();
        let (rows, cols) = match shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            other => {
                return Err(Error::format(
                    Some(path),
                    format!("{tname} has shape {other:?}"),
                ));
            }
        };
        let b = t.data();
        let data = match t.dtype() {
            safetensors::Dtype::F32 => HostMatrix::F32(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            safetensors::Dtype::F16 => HostMatrix::F16(
                b.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            safetensors::Dtype::BF16 => HostMatrix::F32(
                b.chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            ),
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: tensor {tname} has dtype {other:?} (f32, f16 or bf16 expected)",
                    path.display()
                )))
            }
        };
        Ok(Some(HostTensor {
            name: tname,
            source: Some(path.clone()),
            rows,
            cols,
            data,
        }))
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn tensor_name(&self, name: WeightName) -> String {
        name.hf_names().join(" or ")
    }
}
