//! `ember learn`: continual learning into a versioned adapter store. Adds the examples of
//! the data files to the store's learner and runs one update (regularized, replayed, gated;
//! see `ember::learn::Learner`), printing what it did.

use std::path::PathBuf;

use clap::Args;
use ember::adapters::LoraConfig;
use ember::learn::{AnswerProbe, Gate, Learner, LearnerConfig};
use ember::train::Dataset;
use ember::{Context, Result};
use serde_json::json;

use crate::model_cmds::load_model;
use crate::train_cmds::AdapterArgs;

#[derive(Args)]
pub struct LearnArgs {
    /// The adapter store (created when missing or empty).
    #[arg(long)]
    store: PathBuf,
    /// Base model: a GGUF file or an HF model directory (frozen).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// New examples: JSONL ({"messages"}, {"prompt","completion"} or {"text"}) or plain
    /// text. Repeatable.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Probes of the new task for the gate (default: the new examples themselves).
    #[arg(long = "probe-new")]
    probe_new: Vec<PathBuf>,
    /// Probes of what must be retained (the gate refuses an update that worsens their loss
    /// by more than --max-retained-rise; default: a sample of the replay buffer).
    #[arg(long = "probe-retained")]
    probe_retained: Vec<PathBuf>,
    /// Exact-match probes of the new task: JSONL of {"question", "expect"} (chat template)
    /// or {"prompt", "expect"}; no fewer greedy answers may contain their expected text
    /// after the update than before.
    #[arg(long = "answers-new")]
    answers_new: Vec<PathBuf>,
    /// Exact-match probes of what must be retained (same format); their accuracy may fall
    /// by at most --max-answer-drop.
    #[arg(long = "answers-retained")]
    answers_retained: Vec<PathBuf>,
    /// Largest fall of the retained answers' accuracy allowed (a fraction of the probes).
    #[arg(long = "max-answer-drop", default_value_t = 0.0)]
    max_answer_drop: f64,
    /// Text whose base-model behaviour must be kept (general text): added once to the
    /// replay buffer as anchors, replayed distilled against the frozen base. Repeatable.
    #[arg(long)]
    retain: Vec<PathBuf>,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Optimizer steps of the update.
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// New sequences per step (replayed ones come on top).
    #[arg(long = "batch-size", default_value_t = 4)]
    batch_size: usize,
    /// Learning rate (constant after the warmup: no re-warming at every update).
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Warmup steps of the learning rate, once over the store's whole lineage.
    #[arg(long, default_value_t = 4)]
    warmup: u32,
    /// Replayed sequences per new one in each step (0..=4; 0.5 with a batch of 4 adds 2).
    #[arg(long = "replay-ratio", default_value_t = 0.5)]
    replay_ratio: f32,
    /// Examples the replay buffer keeps.
    #[arg(long = "replay-capacity", default_value_t = 512)]
    replay_capacity: usize,
    /// Every replayed example learns the frozen base's distribution (KL) instead of its
    /// tokens (anchors from --retain always do).
    #[arg(long = "replay-distill")]
    replay_distill: bool,
    /// Weight of a distilled replayed example against a new one (per example, however
    /// many tokens it scores).
    #[arg(long = "distill-weight", default_value_t = 1.0)]
    distill_weight: f32,
    /// L2 pull toward the previous version.
    #[arg(long, default_value_t = 0.01)]
    l2: f32,
    /// EWC pull toward the previous version (Fisher from replayed data; replaces --l2).
    #[arg(long, default_value_t = 0.0)]
    ewc: f32,
    /// Keep an EMA of the parameters with this decay and commit it.
    #[arg(long)]
    ema: Option<f32>,
    /// Least relative decrease of the new-task probe loss for the update to be kept.
    #[arg(long = "min-new-gain", default_value_t = 0.0)]
    min_new_gain: f64,
    /// Largest rise of the retained probes' mean loss allowed, in nats per token.
    #[arg(long = "max-retained-rise", default_value_t = 0.25)]
    max_retained_rise: f64,
    /// Probe examples the gate scores per set (a fixed sample; 0: all).
    #[arg(long = "probe-limit", default_value_t = 32)]
    probe_limit: usize,
    /// Keep every update (no evaluation gate).
    #[arg(long = "no-gate")]
    no_gate: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: LearnArgs) -> Result<()> {
    let ctx = Context::new()?;
    let model = load_model(&ctx, &a.model)?;
    let rank = a.adapter.rank.max(1);
    let mut lora = LoraConfig::new(
        rank,
        a.adapter.alpha.unwrap_or(2.0 * rank as f32),
        a.adapter.target_list()?,
    );
    lora.rslora = a.adapter.rslora;
    lora.experts = (a.adapter.experts > 0).then_some(ember::adapters::lora::LoraExperts {
        n_experts: a.adapter.experts,
        top_k: a.adapter.top_k,
        renormalize: !a.adapter.switch_gates,
    });
    let mut c = LearnerConfig::new(lora);
    c.train.rows = a.adapter.seq;
    c.train.adam.lr = a.lr;
    c.steps_per_update = a.steps;
    c.batch_size = a.batch_size;
    c.replay_ratio = a.replay_ratio;
    c.replay_capacity = a.replay_capacity;
    c.replay_distill = a.replay_distill;
    c.warmup_steps = a.warmup;
    c.distill_weight = a.distill_weight;
    c.l2 = a.l2;
    c.ewc = a.ewc;
    c.ema = a.ema;
    c.seed = a.adapter.seed;
    c.probe_limit = a.probe_limit;
    c.gate = (!a.no_gate).then_some(Gate {
        min_new_gain: a.min_new_gain,
        max_retained_rise: a.max_retained_rise,
        max_answer_drop: a.max_answer_drop,
    });
    let load = |paths: &[PathBuf]| -> Result<Vec<ember::train::Example>> {
        let mut out = Vec::new();
        for p in paths {
            out.extend(Dataset::load(p, &model.tokenizer, a.adapter.seq)?.examples);
        }
        Ok(out)
    };
    let data = load(&a.data)?;
    let (probe_new, probe_retained) = (load(&a.probe_new)?, load(&a.probe_retained)?);
    let mut learner = Learner::open(model.clone(), &a.store, c)?;
    learner.set_probes(probe_new, probe_retained)?;
    let answers = |paths: &[PathBuf]| -> Result<Vec<AnswerProbe>> {
        let mut out = Vec::new();
        for p in paths {
            let text = std::fs::read_to_string(p).map_err(|source| ember::Error::Io {
                path: p.clone(),
                source,
            })?;
            out.extend(AnswerProbe::from_jsonl(&model, &text, Some(p))?);
        }
        Ok(out)
    };
    learner.set_answer_probes(answers(&a.answers_new)?, answers(&a.answers_retained)?)?;
    let anchors = load(&a.retain)?;
    learner.retain(&anchors)?;
    learner.add(&data)?;
    let r = learner.update()?;
    if a.json {
        let mut v = json!(r);
        v["peak_rss_mb"] = json!(crate::model_cmds::peak_rss_mb());
        v["device"] = json!(ctx.info().name);
        println!("{v}");
    } else {
        eprintln!(
            "{} {}: {} (loss {:.4} -> {:.4}; new-task probes {:.4} -> {:.4}{}) in {:.1} s",
            if r.kept { "kept" } else { "rejected" },
            ember::learn::store::version_name(r.version),
            r.reason,
            r.first_loss,
            r.last_loss,
            r.new_before,
            r.new_after,
            match (r.retained_before, r.retained_after) {
                (Some(b), Some(x)) => format!("; retained {b:.4} -> {x:.4}"),
                _ => String::new(),
            },
            r.secs
        );
    }
    Ok(())
}
