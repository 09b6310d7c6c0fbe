//! Ember in the browser.
//!
//! [`Engine`] is what the web page drives: it loads a GGUF model from bytes (the page reads
//! the user's file or fetches one from its own server), streams generated text, and trains
//! a LoRA adapter on a few examples with the same WGSL kernels as the native runtime. It
//! awaits the device at every readback instead of blocking, as the browser requires, and is
//! plain Rust: the native tests drive it with `pollster` on the tiny models, and the
//! `wasm-bindgen` layer (`bindings`, wasm32 only) only converts arguments for JavaScript.
//!
//! Build and try it: `scripts/test-web.sh --serve` (see examples/web/README.md).
// The runtime's API shares models as `Arc`s; in the browser wgpu's objects are not Send.
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]

use std::sync::Arc;

use ember::adapters::{LoraAdapter, LoraConfig, Target};
use ember::kernels::train::AdamConfig;
use ember::model::{LoadOptions, Model};
use ember::session::{AdapterId, GenerateOptions, SamplerConfig, Session, SessionParams};
use ember::tokenizer::ChatMessage;
use ember::train::{Dataset, LrSchedule, StepStats, TrainConfig, Trainables, Trainer};
use ember::{Context, ContextOptions, Error, Result};
use serde_json::{json, Value};

#[cfg(target_arch = "wasm32")]
mod bindings;

/// Tokens of context the page's session holds (prompt and answer together).
pub const CONTEXT_TOKENS: usize = 512;

/// A loaded model with one generation session and, once trained, a LoRA adapter.
pub struct Engine {
    model: Arc<Model>,
    session: Session,
    /// The adapter trained so far, and its id in the session.
    adapter: Option<(Arc<LoraAdapter>, AdapterId)>,
}

/// What [`Engine::generate`] is asked for.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt text.
    pub prompt: String,
    /// Tokens to produce at most.
    pub max_tokens: usize,
    /// Wrap the prompt as a user turn of the model's chat template.
    pub chat: bool,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Use the trained adapter, when there is one.
    pub use_adapter: bool,
}

/// What [`Engine::train`] is asked for.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// Training data: JSONL records (`{"messages": [...]}`, `{"prompt", "completion"}` or
    /// `{"text"}`, as `ember finetune` reads them).
    pub jsonl: String,
    /// Optimizer steps.
    pub steps: u32,
    /// Sequences per step.
    pub batch_size: usize,
    /// Learning rate (constant; AdamW without weight decay, gradients clipped to norm 1).
    pub lr: f32,
    /// LoRA rank (on every projection; alpha = 2 × rank).
    pub rank: usize,
    /// Tokens per training row (longer examples are cut).
    pub seq: usize,
    /// Seed of the adapter's initialization and of the batch order.
    pub seed: u64,
}

impl Engine {
    /// Opens the GPU (the browser's WebGPU adapter on the web), loads the GGUF model in
    /// `bytes` and makes a session. `name` stands for the file in error messages;
    /// `progress` gets the fraction loaded.
    pub async fn load(bytes: Vec<u8>, name: &str, progress: &mut dyn FnMut(f32)) -> Result<Engine> {
        let ctx = Context::with_options_async(ContextOptions::default()).await?;
        let mut tick = |f: f32| {
            progress(f);
            true
        };
        let opts = LoadOptions {
            progress: Some(&mut tick),
            ..LoadOptions::default()
        };
        let model = Arc::new(Model::from_gguf_bytes(&ctx, bytes, name, opts)?);
        let session = Session::new(
            model.clone(),
            SessionParams {
                n_ctx: CONTEXT_TOKENS,
                n_seq: 1,
                n_batch: 128,
                kv_budget: 0,
            },
        )?;
        Ok(Engine {
            model,
            session,
            adapter: None,
        })
    }

    /// The device and the model, for the page to show.
    pub fn info(&self) -> Value {
        let ctx = self.model.context();
        let i = ctx.info();
        let caps = ctx.caps();
        json!({
            "adapter": i.name,
            "backend": i.backend,
            "driver": i.driver,
            "f16": caps.f16,
            "subgroups": caps.subgroups,
            "variant": format!("{:?}", self.model.variant).to_lowercase(),
            "model": self.model.config.name,
            "params": self.model.n_params(),
            "weights_mb": self.model.weight_bytes() as f64 / (1 << 20) as f64,
            "n_ctx": self.session.params().n_ctx,
            "trained": self.adapter.is_some(),
        })
    }

    /// Generates a continuation of `req.prompt`, handing each new piece of text to
    /// `on_text` as it comes; returns the text, the prompt's and the new token ids, why it
    /// stopped and the time taken.
    pub async fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Value> {
        let tok = &self.model.tokenizer;
        let text = if req.chat {
            tok.apply_chat_template(
                &[ChatMessage {
                    role: "user".into(),
                    content: req.prompt.clone(),
                }],
                true,
            )?
        } else {
            req.prompt.clone()
        };
        let ids = tok.encode(&text, true, true)?;
        let sampler = if req.temperature > 0.0 {
            SamplerConfig {
                temperature: req.temperature,
                ..SamplerConfig::default()
            }
        } else {
            SamplerConfig::greedy()
        };
        let mut cb = |_: u32, piece: &str| {
            on_text(piece);
            true
        };
        let adapter = match (&self.adapter, req.use_adapter) {
            (Some((_, id)), true) => Some((*id, 1.0)),
            _ => None,
        };
        let g = self
            .session
            .generate_async(
                &ids,
                GenerateOptions {
                    sampler,
                    max_tokens: req.max_tokens,
                    on_token: Some(&mut cb),
                    adapter,
                    ..GenerateOptions::default()
                },
            )
            .await?;
        Ok(json!({
            "text": g.text,
            "prompt_ids": ids,
            "tokens": g.tokens,
            "stop": g.stop,
            "adapter": adapter.is_some(),
            "prefill_secs": g.prefill_secs,
            "decode_secs": g.decode_secs,
            "prefill_tok_s": g.prompt_tokens as f64 / g.prefill_secs.max(1e-9),
            "decode_tok_s": g.tokens.len().saturating_sub(1) as f64 / g.decode_secs.max(1e-9),
        }))
    }

    /// Trains the LoRA adapter (a new one, or the one trained before) on `req.jsonl` and
    /// attaches the result to the session; `on_step` sees each step. Returns the losses.
    pub async fn train(
        &mut self,
        req: &TrainRequest,
        on_step: &mut dyn FnMut(&StepStats),
    ) -> Result<Value> {
        if req.steps == 0 || req.batch_size == 0 || req.rank == 0 || req.seq < 2 {
            return Err(Error::InvalidArgument(
                "training needs steps, batch size and rank of at least 1 and seq of at least 2"
                    .into(),
            ));
        }
        // Refuses text without records ("no training records").
        let data = Dataset::from_jsonl(&req.jsonl, &self.model.tokenizer, req.seq)?;
        let lora = match &self.adapter {
            Some((a, _)) => (**a).clone(),
            None => {
                let config = LoraConfig::new(req.rank, 2.0 * req.rank as f32, Target::ALL.to_vec());
                let mut a = LoraAdapter::init(&self.model.config, config, req.seed)?;
                a.base_identity = Some(self.model.identity);
                a.base_name = self.model.config.name.clone();
                a
            }
        };
        let config = TrainConfig {
            rows: req.seq,
            // As `ember finetune` trains by default: gradients clipped to norm 1.
            adam: AdamConfig {
                lr: req.lr,
                max_norm: 1.0,
                ..AdamConfig::default()
            },
            schedule: LrSchedule::Constant,
            seed: req.seed,
            ..TrainConfig::default()
        };
        let trainables = Trainables {
            lora: Some(lora),
            ..Trainables::default()
        };
        let mut trainer = Trainer::new(self.model.clone(), trainables, config)?;
        let mut losses = Vec::new();
        let mut secs = 0.0;
        let mut step = 0u32;
        let mut epoch = 0u64;
        while step < req.steps {
            for batch in data.epoch(req.batch_size, req.seed, epoch) {
                if step == req.steps {
                    break;
                }
                let s = trainer.step_async(&batch).await?;
                on_step(&s);
                losses.push(s.loss);
                secs += s.secs;
                step += 1;
            }
            epoch += 1;
        }
        let adapter = Arc::new(
            trainer
                .lora_async()
                .await?
                .ok_or_else(|| Error::Internal("the trainer holds no LoRA".into()))?,
        );
        drop(trainer);
        let id = match &self.adapter {
            Some((_, id)) => {
                self.session.replace_adapter(*id, adapter.clone())?;
                *id
            }
            None => self.session.attach_adapter("web", adapter.clone())?,
        };
        self.adapter = Some((adapter, id));
        Ok(json!({
            "losses": losses,
            "steps": req.steps,
            "examples": data.examples.len(),
            "tokens": data.n_targets(),
            "secs": secs,
        }))
    }

    /// Runs every inference kernel family on random data against its CPU reference on this
    /// device (`ember selfcheck`): in the browser, proof that the browser's WGSL compiler
    /// takes the kernels and that they compute right. Returns the report (`checks`: kernel,
    /// variant, max_error, tolerance, ok).
    pub async fn selfcheck(&self) -> Result<Value> {
        let r = ember::kernels::selfcheck::run_async(self.model.context()).await?;
        serde_json::to_value(r).map_err(|e| Error::Internal(format!("selfcheck report: {e}")))
    }

    /// Drops the trained adapter: generation is the base model's again.
    pub fn forget(&mut self) -> Result<()> {
        if let Some((_, id)) = self.adapter.take() {
            self.session.detach_adapter(id)?;
        }
        Ok(())
    }
}
