//! The [`Learner`]: an adapter that keeps learning from examples as they arrive, without
//! forgetting what it knew and always with a way back.
//!
//! Examples are added one at a time or in batches and kept on disk (`pending.json` in the
//! store) until an update uses them. An update runs when the policy says so (every
//! `update_every` examples, or on demand): a few optimizer steps, each on `batch_size` new
//! examples plus `replay_ratio` times as many replayed ones (drawn from a reservoir of past
//! examples and from the anchors, general text given with [`Learner::retain`] that learns
//! the frozen base's whole next-token distribution), with the gradient pulled toward the
//! previous version (L2, or EWC weighted by a Fisher estimated on replayed data) and
//! optionally an EMA of the parameters kept as the result. The learning rate warms up once
//! over the store's first `warmup_steps` steps and then stays constant: a new update (or a
//! new process) does not warm up again. Then the evaluation gate scores the probe sets: the
//! update is kept only if the new-task probes improved by at least `min_new_gain`
//! (relative loss decrease) and the retained-knowledge probes (by default a fixed sample of
//! the replay buffer: what was learned before, and the anchors) worsened by at most
//! `max_retained_rise` nats per token; with exact-match probes ([`AnswerProbe`]), also only
//! if no more new-task answers are wrong than before and the retained answers' accuracy
//! falls by at most `max_answer_drop`. A kept update becomes a new version (the head) in
//! the [`AdapterStore`], a rejected one is recorded (not the head) with its reason, and the
//! trainer goes back to the head.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use web_time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::adapters::{LoraAdapter, LoraConfig};
use crate::error::{Error, Result};
use crate::learn::answers::{answer_accuracy, AnswerProbe};
use crate::learn::replay::{Replay, Stored};
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
    /// Largest increase of the retained-knowledge probes' mean loss allowed, in nats per
    /// scored token (absolute, not relative: retained losses are often small, where a
    /// relative threshold would refuse noise).
    pub max_retained_rise: f64,
    /// Largest fall of the retained answer probes' accuracy allowed (a fraction of the
    /// probes; 0: every answer that was right must stay right).
    #[serde(default)]
    pub max_answer_drop: f64,
}

/// How a [`Learner`] learns.
#[derive(Debug, Clone)]
pub struct LearnerConfig {
    /// The adapter to start from when the store is empty.
    pub lora: LoraConfig,
    /// Optimizer settings (`rows`, AdamW, ...). Its schedule is replaced by the learner's:
    /// `warmup_steps` over the lineage, then constant (no re-warming at every update).
    pub train: TrainConfig,
    /// Optimizer steps per update.
    pub steps_per_update: u32,
    /// New examples per step (replayed ones come on top, see `replay_ratio`).
    pub batch_size: usize,
    /// Run an update every this many added examples (0: only on demand).
    pub update_every: usize,
    /// Replayed sequences per new one in each step (0..=4): 0.5 with a batch of 4 adds 2
    /// replayed sequences. They are added rather than taking the place of new ones, so
    /// replay does not slow the learning of the new task.
    pub replay_ratio: f32,
    /// Examples the replay buffer keeps.
    pub replay_capacity: usize,
    /// Every replayed example learns the frozen base model's distribution (KL) instead of
    /// its own tokens (anchors always do).
    pub replay_distill: bool,
    /// Weight of a distilled replayed example (an anchor) against a new one. Its tokens'
    /// KL divergence is scaled so that, at 1, each distilled example weighs in a step's
    /// loss as much as a new example does, however many tokens it scores: a page of
    /// general text does not drown a one-line fact.
    pub distill_weight: f32,
    /// Steps over which the learning rate warms up linearly, counted over the store's
    /// whole lineage (0: none).
    pub warmup_steps: u32,
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
    /// Tokens generated per answer probe at most.
    pub answer_tokens: usize,
    /// Seed of initialization, sampling and replay.
    pub seed: u64,
}

impl LearnerConfig {
    /// The defaults for `lora`: 8 steps of 4 new sequences plus 2 replayed per update, L2
    /// at 0.01, a gate that keeps updates whose new-task loss falls and whose retained loss
    /// rises by at most 0.25 nats per token (in the continual experiment a naive update
    /// costs 0.3 to 0.7), learning rate 1e-3 after a warmup of 4 steps.
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
            replay_ratio: 0.5,
            replay_capacity: 512,
            replay_distill: false,
            distill_weight: 1.0,
            warmup_steps: 4,
            l2: 0.01,
            ewc: 0.0,
            ema: None,
            gate: Some(Gate {
                min_new_gain: 0.0,
                max_retained_rise: 0.25,
                max_answer_drop: 0.0,
            }),
            probe_limit: 32,
            answer_tokens: 32,
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.steps_per_update == 0 || self.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "a learner needs at least one step of at least one sequence per update".into(),
            ));
        }
        if !(0.0..=4.0).contains(&self.replay_ratio) {
            return Err(Error::InvalidArgument(format!(
                "replay ratio {} (0 <= ratio <= 4 replayed sequences per new one)",
                self.replay_ratio
            )));
        }
        for (name, v) in [
            ("l2", self.l2),
            ("ewc", self.ewc),
            ("distill weight", self.distill_weight),
        ] {
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
    /// Accuracy of the new-task answer probes before and after (None without them).
    pub new_answers_before: Option<f64>,
    /// See `new_answers_before`.
    pub new_answers_after: Option<f64>,
    /// Accuracy of the retained answer probes before and after (None without them).
    pub retained_answers_before: Option<f64>,
    /// See `retained_answers_before`.
    pub retained_answers_after: Option<f64>,
    /// Seconds the update took.
    pub secs: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Pending {
    examples: Vec<Stored>,
}

impl Pending {
    fn of(examples: &[Example]) -> Pending {
        Pending {
            examples: examples.iter().map(Stored::of).collect(),
        }
    }
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
    new_answers: Vec<AnswerProbe>,
    retained_answers: Vec<AnswerProbe>,
    /// Optimizer steps of the head's lineage (the warmup's clock).
    lineage_steps: u32,
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
        let mut train = config.train.clone();
        train.schedule = match config.warmup_steps {
            0 => LrSchedule::Constant,
            w => LrSchedule::WarmupConstant { warmup: w },
        };
        let mut trainer = Trainer::new(model.clone(), trainables, train)?;
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
                if !p.examples.iter().all(Stored::is_consistent) {
                    return Err(Error::format(
                        Some(&pending_path),
                        "an example's tokens and loss mask differ in length",
                    ));
                }
                p.examples.iter().map(Stored::example).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::Io {
                    path: pending_path,
                    source,
                })
            }
        };
        let lineage_steps = lineage_steps(&store)?;
        trainer.set_schedule_clock(lineage_steps);
        Ok(Learner {
            lineage_steps,
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
            new_answers: Vec::new(),
            retained_answers: Vec::new(),
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

    /// Sets exact-match probes for the gate: prompts of the new task(s) and of what must be
    /// retained, each with the text its greedy answer must contain. An update is kept only
    /// if no fewer new-task answers are right than before, and the retained answers'
    /// accuracy falls by at most the gate's `max_answer_drop`. Each probe costs a short
    /// generation before and after every update.
    pub fn set_answer_probes(
        &mut self,
        new_task: Vec<AnswerProbe>,
        retained: Vec<AnswerProbe>,
    ) -> Result<()> {
        let n_ctx = self.model.config.train_ctx;
        for p in new_task.iter().chain(&retained) {
            if p.prompt.len() + self.config.answer_tokens > n_ctx {
                return Err(Error::InvalidArgument(format!(
                    "an answer probe of {} prompt tokens and {} answer tokens exceeds the \
                     model's context of {n_ctx}",
                    p.prompt.len(),
                    self.config.answer_tokens
                )));
            }
        }
        self.new_answers = new_task;
        self.retained_answers = retained;
        Ok(())
    }

    /// Accuracy of the new-task and the retained answer probes with the current adapter.
    fn score_answers(&self) -> Result<(Option<f64>, Option<f64>)> {
        let adapter = self.adapter()?;
        let score = |probes: &[AnswerProbe]| -> Result<Option<f64>> {
            if probes.is_empty() {
                return Ok(None);
            }
            let n = self.config.answer_tokens;
            answer_accuracy(&self.model, Some(&adapter), probes, n).map(Some)
        };
        Ok((score(&self.new_answers)?, score(&self.retained_answers)?))
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

    /// Adds anchors: text whose base-model behaviour the adapter must keep (general text,
    /// instructions it already follows well). They join the replay buffer for good and are
    /// replayed distilled, learning the frozen base's whole next-token distribution, so the
    /// adapter keeps the base's general ability while new facts go in. Text already held is
    /// not added twice. Returns how many were new.
    pub fn retain(&mut self, examples: &[Example]) -> Result<usize> {
        for e in examples {
            self.check(e)?;
        }
        self.replay.add_anchors(examples)
    }

    fn save_pending(&self) -> Result<()> {
        let text = serde_json::to_string(&Pending::of(&self.pending))
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
            // The Fisher is of the model's own loss on its tokens (anchors included).
            (0..4)
                .map(|_| {
                    let batch = self.replay.sample(c.batch_size, &mut self.rng);
                    let plain = batch.into_iter().map(|e| Example::new(e.tokens, e.loss));
                    fit(plain.collect(), rows)
                })
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
        // Without retained probes of its own, the gate watches what was learned before:
        // the replay buffer (scored on its tokens, anchors included).
        let retained = if self.retained_probes.is_empty() {
            self.replay
                .examples()
                .into_iter()
                .map(|e| Example::new(e.tokens, e.loss))
                .collect()
        } else {
            self.retained_probes.clone()
        };
        let retained_probes = fit(sample_probes(retained, c.probe_limit, c.seed), rows);
        let new_before = self.trainer.evaluate(&new_probes)?;
        let retained_before = if retained_probes.is_empty() {
            None
        } else {
            Some(self.trainer.evaluate(&retained_probes)?)
        };
        let (new_answers_before, retained_answers_before) = self.score_answers()?;
        let n_replay = if self.replay.is_empty() {
            0
        } else {
            (c.batch_size as f32 * c.replay_ratio).round() as usize
        };
        let n_new = c.batch_size;
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
            self.trainer
                .set_distill_weight(c.distill_weight * example_balance(&batch))?;
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
        let (new_answers_after, retained_answers_after) = self.score_answers()?;
        let answers_fell = match (new_answers_before, new_answers_after) {
            (Some(b), Some(a)) if a < b => Some((b, a)),
            _ => None,
        };
        let answers_drop = match (retained_answers_before, retained_answers_after) {
            (Some(b), Some(a)) => b - a,
            _ => 0.0,
        };
        let gain = (new_before - new_after) / new_before.abs().max(1e-12);
        let rise = match (retained_before, retained_after) {
            (Some(b), Some(a)) => Some(a - b),
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
                    "retained probe loss rose by {:.4} nats/token (> {:.4})",
                    rise.unwrap_or(0.0),
                    g.max_retained_rise
                ),
            ),
            Some(_) if answers_fell.is_some() => {
                let (b, a) = answers_fell.unwrap_or_default();
                (
                    false,
                    format!(
                        "new-task answers right fell from {:.1}% to {:.1}%",
                        100.0 * b,
                        100.0 * a
                    ),
                )
            }
            Some(g) if answers_drop > g.max_answer_drop + 1e-9 => (
                false,
                format!(
                    "retained answers right fell by {:.1}% (> {:.1}%)",
                    100.0 * answers_drop,
                    100.0 * g.max_answer_drop
                ),
            ),
            Some(_) => (
                true,
                format!(
                    "new-task probe loss fell by {:.2}%{}",
                    100.0 * gain,
                    rise.map(|r| format!(", retained rose by {r:.4} nats/token"))
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
            new_answers_before,
            new_answers_after,
            retained_answers_before,
            retained_answers_after,
            secs: t0.elapsed().as_secs_f64(),
        };
        let new = NewVersion {
            data: summarize(data.iter().map(|e| e.tokens.as_slice())),
            hyperparameters: json!({
                "lr": c.train.adam.lr, "steps": c.steps_per_update, "batch_size": c.batch_size,
                "replay_ratio": c.replay_ratio, "replay_distill": c.replay_distill,
                "anchors": self.replay.anchors(), "distill_weight": c.distill_weight,
                "warmup_steps": c.warmup_steps,
                "lineage_steps": self.lineage_steps + c.steps_per_update,
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
                let text = serde_json::to_vec(&Pending::of(&data))
                    .map_err(|e| Error::Internal(format!("rejected examples: {e}")))?;
                vec![("examples.json".to_string(), text)]
            },
        };
        let version = if kept {
            let v = self.store.commit(&adapter, &self.model, new)?;
            self.replay.add(&data)?;
            self.lineage_steps += c.steps_per_update;
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
            self.trainer.set_schedule_clock(self.lineage_steps);
            v
        };
        // The examples are consumed either way (a rejected update's are in its version's
        // examples.json).
        self.pending.clear();
        self.save_pending()?;
        Ok(UpdateReport { version, ..report })
    }
}

/// The factor that makes a distilled example of `batch` weigh, in the token-averaged loss,
/// as much as a plain one: mean scored tokens of the plain examples over the distilled
/// ones' (1 when either kind is missing).
fn example_balance(batch: &[Example]) -> f32 {
    let mean = |distill: bool| {
        let (n, t) = batch
            .iter()
            .filter(|e| e.distill == distill)
            .fold((0usize, 0usize), |(n, t), e| (n + 1, t + e.n_targets()));
        (n > 0 && t > 0).then(|| t as f32 / n as f32)
    };
    match (mean(false), mean(true)) {
        (Some(plain), Some(distilled)) => plain / distilled,
        _ => 1.0,
    }
}

/// Optimizer steps of the store head's lineage, as its metadata records them (0 without a
/// head, or for a version written before the count was kept).
fn lineage_steps(store: &AdapterStore) -> Result<u32> {
    let Some(head) = store.head()? else {
        return Ok(0);
    };
    let meta = store.meta(head)?;
    Ok(meta.hyperparameters["lineage_steps"]
        .as_u64()
        .map_or(0, |s| s.min(u32::MAX as u64) as u32))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distilled_examples_are_balanced_per_example() {
        let plain = |n: usize| Example::all(vec![1; n + 1]);
        let distilled = |n: usize| Example::all(vec![1; n + 1]).distilled();
        // Plain examples score 4 and 6 tokens (mean 5), the distilled one 20.
        let batch = vec![plain(4), plain(6), distilled(20)];
        assert_eq!(example_balance(&batch), 0.25);
        assert_eq!(example_balance(&[plain(4)]), 1.0);
        assert_eq!(example_balance(&[distilled(9)]), 1.0);
    }
}
