//! Merging LoRA adapters into a dense base: `W' = W + sum_i strength_i * scale_i * B_i A_i`
//! for every adapted projection, so a deployment that serves one adapter pays nothing for it
//! at inference.
//!
//! The merged model is a new [`Model`] that shares every tensor no adapter touches with its
//! base and owns only the changed matrices; the base is never modified. Unmerging is
//! therefore exact (bit for bit): keep using the base, and drop the merged model. Several
//! adapters merge at once with their strengths (task arithmetic: `+1` adds a skill, `-1`
//! removes one, `0.5` halves it).

use std::collections::BTreeMap;

use half::f16;

use crate::adapters::{LoraAdapter, Target};
use crate::error::{Error, Result};
use crate::gpu::{Context, DType};
use crate::kernels::embed::DenseMatrix;
use crate::model::weights::{Linear, Mat};
use crate::model::{Ffn, Model};
use crate::util::Fnv64;

/// A change to rows `first .. first + rows` of one linear layer: `[rows][cols]` values.
type Delta = (usize, usize, Vec<f32>);

/// Which linear layer of a block (0 q|k|v, 1 o, 2 gate|up, 3 down) a target lives in, and
/// its first row there.
fn place(t: Target, m: &Model) -> (usize, usize) {
    let c = &m.config;
    match t {
        Target::Q => (0, 0),
        Target::K => (0, c.q_dim()),
        Target::V => (0, c.q_dim() + c.kv_dim()),
        Target::O => (1, 0),
        Target::Gate => (2, 0),
        Target::Up => (2, c.ff),
        Target::Down => (3, 0),
    }
}

/// Reads a dense matrix back as f32.
fn read_dense(ctx: &Context, d: &DenseMatrix) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(d.rows * d.cols);
    for ch in &d.chunks {
        let n = ch.rows * d.cols;
        let bytes = ch.t.read_bytes(ctx)?;
        match d.dtype {
            DType::F32 => out.extend(bytemuck::cast_slice::<u8, f32>(&bytes[..n * 4])),
            _ => out.extend(
                bytes[..n * 2]
                    .chunks_exact(2)
                    .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
            ),
        }
    }
    Ok(out)
}

impl Model {
    /// A model with `adapters` (each at its strength) merged into its f32/f16 weights, in the
    /// weights' own format (the sum is formed in f32 with f64 dot products, then rounded
    /// once). Shares every untouched tensor with `self`, which stays as it is: unmerging is
    /// dropping the merged model. The merged model gets its own identity, so adapters
    /// trained for the base refuse it. Quantized weights are refused (merging would
    /// requantize them); so are adapters made for another base.
    pub fn merge_lora(&self, adapters: &[(&LoraAdapter, f32)]) -> Result<Model> {
        if adapters.is_empty() {
            return Err(Error::InvalidArgument("no adapters to merge".into()));
        }
        let c = &self.config;
        let mut id = Fnv64::new();
        id.update(&self.identity.to_le_bytes());
        let mut deltas: BTreeMap<(usize, usize), Vec<Delta>> = BTreeMap::new();
        for (k, (ad, strength)) in adapters.iter().enumerate() {
            if !strength.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "adapter {k}: strength {strength}"
                )));
            }
            if let Some(b) = ad.base_identity {
                if b != self.identity {
                    return Err(Error::InvalidArgument(format!(
                        "adapter {k} was made for another base model (identity {b:016x}, this model is {:016x})",
                        self.identity
                    )));
                }
            }
            if ad.config.experts.is_some() {
                return Err(Error::Unsupported(format!(
                    "adapter {k} is a mixture of LoRA experts: its router chooses per token, so it cannot be merged into the weights"
                )));
            }
            let r = ad.config.rank;
            let s = ad.config.scale() * strength;
            id.update(&s.to_le_bytes());
            for (&(l, t), pair) in &ad.weights {
                let (out, inp) = t.dims(c);
                if l >= c.n_layers || pair.a.len() != r * inp || pair.b.len() != out * r {
                    return Err(Error::InvalidArgument(format!(
                        "adapter {k}: layer {l} {} does not fit this model",
                        t.module()
                    )));
                }
                let p = pair.for_model(t, self, r);
                for v in p.a.iter().chain(&p.b) {
                    id.update(&v.to_le_bytes());
                }
                let mut d = vec![0f32; out * inp];
                for o in 0..out {
                    let b = &p.b[o * r..(o + 1) * r];
                    for (i, dv) in d[o * inp..(o + 1) * inp].iter_mut().enumerate() {
                        let dot: f64 = (0..r).map(|j| b[j] as f64 * p.a[j * inp + i] as f64).sum();
                        *dv = (s as f64 * dot) as f32;
                    }
                }
                let (lin, row0) = place(t, self);
                deltas.entry((l, lin)).or_default().push((row0, out, d));
            }
        }
        let ctx = self.context();
        let mut layers = self.layers.clone();
        for ((l, lin), ds) in deltas {
            let layer = &mut layers[l];
            let linear: &mut Linear = match (lin, &mut layer.ffn) {
                (0, _) => &mut layer.qkv,
                (1, _) => &mut layer.o,
                (2, Ffn::Dense { gate_up, .. }) => gate_up,
                (_, Ffn::Dense { down, .. }) => down,
                (_, Ffn::Moe(_)) => {
                    return Err(Error::Unsupported(format!(
                        "merging a feed-forward adapter into layer {l}'s experts"
                    )))
                }
            };
            let cols = linear.cols;
            for part in linear.parts.iter_mut() {
                let lo = part.0;
                let dense: &mut DenseMatrix = match &mut part.1 {
                    Mat::Dense(d) => d,
                    Mat::Quant(q) => {
                        return Err(Error::Unsupported(format!(
                            "merging into quantized weights ({:?}, layer {l}): merge into an f32 or f16 model, or serve the adapter unmerged",
                            q.ty
                        )))
                    }
                };
                let hi = lo + dense.rows;
                let touched: Vec<_> = ds
                    .iter()
                    .filter(|(r0, n, _)| *r0 < hi && r0 + n > lo)
                    .collect();
                if touched.is_empty() {
                    continue;
                }
                let mut w = read_dense(ctx, dense)?;
                for (r0, n, d) in touched {
                    for row in (*r0).max(lo)..(r0 + n).min(hi) {
                        let src = &d[(row - r0) * cols..(row - r0 + 1) * cols];
                        for (x, dv) in w[(row - lo) * cols..(row - lo + 1) * cols]
                            .iter_mut()
                            .zip(src)
                        {
                            *x += dv;
                        }
                    }
                }
                *dense = DenseMatrix::upload(ctx, &w, dense.rows, cols, dense.dtype)?;
            }
        }
        Ok(self.derived(self.config.clone(), layers, id.finish()))
    }
}
