//! Merging LoRA adapters of one base: task arithmetic, TIES, DARE and magnitude pruning,
//! with PEFT's semantics (`add_weighted_adapter` with `linear`, `ties`, `dare_linear`,
//! `dare_ties`, `magnitude_prune`), so merges made here and there agree.
//!
//! The adapters must share their rank. Each adapter's A and B are merged separately, each
//! weighted by `sqrt(|w s|)` (the sign of `w s` on A's side only), `w` the adapter's weight
//! and `s` its scale; the result has that rank and scale 1 (alpha = rank). Per tensor:
//! - linear: `sum_i w_i T_i`;
//! - magnitude prune: each `T_i` keeps its `density` fraction of largest magnitudes, then linear;
//! - TIES: prune by magnitude, elect each element's sign from the sum of the pruned tensors,
//!   then average the weighted values that agree with it (disjoint merge);
//! - DARE: each element kept with probability `density` and rescaled by `1/density`, then
//!   linear (dare_linear) or sign election and disjoint merge (dare_ties).

use std::collections::BTreeMap;

use crate::adapters::lora::LoraPair;
use crate::adapters::{LoraAdapter, LoraConfig};
use crate::error::{Error, Result};
use crate::util::Rng;

/// How to merge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MergeMethod {
    /// Weighted sum (task arithmetic).
    Linear,
    /// Magnitude pruning to `density`, then the weighted sum.
    MagnitudePrune {
        /// Fraction of each tensor's elements kept.
        density: f32,
    },
    /// TIES: magnitude pruning, sign election, disjoint merge.
    Ties {
        /// Fraction of each tensor's elements kept.
        density: f32,
    },
    /// DARE: random drop with probability `1 - density`, rescale, weighted sum.
    DareLinear {
        /// Probability of keeping an element.
        density: f32,
        /// Seed of the drop masks.
        seed: u64,
    },
    /// DARE's random drop, then TIES' sign election and disjoint merge.
    DareTies {
        /// Probability of keeping an element.
        density: f32,
        /// Seed of the drop masks.
        seed: u64,
    },
}

impl MergeMethod {
    /// Parses `linear`, `magnitude_prune`, `ties`, `dare_linear` or `dare_ties`.
    pub fn parse(name: &str, density: f32, seed: u64) -> Result<MergeMethod> {
        let m = match name.replace('-', "_").as_str() {
            "linear" | "task_arithmetic" => MergeMethod::Linear,
            "magnitude_prune" => MergeMethod::MagnitudePrune { density },
            "ties" => MergeMethod::Ties { density },
            "dare_linear" | "dare" => MergeMethod::DareLinear { density, seed },
            "dare_ties" => MergeMethod::DareTies { density, seed },
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown merge method {other:?} (linear, magnitude_prune, ties, dare_linear, dare_ties)"
                )))
            }
        };
        if let Some(d) = m.density() {
            if !(d > 0.0 && d <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "merge density {d} (0 < density <= 1)"
                )));
            }
        }
        Ok(m)
    }

    fn density(self) -> Option<f32> {
        match self {
            MergeMethod::Linear => None,
            MergeMethod::MagnitudePrune { density }
            | MergeMethod::Ties { density }
            | MergeMethod::DareLinear { density, .. }
            | MergeMethod::DareTies { density, .. } => Some(density),
        }
    }
}

/// Keeps the `k = floor(density * n)` largest magnitudes of `t` (PEFT's
/// `magnitude_based_pruning`; nothing is pruned at density 1).
pub fn magnitude_prune(t: &[f32], density: f32) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density as f64 * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&a, &b| t[b].abs().total_cmp(&t[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0.0; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// Keeps each element with probability `density`, rescaled by `1 / density`.
pub fn random_prune(t: &[f32], density: f32, rng: &mut Rng) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    t.iter()
        .map(|&v| {
            if rng.uniform() < density {
                v / density
            } else {
                0.0
            }
        })
        .collect()
}

/// TIES' sign election over the (pruned, unweighted) tensors and disjoint merge of the
/// weighted ones: per element, the mean of the weighted values whose sign is the sign of
/// the sum (0 counts as positive).
pub fn disjoint_merge(pruned: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let n = pruned.first().map_or(0, |t| t.len());
    (0..n)
        .map(|j| {
            let total: f32 = pruned.iter().map(|t| t[j]).sum();
            let major = if total >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0.0f32, 0usize);
            for (t, &w) in pruned.iter().zip(weights) {
                if t[j] != 0.0 && t[j].signum() == major {
                    sum += t[j] * w;
                    count += 1;
                }
            }
            sum / count.max(1) as f32
        })
        .collect()
}

/// Merges the tensors `ts` (one per adapter) with `weights` by `method`; `rng` draws DARE's
/// masks.
pub fn merge_tensors(
    ts: &[&[f32]],
    weights: &[f32],
    method: MergeMethod,
    rng: &mut Rng,
) -> Vec<f32> {
    let linear = |ts: &[Vec<f32>]| -> Vec<f32> {
        let n = ts.first().map_or(0, |t| t.len());
        (0..n)
            .map(|j| ts.iter().zip(weights).map(|(t, &w)| t[j] * w).sum())
            .collect()
    };
    let owned = || ts.iter().map(|t| t.to_vec()).collect::<Vec<_>>();
    match method {
        MergeMethod::Linear => linear(&owned()),
        MergeMethod::MagnitudePrune { density } => linear(
            &ts.iter()
                .map(|t| magnitude_prune(t, density))
                .collect::<Vec<_>>(),
        ),
        MergeMethod::Ties { density } => {
            let pruned: Vec<Vec<f32>> = ts.iter().map(|t| magnitude_prune(t, density)).collect();
            disjoint_merge(&pruned, weights)
        }
        MergeMethod::DareLinear { density, .. } => {
            let pruned: Vec<Vec<f32>> = ts.iter().map(|t| random_prune(t, density, rng)).collect();
            linear(&pruned)
        }
        MergeMethod::DareTies { density, .. } => {
            let pruned: Vec<Vec<f32>> = ts.iter().map(|t| random_prune(t, density, rng)).collect();
            disjoint_merge(&pruned, weights)
        }
    }
}

/// Merges `parts` (adapter, weight) into one adapter of their common rank and scale 1. A
/// layer that only some adapters have merges those.
pub fn merge_adapters(parts: &[(&LoraAdapter, f32)], method: MergeMethod) -> Result<LoraAdapter> {
    let first = parts
        .first()
        .ok_or_else(|| Error::InvalidArgument("no adapters to merge".into()))?
        .0;
    let rank = first.config.rank;
    for (i, (a, w)) in parts.iter().enumerate() {
        if a.config.experts.is_some() {
            return Err(Error::Unsupported(format!(
                "adapter {i} is a mixture of LoRA experts (its router decides per token): merge plain LoRA adapters"
            )));
        }
        if a.config.rank != rank {
            return Err(Error::InvalidArgument(format!(
                "adapter {i} has rank {}, adapter 0 rank {rank}: merging needs one rank",
                a.config.rank
            )));
        }
        if a.base_identity != first.base_identity {
            return Err(Error::InvalidArgument(format!(
                "adapter {i} was made for another base model"
            )));
        }
        if !w.is_finite() {
            return Err(Error::InvalidArgument(format!("adapter {i}: weight {w}")));
        }
    }
    let seed = match method {
        MergeMethod::DareLinear { seed, .. } | MergeMethod::DareTies { seed, .. } => seed,
        _ => 0,
    };
    let mut rng = Rng::new(seed);
    let mut keys: Vec<_> = parts
        .iter()
        .flat_map(|(a, _)| a.weights.keys().copied())
        .collect();
    keys.sort();
    keys.dedup();
    let mut weights = BTreeMap::new();
    for key in keys {
        let (mut ta, mut tb, mut wa, mut wb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (a, w) in parts {
            let Some(p) = a.weights.get(&key) else {
                continue;
            };
            let ws = w * a.config.scale();
            let root = ws.abs().sqrt();
            ta.push(p.a.as_slice());
            tb.push(p.b.as_slice());
            wa.push(if ws >= 0.0 { root } else { -root });
            wb.push(root);
        }
        if ta.iter().any(|t| t.len() != ta[0].len()) || tb.iter().any(|t| t.len() != tb[0].len()) {
            return Err(Error::InvalidArgument(format!(
                "layer {} {}: the adapters' matrices differ in shape",
                key.0,
                key.1.module()
            )));
        }
        let a = merge_tensors(&ta, &wa, method, &mut rng);
        let b = merge_tensors(&tb, &wb, method, &mut rng);
        weights.insert(
            key,
            LoraPair {
                a,
                b,
                router: Vec::new(),
            },
        );
    }
    let mut targets: Vec<_> = weights.keys().map(|k| k.1).collect();
    targets.sort();
    targets.dedup();
    Ok(LoraAdapter {
        config: LoraConfig::new(rank, rank as f32, targets),
        weights,
        base_identity: first.base_identity,
        base_name: first.base_name.clone(),
    })
}
