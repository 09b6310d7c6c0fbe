//! Continual learning through the C ABI: a learner over a versioned adapter store (see
//! `ember::learn::Learner`): add examples, run gated updates, roll back, and serve the
//! adapter of record in sessions.

use std::ffi::c_char;
use std::path::Path;

use ember::adapters::LoraConfig;
use std::sync::Arc;

use ember::learn::{AdapterStore, AnswerProbe, BackgroundLearner, Gate, Learner, LearnerConfig};
use ember::model::Model;
use ember::train::{Dataset, Example};

use crate::adapters::{ember_adapter, K_ADAPTER};
use crate::handles::{get_mut, register, release};
use crate::status::*;
use crate::train::targets;
use crate::{ember_model, non_null, out_string, read_params, req_str, K_MODEL};

const K_LEARNER: &str = "ember_learner";

/// A continual learner: one base model, one adapter store directory. Use it from one
/// thread at a time; the model may serve sessions meanwhile. In background mode
/// (`ember_learner_start_background`) its updates run on a thread of their own.
pub struct ember_learner {
    /// The learner, when it runs on the caller's thread.
    learner: Option<Learner>,
    /// The learner's thread, in background mode.
    bg: Option<BackgroundLearner>,
    model: Arc<Model>,
    store_dir: std::path::PathBuf,
    seq_len: usize,
}

impl ember_learner {
    fn sync(&mut self, what: &str) -> CResult<&mut Learner> {
        self.learner.as_mut().ok_or_else(|| {
            invalid(format!(
                "{what}: the learner runs in the background (ember_learner_stop_background first)"
            ))
        })
    }
}

/// How a learner learns. Get defaults from `ember_learner_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_learner_params {
    /// `sizeof(ember_learner_params)`.
    pub struct_size: u32,
    /// LoRA rank of a fresh adapter (a store with versions continues its head). Default 8.
    pub lora_rank: u32,
    /// LoRA alpha (0: twice the rank).
    pub lora_alpha: f32,
    /// `EMBER_TARGET_*` bits (0: all seven projections).
    pub lora_targets: u32,
    /// Longest sequence in tokens (a multiple of 32); longer records are cut. Default 128.
    pub seq_len: u32,
    /// Learning rate (constant after `warmup_steps`: no re-warming at every update).
    /// Default 1e-3.
    pub lr: f32,
    /// Optimizer steps per update. Default 8.
    pub steps_per_update: u32,
    /// New sequences per step (replayed ones come on top, see `replay_ratio`). Default 4.
    pub batch_size: u32,
    /// Run an update every this many added examples (0: only `ember_learner_update`).
    pub update_every: u32,
    /// Replayed sequences per new one in each step (0..=4; 0.5 with a batch of 4 adds 2
    /// replayed sequences to the 4 new ones). Default 0.5.
    pub replay_ratio: f32,
    /// Examples the replay buffer keeps. Default 512.
    pub replay_capacity: u32,
    /// Every replayed example learns the frozen base's distribution (KL) instead of its
    /// tokens (anchors from `ember_learner_retain` always do).
    pub replay_distill: bool,
    /// L2 pull toward the previous version. Default 0.01.
    pub l2: f32,
    /// EWC pull toward the previous version (Fisher from replayed data; replaces l2). Default 0.
    pub ewc: f32,
    /// EMA decay of the parameters kept and committed (0: off).
    pub ema: f32,
    /// Use the evaluation gate. Default true.
    pub gate: bool,
    /// Least relative decrease of the new-task probes' loss to keep an update. Default 0.
    pub min_new_gain: f64,
    /// Largest rise of the retained probes' mean loss allowed, in nats per token (absolute).
    /// The retained probes default to a sample of the replay buffer. Default 0.25.
    pub max_retained_rise: f64,
    /// Seed of initialization, sampling and replay.
    pub seed: u64,
    /// At most this many examples of each probe set are scored (a fixed sample; 0: all).
    /// Default 32.
    pub probe_limit: u32,
    /// Steps over which the learning rate warms up, once over the store's whole lineage
    /// (0: none). Default 4.
    pub warmup_steps: u32,
    /// Largest fall of the retained answer probes' accuracy allowed, a fraction of the
    /// probes (see `ember_learner_set_answer_probes`). Default 0: every answer that was
    /// right must stay right.
    pub max_answer_drop: f64,
    /// Tokens generated per answer probe at most. Default 32.
    pub answer_tokens: u32,
    /// Weight of a distilled replayed example (an anchor) against a new one, per example
    /// however many tokens it scores. Default 1.
    pub distill_weight: f32,
}

/// The defaults (see each field).
#[no_mangle]
pub extern "C" fn ember_learner_default_params() -> ember_learner_params {
    let d = LearnerConfig::new(LoraConfig::new(8, 16.0, Vec::new()));
    let g = d.gate.unwrap_or(Gate {
        min_new_gain: 0.0,
        max_retained_rise: 0.25,
        max_answer_drop: 0.0,
    });
    ember_learner_params {
        struct_size: std::mem::size_of::<ember_learner_params>() as u32,
        lora_rank: 8,
        lora_alpha: 0.0,
        lora_targets: 0,
        seq_len: d.train.rows as u32,
        lr: d.train.adam.lr,
        steps_per_update: d.steps_per_update,
        batch_size: d.batch_size as u32,
        update_every: d.update_every as u32,
        replay_ratio: d.replay_ratio,
        replay_capacity: d.replay_capacity as u32,
        replay_distill: d.replay_distill,
        l2: d.l2,
        ewc: d.ewc,
        ema: 0.0,
        gate: true,
        min_new_gain: g.min_new_gain,
        max_retained_rise: g.max_retained_rise,
        seed: d.seed,
        probe_limit: d.probe_limit as u32,
        warmup_steps: d.warmup_steps,
        max_answer_drop: g.max_answer_drop,
        answer_tokens: d.answer_tokens as u32,
        distill_weight: d.distill_weight,
    }
}

fn config(p: &ember_learner_params) -> CResult<LearnerConfig> {
    if p.lora_rank == 0 {
        return Err(invalid("lora_rank is 0"));
    }
    if p.seq_len == 0 || p.seq_len % 32 != 0 {
        return Err(invalid(format!(
            "seq_len {} is not a positive multiple of 32",
            p.seq_len
        )));
    }
    for (name, v) in [("lr", p.lr), ("ema", p.ema)] {
        if !v.is_finite() || v < 0.0 {
            return Err(invalid(format!("{name} is {v}")));
        }
    }
    let alpha = if p.lora_alpha > 0.0 {
        p.lora_alpha
    } else {
        2.0 * p.lora_rank as f32
    };
    let mut c = LearnerConfig::new(LoraConfig::new(
        p.lora_rank as usize,
        alpha,
        targets(p.lora_targets)?,
    ));
    c.train.rows = p.seq_len as usize;
    c.train.adam.lr = p.lr;
    c.steps_per_update = p.steps_per_update;
    c.batch_size = p.batch_size as usize;
    c.update_every = p.update_every as usize;
    c.replay_ratio = p.replay_ratio;
    c.replay_capacity = p.replay_capacity as usize;
    c.replay_distill = p.replay_distill;
    c.l2 = p.l2;
    c.ewc = p.ewc;
    c.ema = (p.ema > 0.0).then_some(p.ema);
    c.gate = p.gate.then_some(Gate {
        min_new_gain: p.min_new_gain,
        max_retained_rise: p.max_retained_rise,
        max_answer_drop: p.max_answer_drop,
    });
    c.seed = p.seed;
    c.probe_limit = p.probe_limit as usize;
    c.warmup_steps = p.warmup_steps;
    if p.answer_tokens == 0 {
        return Err(invalid("answer_tokens is 0"));
    }
    c.answer_tokens = p.answer_tokens as usize;
    c.distill_weight = p.distill_weight;
    Ok(c)
}

/// Opens (or creates) the adapter store in directory `store_dir` for `model` and a learner
/// over it, continuing from the store's head (or a fresh adapter). Fails with
/// `EMBER_INVALID_ARGUMENT` for a store of another base model or bad parameters, and with
/// `EMBER_BAD_FORMAT`-class errors naming the file for a damaged store.
///
/// # Safety
/// `model` live; `store_dir` NUL-terminated UTF-8; `params` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_open(
    model: *const ember_model,
    store_dir: *const c_char,
    params: *const ember_learner_params,
    out: *mut *mut ember_learner,
) -> ember_status {
    guard("ember_learner_open", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let m = unsafe { crate::handles::get(K_MODEL, model) }?;
        let dir = unsafe { req_str(store_dir, "store_dir") }?;
        let p = unsafe {
            read_params(
                params,
                ember_learner_default_params(),
                std::mem::size_of::<ember_learner_params>(),
                "ember_learner_params",
            )
        }?;
        let c = config(&p)?;
        let learner = Learner::open(m.model.clone(), Path::new(dir), c)?;
        unsafe {
            *out = register(
                K_LEARNER,
                ember_learner {
                    learner: Some(learner),
                    bg: None,
                    model: m.model.clone(),
                    store_dir: Path::new(dir).to_path_buf(),
                    seq_len: p.seq_len as usize,
                },
            )
        };
        Ok(())
    })
}

/// Frees a learner (its store stays on disk).
///
/// # Safety
/// `learner` NULL or live; not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_free(learner: *mut ember_learner) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(unsafe { release(K_LEARNER, learner) })
    }));
}

fn records(l: &ember_learner, jsonl: &str) -> CResult<Vec<Example>> {
    let tok = &l.model.tokenizer;
    Ok(Dataset::from_jsonl(jsonl, tok, l.seq_len)?.examples)
}

/// Adds the JSONL records in `jsonl` (same formats as `ember_trainer_step`); they are kept
/// on disk until an update uses them. When the `update_every` policy triggers an update,
/// its report (JSON, as `ember_learner_update`'s) goes to `*out_report_json` (else NULL;
/// free with `ember_string_free`; `out_report_json` may be NULL).
///
/// # Safety
/// `learner` live (one thread); `jsonl` NUL-terminated UTF-8; `out_report_json` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_add(
    learner: *mut ember_learner,
    jsonl: *const c_char,
    out_report_json: *mut *mut c_char,
) -> ember_status {
    guard("ember_learner_add", || {
        if !out_report_json.is_null() {
            unsafe { *out_report_json = std::ptr::null_mut() };
        }
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let text = unsafe { req_str(jsonl, "jsonl") }?;
        let ex = records(l, text)?;
        if let Some(bg) = &l.bg {
            bg.add(ex)?;
            return Ok(());
        }
        if let Some(r) = l.sync("ember_learner_add")?.add(&ex)? {
            if !out_report_json.is_null() {
                out_string(out_report_json, &serde_json::json!(r).to_string())?;
            }
        }
        Ok(())
    })
}

/// Sets the probe sets of the evaluation gate (JSONL records; NULL or empty: none):
/// examples of the new task, and of what must be retained.
///
/// # Safety
/// `learner` live; each string NULL or NUL-terminated UTF-8.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_set_probes(
    learner: *mut ember_learner,
    new_task_jsonl: *const c_char,
    retained_jsonl: *const c_char,
) -> ember_status {
    guard("ember_learner_set_probes", || {
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let read = |p: *const c_char, what: &str| -> CResult<Vec<Example>> {
            if p.is_null() {
                return Ok(Vec::new());
            }
            let text = unsafe { req_str(p, what) }?;
            if text.trim().is_empty() {
                return Ok(Vec::new());
            }
            records(l, text)
        };
        let (n, r) = (
            read(new_task_jsonl, "new_task_jsonl")?,
            read(retained_jsonl, "retained_jsonl")?,
        );
        l.sync("ember_learner_set_probes")?.set_probes(n, r)?;
        Ok(())
    })
}

/// Adds anchors: JSONL records of text whose base-model behaviour the adapter must keep
/// (general text). They join the replay buffer for good and are replayed distilled against
/// the frozen base, so new facts go in without wearing away general ability; text already
/// held is skipped. `*out_added` (may be NULL) gets how many were new. Not while the learner
/// runs in the background.
///
/// # Safety
/// `learner` live; `jsonl` NUL-terminated UTF-8; `out_added` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_retain(
    learner: *mut ember_learner,
    jsonl: *const c_char,
    out_added: *mut u32,
) -> ember_status {
    guard("ember_learner_retain", || {
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let text = unsafe { req_str(jsonl, "jsonl") }?;
        let ex = records(l, text)?;
        let added = l.sync("ember_learner_retain")?.retain(&ex)?;
        if !out_added.is_null() {
            unsafe { *out_added = added as u32 };
        }
        Ok(())
    })
}

/// Sets exact-match probes of the evaluation gate (JSONL; NULL or empty: none): each line
/// `{"question": ..., "expect": ...}` (asked through the chat template) or `{"prompt": ...,
/// "expect": ...}` (raw text). An update is kept only if no fewer new-task answers contain
/// their expected text (case-insensitive, greedy answers) than before, and the retained
/// answers' accuracy falls by at most `max_answer_drop`. Each probe costs a short
/// generation before and after every update.
///
/// # Safety
/// `learner` live; each string NULL or NUL-terminated UTF-8.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_set_answer_probes(
    learner: *mut ember_learner,
    new_task_jsonl: *const c_char,
    retained_jsonl: *const c_char,
) -> ember_status {
    guard("ember_learner_set_answer_probes", || {
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let model = l.model.clone();
        let read = |p: *const c_char, what: &str| -> CResult<Vec<AnswerProbe>> {
            if p.is_null() {
                return Ok(Vec::new());
            }
            let text = unsafe { req_str(p, what) }?;
            Ok(AnswerProbe::from_jsonl(&model, text, None)?)
        };
        let (n, r) = (
            read(new_task_jsonl, "new_task_jsonl")?,
            read(retained_jsonl, "retained_jsonl")?,
        );
        l.sync("ember_learner_set_answer_probes")?
            .set_answer_probes(n, r)?;
        Ok(())
    })
}

/// Runs an update on the pending examples now and writes its report to `*out_report_json`
/// (free with `ember_string_free`): `{"version", "kept", "reason", "examples", "steps",
/// "first_loss", "last_loss", "new_before", "new_after", "retained_before",
/// "retained_after", "new_answers_before", "new_answers_after", "retained_answers_before",
/// "retained_answers_after", "secs"}` (answer accuracies are null without answer probes). A rejected update is recorded in the store (not the head)
/// and the learner returns to the head. Fails with `EMBER_INVALID_ARGUMENT` when nothing is
/// pending.
///
/// # Safety
/// `learner` live; `out_report_json` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_update(
    learner: *mut ember_learner,
    out_report_json: *mut *mut c_char,
) -> ember_status {
    guard("ember_learner_update", || {
        non_null(out_report_json, "out_report_json")?;
        unsafe { *out_report_json = std::ptr::null_mut() };
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let r = l.sync("ember_learner_update")?.update()?;
        out_string(out_report_json, &serde_json::json!(r).to_string())
    })
}

/// Makes version `version` the head again and continues from it.
///
/// # Safety
/// `learner` live.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_rollback(
    learner: *mut ember_learner,
    version: u32,
) -> ember_status {
    guard("ember_learner_rollback", || {
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        l.sync("ember_learner_rollback")?.rollback(version)?;
        Ok(())
    })
}

/// The current adapter (the head after an update) as a new adapter handle, to attach to
/// sessions (free with `ember_adapter_free`).
///
/// # Safety
/// `learner` live; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_get_adapter(
    learner: *mut ember_learner,
    out: *mut *mut ember_adapter,
) -> ember_status {
    guard("ember_learner_get_adapter", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let a = match &l.bg {
            Some(bg) => match bg.adapter().0 {
                Some(a) => (*a).clone(),
                None => {
                    return Err(invalid(
                        "no update has been kept in the background yet (ember_learner_poll)",
                    ))
                }
            },
            None => l.sync("ember_learner_get_adapter")?.adapter()?,
        };
        unsafe { *out = register(K_ADAPTER, ember_adapter::lora(a)) };
        Ok(())
    })
}

/// Writes `{"head", "background", "versions": [...]}` (each version's metadata, or its
/// error), plus `"pending"`, `"replay"`, `"replay_seen"` and `"anchors"` when not in
/// background mode, to
/// `*out_json` (free with `ember_string_free`).
///
/// # Safety
/// `learner` live; `out_json` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_info_json(
    learner: *mut ember_learner,
    out_json: *mut *mut c_char,
) -> ember_status {
    guard("ember_learner_info_json", || {
        non_null(out_json, "out_json")?;
        unsafe { *out_json = std::ptr::null_mut() };
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let s = AdapterStore::open(&l.store_dir)?;
        let versions: Vec<serde_json::Value> = s
            .versions()?
            .into_iter()
            .map(|e| match e.meta {
                Ok(m) => serde_json::json!(m),
                Err(err) => serde_json::json!({"version": e.version, "error": err.to_string()}),
            })
            .collect();
        let mut v = serde_json::json!({
            "head": s.head()?,
            "background": l.bg.is_some(),
            "versions": versions,
        });
        if let Some(learner) = &l.learner {
            v["pending"] = learner.pending().into();
            v["replay"] = learner.replay().len().into();
            v["replay_seen"] = learner.replay().seen().into();
            v["anchors"] = learner.replay().anchors().into();
        }
        out_string(out_json, &v.to_string())
    })
}

/// Moves the learner's updates to a thread of their own: `ember_learner_add` then queues the
/// records and returns at once, `ember_learner_request_update` queues an update, sessions
/// of the same model keep serving meanwhile, and `ember_learner_poll` reports what
/// happened. `ember_learner_update`, `_set_probes` and `_rollback` are refused until
/// `ember_learner_stop_background`.
///
/// # Safety
/// `learner` live.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_start_background(
    learner: *mut ember_learner,
) -> ember_status {
    guard("ember_learner_start_background", || {
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let inner = l
            .learner
            .take()
            .ok_or_else(|| invalid("the learner already runs in the background"))?;
        l.bg = Some(BackgroundLearner::spawn(inner)?);
        Ok(())
    })
}

/// Finishes the queued work, stops the learner's thread and returns to synchronous calls.
///
/// # Safety
/// `learner` live.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_stop_background(
    learner: *mut ember_learner,
) -> ember_status {
    guard("ember_learner_stop_background", || {
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let bg =
            l.bg.take()
                .ok_or_else(|| invalid("the learner does not run in the background"))?;
        l.learner = Some(bg.stop()?);
        Ok(())
    })
}

/// Queues an update of the pending records (background mode).
///
/// # Safety
/// `learner` live.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_request_update(learner: *mut ember_learner) -> ember_status {
    guard("ember_learner_request_update", || {
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let bg = l.bg.as_ref().ok_or_else(|| {
            invalid("the learner does not run in the background (use ember_learner_update)")
        })?;
        bg.request_update()?;
        Ok(())
    })
}

/// Blocks until the queued work of a background learner is done (at once otherwise).
///
/// # Safety
/// `learner` live.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_wait(learner: *mut ember_learner) -> ember_status {
    guard("ember_learner_wait", || {
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        if let Some(bg) = &l.bg {
            bg.wait_idle();
        }
        Ok(())
    })
}

/// What a background learner did since the last call: `{"busy", "published", "events":
/// [...]}`, each event an update report (as `ember_learner_update`'s) or `{"error": ...}`
/// for a rejected record or a failed update; `published` counts the kept updates, whose
/// adapter `ember_learner_get_adapter` returns. Free with `ember_string_free`.
///
/// # Safety
/// `learner` live; `out_json` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_learner_poll(
    learner: *mut ember_learner,
    out_json: *mut *mut c_char,
) -> ember_status {
    guard("ember_learner_poll", || {
        non_null(out_json, "out_json")?;
        unsafe { *out_json = std::ptr::null_mut() };
        let l = unsafe { get_mut(K_LEARNER, learner) }?;
        let bg =
            l.bg.as_ref()
                .ok_or_else(|| invalid("the learner does not run in the background"))?;
        let events: Vec<serde_json::Value> = bg
            .events()
            .into_iter()
            .map(|e| match e {
                Ok(r) => serde_json::json!(r),
                Err(err) => serde_json::json!({ "error": err }),
            })
            .collect();
        let v = serde_json::json!({
            "busy": bg.busy(),
            "published": bg.adapter().1,
            "events": events,
        });
        out_string(out_json, &v.to_string())
    })
}
