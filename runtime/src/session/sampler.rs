//! Per-sequence sampling settings and state. The choice itself runs on the GPU
//! ([`crate::kernels::sample`]); the CPU draws the uniform number from the sequence's own
//! seeded generator and keeps the recent tokens for the repetition penalty.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::sample::RowParams;
use crate::util::Rng;

/// How a sequence picks its next token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off; at most 1024 are considered).
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches top_p (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens by this (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the sequence's random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

/// Most recent tokens the repetition penalty can look at.
pub const MAX_PENALTY_TOKENS: usize = 256;

impl SamplerConfig {
    /// Greedy decoding (always the most likely token).
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 1,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        }
    }

    /// Checks every value is in range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature {} (must be >= 0)", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} (must be in (0, 1])", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad(format!("min_p {} (must be in [0, 1))", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad(format!(
                "repeat_penalty {} (must be > 0)",
                self.repeat_penalty
            ));
        }
        if self.repeat_last_n > MAX_PENALTY_TOKENS {
            return bad(format!(
                "repeat_last_n {} (at most {MAX_PENALTY_TOKENS})",
                self.repeat_last_n
            ));
        }
        Ok(())
    }
}

/// A sequence's sampler: its settings and random generator.
#[derive(Debug, Clone)]
pub struct SamplerState {
    /// Settings.
    pub config: SamplerConfig,
    rng: Rng,
}

impl SamplerState {
    /// A sampler seeded by its configuration.
    pub fn new(config: SamplerConfig) -> Result<Self> {
        config.validate()?;
        Ok(SamplerState {
            config,
            rng: Rng::new(config.seed),
        })
    }

    /// The GPU row parameters for the next draw: penalty tokens are written by the caller
    /// at `penalty_off`, `n_penalty` of them.
    pub fn next_row(&mut self, penalty_off: u32, n_penalty: u32) -> RowParams {
        let c = &self.config;
        RowParams {
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            min_p: c.min_p,
            u: self.rng.uniform(),
            penalty: c.repeat_penalty,
            n_penalty: if c.repeat_penalty == 1.0 {
                0
            } else {
                n_penalty
            },
            penalty_off,
        }
    }

    /// The distinct ids among the last `repeat_last_n` of `history`.
    pub fn penalty_ids(&self, history: &[u32]) -> Vec<u32> {
        if self.config.repeat_penalty == 1.0 {
            return Vec::new();
        }
        let n = self.config.repeat_last_n.min(history.len());
        let mut ids: Vec<u32> = history[history.len() - n..].to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
