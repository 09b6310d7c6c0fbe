//! A plain-Rust float64 forward pass of a Llama / Qwen2 decoder and of the Mixture-of-Experts
//! Mixtral / Qwen2-MoE / OLMoE / Qwen3-MoE decoders, the reference the tests compare Ember
//! against when no transformers fixture applies (quantized GGUF files): the weights are read
//! from the file and dequantized with [`ember::quant::dequantize`], and everything after that
//! runs in f64, one position at a time, with no batching or fusion.
//!
//! The model: token embedding; per layer RMSNorm, q/k/v projections (plus biases when the
//! file has them), q/k RMSNorms with the same epsilon when the file has them (OLMoE's over the
//! whole q and k projection outputs, all heads together; Qwen3-MoE's over each head), RoPE,
//! causal grouped-query attention with softmax scaled by `1/sqrt(head_dim)`, output projection
//! and residual, RMSNorm, the feed-forward block ([`RefFfn`]) and residual; final RMSNorm and
//! the output projection (the embedding table when `output.weight` is absent).
//!
//! The feed-forward block is either a SwiGLU MLP ([`RefMlp`], `down(silu(gate x) * up x)`) or
//! a Mixture-of-Experts block ([`RefMoe`]): router logits `W_router x`, softmax over all
//! experts, the top k (largest first, ties to the lower index), their weights renormalized to
//! sum to 1 for Mixtral and Qwen3-MoE (`norm_topk_prob`), output `sum_j w_j * expert_j(x)`;
//! Qwen2-MoE adds a shared expert on every token, scaled by `sigmoid(shared_gate . x)`.
//! [`RefModel::forward_routed`] also returns each MoE layer's choice of experts and their
//! weights per position.
//!
//! RoPE follows llama.cpp's choice per architecture for GGUF files: `llama` (which also
//! carries Mixtral) rotates adjacent pairs `(2i, 2i+1)` (the converter permuted q and k for
//! it); `qwen2`, `qwen2moe`, `olmoe` and `qwen3moe` rotate halves `(i, i + n_rot/2)` on the HF
//! layout (NeoX style). GGUF experts are read from the stacked
//! `blk.N.ffn_{gate,up,down}_exps.weight` tensors (ggml dims `[in, out, E]`, expert `e` the
//! `e`-th block of rows), the router from `blk.N.ffn_gate_inp.weight` and the counts from
//! `{arch}.expert_count` / `{arch}.expert_used_count`; routed weights are renormalized for
//! `llama` and `qwen3moe` (as llama.cpp does) unless `{arch}.expert_weights_norm` says
//! otherwise. [`RefModel::from_tiny_hf`] builds the same models from the HF tensors, which
//! always rotate halves.

use std::collections::HashMap;
use std::path::Path;

use ember::adapters::Target;
use ember::format::gguf::{GgufFile, TensorType};
use ember::quant::dequantize;
use ember::{Error, Result};

use crate::tiny::{self, TinyVariant};

/// A SwiGLU MLP `down(silu(gate x) * up x)`, every matrix row-major `[out][in]`; its width
/// `ff` is `gate.len() / hidden`.
#[derive(Debug, Clone)]
pub struct RefMlp {
    /// `[ff][hidden]`.
    pub gate: Vec<f64>,
    /// `[ff][hidden]`.
    pub up: Vec<f64>,
    /// `[hidden][ff]`.
    pub down: Vec<f64>,
}

impl RefMlp {
    /// `down(silu(gate x) * up x)`.
    ///
    /// # Panics
    /// When the matrices do not fit `x`.
    pub fn forward(&self, x: &[f64]) -> Vec<f64> {
        let ff = self.gate.len() / x.len().max(1);
        let gate = matvec(&self.gate, x, ff);
        let up = matvec(&self.up, x, ff);
        let act: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        matvec(&self.down, &act, x.len())
    }
}

/// The experts one position was routed to in one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RefRoute {
    /// The chosen experts, largest router probability first (ties: lower index first).
    pub experts: Vec<usize>,
    /// The factor applied to each chosen expert's output (renormalized when the block says
    /// so), in the order of `experts`.
    pub weights: Vec<f64>,
}

/// A Mixture-of-Experts feed-forward block.
#[derive(Debug, Clone)]
pub struct RefMoe {
    /// Router `[experts][hidden]`.
    pub router: Vec<f64>,
    /// The routed experts, in index order.
    pub experts: Vec<RefMlp>,
    /// Experts used per token.
    pub top_k: usize,
    /// Whether the top-k probabilities are renormalized to sum to 1 (Mixtral, Qwen3-MoE; not
    /// Qwen2-MoE or OLMoE, whose `norm_topk_prob` is false).
    pub renormalize: bool,
    /// A shared expert run on every token and added to the routed sum (Qwen2-MoE).
    pub shared: Option<RefMlp>,
    /// `[hidden]`: when present, the shared expert's output is scaled by
    /// `sigmoid(shared_gate . x)`.
    pub shared_gate: Option<Vec<f64>>,
}

impl RefMoe {
    /// The routing of `x` (the post-attention RMSNorm output): softmax over all experts of
    /// `router x`, the `top_k` largest (ties to the lower index), renormalized if
    /// [`RefMoe::renormalize`].
    ///
    /// # Panics
    /// When the router does not fit `x` and the experts.
    pub fn route(&self, x: &[f64]) -> RefRoute {
        let logits = matvec(&self.router, x, self.experts.len());
        let probs = softmax(&logits);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        // Stable: equal probabilities keep the lower index first.
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        order.truncate(self.top_k);
        let mut weights: Vec<f64> = order.iter().map(|&e| probs[e]).collect();
        if self.renormalize {
            let sum: f64 = weights.iter().sum();
            for w in &mut weights {
                *w /= sum;
            }
        }
        RefRoute {
            experts: order,
            weights,
        }
    }

    /// The block's output for `x`, and the routing.
    ///
    /// # Panics
    /// When the weights do not fit `x`.
    pub fn forward(&self, x: &[f64]) -> (Vec<f64>, RefRoute) {
        let route = self.route(x);
        let mut out = vec![0.0f64; x.len()];
        for (&e, &w) in route.experts.iter().zip(&route.weights) {
            for (o, y) in out.iter_mut().zip(self.experts[e].forward(x)) {
                *o += w * y;
            }
        }
        if let Some(s) = &self.shared {
            let scale = self
                .shared_gate
                .as_ref()
                .map_or(1.0, |g| 1.0 / (1.0 + (-dot(g, x)).exp()));
            for (o, y) in out.iter_mut().zip(s.forward(x)) {
                *o += scale * y;
            }
        }
        (out, route)
    }
}

/// A decoder block's feed-forward part.
#[derive(Debug, Clone)]
pub enum RefFfn {
    /// One SwiGLU MLP (Llama, Qwen2).
    Dense(RefMlp),
    /// A Mixture-of-Experts block (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE).
    Moe(RefMoe),
}

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
    /// q, k and v biases (Qwen2, Qwen2-MoE).
    pub bias: Option<[Vec<f64>; 3]>,
    /// q and k RMSNorm weights, applied after the projection (and bias), before RoPE, to each
    /// consecutive run of as many values as the weight has: OLMoE's `[n_heads * head_dim]`
    /// and `[n_kv_heads * head_dim]` normalize the whole projection output (all heads
    /// together), Qwen3-MoE's `[head_dim]` each head.
    pub qk_norm: Option<[Vec<f64>; 2]>,
    /// `[hidden]`.
    pub ffn_norm: Vec<f64>,
    /// The feed-forward block.
    pub ffn: RefFfn,
}

/// A Llama-family model (dense or Mixture-of-Experts) held in f64.
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

/// Tensor `name` of `f` as f64, checking its ggml dims are `dims` (`ne[0]` first):
/// quantized data through [`ember::quant::dequantize`], float data converted exactly.
fn gguf_dims(f: &GgufFile, path: &Path, name: &str, dims: &[usize]) -> Result<Vec<f64>> {
    let t = f
        .tensor(name)
        .ok_or_else(|| fmt_err(path, format!("reference: no tensor {name}")))?;
    let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
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

/// Tensor `name` of `f` as f64, checking it is `rows x cols` (`rows = 1` for a vector).
fn gguf_tensor(
    f: &GgufFile,
    path: &Path,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<f64>> {
    if rows == 1 {
        gguf_dims(f, path, name, &[cols])
    } else {
        gguf_dims(f, path, name, &[cols, rows])
    }
}

/// The `n` experts of a stacked expert tensor `name` (ggml dims `[cols, rows, n]`), each
/// `[rows][cols]`.
fn gguf_experts(
    f: &GgufFile,
    path: &Path,
    name: &str,
    rows: usize,
    cols: usize,
    n: usize,
) -> Result<Vec<Vec<f64>>> {
    let all = gguf_dims(f, path, name, &[cols, rows, n])?;
    Ok(all.chunks_exact(rows * cols).map(<[f64]>::to_vec).collect())
}

impl RefModel {
    /// Reads a `llama` (Llama, or Mixtral with `llama.expert_count` experts), `qwen2`,
    /// `qwen2moe`, `olmoe` or `qwen3moe` GGUF file. Heads are `{arch}.attention.key_length`
    /// wide (`embedding_length / head_count` without it); `blk.N.attn_{q,k}_norm.weight` are
    /// either whole-projection (OLMoE) or per-head (`[head_dim]`, Qwen3-MoE) norms. A layer is
    /// a Mixture-of-Experts layer when it has a router `blk.N.ffn_gate_inp.weight`; its experts
    /// are `{arch}.expert_feed_forward_length` wide (`{arch}.feed_forward_length` without it),
    /// a shared expert
    /// (`blk.N.ffn_{gate,up,down}_shexp.weight`, gate `blk.N.ffn_gate_inp_shexp.weight`)
    /// `{arch}.expert_shared_feed_forward_length` wide (its tensors' width without it).
    ///
    /// Errors: [`Error::Format`] for a missing key or tensor or a wrong shape,
    /// [`Error::Unsupported`] for another architecture; those of [`GgufFile::open`].
    pub fn from_gguf(path: &Path) -> Result<RefModel> {
        let f = GgufFile::open(path)?;
        let arch = f.architecture()?.to_string();
        let neox = match arch.as_str() {
            "llama" => false,
            "qwen2" | "qwen2moe" | "olmoe" | "qwen3moe" => true,
            other => {
                return Err(Error::Unsupported(format!(
                    "reference: architecture {other:?}"
                )))
            }
        };
        let opt = |key: &str| -> Result<Option<usize>> {
            Ok(f.get_u64(&format!("{arch}.{key}"))?.map(|x| x as usize))
        };
        let need = |key: &str| -> Result<usize> {
            opt(key)?.ok_or_else(|| fmt_err(path, format!("reference: no {arch}.{key}")))
        };
        let hidden = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let n_kv_heads = need("attention.head_count_kv")?;
        let head_dim = match opt("attention.key_length")? {
            Some(d) => d,
            None => hidden / n_heads.max(1),
        };
        let n_layers = need("block_count")?;
        let n_rot = need("rope.dimension_count")?;
        let vocab = need("vocab_size")?;
        let eps = f
            .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| fmt_err(path, "reference: no rms epsilon".into()))?;
        let rope_base = f
            .get_f64(&format!("{arch}.rope.freq_base"))?
            .unwrap_or(10000.0);
        let renormalize = f
            .get_bool(&format!("{arch}.expert_weights_norm"))?
            .unwrap_or(matches!(arch.as_str(), "llama" | "qwen3moe"));
        let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
        let hd64 = head_dim as u64;
        let t = |name: &str, rows: usize, cols: usize| gguf_tensor(&f, path, name, rows, cols);
        let lm_head = match f.tensor("output.weight") {
            Some(_) => Some(t("output.weight", vocab, hidden)?),
            None => None,
        };
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let n = |w: &str| format!("blk.{i}.{w}");
            let has = |w: &str| f.tensor(&n(w)).is_some();
            let bias = if has("attn_q.bias") {
                Some([
                    t(&n("attn_q.bias"), 1, q_dim)?,
                    t(&n("attn_k.bias"), 1, kv_dim)?,
                    t(&n("attn_v.bias"), 1, kv_dim)?,
                ])
            } else {
                None
            };
            // Per head when the weight is one head wide, else over the whole projection.
            let qk_norm = if has("attn_q_norm.weight") {
                let width = |w: &str, whole: usize| {
                    let per_head = f.tensor(&n(w)).map(|t| t.dims.as_slice()) == Some(&[hd64]);
                    t(&n(w), 1, if per_head { head_dim } else { whole })
                };
                Some([
                    width("attn_q_norm.weight", q_dim)?,
                    width("attn_k_norm.weight", kv_dim)?,
                ])
            } else {
                None
            };
            let ffn = if has("ffn_gate_inp.weight") {
                let n_exp = need("expert_count")?;
                let top_k = need("expert_used_count")?;
                let eff = match opt("expert_feed_forward_length")? {
                    Some(x) => x,
                    None => need("feed_forward_length")?,
                };
                let ex = |w: &str, rows: usize, cols: usize| {
                    gguf_experts(&f, path, &n(w), rows, cols, n_exp)
                };
                let gates = ex("ffn_gate_exps.weight", eff, hidden)?;
                let ups = ex("ffn_up_exps.weight", eff, hidden)?;
                let downs = ex("ffn_down_exps.weight", hidden, eff)?;
                let experts = gates
                    .into_iter()
                    .zip(ups)
                    .zip(downs)
                    .map(|((gate, up), down)| RefMlp { gate, up, down })
                    .collect();
                let (shared, shared_gate) = if has("ffn_gate_shexp.weight") {
                    let sff = match opt("expert_shared_feed_forward_length")? {
                        Some(x) => x,
                        None => f
                            .tensor(&n("ffn_gate_shexp.weight"))
                            .and_then(|t| t.dims.get(1))
                            .map_or(0, |&d| d as usize),
                    };
                    let mlp = RefMlp {
                        gate: t(&n("ffn_gate_shexp.weight"), sff, hidden)?,
                        up: t(&n("ffn_up_shexp.weight"), sff, hidden)?,
                        down: t(&n("ffn_down_shexp.weight"), hidden, sff)?,
                    };
                    // The converter writes the HF `[1, hidden]` gate as ggml dims
                    // `[hidden, 1]`; a `[hidden]` vector means the same.
                    let gate_name = n("ffn_gate_inp_shexp.weight");
                    let gate = match f.tensor(&gate_name).map(|t| t.dims.len()) {
                        None => None,
                        Some(1) => Some(gguf_dims(&f, path, &gate_name, &[hidden])?),
                        Some(_) => Some(gguf_dims(&f, path, &gate_name, &[hidden, 1])?),
                    };
                    (Some(mlp), gate)
                } else {
                    (None, None)
                };
                RefFfn::Moe(RefMoe {
                    router: t(&n("ffn_gate_inp.weight"), n_exp, hidden)?,
                    experts,
                    top_k,
                    renormalize,
                    shared,
                    shared_gate,
                })
            } else {
                let ff = need("feed_forward_length")?;
                RefFfn::Dense(RefMlp {
                    gate: t(&n("ffn_gate.weight"), ff, hidden)?,
                    up: t(&n("ffn_up.weight"), ff, hidden)?,
                    down: t(&n("ffn_down.weight"), hidden, ff)?,
                })
            };
            layers.push(RefLayer {
                attn_norm: t(&n("attn_norm.weight"), 1, hidden)?,
                wq: t(&n("attn_q.weight"), q_dim, hidden)?,
                wk: t(&n("attn_k.weight"), kv_dim, hidden)?,
                wv: t(&n("attn_v.weight"), kv_dim, hidden)?,
                wo: t(&n("attn_output.weight"), hidden, q_dim)?,
                bias,
                qk_norm,
                ffn_norm: t(&n("ffn_norm.weight"), 1, hidden)?,
                ffn,
            });
        }
        Ok(RefModel {
            vocab,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
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

    /// The tiny model `v` (dense or Mixture-of-Experts) straight from its HF tensors
    /// ([`tiny::tiny_tensors`]), with HF's rotate-half RoPE and the config's f64 epsilon. What
    /// each layer has follows from the tensors present: q/k/v biases, q/k norms (whole or
    /// per-head by their width), a router `block_sparse_moe.gate.weight` (Mixtral's
    /// `w1`/`w3`/`w2` experts) or `mlp.gate.weight` (`gate_proj`/`up_proj`/`down_proj` experts)
    /// instead of the dense MLP, a shared expert and its gate; the top-k weights are
    /// renormalized unless the config's `norm_topk_prob` is false (Mixtral has none and always
    /// renormalizes).
    ///
    /// # Panics
    /// When a tensor the layout implies is missing or one is left unused.
    pub fn from_tiny_hf(v: TinyVariant) -> RefModel {
        let mut t: HashMap<String, Vec<f64>> = tiny::tiny_tensors(v)
            .into_iter()
            .map(|(n, _, vals)| (n, vals.into_iter().map(f64::from).collect()))
            .collect();
        let config = tiny::config_json(v);
        let renormalize = config["norm_topk_prob"].as_bool().unwrap_or(true);
        let top_k = config["num_experts_per_tok"]
            .as_u64()
            .map_or(tiny::EXPERTS_USED, |k| k as usize);
        let mut layers = Vec::with_capacity(tiny::LAYERS);
        for i in 0..tiny::LAYERS {
            let name = |w: &str| format!("model.layers.{i}.{w}");
            let has = |t: &HashMap<String, Vec<f64>>, w: &str| t.contains_key(&name(w));
            let bias = has(&t, "self_attn.q_proj.bias");
            let qk_norm = has(&t, "self_attn.q_norm.weight");
            let shared = has(&t, "mlp.shared_expert.gate_proj.weight");
            let moe = if has(&t, "block_sparse_moe.gate.weight") {
                Some(("block_sparse_moe", ["w1", "w3", "w2"]))
            } else if has(&t, "mlp.gate.weight") {
                Some(("mlp", ["gate_proj", "up_proj", "down_proj"]))
            } else {
                None
            };
            let mut l = |w: &str| {
                let n = name(w);
                t.remove(&n).unwrap_or_else(|| panic!("no tensor {n}"))
            };
            let ffn = match moe {
                Some((m, [g, u, d])) => {
                    let experts = (0..tiny::EXPERTS)
                        .map(|e| {
                            let mut x = |w: &str| l(&format!("{m}.experts.{e}.{w}.weight"));
                            RefMlp {
                                gate: x(g),
                                up: x(u),
                                down: x(d),
                            }
                        })
                        .collect();
                    RefFfn::Moe(RefMoe {
                        router: l(&format!("{m}.gate.weight")),
                        experts,
                        top_k,
                        renormalize,
                        shared: shared.then(|| RefMlp {
                            gate: l("mlp.shared_expert.gate_proj.weight"),
                            up: l("mlp.shared_expert.up_proj.weight"),
                            down: l("mlp.shared_expert.down_proj.weight"),
                        }),
                        shared_gate: shared.then(|| l("mlp.shared_expert_gate.weight")),
                    })
                }
                None => RefFfn::Dense(RefMlp {
                    gate: l("mlp.gate_proj.weight"),
                    up: l("mlp.up_proj.weight"),
                    down: l("mlp.down_proj.weight"),
                }),
            };
            layers.push(RefLayer {
                attn_norm: l("input_layernorm.weight"),
                wq: l("self_attn.q_proj.weight"),
                wk: l("self_attn.k_proj.weight"),
                wv: l("self_attn.v_proj.weight"),
                wo: l("self_attn.o_proj.weight"),
                bias: bias.then(|| {
                    [
                        l("self_attn.q_proj.bias"),
                        l("self_attn.k_proj.bias"),
                        l("self_attn.v_proj.bias"),
                    ]
                }),
                qk_norm: qk_norm
                    .then(|| [l("self_attn.q_norm.weight"), l("self_attn.k_norm.weight")]),
                ffn_norm: l("post_attention_layernorm.weight"),
                ffn,
            });
        }
        let mut take = |n: &str| t.remove(n).unwrap_or_else(|| panic!("no tensor {n}"));
        let model = RefModel {
            vocab: tiny::VOCAB,
            hidden: tiny::HIDDEN,
            n_heads: tiny::HEADS,
            n_kv_heads: tiny::KV_HEADS,
            head_dim: tiny::HEAD_DIM,
            n_rot: tiny::HEAD_DIM,
            eps: tiny::RMS_EPS,
            rope_base: tiny::ROPE_THETA,
            neox: true,
            embed: take("model.embed_tokens.weight"),
            norm: take("model.norm.weight"),
            lm_head: (!v.tied()).then(|| take("lm_head.weight")),
            layers,
        };
        let mut left: Vec<&String> = t.keys().collect();
        left.sort();
        assert!(left.is_empty(), "{}: unused tensors {left:?}", v.name());
        model
    }

    /// Logits at every position of `tokens` (`[tokens.len()][vocab]`), each position seeing
    /// itself and the ones before it.
    ///
    /// # Panics
    /// On a token id outside the vocabulary.
    pub fn forward(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        self.forward_routed(tokens).0
    }

    /// [`RefModel::forward`] and the routing: per layer, per position of `tokens`, the experts
    /// chosen and their weights (an empty list for a dense layer).
    ///
    /// # Panics
    /// On a token id outside the vocabulary.
    pub fn forward_routed(&self, tokens: &[u32]) -> (Vec<Vec<f64>>, Vec<Vec<RefRoute>>) {
        self.forward_adapted(tokens, &mut |_: Site<'_>| None)
    }

    /// [`RefModel::forward_routed`] with an adapter: at each linear layer LoRA can adapt
    /// (q, k, v, o, and gate, up, down of a dense feed-forward), `adapter` sees the
    /// [`Site`] and may return a delta added to the projection's output.
    ///
    /// # Panics
    /// On a token id outside the vocabulary, or a delta of the wrong length.
    pub fn forward_adapted(
        &self,
        tokens: &[u32],
        adapter: &mut dyn FnMut(Site<'_>) -> Option<Vec<f64>>,
    ) -> (Vec<Vec<f64>>, Vec<Vec<RefRoute>>) {
        let mut proj = |layer: usize, target: Target, pos: usize, x: &[f64], y: &mut Vec<f64>| {
            if let Some(d) = adapter(Site {
                layer,
                target,
                pos,
                x,
            }) {
                assert_eq!(
                    d.len(),
                    y.len(),
                    "adapter delta for layer {layer} {target:?}"
                );
                add(y, &d);
            }
        };
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
        let mut routes = Vec::with_capacity(self.layers.len());
        for (li, l) in self.layers.iter().enumerate() {
            let mut qs = Vec::with_capacity(tokens.len());
            let mut ks = Vec::with_capacity(tokens.len());
            let mut vs = Vec::with_capacity(tokens.len());
            for (pos, xp) in x.iter().enumerate() {
                let hn = rms_norm(xp, &l.attn_norm, self.eps);
                let mut q = matvec(&l.wq, &hn, q_dim);
                let mut k = matvec(&l.wk, &hn, kv_dim);
                let mut v = matvec(&l.wv, &hn, kv_dim);
                proj(li, Target::Q, pos, &hn, &mut q);
                proj(li, Target::K, pos, &hn, &mut k);
                proj(li, Target::V, pos, &hn, &mut v);
                if let Some([bq, bk, bv]) = &l.bias {
                    add(&mut q, bq);
                    add(&mut k, bk);
                    add(&mut v, bv);
                }
                if let Some([nq, nk]) = &l.qk_norm {
                    q = q
                        .chunks(nq.len())
                        .flat_map(|c| rms_norm(c, nq, self.eps))
                        .collect();
                    k = k
                        .chunks(nk.len())
                        .flat_map(|c| rms_norm(c, nk, self.eps))
                        .collect();
                }
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            let scale = 1.0 / (hd as f64).sqrt();
            let mut layer_routes = Vec::new();
            for (pos, xp) in x.iter_mut().enumerate() {
                let mut attn = vec![0.0f64; q_dim];
                for head in 0..self.n_heads {
                    let g = head / group;
                    let q = &qs[pos][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|s| dot(q, &ks[s][g * hd..(g + 1) * hd]) * scale)
                        .collect();
                    let out = &mut attn[head * hd..(head + 1) * hd];
                    for (s, w) in softmax(&scores).into_iter().enumerate() {
                        let v = &vs[s][g * hd..(g + 1) * hd];
                        for (o, vv) in out.iter_mut().zip(v) {
                            *o += w * vv;
                        }
                    }
                }
                let mut o = matvec(&l.wo, &attn, h);
                proj(li, Target::O, pos, &attn, &mut o);
                add(xp, &o);
                let hn = rms_norm(xp, &l.ffn_norm, self.eps);
                let y = match &l.ffn {
                    RefFfn::Dense(mlp) => {
                        let ff = mlp.gate.len() / h;
                        let mut gate = matvec(&mlp.gate, &hn, ff);
                        let mut up = matvec(&mlp.up, &hn, ff);
                        proj(li, Target::Gate, pos, &hn, &mut gate);
                        proj(li, Target::Up, pos, &hn, &mut up);
                        let act: Vec<f64> = gate
                            .iter()
                            .zip(&up)
                            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                            .collect();
                        let mut y = matvec(&mlp.down, &act, h);
                        proj(li, Target::Down, pos, &act, &mut y);
                        y
                    }
                    RefFfn::Moe(moe) => {
                        let (y, route) = moe.forward(&hn);
                        layer_routes.push(route);
                        y
                    }
                };
                add(xp, &y);
            }
            routes.push(layer_routes);
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = x
            .iter()
            .map(|xp| matvec(head, &rms_norm(xp, &self.norm, self.eps), self.vocab))
            .collect();
        (logits, routes)
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

/// Where an adapter acts in [`RefModel::forward_adapted`]: the layer, the adapted linear
/// layer, the position and the linear layer's input there.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    /// Decoder layer.
    pub layer: usize,
    /// The linear layer.
    pub target: Target,
    /// Position in the sequence.
    pub pos: usize,
    /// The linear layer's input at this position.
    pub x: &'a [f64],
}

/// `exp(v - max) / sum`.
fn softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|s| (s - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
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
    fn routing_picks_renormalizes_and_breaks_ties_low() {
        // Two hidden units, four one-unit-wide experts: expert e adds e + 1 to unit 0.
        let experts = (0..4)
            .map(|e| RefMlp {
                gate: vec![1.0, 0.0],
                up: vec![0.0, 1.0],
                down: vec![f64::from(e + 1), 0.0],
            })
            .collect();
        // Router logits for x = (1, 0): [0, 1, 1, 0.5].
        let mut moe = RefMoe {
            router: vec![0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.0],
            experts,
            top_k: 2,
            renormalize: false,
            shared: None,
            shared_gate: None,
        };
        let x = [1.0, 0.0];
        let probs = softmax(&[0.0, 1.0, 1.0, 0.5]);
        let r = moe.route(&x);
        assert_eq!(r.experts, vec![1, 2], "ties go to the lower index first");
        assert!((r.weights[0] - probs[1]).abs() < 1e-15);
        assert!((r.weights[1] - probs[2]).abs() < 1e-15);
        moe.renormalize = true;
        assert_eq!(moe.route(&x).weights, vec![0.5, 0.5]);
        // up x = 0 switches every expert off; a shared expert still adds its gated output.
        assert_eq!(moe.forward(&x).0, vec![0.0, 0.0]);
        let x = [1.0, 2.0];
        let silu1 = 1.0 / (1.0 + (-1.0f64).exp());
        let (y, r) = moe.forward(&x);
        let routed: f64 = r
            .experts
            .iter()
            .zip(&r.weights)
            .map(|(&e, w)| w * (e + 1) as f64 * silu1 * 2.0)
            .sum();
        assert!((y[0] - routed).abs() < 1e-12 && y[1] == 0.0);
        moe.shared = Some(RefMlp {
            gate: vec![1.0, 0.0],
            up: vec![0.0, 1.0],
            down: vec![0.0, 1.0],
        });
        moe.shared_gate = Some(vec![0.0, 0.5]);
        let sig1 = 1.0 / (1.0 + (-1.0f64).exp());
        let (y, _) = moe.forward(&x);
        assert!((y[0] - routed).abs() < 1e-12);
        assert!((y[1] - sig1 * silu1 * 2.0).abs() < 1e-12);
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
