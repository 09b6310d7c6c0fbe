//! Converting a GGUF model into an HF directory (`config.json`, `model.safetensors`,
//! tokenizer files): dequantized to f32 or f16, with the q/k rows put back into HF's order
//! (llama.cpp's converter permutes them for adjacent-pair RoPE). Used to compare the two
//! loaders on the same weights and to hand a model to transformers.

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use serde_json::json;

use crate::error::{Error, Result};
use crate::format::gguf::GgufFile;
use crate::model::config::{Arch, ModelConfig};
use crate::model::loader::{GgufSource, LayerWeight, WeightName, WeightSource};
use crate::tokenizer::Tokenizer;
use crate::util::write_atomic;

/// Element type of an exported checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    /// 32-bit floats (exactly the dequantized values).
    F32,
    /// 16-bit floats.
    F16,
}

/// Inverse of llama.cpp's q/k permutation: GGUF row `h*hd + 2i + j` is HF row
/// `h*hd + j*hd/2 + i`.
pub fn unpermute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = data.len() / cols;
    let hd = rows / heads;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * hd / 2 + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Writes the HF tokenizer files of `t` into `dir`.
pub fn write_tokenizer_files(t: &Tokenizer, dir: &Path) -> Result<()> {
    write_atomic(&dir.join("tokenizer.json"), t.to_hf_json(false)?.as_bytes())?;
    let name = |id: Option<u32>| {
        id.and_then(|i| t.token_bytes(i))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let mut cfg = json!({
        "add_bos_token": t.adds_bos(),
        "add_eos_token": false,
        "bos_token": name(t.bos()),
        "eos_token": name(t.eos()),
    });
    if let Some(tpl) = t.chat_template() {
        cfg["chat_template"] = json!(tpl);
    }
    write_atomic(
        &dir.join("tokenizer_config.json"),
        cfg.to_string().as_bytes(),
    )?;
    let gen = json!({ "bos_token_id": t.bos(), "eos_token_id": t.end_of_generation_ids() });
    write_atomic(
        &dir.join("generation_config.json"),
        gen.to_string().as_bytes(),
    )
}

/// Converts the GGUF model at `gguf` into an HF directory at `out` (created if needed).
pub fn export_hf(gguf: &Path, out: &Path, dtype: ExportDtype) -> Result<()> {
    let file = GgufFile::open(gguf)?;
    let c = ModelConfig::from_gguf(&file)?;
    let tok = Tokenizer::from_gguf(&file)?;
    let src = GgufSource {
        file: &file,
        path: gguf.to_path_buf(),
    };
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let permuted = c.arch != Arch::Qwen2;
    let mut names = vec![WeightName::Embed, WeightName::Norm];
    if !c.tied_embeddings {
        names.push(WeightName::LmHead);
    }
    for i in 0..c.n_layers {
        use LayerWeight::*;
        for w in [AttnNorm, Q, K, V, O, FfnNorm, Gate, Up, Down] {
            names.push(WeightName::Layer(i, w));
        }
        if c.qkv_bias {
            for w in [QBias, KBias, VBias] {
                names.push(WeightName::Layer(i, w));
            }
        }
    }
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(names.len());
    for n in names {
        let t = src.need(n)?;
        let mut v = t.to_f32()?;
        if permuted {
            match n {
                WeightName::Layer(_, LayerWeight::Q) => v = unpermute_rows(&v, c.n_heads, t.cols),
                WeightName::Layer(_, LayerWeight::K) => {
                    v = unpermute_rows(&v, c.n_kv_heads, t.cols)
                }
                _ => {}
            }
        }
        let shape = if t.rows == 1 {
            vec![t.cols]
        } else {
            vec![t.rows, t.cols]
        };
        let bytes: Vec<u8> = match dtype {
            ExportDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ExportDtype::F16 => v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
        };
        tensors.push((n.hf(), shape, bytes));
    }
    let st_dtype = match dtype {
        ExportDtype::F32 => safetensors::Dtype::F32,
        ExportDtype::F16 => safetensors::Dtype::F16,
    };
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Internal(format!("safetensors view {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Internal(format!("serializing safetensors: {e}")))?;
    write_atomic(&out.join("model.safetensors"), &st)?;
    let mut cfg = json!({
        "architectures": [if c.arch == Arch::Qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": c.arch.name(),
        "hidden_size": c.hidden,
        "intermediate_size": c.ff,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope.base,
        "max_position_embeddings": c.train_ctx,
        "vocab_size": c.vocab,
        "tie_word_embeddings": c.tied_embeddings,
        "attention_bias": c.qkv_bias,
        "hidden_act": "silu",
        "torch_dtype": if dtype == ExportDtype::F32 { "float32" } else { "float16" },
    });
    if c.rope.freq_scale != 1.0 {
        let factor = 1.0 / c.rope.freq_scale;
        cfg["rope_scaling"] = if c.rope.ext_factor != 0.0 {
            json!({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": c.rope.orig_ctx,
                   "beta_fast": c.rope.beta_fast, "beta_slow": c.rope.beta_slow})
        } else {
            json!({"rope_type": "linear", "factor": factor})
        };
    }
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    write_tokenizer_files(&tok, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: HF row h*hd + j*hd/2 + i goes to GGUF row h*hd + 2i + j.
        let (heads, hd, cols) = (3, 8, 2);
        let hf: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let (s, d) = (h * hd + j * hd / 2 + i, h * hd + 2 * i + j);
                    gguf[d * cols..(d + 1) * cols].copy_from_slice(&hf[s * cols..(s + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, heads, cols), hf);
    }
}
