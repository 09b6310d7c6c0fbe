//! The [`Learner`]: an adapter that keeps learning from examples as they arrive, without
//! forgetting what it knew and always with a way back.
//!
//! Examples are added one at a time or in batches and kept on disk (`pending.json` in the
//! store) until an update uses them. An update runs when the policy says so (every
//! `update_every` examples, or on demand): a few optimizer steps on the new examples mixed
//! with a share of replayed past examples (a reservoir on disk, optionally distilled: they
//! then learn the frozen base's whole next-token distribution), with the gradient pulled
//! toward the previous version (L2, or EWC weighted by a Fisher estimated on replayed data)
//! and optionally an EMA of the parameters kept as the result. Then the evaluation gate
//! scores the probe sets: the update is kept only if the new-task probes improved by at
//! least `min_new_gain` (relative loss decrease) and the retained-knowledge probes worsened
//! by at most `max_retained_rise` (relative loss increase); a kept update becomes a new
//! version (the head) in the [`AdapterStore`], a rejected one is recorded (not the head)
//! with its reason, and the trainer goes back to the head.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::adapters::{LoraAdapter, LoraConfig};
use crate::error::{Error, Result};
use crate::learn::replay::Replay;
use crate::learn::store::{summarize, AdapterStore, NewVersion};
use crate::model::Model;
use crate::train::{Example, LrSchedule, TrainConfig, Trainables, Trainer};
use crate::util::{write_atomic, Rng};

/// The evaluation gate's thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// Least relative decrease of the new-task probes' loss for an update to be kept
    /// (0: any improvement or none at all; negative values allow a loss).
    pub min_new_gain: f64,
    /// Largest relative increase of the retained-knowledge probes' loss allowed.
    pub max_retained_rise: f64,
}

/// How a [`Learner`] learns.
#[derive(Debug, Clone)]
pub struct LearnerConfig {
    /// The adapter to start from when the store is empty.
    pub lora: LoraConfig,
    /// Optimizer settings (`rows`, AdamW, ...). The schedule should not re-warm at every
    /// update: the default is constant.
    pub train: TrainConfig,
    /// Optimizer steps per update.
    pub steps_per_update: u32,
    /// Sequences per step (new and replayed together).
    pub batch_size: usize,
    /// Run an update every this many added examples (0: only on demand).
    pub update_every: usize,
    /// Share of each step's sequences drawn from the replay buffer (0..1).
    pub replay_ratio: f32,
    /// Examples the replay buffer keeps.
    pub replay_capacity: usize,
    /// Replayed examples learn the frozen base model's distribution (KL) instead of their
    /// own tokens.
    pub replay_distill: bool,
    /// L2 pull toward the previous version (0: off). Ignored when `ewc` is set.
    pub l2: f32,
    /// EWC pull toward the previous version, weighted by the Fisher on replayed data (0: off).
    pub ewc: f32,
    /// Keep an EMA of the parameters with this decay and commit it instead of the last
    /// iterate.
    pub ema: Option<f32>,
    /// The evaluation gate (None: every update is kept).
    pub gate: Option<Gate>,
    /// At most this many examples of each probe set are scored (a fixed sample, the same
    /// before and after an update; 0: all). Scoring costs a forward pass per example.
    pub probe_limit: usize,
    /// Seed of initialization, sampling and replay.
    pub seed: u64,
}

impl LearnerConfig {
    /// The defaults for `lora`: 8 steps of 4 sequences per update, a quarter replayed, L2
    /// at 0.1, a gate that keeps updates whose new-task loss falls and whose retained loss
    /// rises by less than 5%, constant learning rate 1e-3.
    pub fn new(lora: LoraConfig) -> LearnerConfig {
        let mut train = TrainConfig {
            rows: 128,
            schedule: LrSchedule::Constant,
            ..Default::default()
        };
        train.adam.lr = 1e-3;
        LearnerConfig {
            lora,
            train,
            steps_per_update: 8,
            batch_size: 4,
            update_every: 0,
            replay_ratio: 0.25,
            replay_capacity: 512,
            replay_distill: false,
            l2: 0.1,
            ewc: 0.0,
            ema: None,
            gate: Some(Gate {
                min_new_gain: 0.0,
                max_retained_rise: 0.05,
            }),
            probe_limit: 32,
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.steps_per_update == 0 || self.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "a learner needs at least one step of at least one sequence per update".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.replay_ratio) {
            return Err(Error::InvalidArgument(format!(
                "replay ratio {} (0 <= ratio < 1)",
                self.replay_ratio
            )));
        }
        for (name, v) in [("l2", self.l2), ("ewc", self.ewc)] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::InvalidArgument(format!("{name} strength {v}")));
            }
        }
        Ok(())
    }
}

/// What an update did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpdateReport {
    /// The version written (the new head when kept; a recorded, rejected version otherwise).
    pub version: u32,
    /// Whether the update became the head.
    pub kept: bool,
    /// Why it was kept or rejected.
    pub reason: String,
    /// New examples trained on.
    pub examples: usize,
    /// Optimizer steps.
    pub steps: u32,
    /// Task loss of the first and last step.
    pub first_loss: f64,
    /// See `first_loss`.
    pub last_loss: f64,
    /// New-task probe loss before and after.
    pub new_before: f64,
    /// See `new_before`.
    pub new_after: f64,
    /// Retained-knowledge probe loss before and after (None without retained probes).
    pub retained_before: Option<f64>,
    /// See `retained_before`.
    pub retained_after: Option<f64>,
    /// Seconds the update took.
    pub secs: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Pending {
    examples: Vec<(Vec<u32>, Vec<bool>)>,
}

/// An adapter that keeps learning (see the module documentation).
pub struct Learner {
    model: Arc<Model>,
    store: AdapterStore,
    config: LearnerConfig,
    trainer: Trainer,
    replay: Replay,
    pending_path: PathBuf,
    pending: Vec<Example>,
    new_probes: Vec<Example>,
    retained_probes: Vec<Example>,
    rng: Rng,
}

impl Learner {
    /// Opens (or creates) the store in `dir` for `model` and continues from its head, or
    /// from a fresh adapter of `config.lora` when it has none; examples added but not yet
    /// trained on by an earlier process are picked up.
    pub fn open(model: Arc<Model>, dir: &Path, config: LearnerConfig) -> Result<Learner> {
        config.validate()?;
        let store = AdapterStore::open_or_create(dir, &model)?;
        let adapter = match store.load_head(&model)? {
            Some(a) => a,
            None => {
                let mut a = LoraAdapter::init(&model.config, config.lora.clone(), config.seed)?;
                a.base_identity = Some(model.identity);
                a.base_name = model.config.name.clone();
                a
            }
        };
        let trainables = Trainables {
            lora: Some(adapter),
            ..Default::default()
        };
        let mut trainer = Trainer::new(model.clone(), trainables, config.train.clone())?;
        trainer.set_ema(config.ema)?;
        let replay = Replay::open(
            &dir.join("replay.json"),
            config.replay_capacity,
            config.seed,
        )?;
        let pending_path = dir.join("pending.json");
        let pending = match std::fs::read_to_string(&pending_path) {
            Ok(text) => {
                let p: Pending = serde_json::from_str(&text).map_err(|e| {
                    Error::format(
                        Some(&pending_path),
                        format!("invalid pending examples: {e}"),
                    )
                })?;
                p.examples
                    .into_iter()
                    .map(|(t, l)| Example::new(t, l))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::Io {
                    path: pending_path,
                    source,
                })
            }
        };
        Ok(Learner {
            rng: Rng::new(config.seed ^ 0x5EED),
            model,
            store,
            config,
            trainer,
            replay,
            pending_path,
            pending,
            new_probes: Vec::new(),
            retained_probes: Vec::new(),
        })
    }

    /// The base model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The store.
    pub fn store(&self) -> &AdapterStore {
        &self.store
    }

    /// The adapter of record's version, if any.
    pub fn head(&self) -> Result<Option<u32>> {
        self.store.head()
    }

    /// Examples waiting for an update.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The replay buffer.
    pub fn replay(&self) -> &Replay {
        &self.replay
    }

    /// The adapter as trained so far (the head after an update).
    pub fn adapter(&self) -> Result<LoraAdapter> {
        self.trainer
            .lora()?
            .ok_or_else(|| Error::Internal("a learner without LoRA".into()))
    }

    /// Sets the probe sets the gate scores: examples of the new task(s), and examples of
    /// what must be retained. Without new-task probes an update is scored on its own data.
    pub fn set_probes(&mut self, new_task: Vec<Example>, retained: Vec<Example>) -> Result<()> {
        for e in new_task.iter().chain(&retained) {
            self.check(e)?;
        }
        self.new_probes = new_task;
        self.retained_probes = retained;
        Ok(())
    }

    fn check(&self, e: &Example) -> Result<()> {
        let rows = self.config.train.rows;
        if e.tokens.len() < 2 || e.tokens.len() > rows {
            return Err(Error::InvalidArgument(format!(
                "an example of {} tokens does not fit (2..={rows} tokens per sequence)",
                e.tokens.len()
            )));
        }
        if e.loss.len() != e.tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "an example's loss mask has {} entries for {} tokens",
                e.loss.len(),
                e.tokens.len()
            )));
        }
        let vocab = self.model.config.vocab as u32;
        if let Some(&t) = e.tokens.iter().find(|&&t| t >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token {t} is outside the vocabulary of {vocab}"
            )));
        }
        if e.n_targets() == 0 {
            return Err(Error::InvalidArgument(
                "an example with no scored token".into(),
            ));
        }
        Ok(())
    }

    /// Adds examples (kept on disk until an update uses them); runs an update when the
    /// policy's count is reached, returning its report.
    pub fn add(&mut self, examples: &[Example]) -> Result<Option<UpdateReport>> {
        for e in examples {
            self.check(e)?;
        }
        self.pending.extend(examples.iter().cloned());
        self.save_pending()?;
        if self.config.update_every > 0 && self.pending.len() >= self.config.update_every {
            return self.update().map(Some);
        }
        Ok(None)
    }

    fn save_pending(&self) -> Result<()> {
        let p = Pending {
            examples: self
                .pending
                .iter()
                .map(|e| (e.tokens.clone(), e.loss.clone()))
                .collect(),
        };
        let text = serde_json::to_string(&p)
            .map_err(|e| Error::Internal(format!("pending examples: {e}")))?;
        write_atomic(&self.pending_path, text.as_bytes())
    }

    /// Makes version `v` the head again and continues training from it.
    pub fn rollback(&mut self, v: u32) -> Result<()> {
        if !self.store.version_dir(v).is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{}: no version {}",
                self.store.dir().display(),
                crate::learn::store::version_name(v)
            )));
        }
        let adapter = self.store.load(v, &self.model)?;
        self.store.rollback(v)?;
        self.trainer.set_lora(&adapter)
    }

    /// Trains on the pending examples now (see the module documentation).
    pub fn update(&mut self) -> Result<UpdateReport> {
        if self.pending.is_empty() {
            return Err(Error::InvalidArgument("no examples to learn from".into()));
        }
        let t0 = Instant::now();
        let c = self.config.clone();
        let data = self.pending.clone();
        let rows = c.train.rows;
        let replay_batches: Vec<Vec<Example>> = if self.replay.is_empty() {
            Vec::new()
        } else {
            (0..4)
                .map(|_| fit(self.replay.sample(c.batch_size, &mut self.rng), rows))
                .collect()
        };
        if c.ewc > 0.0 && !replay_batches.is_empty() {
            self.trainer.anchor_here(c.ewc, &replay_batches)?;
        } else {
            self.trainer.anchor_here(c.l2, &[])?;
        }
        let new_probes = if self.new_probes.is_empty() {
            data.clone()
        } else {
            self.new_probes.clone()
        };
        let new_probes = sample_probes(new_probes, c.probe_limit, c.seed);
        let retained_probes = sample_probes(self.retained_probes.clone(), c.probe_limit, c.seed);
        let new_before = self.trainer.evaluate(&new_probes)?;
        let retained_before = if retained_probes.is_empty() {
            None
        } else {
            Some(self.trainer.evaluate(&retained_probes)?)
        };
        let n_replay = if self.replay.is_empty() {
            0
        } else {
            ((c.batch_size as f32 * c.replay_ratio).round() as usize).min(c.batch_size - 1)
        };
        let n_new = c.batch_size - n_replay;
        let mut order: Vec<usize> = (0..data.len()).collect();
        let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
        let mut cursor = data.len();
        for _ in 0..c.steps_per_update {
            let mut batch = Vec::with_capacity(c.batch_size);
            for _ in 0..n_new {
                if cursor == data.len() {
                    // A new pass over the data, shuffled.
                    for i in (1..order.len()).rev() {
                        order.swap(i, self.rng.below(i as u64 + 1) as usize);
                    }
                    cursor = 0;
                }
                batch.push(data[order[cursor]].clone());
                cursor += 1;
            }
            for e in fit(self.replay.sample(n_replay, &mut self.rng), rows) {
                batch.push(if c.replay_distill { e.distilled() } else { e });
            }
            let s = self.trainer.step(&batch)?;
            if first_loss.is_nan() {
                first_loss = s.loss;
            }
            last_loss = s.loss;
        }
        if let Some(ema) = self.trainer.lora_ema()? {
            self.trainer.set_lora(&ema)?;
        }
        let new_after = self.trainer.evaluate(&new_probes)?;
        let retained_after = if retained_probes.is_empty() {
            None
        } else {
            Some(self.trainer.evaluate(&retained_probes)?)
        };
        let gain = (new_before - new_after) / new_before.abs().max(1e-12);
        let rise = match (retained_before, retained_after) {
            (Some(b), Some(a)) => Some((a - b) / b.abs().max(1e-12)),
            _ => None,
        };
        let (kept, reason) = match c.gate {
            None => (true, "no gate".to_string()),
            Some(g) if gain < g.min_new_gain => (
                false,
                format!(
                    "new-task probe loss fell by {:.2}% (< {:.2}%)",
                    100.0 * gain,
                    100.0 * g.min_new_gain
                ),
            ),
            Some(g) if rise.is_some_and(|r| r > g.max_retained_rise) => (
                false,
                format!(
                    "retained probe loss rose by {:.2}% (> {:.2}%)",
                    100.0 * rise.unwrap_or(0.0),
                    100.0 * g.max_retained_rise
                ),
            ),
            Some(_) => (
                true,
                format!(
                    "new-task probe loss fell by {:.2}%{}",
                    100.0 * gain,
                    rise.map(|r| format!(", retained rose by {:.2}%", 100.0 * r))
                        .unwrap_or_default()
                ),
            ),
        };
        let adapter = self.adapter()?;
        let report = UpdateReport {
            version: 0,
            kept,
            reason: reason.clone(),
            examples: data.len(),
            steps: c.steps_per_update,
            first_loss,
            last_loss,
            new_before,
            new_after,
            retained_before,
            retained_after,
            secs: t0.elapsed().as_secs_f64(),
        };
        let new = NewVersion {
            data: summarize(data.iter().map(|e| e.tokens.as_slice())),
            hyperparameters: json!({
                "lr": c.train.adam.lr, "steps": c.steps_per_update, "batch_size": c.batch_size,
                "replay_ratio": c.replay_ratio, "replay_distill": c.replay_distill,
                "l2": c.l2, "ewc": c.ewc, "ema": c.ema, "gate": c.gate, "seed": c.seed,
                "rank": c.lora.rank, "alpha": c.lora.alpha,
            }),
            metrics: serde_json::to_value(&report)
                .map_err(|e| Error::Internal(format!("update report: {e}")))?,
            note: if kept {
                format!("update: {reason}")
            } else {
                format!("rejected: {reason}")
            },
            // A rejected update keeps its examples beside it: nothing added is lost.
            files: if kept {
                Vec::new()
            } else {
                let p = Pending {
                    examples: data
                        .iter()
                        .map(|e| (e.tokens.clone(), e.loss.clone()))
                        .collect(),
                };
                let text = serde_json::to_vec(&p)
                    .map_err(|e| Error::Internal(format!("rejected examples: {e}")))?;
                vec![("examples.json".to_string(), text)]
            },
        };
        let version = if kept {
            let v = self.store.commit(&adapter, &self.model, new)?;
            self.replay.add(&data)?;
            v
        } else {
            let v = self.store.record_rejected(&adapter, &self.model, new)?;
            let back = match self.store.load_head(&self.model)? {
                Some(a) => a,
                None => {
                    let mut a = LoraAdapter::init(&self.model.config, c.lora.clone(), c.seed)?;
                    a.base_identity = Some(self.model.identity);
                    a
                }
            };
            self.trainer.set_lora(&back)?;
            v
        };
        // The examples are consumed either way (a rejected update's are in its version's
        // examples.json).
        self.pending.clear();
        self.save_pending()?;
        Ok(UpdateReport { version, ..report })
    }
}

/// Replayed examples cut to `rows` tokens (they may come from updates with longer
/// sequences); one left with nothing to score is dropped.
fn fit(examples: Vec<Example>, rows: usize) -> Vec<Example> {
    examples
        .into_iter()
        .map(|mut e| {
            e.tokens.truncate(rows);
            e.loss.truncate(rows);
            e
        })
        .filter(|e| e.n_targets() > 0)
        .collect()
}

/// At most `limit` of `probes` (all when `limit` is 0 or they fit), drawn with `seed`: the
/// same sample before and after an update.
fn sample_probes(mut probes: Vec<Example>, limit: usize, seed: u64) -> Vec<Example> {
    if limit == 0 || probes.len() <= limit {
        return probes;
    }
    let mut rng = Rng::new(seed ^ 0x0BE5);
    for i in (1..probes.len()).rev() {
        probes.swap(i, rng.below(i as u64 + 1) as usize);
    }
    probes.truncate(limit);
    probes
}
