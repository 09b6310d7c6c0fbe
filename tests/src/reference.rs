//! A plain-Rust float64 forward pass of a Llama / Qwen2 decoder, the reference the tests
//! compare Ember against when no transformers fixture applies (quantized GGUF files): the
//! weights are read from the file and dequantized with [`ember::quant::dequantize`], and
//! everything after that runs in f64, one position at a time, with no batching or fusion.
//!
//! The model: token embedding; per layer RMSNorm, q/k/v projections (plus biases when the
//! file has them), RoPE, causal grouped-query attention with softmax scaled by
//! `1/sqrt(head_dim)`, output projection and residual, RMSNorm, SwiGLU feed-forward
//! (`down(silu(gate x) * up x)`) and residual; final RMSNorm and the output projection (the
//! embedding table when `output.weight` is absent).
//!
//! RoPE follows llama.cpp's choice per architecture for GGUF files: `llama` rotates adjacent
//! pairs `(2i, 2i+1)` (the converter permuted q and k for it), `qwen2` rotates halves
//! `(i, i + n_rot/2)` on the HF layout (NeoX style). [`RefModel::from_tiny_hf`] builds the
//! same model from the HF tensors, which always rotate halves.

use std::collections::HashMap;
use std::path::Path;

use ember::format::gguf::{GgufFile, TensorType};
use ember::quant::dequantize;
use ember::{Error, Result};

use crate::tiny::{self, TinyVariant};

/// One decoder block, every matrix row-major `[out][in]`.
#[derive(Debug, Clone)]
pub struct RefLayer {
    /// `[hidden]`.
    pub attn_norm: Vec<f64>,
    /// `[n_heads * head_dim][hidden]`.
    pub wq: Vec<f64>,
    /// `[n_kv_heads * head_dim][hidden]`.
    pub wk: Vec<f64>,
    /// `[n_kv_heads * head_dim][hidden]`.
    pub wv: Vec<f64>,
    /// `[hidden][n_heads * head_dim]`.
    pub wo: Vec<f64>,
    /// q, k and v biases (Qwen2).
    pub bias: Option<[Vec<f64>; 3]>,
    /// `[hidden]`.
    pub ffn_norm: Vec<f64>,
    /// `[ff][hidden]`.
    pub gate: Vec<f64>,
    /// `[ff][hidden]`.
    pub up: Vec<f64>,
    /// `[hidden][ff]`.
    pub down: Vec<f64>,
}

/// A Llama-family model held in f64.
#[derive(Debug, Clone)]
pub struct RefModel {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Feed-forward width.
    pub ff: usize,
    /// Rotated dimensions per head.
    pub n_rot: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base frequency.
    pub rope_base: f64,
    /// Rotate halves (NeoX / HF) instead of adjacent pairs (GGUF Llama).
    pub neox: bool,
    /// `[vocab][hidden]`.
    pub embed: Vec<f64>,
    /// `[hidden]`.
    pub norm: Vec<f64>,
    /// `[vocab][hidden]`, `None` when tied to the embedding.
    pub lm_head: Option<Vec<f64>>,
    /// The blocks.
    pub layers: Vec<RefLayer>,
}

fn fmt_err(path: &Path, detail: String) -> Error {
    Error::format(Some(path), detail)
}

/// Tensor `name` of `f` as f64, checking it is `rows x cols` (`rows = 1` for a vector):
/// quantized data through [`ember::quant::dequantize`], float data converted exactly.
fn gguf_tensor(
    f: &GgufFile,
    path: &Path,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<f64>> {
    let t = f
        .tensor(name)
        .ok_or_else(|| fmt_err(path, format!("reference: no tensor {name}")))?;
    let want: Vec<u64> = if rows == 1 {
        vec![cols as u64]
    } else {
        vec![cols as u64, rows as u64]
    };
    if t.dims != want {
        return Err(fmt_err(
            path,
            format!("reference: {name} has dims {:?}, expected {want:?}", t.dims),
        ));
    }
    let v = match t.ty {
        TensorType::Quant(q) => dequantize(q, f.tensor_data(t)?)?,
        _ => f.tensor_f32(t)?,
    };
    Ok(v.into_iter().map(f64::from).collect())
}

impl RefModel {
    /// Reads a `llama` or `qwen2` GGUF file.
    ///
    /// Errors: [`Error::Format`] for a missing key or tensor or a wrong shape,
    /// [`Error::Unsupported`] for another architecture; those of [`GgufFile::open`].
    pub fn from_gguf(path: &Path) -> Result<RefModel> {
        let f = GgufFile::open(path)?;
        let arch = f.architecture()?.to_string();
        let neox = match arch.as_str() {
            "llama" => false,
            "qwen2" => true,
            other => {
                return Err(Error::Unsupported(format!(
                    "reference: architecture {other:?}"
                )))
            }
        };
        let need = |key: &str| -> Result<usize> {
            let k = format!("{arch}.{key}");
            f.get_u64(&k)?
                .map(|x| x as usize)
                .ok_or_else(|| fmt_err(path, format!("reference: no {k}")))
        };
        let hidden = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let n_kv_heads = need("attention.head_count_kv")?;
        let head_dim = hidden / n_heads.max(1);
        let ff = need("feed_forward_length")?;
        let n_layers = need("block_count")?;
        let n_rot = need("rope.dimension_count")?;
        let vocab = need("vocab_size")?;
        let eps = f
            .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| fmt_err(path, "reference: no rms epsilon".into()))?;
        let rope_base = f
            .get_f64(&format!("{arch}.rope.freq_base"))?
            .unwrap_or(10000.0);
        let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
        let t = |name: &str, rows: usize, cols: usize| gguf_tensor(&f, path, name, rows, cols);
        let lm_head = match f.tensor("output.weight") {
            Some(_) => Some(t("output.weight", vocab, hidden)?),
            None => None,
        };
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let n = |w: &str| format!("blk.{i}.{w}");
            let bias = if f.tensor(&n("attn_q.bias")).is_some() {
                Some([
                    t(&n("attn_q.bias"), 1, q_dim)?,
                    t(&n("attn_k.bias"), 1, kv_dim)?,
                    t(&n("attn_v.bias"), 1, kv_dim)?,
                ])
            } else {
                None
            };
            layers.push(RefLayer {
                attn_norm: t(&n("attn_norm.weight"), 1, hidden)?,
                wq: t(&n("attn_q.weight"), q_dim, hidden)?,
                wk: t(&n("attn_k.weight"), kv_dim, hidden)?,
                wv: t(&n("attn_v.weight"), kv_dim, hidden)?,
                wo: t(&n("attn_output.weight"), hidden, q_dim)?,
                bias,
                ffn_norm: t(&n("ffn_norm.weight"), 1, hidden)?,
                gate: t(&n("ffn_gate.weight"), ff, hidden)?,
                up: t(&n("ffn_up.weight"), ff, hidden)?,
                down: t(&n("ffn_down.weight"), hidden, ff)?,
            });
        }
        Ok(RefModel {
            vocab,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ff,
            n_rot,
            eps,
            rope_base,
            neox,
            embed: t("token_embd.weight", vocab, hidden)?,
            norm: t("output_norm.weight", 1, hidden)?,
            lm_head,
            layers,
        })
    }

    /// The tiny model `v` straight from its HF tensors ([`tiny::tiny_tensors`]), with HF's
    /// rotate-half RoPE and the config's f64 epsilon.
    pub fn from_tiny_hf(v: TinyVariant) -> RefModel {
        let mut t: HashMap<String, Vec<f64>> = tiny::tiny_tensors(v)
            .into_iter()
            .map(|(n, _, vals)| (n, vals.into_iter().map(f64::from).collect()))
            .collect();
        let mut take = |n: &str| t.remove(n).unwrap_or_else(|| panic!("no tensor {n}"));
        let layers = (0..tiny::LAYERS)
            .map(|i| {
                let mut l = |w: &str| take(&format!("model.layers.{i}.{w}"));
                RefLayer {
                    attn_norm: l("input_layernorm.weight"),
                    wq: l("self_attn.q_proj.weight"),
                    wk: l("self_attn.k_proj.weight"),
                    wv: l("self_attn.v_proj.weight"),
                    wo: l("self_attn.o_proj.weight"),
                    bias: (v == TinyVariant::Qwen2).then(|| {
                        [
                            l("self_attn.q_proj.bias"),
                            l("self_attn.k_proj.bias"),
                            l("self_attn.v_proj.bias"),
                        ]
                    }),
                    ffn_norm: l("post_attention_layernorm.weight"),
                    gate: l("mlp.gate_proj.weight"),
                    up: l("mlp.up_proj.weight"),
                    down: l("mlp.down_proj.weight"),
                }
            })
            .collect();
        RefModel {
            vocab: tiny::VOCAB,
            hidden: tiny::HIDDEN,
            n_heads: tiny::HEADS,
            n_kv_heads: tiny::KV_HEADS,
            head_dim: tiny::HEAD_DIM,
            ff: tiny::FFN,
            n_rot: tiny::HEAD_DIM,
            eps: tiny::RMS_EPS,
            rope_base: tiny::ROPE_THETA,
            neox: true,
            embed: take("model.embed_tokens.weight"),
            norm: take("model.norm.weight"),
            lm_head: (!v.tied()).then(|| take("lm_head.weight")),
            layers,
        }
    }

    /// Logits at every position of `tokens` (`[tokens.len()][vocab]`), each position seeing
    /// itself and the ones before it.
    ///
    /// # Panics
    /// On a token id outside the vocabulary.
    pub fn forward(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let (h, hd) = (self.hidden, self.head_dim);
        let (q_dim, kv_dim) = (self.n_heads * hd, self.n_kv_heads * hd);
        let group = self.n_heads / self.n_kv_heads;
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&id| {
                let id = id as usize;
                assert!(id < self.vocab, "token {id} outside the vocabulary");
                self.embed[id * h..(id + 1) * h].to_vec()
            })
            .collect();
        for l in &self.layers {
            let mut qs = Vec::with_capacity(tokens.len());
            let mut ks = Vec::with_capacity(tokens.len());
            let mut vs = Vec::with_capacity(tokens.len());
            for (pos, xp) in x.iter().enumerate() {
                let hn = rms_norm(xp, &l.attn_norm, self.eps);
                let mut q = matvec(&l.wq, &hn, q_dim);
                let mut k = matvec(&l.wk, &hn, kv_dim);
                let mut v = matvec(&l.wv, &hn, kv_dim);
                if let Some([bq, bk, bv]) = &l.bias {
                    add(&mut q, bq);
                    add(&mut k, bk);
                    add(&mut v, bv);
                }
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            let scale = 1.0 / (hd as f64).sqrt();
            for (pos, xp) in x.iter_mut().enumerate() {
                let mut attn = vec![0.0f64; q_dim];
                for head in 0..self.n_heads {
                    let g = head / group;
                    let q = &qs[pos][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|s| dot(q, &ks[s][g * hd..(g + 1) * hd]) * scale)
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    let out = &mut attn[head * hd..(head + 1) * hd];
                    for (s, w) in e.iter().enumerate() {
                        let v = &vs[s][g * hd..(g + 1) * hd];
                        for (o, vv) in out.iter_mut().zip(v) {
                            *o += w / sum * vv;
                        }
                    }
                }
                add(xp, &matvec(&l.wo, &attn, h));
                let hn = rms_norm(xp, &l.ffn_norm, self.eps);
                let gate = matvec(&l.gate, &hn, self.ff);
                let up = matvec(&l.up, &hn, self.ff);
                let act: Vec<f64> = gate
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                add(xp, &matvec(&l.down, &act, h));
            }
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        x.iter()
            .map(|xp| matvec(head, &rms_norm(xp, &self.norm, self.eps), self.vocab))
            .collect()
    }

    /// Rotates every head of `v` (`[heads * head_dim]`) for position `pos`.
    fn rope(&self, v: &mut [f64], pos: usize) {
        let half = self.n_rot / 2;
        for head in v.chunks_mut(self.head_dim) {
            for i in 0..half {
                let freq = self.rope_base.powf(-2.0 * i as f64 / self.n_rot as f64);
                let (sin, cos) = (pos as f64 * freq).sin_cos();
                let (a, b) = if self.neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn add(y: &mut [f64], x: &[f64]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// `w` is `[rows][x.len()]`.
fn matvec(w: &[f64], x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len();
    assert_eq!(
        w.len(),
        rows * cols,
        "matvec: {} values for {rows}x{cols}",
        w.len()
    );
    w.chunks_exact(cols).map(|r| dot(r, x)).collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// Index of the largest value (the first one on ties).
pub fn argmax<T: Copy + PartialOrd>(v: &[T]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Largest absolute difference between `a` and `b` (which must have the same length).
///
/// # Panics
/// When the lengths differ.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_pairs() {
        let mut m = RefModel::from_tiny_hf(TinyVariant::Llama);
        m.head_dim = 4;
        m.n_rot = 4;
        let v0: Vec<f64> = (0..8).map(f64::from).collect();
        // Position 0 is the identity in both modes.
        for neox in [false, true] {
            m.neox = neox;
            let mut v = v0.clone();
            m.rope(&mut v, 0);
            assert_eq!(v, v0);
        }
        // Adjacent pairs at position 1: pair 0 turns by 1 radian, pair 1 by base^-0.5.
        m.neox = false;
        let mut v = v0.clone();
        m.rope(&mut v, 1);
        let (s, c) = 1f64.sin_cos();
        assert!((v[0] - (0.0 * c - 1.0 * s)).abs() < 1e-15);
        assert!((v[1] - (0.0 * s + 1.0 * c)).abs() < 1e-15);
        // Rotate-half on a vector equals adjacent pairs on the de-interleaved vector.
        m.neox = true;
        let mut a = v0.clone();
        m.rope(&mut a, 3);
        m.neox = false;
        let inter: Vec<f64> = [0, 2, 1, 3, 4, 6, 5, 7].iter().map(|&i| v0[i]).collect();
        let mut b = inter.clone();
        m.rope(&mut b, 3);
        for (k, &i) in [0usize, 2, 1, 3, 4, 6, 5, 7].iter().enumerate() {
            assert!((a[i] - b[k]).abs() < 1e-12, "{i}");
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 1.0]), 1.0);
        let n = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let r = (12.5f64).sqrt();
        assert!((n[0] - 3.0 / r).abs() < 1e-15 && (n[1] - 8.0 / r).abs() < 1e-15);
    }
}
