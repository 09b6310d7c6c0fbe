//! On-device training: LoRA, soft prompts and prefixes learned with the same WGSL kernels
//! that run inference, against a frozen base in any stored format (f32, f16, bf16 or a GGUF
//! quantization, dequantized on the fly).
//!
//! A [`Trainer`] owns the trainable parameters (one flat buffer, see [`params`]), the step's
//! dispatches (built once for a block of rows and replayed, see [`graph`]) and AdamW's
//! state. [`Trainer::step`] takes a batch of [`Example`]s, packs them into blocks (several
//! blocks accumulate into one update), and returns the loss; the CPU only writes the
//! per-row inputs and reads one loss per block back.

pub mod attention;
pub mod batch;
pub mod data;
pub mod frozen;
pub mod graph;
pub mod moe;
pub mod params;
pub mod regularize;
pub mod schedule;

use std::collections::HashMap;
use std::sync::Arc;
use web_time::Instant;

use serde::Serialize;

use crate::adapters::lora::LoraPair;
use crate::adapters::{LoraAdapter, LoraConfig, Prefix, SoftPrompt, Target};
use crate::error::{Error, Result};
use crate::gpu::{blocking, DType, Dispatch, Tensor};
use crate::kernels::rope::RopeTable;
use crate::kernels::train::{fill, grad_norm, grad_norm_scratch, AdamConfig, AdamW};
use crate::model::export::unpermute_rows;
use crate::model::Model;

pub use batch::{pack, Example, Virtual};
pub use data::Dataset;
pub use graph::Budgets;
pub use params::ParamKey;
pub use schedule::LrSchedule;

/// What is trained (at least one).
#[derive(Debug, Clone, Default)]
pub struct Trainables {
    /// A LoRA adapter to train (its current values are the starting point: a fresh
    /// [`LoraAdapter::init`], or a loaded one to continue).
    pub lora: Option<LoraAdapter>,
    /// A soft prompt to train.
    pub prompt: Option<SoftPrompt>,
    /// A prefix to train (not together with a soft prompt).
    pub prefix: Option<Prefix>,
}

impl Trainables {
    /// Virtual tokens in front of every sequence (the soft prompt's or the prefix's).
    pub fn n_virtual(&self) -> usize {
        let prompt = self.prompt.as_ref().map(|p| p.n_virtual);
        prompt
            .or(self.prefix.as_ref().map(|p| p.n_virtual))
            .unwrap_or(0)
    }
}

/// Optimization settings.
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    /// Rows per block: the longest sequence (with its virtual tokens) that fits, and how
    /// many tokens one forward/backward replay processes (a multiple of 32).
    pub rows: usize,
    /// AdamW (its `lr` is the base rate of the schedule).
    pub adam: AdamConfig,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Seed for shuffling data (initialization is the trainables' own).
    pub seed: u64,
    /// Weight of a distilled token's KL term relative to a predicted token's
    /// cross-entropy ([`Example::distill`]).
    pub distill_weight: f32,
    /// Weight alpha of a mixture of LoRA experts' load-balancing loss (Switch
    /// Transformer's `alpha * E * sum_e f_e P_e` per adapted layer: `f_e` the share of the
    /// block's tokens routed to expert `e`, `P_e` its mean router probability).
    pub balance_loss: f32,
    /// Weight of a mixture's router z-loss (ST-MoE's mean squared log-sum-exp of the
    /// router logits per adapted layer), which keeps the logits small.
    pub z_loss: f32,
    /// Scratch budgets.
    #[serde(skip)]
    pub budgets: Budgets,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            rows: 256,
            adam: AdamConfig {
                lr: 1e-4,
                weight_decay: 0.0,
                max_norm: 1.0,
                ..Default::default()
            },
            schedule: LrSchedule::Constant,
            seed: 0,
            distill_weight: 1.0,
            balance_loss: 0.01,
            z_loss: 0.0,
            budgets: Budgets::default(),
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    /// Updates applied so far (including this one unless skipped).
    pub step: u32,
    /// Mean loss over the scored tokens of the batch (before the update): cross-entropy,
    /// and for distilled tokens `distill_weight` times the KL divergence to the base.
    pub loss: f64,
    /// A mixture of LoRA experts' auxiliary losses (load balancing and router z-loss,
    /// summed over adapted layers), trained beside `loss`; 0 otherwise.
    pub aux_loss: f64,
    /// Global gradient norm (before clipping).
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Tokens scored.
    pub tokens: usize,
    /// Rows processed (tokens, virtual tokens and padding).
    pub rows: usize,
    /// Blocks of rows (forward/backward replays) in the step.
    pub blocks: usize,
    /// The loss or a gradient was not finite: the update was skipped and the parameters
    /// are unchanged.
    pub skipped: bool,
    /// Wall time of the step.
    pub secs: f64,
}

/// How a mixture of LoRA experts on one adapted layer routed the training tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpertLoad {
    /// Decoder layer.
    pub layer: usize,
    /// Adapted linear layer.
    pub target: Target,
    /// Token rows that chose each expert.
    pub counts: Vec<u32>,
}

/// Trains adapters of one base model on its device.
pub struct Trainer {
    model: Arc<Model>,
    config: TrainConfig,
    params: params::ParamStore,
    graph: graph::Graph,
    adam: AdamW,
    optimizer_ops: Vec<Dispatch>,
    zero_grad: Dispatch,
    norm: Tensor,
    lora: Option<(LoraConfig, Vec<(usize, Target)>)>,
    virt: Virtual,
    steps: u32,
    /// The learning-rate schedule's clock at step `clock.1` was `clock.0` (see
    /// [`Trainer::set_schedule_clock`]).
    clock: (u32, u32),
    base_name: String,
    reg: regularize::RegScratch,
    anchor: Option<regularize::Anchor>,
    /// EMA of the parameters: values, decay, update dispatches.
    ema: Option<(Tensor, f32, Vec<Dispatch>)>,
}

impl Trainer {
    /// Prepares training of `trainables` on `model`.
    pub fn new(model: Arc<Model>, trainables: Trainables, config: TrainConfig) -> Result<Trainer> {
        graph::check_rows(config.rows)?;
        let c = &model.config;
        let ctx = model.context().clone();
        let mut values = Vec::new();
        let mut lora = None;
        let mut base_name = String::new();
        for id in [
            trainables.lora.as_ref().and_then(|a| a.base_identity),
            trainables.prompt.as_ref().and_then(|p| p.base_identity),
            trainables.prefix.as_ref().and_then(|p| p.base_identity),
        ]
        .into_iter()
        .flatten()
        {
            if id != model.identity {
                return Err(Error::InvalidArgument(format!(
                    "the adapter to train was made for another base model (identity {id:016x}, this model is {:016x})",
                    model.identity
                )));
            }
        }
        if let Some(a) = &trainables.lora {
            base_name = a.base_name.clone();
            a.check_fits(c, "LoRA")?;
            if let Some(&(l, t)) = a.weights.keys().find(|&&(l, t)| {
                model.layers[l].moe().is_some()
                    && matches!(t, Target::Gate | Target::Up | Target::Down)
            }) {
                return Err(Error::Unsupported(format!(
                    "LoRA on {} of layer {l}, a Mixture-of-Experts block (its feed-forward is the experts; adapt q, k, v or o)",
                    t.module()
                )));
            }
            let mut keys = Vec::new();
            for (&(l, t), p) in &a.weights {
                let m = p.for_model(t, &model, a.config.width());
                values.push((ParamKey::LoraA(l, t), m.a));
                values.push((ParamKey::LoraB(l, t), m.b));
                if !m.router.is_empty() {
                    values.push((ParamKey::Router(l, t), m.router));
                }
                keys.push((l, t));
            }
            lora = Some((a.config.clone(), keys));
        }
        let virt = match (&trainables.prompt, &trainables.prefix) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "train a soft prompt or a prefix, not both".into(),
                ))
            }
            (Some(p), None) => {
                if p.values.len() != p.n_virtual * c.hidden {
                    return Err(Error::InvalidArgument(format!(
                        "soft prompt of {} values for {} tokens of {}",
                        p.values.len(),
                        p.n_virtual,
                        c.hidden
                    )));
                }
                values.push((ParamKey::Prompt, p.values.clone()));
                Virtual::Prompt(p.n_virtual)
            }
            (None, Some(p)) => {
                if p.layers.len() != c.n_layers
                    || p.layers
                        .iter()
                        .any(|l| l.len() != p.n_virtual * 2 * c.kv_dim())
                {
                    return Err(Error::InvalidArgument(
                        "prefix does not fit this model's layers".into(),
                    ));
                }
                for l in 0..c.n_layers {
                    values.push((ParamKey::Prefix(l), p.layer_for_model(l, &model, true)));
                }
                Virtual::Prefix(p.n_virtual)
            }
            (None, None) => Virtual::None,
        };
        let params = params::ParamStore::new(&ctx, values)?;
        let rope = RopeTable::new(&ctx, c.rope, config.rows.max(c.train_ctx.min(1 << 16)))?;
        for (name, v) in [
            ("balance loss", config.balance_loss),
            ("z-loss", config.z_loss),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::InvalidArgument(format!("{name} weight {v}")));
            }
        }
        let shape = lora.as_ref().map(|(lc, _)| graph::LoraShape {
            rank: lc.rank,
            scale: lc.scale(),
            experts: lc.experts,
            balance_loss: config.balance_loss,
            z_loss: config.z_loss,
        });
        let graph = graph::Graph::new(
            &model,
            &params,
            shape,
            virt,
            config.rows,
            &rope,
            config.budgets,
        )?;
        let norm = Tensor::zeros(&ctx, &[1], DType::F32)?;
        let part = Tensor::zeros(&ctx, &[grad_norm_scratch(params.n)], DType::F32)?;
        let adam = AdamW::new(
            &ctx,
            &params.param,
            &params.grad,
            &params.m,
            &params.v,
            &norm,
            params.n,
        )?;
        let mut optimizer_ops = grad_norm(&ctx, &norm, &part, &params.grad, params.n)?;
        optimizer_ops.push(adam.dispatch.clone());
        let zero_grad = fill(&ctx, &params.grad, 0.0, params.n)?;
        let reg = regularize::RegScratch::new(&ctx, params.n)?;
        Ok(Trainer {
            model,
            config,
            params,
            graph,
            adam,
            optimizer_ops,
            zero_grad,
            norm,
            lora,
            virt,
            steps: 0,
            clock: (0, 0),
            base_name,
            reg,
            anchor: None,
            ema: None,
        })
    }

    /// The base model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// Sets the weight of distilled tokens' KL divergence (`TrainConfig::distill_weight`)
    /// for the steps that follow: a continual learner balances each step's distilled rows
    /// against its new ones with it.
    pub fn set_distill_weight(&mut self, weight: f32) -> Result<()> {
        if !weight.is_finite() || weight < 0.0 {
            return Err(Error::InvalidArgument(format!("distill weight {weight}")));
        }
        self.config.distill_weight = weight;
        Ok(())
    }

    /// Sets where the learning-rate schedule stands: the next step uses the rate of
    /// schedule step `clock` (and the one after, `clock + 1`). A continual learner sets it
    /// to the steps its adapter's lineage has already taken, so a warmup happens once
    /// over the adapter's life, not again in every process. The optimizer's own step count
    /// (AdamW's bias correction, over its freshly zeroed moments) is not affected.
    pub fn set_schedule_clock(&mut self, clock: u32) {
        self.clock = (clock, self.steps);
    }

    /// Trainable values.
    pub fn n_params(&self) -> usize {
        self.params.n_params()
    }

    /// Dispatches of one block's forward + backward replay.
    pub fn dispatches_per_block(&self) -> usize {
        self.graph.train_ops.len()
    }

    /// Device bytes of parameters, optimizer state, activations and scratch.
    pub fn device_bytes(&self) -> u64 {
        self.params.bytes() + self.graph.bytes
    }

    /// Virtual tokens (soft prompt or prefix) in front of every sequence.
    pub fn virtual_tokens(&self) -> usize {
        self.virt.rows()
    }

    /// The data-shuffling seed.
    pub fn seed(&self) -> u64 {
        self.config.seed
    }

    /// Saves what is trained to `dir` in the PEFT layout, recording the base model: a
    /// LoRA adapter, soft prompt or prefix alone goes to `dir`; several go to `dir/lora`,
    /// `dir/prompt` and `dir/prefix`. Every file is written atomically. Returns the
    /// directories written.
    pub fn save(&self, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
        let model = &self.model;
        let (lora, prompt, prefix) = (self.lora()?, self.soft_prompt()?, self.prefix()?);
        let several = lora.is_some() as u8 + prompt.is_some() as u8 + prefix.is_some() as u8 > 1;
        let sub = |name: &str| {
            if several {
                dir.join(name)
            } else {
                dir.to_path_buf()
            }
        };
        let mut saved = Vec::new();
        if let Some(a) = lora {
            a.save(&sub("lora"), model)?;
            saved.push(sub("lora"));
        }
        if let Some(p) = prompt {
            p.save(&sub("prompt"), model)?;
            saved.push(sub("prompt"));
        }
        if let Some(p) = prefix {
            p.save(&sub("prefix"), model)?;
            saved.push(sub("prefix"));
        }
        Ok(saved)
    }

    /// Sets the base learning rate (the schedule multiplies it).
    pub fn set_lr(&mut self, lr: f32) {
        self.config.adam.lr = lr;
    }

    /// Writes block `p`'s inputs: `weight` scales each scored token's loss, `route_weight`
    /// each token row's share of a mixture's auxiliary losses.
    fn write_block(&self, p: &batch::Packed, weight: f32, route_weight: f32) -> Result<()> {
        let ctx = self.model.context();
        let vocab = self.model.config.vocab as u32;
        if let Some(&bad) = p.ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let inp = &self.graph.inputs;
        let distill = weight * self.config.distill_weight;
        let w: Vec<f32> = p
            .targets
            .iter()
            .map(|&t| match t {
                batch::NONE => 0.0,
                batch::DISTILL => distill,
                _ => weight,
            })
            .collect();
        inp.ids.write(ctx, &p.ids)?;
        inp.pos.write(ctx, &p.pos)?;
        inp.targets.write(ctx, &p.targets)?;
        inp.weights.write(ctx, &w)?;
        inp.ranges.write(ctx, &p.ranges)?;
        inp.virt.write(ctx, &p.virt)?;
        if self.graph.mix.is_some() {
            inp.route_w.write(ctx, &route_weights(p, route_weight))?;
        }
        Ok(())
    }

    fn blocks(&self, examples: &[Example]) -> Result<(Vec<batch::Packed>, usize)> {
        let blocks = pack(examples, self.config.rows, self.virt)?;
        if blocks.iter().any(|b| b.has_distill()) && self.graph.distill_train_ops.is_empty() {
            return Err(Error::InvalidArgument(
                "distilled examples need a LoRA adapter to train (without a soft prompt or prefix)"
                    .into(),
            ));
        }
        let n: usize = blocks.iter().map(|b| b.n_targets()).sum();
        if n == 0 {
            return Err(Error::InvalidArgument(
                "the batch has no scored tokens (every label is masked)".into(),
            ));
        }
        Ok((blocks, n))
    }

    /// The dispatches that replay block `b` (`train`: with the backward; with the base
    /// model's forward first when the block has distilled rows).
    fn ops_for(&self, b: &batch::Packed, train: bool) -> &[Dispatch] {
        let g = &self.graph;
        match (train, b.has_distill()) {
            (false, false) => &g.eval_ops,
            (true, false) => &g.train_ops,
            (false, true) => &g.distill_eval_ops,
            (true, true) => &g.distill_train_ops,
        }
    }

    /// Runs every block (`train`: with the backward) and returns the summed loss.
    async fn replay(&self, blocks: &[batch::Packed], n: usize, train: bool) -> Result<f64> {
        let ctx = self.model.context();
        let mut loss = 0.0f64;
        let tokens: usize = blocks.iter().map(batch::Packed::n_tokens).sum();
        for b in blocks {
            self.write_block(b, 1.0 / n as f32, 1.0 / tokens.max(1) as f32)?;
            ctx.run(self.ops_for(b, train))?;
            loss += self
                .graph
                .loss
                .read_f32_async(ctx)
                .await?
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>();
        }
        Ok(loss)
    }

    /// Mean loss of `examples` with the current parameters (no update).
    pub fn evaluate(&self, examples: &[Example]) -> Result<f64> {
        blocking("Trainer::evaluate", self.evaluate_async(examples))
    }

    /// [`Trainer::evaluate`], awaiting the device (the form the browser needs).
    pub async fn evaluate_async(&self, examples: &[Example]) -> Result<f64> {
        let (blocks, n) = self.blocks(examples)?;
        self.replay(&blocks, n, false).await
    }

    /// One optimizer step on `examples` (packed into as many blocks as needed; their
    /// gradients accumulate into one update). A non-finite loss or gradient skips the
    /// update and leaves every parameter and moment unchanged.
    pub fn step(&mut self, examples: &[Example]) -> Result<StepStats> {
        blocking("Trainer::step", self.step_async(examples))
    }

    /// [`Trainer::step`], awaiting the device (the form the browser needs).
    pub async fn step_async(&mut self, examples: &[Example]) -> Result<StepStats> {
        let t0 = Instant::now();
        let ctx = self.model.context().clone();
        let (blocks, n) = self.blocks(examples)?;
        ctx.submit(std::slice::from_ref(&self.zero_grad));
        if let Some((stats, _)) = &self.graph.mix {
            stats.loss.write(&ctx, &vec![0.0f32; stats.loss.numel()])?;
        }
        let loss = self.replay(&blocks, n, true).await?;
        if let Some(a) = &self.anchor {
            ctx.submit(&a.ops);
        }
        let aux_loss = match &self.graph.mix {
            Some((stats, _)) => stats
                .loss
                .read_f32_async(&ctx)
                .await?
                .iter()
                .map(|&v| v as f64)
                .sum(),
            None => 0.0,
        };
        let clock = self.clock.0.saturating_add(self.steps - self.clock.1);
        let lr = (self.config.adam.lr as f64 * self.config.schedule.factor(clock)) as f32;
        let adam = AdamConfig {
            lr,
            ..self.config.adam
        };
        self.adam.set_step(&ctx, &adam, self.steps + 1);
        ctx.run(&self.optimizer_ops)?;
        let grad_norm = self.norm.read_f32_async(&ctx).await?[0];
        let skipped = !grad_norm.is_finite() || !loss.is_finite() || !aux_loss.is_finite();
        if !skipped {
            self.steps += 1;
            if let Some((_, _, ops)) = &self.ema {
                ctx.submit(ops);
            }
        }
        Ok(StepStats {
            step: self.steps,
            loss,
            aux_loss,
            grad_norm,
            lr,
            tokens: n,
            rows: blocks.len() * self.config.rows,
            blocks: blocks.len(),
            skipped,
            secs: t0.elapsed().as_secs_f64(),
        })
    }

    /// Runs one block of `examples` forward and backward dispatch by dispatch and returns
    /// the time per kernel as (name, count, seconds), slowest first (profiling only).
    pub fn profile(&self, examples: &[Example]) -> Result<Vec<(String, usize, f64)>> {
        let (blocks, n) = self.blocks(examples)?;
        let tokens = blocks[0].n_tokens().max(1) as f32;
        self.write_block(&blocks[0], 1.0 / n as f32, 1.0 / tokens)?;
        self.model.context().profile(self.ops_for(&blocks[0], true))
    }

    /// A mixture of LoRA experts' load: per adapted (layer, target), how many token rows
    /// chose each expert in the training steps since the start or the last
    /// [`Trainer::reset_expert_load`]. Empty without a mixture.
    pub fn expert_load(&self) -> Result<Vec<ExpertLoad>> {
        let Some((stats, slots)) = &self.graph.mix else {
            return Ok(Vec::new());
        };
        let counts = stats.counts.read_u32(self.model.context())?;
        let e = counts.len() / slots.len().max(1);
        Ok(slots
            .iter()
            .zip(counts.chunks(e.max(1)))
            .map(|(&(layer, target), c)| ExpertLoad {
                layer,
                target,
                counts: c.to_vec(),
            })
            .collect())
    }

    /// Zeroes the counters [`Trainer::expert_load`] reads.
    pub fn reset_expert_load(&self) -> Result<()> {
        if let Some((stats, _)) = &self.graph.mix {
            stats
                .counts
                .write(self.model.context(), &vec![0u32; stats.counts.numel()])?;
        }
        Ok(())
    }

    /// The gradients of the last step (host copies, model order), for tests and tools.
    pub fn gradients(&self) -> Result<HashMap<ParamKey, Vec<f32>>> {
        self.params.read_gradients(self.model.context())
    }

    /// Pulls the parameters toward their current values from now on: L2 with strength
    /// `lambda` (`grad += lambda (theta - theta_now)`), or, with `fisher_batches`, EWC: the
    /// pull weighted per parameter by the diagonal empirical Fisher of those batches (mean
    /// squared gradient, normalized to mean 1), estimated here on the GPU. `lambda = 0`
    /// removes the pull.
    pub fn anchor_here(&mut self, lambda: f32, fisher_batches: &[Vec<Example>]) -> Result<()> {
        let ctx = self.model.context().clone();
        if lambda == 0.0 {
            self.anchor = None;
            return Ok(());
        }
        let n = self.params.n;
        let values = Tensor::zeros(&ctx, &[n], DType::F32)?;
        ctx.run(&[crate::kernels::elementwise::unary(
            &ctx,
            crate::kernels::elementwise::UnaryOp::Copy,
            &values,
            Some(&self.params.param),
            n,
        )?])?;
        let fisher = if fisher_batches.is_empty() {
            None
        } else {
            let f = Tensor::zeros(&ctx, &[n], DType::F32)?;
            let acc = self.reg.square_add(&ctx, &self.params.grad, &f)?;
            for b in fisher_batches {
                let (blocks, count) = self.blocks(b)?;
                ctx.submit(std::slice::from_ref(&self.zero_grad));
                blocking("Trainer::anchor_here", self.replay(&blocks, count, true))?;
                ctx.run(&acc)?;
            }
            let mut host = f.read_f32(&ctx)?;
            let mean = host.iter().map(|&v| v as f64).sum::<f64>() / self.params.n_params() as f64;
            if !(mean.is_finite() && mean > 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "the Fisher estimate's mean is {mean}: the batches give no gradient"
                )));
            }
            host.iter_mut().for_each(|v| *v = (*v as f64 / mean) as f32);
            f.write(&ctx, &host)?;
            ctx.submit(std::slice::from_ref(&self.zero_grad));
            Some(f)
        };
        let ops = self.reg.pull(
            &ctx,
            &self.params.param,
            &self.params.grad,
            &values,
            fisher.as_ref(),
            lambda,
        )?;
        self.anchor = Some(regularize::Anchor {
            values,
            fisher,
            lambda,
            ops,
        });
        Ok(())
    }

    /// Keeps an exponential moving average of the parameters (`ema = beta ema + (1 - beta)
    /// theta` after every update), starting from their current values; `None` stops it.
    pub fn set_ema(&mut self, beta: Option<f32>) -> Result<()> {
        let Some(beta) = beta else {
            self.ema = None;
            return Ok(());
        };
        let ctx = self.model.context().clone();
        let n = self.params.n;
        let ema = Tensor::zeros(&ctx, &[n], DType::F32)?;
        ctx.run(&[crate::kernels::elementwise::unary(
            &ctx,
            crate::kernels::elementwise::UnaryOp::Copy,
            &ema,
            Some(&self.params.param),
            n,
        )?])?;
        let ops = self.reg.ema(&ctx, &ema, &self.params.param, beta)?;
        self.ema = Some((ema, beta, ops));
        Ok(())
    }

    /// The EMA of the LoRA adapter ([`Trainer::set_ema`]), if one is kept.
    pub fn lora_ema(&self) -> Result<Option<LoraAdapter>> {
        match &self.ema {
            Some((ema, _, _)) => {
                let vals = self.params.read_from(self.model.context(), ema)?;
                self.lora_from(vals)
            }
            None => Ok(None),
        }
    }

    /// Replaces the LoRA parameters with `adapter`'s (same shape), resetting the optimizer's
    /// moments and the EMA (a rollback to an earlier version).
    pub fn set_lora(&mut self, adapter: &LoraAdapter) -> Result<()> {
        let Some((config, keys)) = &self.lora else {
            return Err(Error::InvalidArgument("this trainer trains no LoRA".into()));
        };
        if adapter.config.width() != config.width() || adapter.config.experts != config.experts {
            return Err(Error::InvalidArgument(
                "the adapter's rank or experts differ from the trained one".into(),
            ));
        }
        adapter.check_fits(&self.model.config, "LoRA")?;
        let mut vals = self.params.read(self.model.context())?;
        for &(l, t) in keys {
            let p = adapter.weights.get(&(l, t)).ok_or_else(|| {
                Error::InvalidArgument(format!("the adapter lacks layer {l} {}", t.module()))
            })?;
            let m = p.for_model(t, &self.model, config.width());
            vals.insert(ParamKey::LoraA(l, t), m.a);
            vals.insert(ParamKey::LoraB(l, t), m.b);
            if !m.router.is_empty() {
                vals.insert(ParamKey::Router(l, t), m.router);
            }
        }
        self.params.write(self.model.context(), &vals)?;
        let beta = self.ema.as_ref().map(|e| e.1);
        self.set_ema(beta)
    }

    /// The trained LoRA adapter (HF row order, recording the base model).
    pub fn lora(&self) -> Result<Option<LoraAdapter>> {
        blocking("Trainer::lora", self.lora_async())
    }

    /// [`Trainer::lora`], awaiting the device (the form the browser needs).
    pub async fn lora_async(&self) -> Result<Option<LoraAdapter>> {
        let vals = self.params.read_async(self.model.context()).await?;
        self.lora_from(vals)
    }

    fn lora_from(&self, vals: HashMap<ParamKey, Vec<f32>>) -> Result<Option<LoraAdapter>> {
        let Some((config, keys)) = &self.lora else {
            return Ok(None);
        };
        let c = &self.model.config;
        let mut weights = std::collections::BTreeMap::new();
        let width = config.width();
        for &(l, t) in keys {
            let a = vals[&ParamKey::LoraA(l, t)].clone();
            let mut b = vals[&ParamKey::LoraB(l, t)].clone();
            let router = vals
                .get(&ParamKey::Router(l, t))
                .cloned()
                .unwrap_or_default();
            if self.model.qk_permuted {
                match t {
                    Target::Q => b = unpermute_rows(&b, c.n_heads, width),
                    Target::K => b = unpermute_rows(&b, c.n_kv_heads, width),
                    _ => {}
                }
            }
            weights.insert((l, t), LoraPair { a, b, router });
        }
        Ok(Some(LoraAdapter {
            config: config.clone(),
            weights,
            base_identity: Some(self.model.identity),
            base_name: if self.base_name.is_empty() {
                self.model.config.name.clone()
            } else {
                self.base_name.clone()
            },
        }))
    }

    /// The trained soft prompt.
    pub fn soft_prompt(&self) -> Result<Option<SoftPrompt>> {
        let Virtual::Prompt(n) = self.virt else {
            return Ok(None);
        };
        let mut vals = self.params.read(self.model.context())?;
        Ok(Some(SoftPrompt {
            n_virtual: n,
            values: vals.remove(&ParamKey::Prompt).unwrap_or_default(),
            base_identity: Some(self.model.identity),
        }))
    }

    /// The trained prefix (HF head-dimension order).
    pub fn prefix(&self) -> Result<Option<Prefix>> {
        let Virtual::Prefix(n) = self.virt else {
            return Ok(None);
        };
        let mut vals = self.params.read(self.model.context())?;
        let model_order = Prefix {
            n_virtual: n,
            layers: (0..self.model.config.n_layers)
                .map(|l| vals.remove(&ParamKey::Prefix(l)).unwrap_or_default())
                .collect(),
            base_identity: Some(self.model.identity),
        };
        let layers = (0..self.model.config.n_layers)
            .map(|l| model_order.layer_for_model(l, &self.model, false))
            .collect();
        Ok(Some(Prefix {
            layers,
            ..model_order
        }))
    }
}

/// Per-row weights of a mixture's auxiliary losses: `w` on token rows, 0 on virtual and
/// padding rows.
fn route_weights(p: &batch::Packed, w: f32) -> Vec<f32> {
    p.virt
        .iter()
        .enumerate()
        .map(|(r, &v)| {
            if r < p.used && v == batch::NONE {
                w
            } else {
                0.0
            }
        })
        .collect()
}
