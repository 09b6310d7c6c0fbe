//! Commands that teach a model: finetune (LoRA, soft prompt or prefix on a JSONL dataset)
//! and bench-train (training speed and memory).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use ember::adapters::lora::LoraExperts;
use ember::adapters::{LoraAdapter, LoraConfig, Prefix, SoftPrompt, Target};
use ember::kernels::train::AdamConfig;
use ember::model::Model;
use ember::train::{Dataset, Example, LrSchedule, TrainConfig, Trainables, Trainer};
use ember::util::Rng;
use ember::{Context, Error, Result};
use serde_json::json;

use crate::model_cmds::{
    attach_adapters, generate_text, load_model, peak_rss_mb, session, ModelArgs,
};

/// What to train and how.
#[derive(Args, Clone)]
pub struct AdapterArgs {
    /// LoRA rank (0: no LoRA).
    #[arg(long = "lora-rank", default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (default: twice the rank).
    #[arg(long = "lora-alpha")]
    pub alpha: Option<f32>,
    /// Scale by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank.
    #[arg(long)]
    pub rslora: bool,
    /// Adapted projections, comma-separated (q,k,v,o,gate,up,down or all).
    #[arg(long = "lora-targets", default_value = "all")]
    pub targets: String,
    /// Train a mixture of this many LoRA experts (each of --lora-rank) behind a router on
    /// every adapted layer instead of one LoRA pair (0: plain LoRA).
    #[arg(long = "lora-experts", default_value_t = 0)]
    pub experts: usize,
    /// Experts each token uses in a mixture.
    #[arg(long = "lora-top-k", default_value_t = 2)]
    pub top_k: usize,
    /// Keep a chosen expert's softmax-over-all gate (Switch Transformer) instead of
    /// renormalizing the chosen gates to sum to 1 (use with --lora-top-k 1).
    #[arg(long = "switch-gates")]
    pub switch_gates: bool,
    /// Train a soft prompt of this many virtual tokens.
    #[arg(long = "prompt-tokens", default_value_t = 0)]
    pub prompt_tokens: usize,
    /// Train a prefix of this many virtual tokens (per-layer keys and values).
    #[arg(long = "prefix-tokens", default_value_t = 0)]
    pub prefix_tokens: usize,
    /// Continue training this LoRA adapter (PEFT directory) instead of a fresh one.
    #[arg(long = "init-adapter")]
    pub init_adapter: Option<PathBuf>,
    /// Rows per block: the longest sequence, in tokens (a multiple of 32).
    #[arg(long = "seq", default_value_t = 256)]
    pub seq: usize,
    /// Random seed (initialization and shuffling).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl AdapterArgs {
    /// The LoRA targets these options name.
    pub fn target_list(&self) -> Result<Vec<Target>> {
        self.targets()
    }

    fn targets(&self) -> Result<Vec<Target>> {
        if self.targets == "all" || self.targets == "all-linear" {
            return Ok(Target::ALL.to_vec());
        }
        self.targets
            .split(',')
            .map(|t| {
                let t = t.trim();
                let name = if t.ends_with("_proj") {
                    t.to_string()
                } else {
                    format!("{t}_proj")
                };
                Target::parse(&name)
            })
            .collect()
    }

    /// The trainables these options describe, initialized for `model`.
    pub fn trainables(&self, model: &Model) -> Result<Trainables> {
        let mut t = Trainables::default();
        if let Some(dir) = &self.init_adapter {
            t.lora = Some(LoraAdapter::load(dir, model)?);
        } else if self.rank > 0 {
            let config = LoraConfig {
                rank: self.rank,
                alpha: self.alpha.unwrap_or(2.0 * self.rank as f32),
                rslora: self.rslora,
                targets: self.targets()?,
                experts: (self.experts > 0).then_some(LoraExperts {
                    n_experts: self.experts,
                    top_k: self.top_k,
                    renormalize: !self.switch_gates,
                }),
            };
            let mut a = LoraAdapter::init(&model.config, config, self.seed)?;
            a.base_identity = Some(model.identity);
            a.base_name = model.config.name.clone();
            t.lora = Some(a);
        }
        if self.prompt_tokens > 0 {
            // Start from real token embeddings (PEFT's TEXT init): faster than noise.
            let ids = model
                .tokenizer
                .encode("Answer the question accurately.", false, false)?;
            t.prompt = Some(SoftPrompt::from_tokens(model, &ids, self.prompt_tokens)?);
        }
        if self.prefix_tokens > 0 {
            t.prefix = Some(Prefix::random(
                &model.config,
                self.prefix_tokens,
                self.seed,
            )?);
        }
        if t.lora.is_none() && t.prompt.is_none() && t.prefix.is_none() {
            return Err(Error::InvalidArgument(
                "nothing to train: give --lora-rank, --prompt-tokens or --prefix-tokens".into(),
            ));
        }
        Ok(t)
    }
}

#[derive(Args)]
pub struct FinetuneArgs {
    /// Base model: a GGUF file or an HF model directory (frozen, in its stored format).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Training data: JSONL ({"messages"}, {"prompt","completion"} or {"text"}) or plain text.
    /// Repeatable: the files are mixed (e.g. new facts plus replay text that keeps the
    /// model's general ability).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Text the model should keep handling as the base model does (same formats as
    /// --data; repeatable): mixed in, its scored tokens learn the frozen base model's whole
    /// next-token distribution (KL divergence), which keeps general ability while new facts
    /// are learned. Records of --data files may also say "distill": true.
    #[arg(long)]
    distill: Vec<PathBuf>,
    /// Weight of a distilled token's KL term relative to a data token's cross-entropy.
    #[arg(long = "distill-weight", default_value_t = 1.0)]
    distill_weight: f32,
    /// Output directory for the adapter (PEFT layout; LoRA in DIR, or DIR/prompt, DIR/prefix).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Optimizer steps (default: one epoch).
    #[arg(long)]
    steps: Option<u32>,
    /// Sequences per optimizer step.
    #[arg(long = "batch-size", default_value_t = 8)]
    batch_size: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Learning-rate schedule: cosine, constant or warmup-constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Warmup steps (default: 5% of the steps).
    #[arg(long)]
    warmup: Option<u32>,
    /// AdamW weight decay.
    #[arg(long = "weight-decay", default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip gradients to this global norm (0: off).
    #[arg(long = "max-grad-norm", default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Weight alpha of a mixture's load-balancing loss (Switch: alpha E sum_e f_e P_e).
    #[arg(long = "balance-loss", default_value_t = 0.01)]
    balance_loss: f32,
    /// Weight of a mixture's router z-loss (mean squared log-sum-exp of router logits).
    #[arg(long = "z-loss", default_value_t = 0.0)]
    z_loss: f32,
    /// Print one JSON object per step and a summary instead of a progress bar.
    #[arg(long)]
    json: bool,
}

pub fn run_finetune(a: FinetuneArgs) -> Result<()> {
    let ctx = Context::new()?;
    let model = load_model(&ctx, &a.model)?;
    let t = a.adapter.trainables(&model)?;
    let virt = t.n_virtual();
    let max_tokens = a.adapter.seq.saturating_sub(virt);
    let mut data = Dataset::default();
    for path in &a.data {
        data.extend(Dataset::load(path, &model.tokenizer, max_tokens)?);
    }
    for path in &a.distill {
        data.extend(Dataset::load(path, &model.tokenizer, max_tokens)?.distilled());
    }
    let per_epoch = data.examples.len().div_ceil(a.batch_size.max(1)) as u32;
    let steps = a.steps.unwrap_or(per_epoch).max(1);
    let warmup = a.warmup.unwrap_or(steps / 20);
    let config = TrainConfig {
        rows: a.adapter.seq,
        adam: AdamConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            max_norm: a.max_grad_norm,
            ..Default::default()
        },
        schedule: LrSchedule::parse(&a.schedule, warmup, steps)?,
        seed: a.adapter.seed,
        distill_weight: a.distill_weight,
        balance_loss: a.balance_loss,
        z_loss: a.z_loss,
        ..Default::default()
    };
    let mut tr = Trainer::new(model.clone(), t, config)?;
    if !a.json {
        eprintln!(
            "training {} parameters on {} sequences ({} scored tokens{}), {steps} steps of {} sequences",
            tr.n_params(),
            data.examples.len(),
            data.n_targets(),
            if data.truncated > 0 {
                format!(", {} truncated to {max_tokens} tokens", data.truncated)
            } else {
                String::new()
            },
            a.batch_size
        );
    }
    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(steps as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps | {msg} | {elapsed} (ETA {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let (mut tokens, mut rows, mut skipped, mut last_loss, mut first_loss) =
        (0usize, 0usize, 0, f64::NAN, f64::NAN);
    let mut epoch = 0u64;
    let mut done = 0u32;
    'outer: loop {
        for b in data.epoch(a.batch_size, a.adapter.seed, epoch) {
            if done == steps {
                break 'outer;
            }
            let s = tr.step(&b)?;
            done += 1;
            tokens += b.iter().map(|e| e.tokens.len()).sum::<usize>();
            rows += s.rows;
            skipped += s.skipped as u32;
            last_loss = s.loss;
            if first_loss.is_nan() {
                first_loss = s.loss;
            }
            let tok_s = tokens as f64 / t0.elapsed().as_secs_f64();
            if a.json {
                println!(
                    "{}",
                    json!({"step": done, "epoch": epoch, "loss": s.loss, "aux_loss": s.aux_loss,
                           "grad_norm": s.grad_norm, "lr": s.lr, "skipped": s.skipped,
                           "tokens_per_s": tok_s, "secs": s.secs})
                );
            } else {
                bar.set_message(format!("loss {:.4} | {:.0} tok/s", s.loss, tok_s));
                bar.inc(1);
            }
        }
        epoch += 1;
    }
    bar.finish_and_clear();
    let saved = tr.save(&a.out)?;
    let secs = t0.elapsed().as_secs_f64();
    let load = tr.expert_load()?;
    let mut summary = json!({
        "model": a.model, "data": a.data, "distill": a.distill, "distill_weight": a.distill_weight, "out": saved,
        "steps": done, "skipped_steps": skipped, "epochs": epoch as f64 + 0.0,
        "first_loss": first_loss, "final_loss": last_loss,
        "tokens": tokens, "rows": rows, "tokens_per_s": tokens as f64 / secs, "secs": secs,
        "trainable_params": tr.n_params(), "gpu_mb": (tr.device_bytes() + model.weight_bytes()) as f64 / 1e6,
        "peak_rss_mb": peak_rss_mb(),
        "device": ctx.info().name, "backend": ctx.info().backend,
    });
    if !load.is_empty() {
        summary["expert_load"] = json!(load);
    }
    if a.json {
        println!("{summary}");
    } else {
        print_expert_load(&load);
        eprintln!(
            "loss {first_loss:.4} -> {last_loss:.4} in {done} steps, {:.1} s ({:.0} tokens/s); saved {}",
            secs,
            tokens as f64 / secs,
            saved
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// A mixture's routing during training: per adapted layer, each expert's share of the
/// choices (1/E is fair).
fn print_expert_load(load: &[ember::train::ExpertLoad]) {
    if load.is_empty() {
        return;
    }
    eprintln!("expert load (share of the choices per adapted layer):");
    for l in load {
        let total = l.counts.iter().sum::<u32>().max(1) as f64;
        let shares: Vec<String> = l
            .counts
            .iter()
            .map(|&c| format!("{:5.1}%", 100.0 * c as f64 / total))
            .collect();
        eprintln!(
            "  layer {:3} {:>9}: {}",
            l.layer,
            l.target.module(),
            shares.join(" ")
        );
    }
}

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Base model: a GGUF file or an HF model directory.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Timed steps (after one warmup step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Training step time against the forward pass over the same tokens, and memory.
pub fn run_bench_train(a: BenchTrainArgs) -> Result<()> {
    let ctx = Context::new()?;
    let model = load_model(&ctx, &a.model)?;
    let t = a.adapter.trainables(&model)?;
    let virt = t.n_virtual();
    let n_tok = a.adapter.seq - virt;
    let mut rng = Rng::new(a.adapter.seed);
    let tokens: Vec<u32> = (0..n_tok)
        .map(|_| rng.below(model.config.vocab as u64) as u32)
        .collect();
    let batch = vec![Example::all(tokens.clone())];
    let config = TrainConfig {
        rows: a.adapter.seq,
        ..Default::default()
    };
    let mut tr = Trainer::new(model.clone(), t, config)?;
    tr.step(&batch)?; // warm the pipelines
    tr.evaluate(&batch)?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t0 = Instant::now();
        for _ in 0..a.steps.max(1) {
            f()?;
        }
        Ok(t0.elapsed().as_secs_f64() / a.steps.max(1) as f64)
    };
    let step_s = time(&mut || tr.step(&batch).map(|_| ()))?;
    let fwd_s = time(&mut || tr.evaluate(&batch).map(|_| ()))?;
    // Inference prefill over the same tokens (the serving forward pass).
    let mut sess = ember::session::Session::new(
        model.clone(),
        ember::session::SessionParams {
            n_ctx: n_tok.next_multiple_of(64),
            n_seq: 1,
            n_batch: n_tok,
            kv_budget: 0,
        },
    )?;
    sess.logits(&tokens)?;
    let prefill_s = time(&mut || sess.logits(&tokens).map(|_| ()))?;
    if std::env::var_os("EMBER_PROFILE").is_some() {
        let prof = tr.profile(&batch)?;
        let total: f64 = prof.iter().map(|p| p.2).sum();
        for (name, n, s) in prof {
            eprintln!(
                "{name:<18} x{n:<5} {:9.1} ms {:5.1}%",
                s * 1e3,
                100.0 * s / total
            );
        }
    }
    let info = ctx.info();
    let v = json!({
        "model": a.model, "model_formats": model.source.weight_formats,
        "device": info.name, "backend": info.backend, "driver": info.driver,
        "seq": a.adapter.seq, "lora_rank": a.adapter.rank, "lora_experts": a.adapter.experts, "lora_top_k": a.adapter.top_k, "lora_targets": a.adapter.targets,
        "prompt_tokens": a.adapter.prompt_tokens, "prefix_tokens": a.adapter.prefix_tokens,
        "trainable_params": tr.n_params(),
        "train_step_s": step_s, "train_tokens_per_s": n_tok as f64 / step_s,
        "forward_s": fwd_s, "step_over_forward": step_s / fwd_s,
        "prefill_s": prefill_s, "step_over_prefill": step_s / prefill_s,
        "dispatches_per_step": tr.dispatches_per_block(),
        "gpu_mb": (tr.device_bytes() + model.weight_bytes()) as f64 / 1e6,
        "gpu_train_state_mb": tr.device_bytes() as f64 / 1e6,
        "peak_rss_mb": peak_rss_mb(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "training {:.1} tokens/s ({:.3} s/step of {n_tok} tokens), {:.2}x the training forward, {:.2}x inference prefill; GPU {:.0} MB, peak RSS {:.0} MB",
            n_tok as f64 / step_s,
            step_s,
            step_s / fwd_s,
            step_s / prefill_s,
            (tr.device_bytes() + model.weight_bytes()) as f64 / 1e6,
            peak_rss_mb()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct EvalQaArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL of {"question": ..., "expect": ...}: an answer counts when it contains
    /// `expect` (case-insensitive).
    #[arg(long)]
    questions: PathBuf,
    /// Tokens to generate per answer at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 48)]
    n: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Asks each question through the chat template (greedy) and scores the answers.
pub fn run_eval_qa(a: EvalQaArgs) -> Result<()> {
    let ctx = Context::new()?;
    let model = load_model(&ctx, &a.model.model)?;
    let mut sess = session(&model, &a.model, 1)?;
    let adapter = attach_adapters(&mut sess, &a.model.adapters)?;
    let text = std::fs::read_to_string(&a.questions).map_err(|source| Error::Io {
        path: a.questions.clone(),
        source,
    })?;
    let mut rows = Vec::new();
    let mut correct = 0;
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(Some(&a.questions), format!("line {}: {e}", i + 1)))?;
        let (Some(q), Some(expect)) = (v["question"].as_str(), v["expect"].as_str()) else {
            return Err(Error::format(
                Some(&a.questions),
                format!("line {}: needs \"question\" and \"expect\" strings", i + 1),
            ));
        };
        let prompt = model
            .tokenizer
            .apply_chat_template(&[ember::tokenizer::ChatMessage::new("user", q)], true)?;
        sess.reset();
        let g = generate_text(
            &mut sess,
            &prompt,
            ember::session::SamplerConfig::greedy(),
            a.n,
            &[],
            &adapter,
            &mut |_| {},
        )?;
        let ok = g.text.to_lowercase().contains(&expect.to_lowercase());
        correct += ok as usize;
        if !a.json {
            eprintln!(
                "[{}] {q}\n    -> {}",
                if ok { "ok" } else { "--" },
                g.text.trim()
            );
        }
        rows.push(json!({"question": q, "expect": expect, "answer": g.text, "correct": ok}));
    }
    let n = rows.len().max(1);
    let v = json!({"questions": rows.len(), "correct": correct, "accuracy": correct as f64 / n as f64,
                   "adapters": a.model.adapters, "answers": rows});
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{correct}/{} answers contain the expected fact ({:.0}%)",
            rows.len(),
            100.0 * correct as f64 / n as f64
        );
    }
    Ok(())
}
