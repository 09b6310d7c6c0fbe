//! Commands that run a model: generate, chat, perplexity, bench.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use ember::adapters::{load_dir, Loaded, LoraAdapter};
use ember::model::{LoadOptions, Model};
use ember::session::{
    GenerateOptions, Generation, SamplerConfig, SeqAdapters, Session, SessionParams,
};
use ember::tokenizer::ChatMessage;
use ember::{Context, Error, Result};
use serde_json::json;

/// Model and session options shared by the model commands.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: a GGUF file or an HF model directory.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Context size per sequence (tokens).
    #[arg(long = "ctx-size", default_value_t = 2048)]
    pub ctx_size: usize,
    /// Prefill chunk size (tokens).
    #[arg(long = "batch-size", default_value_t = 256)]
    pub batch_size: usize,
    /// Adapter directory (PEFT layout: LoRA, soft prompt or prefix; or the lora/, prompt/,
    /// prefix/ subdirectories that training saves), optionally with a strength: DIR or
    /// DIR:SCALE. Repeatable: several LoRA adapters apply together.
    #[arg(long = "adapter")]
    pub adapters: Vec<String>,
}

/// Sampling options.
#[derive(Args, Clone)]
pub struct SampleArgs {
    /// Temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Top-k (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: u32,
    /// Top-p (1 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens the repetition penalty looks back.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed.
    #[arg(long = "seed", default_value_t = 0)]
    pub seed: u64,
}

impl SampleArgs {
    fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

/// Loads a model with a progress bar on stderr (hidden when stderr is not a terminal).
pub fn load_model(ctx: &Context, path: &std::path::Path) -> Result<Arc<Model>> {
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {msg} {bar:30} {percent:>3}% {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let mut progress = |f: f32| {
        bar.set_position((f * 1000.0) as u64);
        true
    };
    let model = Model::load(
        ctx,
        path,
        LoadOptions {
            progress: Some(&mut progress),
            ..Default::default()
        },
    );
    bar.finish_and_clear();
    Ok(Arc::new(model?))
}

pub fn session(model: &Arc<Model>, a: &ModelArgs, n_seq: usize) -> Result<Session> {
    Session::new(
        model.clone(),
        SessionParams {
            n_ctx: a.ctx_size,
            n_seq,
            n_batch: a.batch_size,
            kv_budget: 0,
        },
    )
}

/// Loads `--adapter DIR[:SCALE]` arguments: LoRA adapters are stacked into one attached to
/// `sess` (they apply together, each at its strength); a soft prompt or prefix (at most
/// one) goes at the start of every sequence.
pub fn attach_adapters(sess: &mut Session, args: &[String]) -> Result<SeqAdapters> {
    let mut out = SeqAdapters::default();
    if args.is_empty() {
        return Ok(out);
    }
    let model = sess.model().clone();
    let mut loras = Vec::new();
    for a in args {
        let (dir, scale) = match a.rsplit_once(':') {
            Some((d, s)) if s.parse::<f32>().is_ok() => (d, s.parse::<f32>().unwrap_or(1.0)),
            _ => (a.as_str(), 1.0),
        };
        for l in load_dir(std::path::Path::new(dir), &model)? {
            match l {
                Loaded::Lora(l) => loras.push((l, scale)),
                Loaded::Prompt(p) if out.prompt.is_none() => out.prompt = Some(p),
                Loaded::Prompt(_) => {
                    return Err(Error::InvalidArgument(
                        "more than one soft prompt or prefix among the adapters".into(),
                    ))
                }
            }
        }
    }
    if !loras.is_empty() {
        let refs: Vec<(&LoraAdapter, f32)> = loras.iter().map(|(a, s)| (a, *s)).collect();
        let stacked = LoraAdapter::stack(&refs)?;
        out.lora = Some((sess.attach_adapter("cli", Arc::new(stacked))?, 1.0));
    }
    Ok(out)
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sample: SampleArgs,
    /// Prompt text.
    #[arg(short = 'p', long = "prompt")]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n: usize,
    /// Wrap the prompt as a user turn of the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Print a JSON summary (text, tokens, timings) instead of streaming.
    #[arg(long)]
    json: bool,
    /// Report how many tokens each layer sent to each expert (Mixture-of-Experts models):
    /// a table on stderr, or `expert_load` in the JSON summary.
    #[arg(long = "expert-stats")]
    expert_stats: bool,
}

/// One layer's expert loads: each expert's share of the layer's choices, and the imbalance
/// (largest load over the mean; 1 is perfectly even, 0 when nothing was routed).
fn layer_load(counts: &[u64]) -> (Vec<f64>, f64) {
    let total: u64 = counts.iter().sum();
    let share = counts
        .iter()
        .map(|&n| n as f64 / total.max(1) as f64)
        .collect();
    let mean = total as f64 / counts.len().max(1) as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    (share, if mean > 0.0 { max / mean } else { 0.0 })
}

/// Per-layer expert loads as JSON: the counts, each expert's share and the imbalance
/// ([`layer_load`]).
pub fn expert_load_json(counts: &[Vec<u64>]) -> serde_json::Value {
    let layers: Vec<_> = counts
        .iter()
        .enumerate()
        .map(|(l, c)| {
            let (share, imbalance) = layer_load(c);
            json!({"layer": l, "counts": c, "share": share, "imbalance": imbalance})
        })
        .collect();
    json!(layers)
}

/// The loads as a table on stderr: one row per layer, each expert's share in %.
fn print_expert_load(counts: &[Vec<u64>]) {
    eprintln!("expert load (% of the layer's routed tokens; imbalance = max / mean):");
    for (l, c) in counts.iter().enumerate() {
        let (share, imbalance) = layer_load(c);
        let cells: Vec<String> = share.iter().map(|s| format!("{:5.1}", 100.0 * s)).collect();
        eprintln!(
            "layer {l:>3}: {}  imbalance {imbalance:.2}",
            cells.join(" ")
        );
    }
}

/// Generates from `prompt` (already rendered), streaming text pieces to `out`.
pub fn generate_text(
    sess: &mut Session,
    prompt: &str,
    sampler: SamplerConfig,
    n: usize,
    stop: &[String],
    adapters: &SeqAdapters,
    out: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let ids = sess.model().tokenizer.encode(prompt, true, true)?;
    let mut cb = |_: u32, piece: &str| {
        out(piece);
        true
    };
    let opts = GenerateOptions {
        sampler,
        max_tokens: n,
        stop: stop.to_vec(),
        on_token: Some(&mut cb),
        adapter: adapters.lora,
        prompt: adapters.prompt.clone(),
    };
    sess.generate(&ids, opts)
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let ctx = Context::new()?;
    let model = load_model(&ctx, &a.model.model)?;
    let mut sess = session(&model, &a.model, 1)?;
    let adapter = attach_adapters(&mut sess, &a.model.adapters)?;
    let prompt = if a.chat {
        model.tokenizer.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            true,
        )?
    } else {
        a.prompt.clone()
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let mut print = |s: &str| {
        if !json {
            let mut o = stdout.lock();
            let _ = o.write_all(s.as_bytes());
            let _ = o.flush();
        }
    };
    let g = generate_text(
        &mut sess,
        &prompt,
        a.sample.config(),
        a.n,
        &a.stop,
        &adapter,
        &mut print,
    )?;
    let load = if a.expert_stats {
        let counts = sess.expert_counts()?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--expert-stats: {} is not a Mixture-of-Experts model",
                model.config.name
            ))
        })?;
        Some(counts)
    } else {
        None
    };
    if json {
        let mut v = json!({
            "text": g.text, "tokens": g.tokens, "prompt_tokens": g.prompt_tokens,
            "stop_reason": g.stop,
            "prefill_tok_s": g.prompt_tokens as f64 / g.prefill_secs,
            "decode_tok_s": g.tokens.len().saturating_sub(1) as f64 / g.decode_secs.max(1e-9),
        });
        if let Some(c) = &load {
            v["expert_load"] = expert_load_json(c);
        }
        println!("{v}");
    } else {
        println!();
        if let Some(c) = &load {
            print_expert_load(c);
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sample: SampleArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Tokens per answer at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n: usize,
}

pub fn run_chat(a: ChatArgs) -> Result<()> {
    let ctx = Context::new()?;
    let model = load_model(&ctx, &a.model.model)?;
    let mut sess = session(&model, &a.model, 1)?;
    let adapter = attach_adapters(&mut sess, &a.model.adapters)?;
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(s) = &a.system {
        history.push(ChatMessage {
            role: "system".into(),
            content: s.clone(),
        });
    }
    eprintln!(
        "chatting with {} (empty line or Ctrl-D to quit)",
        model.config.name
    );
    let stdin = std::io::stdin();
    let mut seed = a.sample.seed;
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| Error::Io {
            path: "<stdin>".into(),
            source: e,
        })? == 0
        {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            break;
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line.to_string(),
        });
        let prompt = model.tokenizer.apply_chat_template(&history, true)?;
        let mut cfg = a.sample.config();
        cfg.seed = seed;
        seed = seed.wrapping_add(1);
        let stdout = std::io::stdout();
        let mut print = |s: &str| {
            let mut o = stdout.lock();
            let _ = o.write_all(s.as_bytes());
            let _ = o.flush();
        };
        let g = generate_text(&mut sess, &prompt, cfg, a.n, &[], &adapter, &mut print)?;
        println!();
        history.push(ChatMessage {
            role: "assistant".into(),
            content: g.text,
        });
    }
    Ok(())
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Window (context) size.
    #[arg(long = "ctx", default_value_t = 512)]
    ctx: usize,
    /// Print JSON: ppl, tokens, scored, top1.
    #[arg(long)]
    json: bool,
}

pub fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    let ctx = Context::new()?;
    let model = load_model(&ctx, &a.model.model)?;
    let text = std::fs::read_to_string(&a.file).map_err(|e| Error::Io {
        path: a.file.clone(),
        source: e,
    })?;
    let tokens = model.tokenizer.encode(&text, false, false)?;
    let mut args = a.model.clone();
    args.ctx_size = a.ctx;
    args.batch_size = args.batch_size.min(a.ctx);
    let mut sess = session(&model, &args, 1)?;
    let adapter = attach_adapters(&mut sess, &a.model.adapters)?;
    let t0 = Instant::now();
    let r = sess.perplexity_with(&tokens, a.ctx, adapter.clone())?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            json!({"ppl": r.ppl, "tokens": r.tokens, "scored": r.scored, "top1": r.top1})
        );
    } else {
        eprintln!(
            "{} tokens, {} scored, {:.1} tok/s",
            r.tokens,
            r.scored,
            r.tokens as f64 / secs
        );
        println!("ppl: {:.4}", r.ppl);
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens to prefill.
    #[arg(long = "prompt", default_value_t = 256)]
    prompt: usize,
    /// Tokens to decode.
    #[arg(long = "gen", default_value_t = 128)]
    generate: usize,
    /// Sequences decoded together.
    #[arg(long = "batch", default_value_t = 1)]
    batch: usize,
    /// Repetitions (the best is reported).
    #[arg(long = "reps", default_value_t = 2)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn run_bench(a: BenchArgs) -> Result<()> {
    let ctx = Context::new()?;
    let model = load_model(&ctx, &a.model.model)?;
    let mut args = a.model.clone();
    args.ctx_size = args.ctx_size.max(a.prompt + a.generate + 1);
    let mut sess = session(&model, &args, a.batch)?;
    let adapter = attach_adapters(&mut sess, &a.model.adapters)?;
    // A prompt of ordinary text tokens (the same token ids every run).
    let vocab = model.config.vocab as u32;
    let first = if vocab > 2000 { 1000 } else { 0 };
    let prompt: Vec<u32> = (0..a.prompt as u32)
        .map(|i| first + (i * 7919) % (vocab - first))
        .collect();
    let mut best_prefill = 0.0f64;
    let mut best_decode = 0.0f64;
    let mut dispatches = 0;
    let mut expert_load = None;
    for _ in 0..a.reps.max(1) {
        sess.reset();
        let ids: Vec<_> = (0..a.batch)
            .map(|i| {
                sess.add_sequence(SamplerConfig {
                    seed: i as u64,
                    ..SamplerConfig::greedy()
                })
            })
            .collect::<Result<_>>()?;
        for &id in &ids {
            sess.set_sequence_adapter(id, adapter.lora.map(|a| a.0), 1.0)?;
            sess.set_sequence_prompt(id, adapter.prompt.clone())?;
        }
        let t0 = Instant::now();
        for &id in &ids {
            sess.prefill(id, &prompt)?;
        }
        let prefill = (a.prompt * a.batch) as f64 / t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..a.generate {
            sess.decode(&ids)?;
        }
        let decode = (a.generate * a.batch) as f64 / t1.elapsed().as_secs_f64();
        dispatches = sess.last_dispatches;
        if let Some(counts) = sess.expert_counts()? {
            expert_load = Some(counts);
            sess.reset_expert_counts()?;
        }
        best_prefill = best_prefill.max(prefill);
        best_decode = best_decode.max(decode);
    }
    if std::env::var_os("EMBER_PROFILE").is_some() {
        for (name, n, s) in sess.profile_decode(a.batch)? {
            eprintln!("{name:<16} x{n:<4} {:8.2} ms", s * 1e3);
        }
    }
    let info = ctx.info();
    let mut v = json!({
        "model": a.model.model.display().to_string(),
        "model_name": model.config.name,
        "arch": model.config.arch.name(),
        "weights": model.source.weight_formats,
        "params": model.n_params(),
        "active_params": model.n_active_params(),
        "device": info.name, "backend": info.backend, "driver": info.driver_info,
        "variant": format!("{:?}", model.variant).to_lowercase(),
        "prompt": a.prompt, "gen": a.generate, "batch": a.batch,
        "prefill_tok_s": best_prefill,
        "decode_tok_s": best_decode,
        "dispatches_per_token": dispatches,
        "peak_rss_mb": peak_rss_mb(),
        "gpu_mem_mb": ctx.allocated_bytes() as f64 / (1024.0 * 1024.0),
        "weights_mb": model.weight_bytes() as f64 / (1024.0 * 1024.0),
    });
    if let Some(m) = &model.config.moe {
        v["experts"] = json!({"n": m.n_experts, "top_k": m.top_k, "ff": m.expert_ff,
                              "shared_ff": m.shared_ff, "gating": m.gating});
    }
    if let Some(c) = &expert_load {
        // The last repetition's prefill and decode.
        v["expert_load"] = expert_load_json(c);
    }
    if a.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    Ok(())
}

#[derive(Args)]
pub struct ConvertArgs {
    /// GGUF model to convert.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Output directory (config.json, model.safetensors, tokenizer files).
    #[arg(long = "out")]
    out: PathBuf,
    /// Write f16 instead of f32.
    #[arg(long)]
    f16: bool,
}

pub fn run_convert(a: ConvertArgs) -> Result<()> {
    use ember::model::export::{export_hf, ExportDtype};
    let dtype = if a.f16 {
        ExportDtype::F16
    } else {
        ExportDtype::F32
    };
    export_hf(&a.model, &a.out, dtype)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
