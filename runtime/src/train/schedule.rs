//! Learning-rate schedules, as multipliers of the base rate per optimizer step (the same
//! formulas as transformers' `get_*_schedule_with_warmup`, so runs compare step for step).

use serde::{Deserialize, Serialize};

/// How the learning rate changes over the optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at `total`.
    Cosine {
        /// Warmup steps.
        warmup: u32,
        /// Steps of the whole run.
        total: u32,
    },
    /// Linear warmup, then the base rate for as long as training goes on (continual use).
    WarmupConstant {
        /// Warmup steps.
        warmup: u32,
    },
}

impl LrSchedule {
    /// Multiplier of the base rate for optimizer step `step` (0-based: the first update
    /// uses `factor(0)`).
    pub fn factor(&self, step: u32) -> f64 {
        let s = step as f64;
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::WarmupConstant { warmup } => {
                if step < warmup {
                    s / warmup.max(1) as f64
                } else {
                    1.0
                }
            }
            LrSchedule::Cosine { warmup, total } => {
                if step < warmup {
                    return s / warmup.max(1) as f64;
                }
                let progress = (s - warmup as f64) / (total.saturating_sub(warmup)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// Parses `constant`, `cosine` (with `warmup` and `total`) or `warmup-constant`.
    pub fn parse(name: &str, warmup: u32, total: u32) -> crate::Result<LrSchedule> {
        match name {
            "constant" => Ok(LrSchedule::Constant),
            "cosine" => Ok(LrSchedule::Cosine { warmup, total }),
            "warmup-constant" | "warmup_constant" => Ok(LrSchedule::WarmupConstant { warmup }),
            s => Err(crate::Error::InvalidArgument(format!(
                "learning-rate schedule {s:?} (constant, cosine, warmup-constant)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_the_transformers_formulas() {
        let c = LrSchedule::Cosine {
            warmup: 3,
            total: 20,
        };
        let f: Vec<f64> = (0..20).map(|s| c.factor(s)).collect();
        assert_eq!(&f[..4], &[0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]);
        assert!(
            (f[3 + 17 / 2] - 0.5 * (1.0 + (std::f64::consts::PI * 8.0 / 17.0).cos())).abs() < 1e-12
        );
        assert!(f.windows(2).skip(3).all(|w| w[1] <= w[0]));
        assert_eq!(c.factor(20), 0.0);
        let w = LrSchedule::WarmupConstant { warmup: 4 };
        assert_eq!((w.factor(2), w.factor(4), w.factor(1000)), (0.5, 1.0, 1.0));
        assert_eq!(LrSchedule::Constant.factor(7), 1.0);
        assert!(LrSchedule::parse("linear", 0, 0).is_err());
    }
}
