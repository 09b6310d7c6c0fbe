//! On-device training through the C ABI: a trainer per model, steps on JSONL records or raw
//! token sequences, whole-file training with a progress callback, evaluation, snapshots as
//! attachable adapters, and atomic saves in the PEFT layout.

use std::ffi::{c_char, c_void};
use std::path::Path;

use ember::adapters::lora::LoraExperts;
use ember::adapters::{LoraAdapter, LoraConfig, Prefix, SoftPrompt, Target};
use ember::kernels::train::AdamConfig;
use ember::train::{Dataset, Example, LrSchedule, StepStats, TrainConfig, Trainables, Trainer};

use crate::adapters::{ember_adapter, K_ADAPTER};
use crate::handles::{get, get_mut, register, release};
use crate::status::*;
use crate::{ember_model, non_null, out_string, read_params, req_str, K_MODEL};

const K_TRAINER: &str = "ember_trainer";

/// Trains adapters (LoRA, soft prompt or prefix) of one model on its GPU. Use one trainer
/// from one thread at a time; the model may serve sessions meanwhile.
pub struct ember_trainer {
    trainer: Trainer,
    seq_len: usize,
}

/// LoRA target bits for `ember_train_params.lora_targets`.
pub const EMBER_TARGET_Q: u32 = 1;
/// Key projection.
pub const EMBER_TARGET_K: u32 = 2;
/// Value projection.
pub const EMBER_TARGET_V: u32 = 4;
/// Attention output projection.
pub const EMBER_TARGET_O: u32 = 8;
/// FFN gate projection.
pub const EMBER_TARGET_GATE: u32 = 16;
/// FFN up projection.
pub const EMBER_TARGET_UP: u32 = 32;
/// FFN down projection.
pub const EMBER_TARGET_DOWN: u32 = 64;

/// Learning-rate schedules.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_lr_schedule {
    /// The base rate throughout.
    EMBER_LR_CONSTANT = 0,
    /// Linear warmup, then cosine decay to 0 at `total_steps`.
    EMBER_LR_COSINE = 1,
    /// Linear warmup, then constant (continual training).
    EMBER_LR_WARMUP_CONSTANT = 2,
}

/// What to train and how. Get defaults from `ember_train_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_train_params {
    /// `sizeof(ember_train_params)`.
    pub struct_size: u32,
    /// LoRA rank (0: no LoRA). Default 8.
    pub lora_rank: u32,
    /// LoRA alpha (0: twice the rank).
    pub lora_alpha: f32,
    /// Scale by alpha / sqrt(rank) instead of alpha / rank.
    pub rslora: bool,
    /// `EMBER_TARGET_*` bits (0: all seven projections).
    pub lora_targets: u32,
    /// Train a soft prompt of this many virtual tokens (0: none).
    pub prompt_tokens: u32,
    /// Train a prefix of this many virtual tokens (0: none; not with a soft prompt).
    pub prefix_tokens: u32,
    /// Continue training this LoRA adapter instead of a fresh one (NULL: fresh).
    pub init_adapter: *const ember_adapter,
    /// Longest sequence in tokens, virtual tokens included (a multiple of 32). Default 256.
    pub seq_len: u32,
    /// Base learning rate. Default 1e-3.
    pub lr: f32,
    /// AdamW weight decay. Default 0.
    pub weight_decay: f32,
    /// Clip gradients to this global norm (0: off). Default 1.
    pub max_grad_norm: f32,
    /// AdamW beta1 (0.9).
    pub beta1: f32,
    /// AdamW beta2 (0.999).
    pub beta2: f32,
    /// AdamW epsilon (1e-8).
    pub eps: f32,
    /// Learning-rate schedule. Default cosine.
    pub schedule: ember_lr_schedule,
    /// Warmup steps.
    pub warmup_steps: u32,
    /// Steps of the whole run (for the cosine schedule).
    pub total_steps: u32,
    /// Seed of the initialization and of shuffling.
    pub seed: u64,
    /// Weight of a distilled token's term (a record with `"distill": true` learns the frozen
    /// base model's next-token distribution, by KL divergence, instead of its own tokens:
    /// mixed into new data, it keeps what the base knows). Default 1.
    pub distill_weight: f32,
    /// Train a mixture of this many LoRA experts (2..=32, each of `lora_rank`) behind a
    /// trainable router on every adapted projection instead of one LoRA pair (0: plain
    /// LoRA). Default 0.
    pub lora_experts: u32,
    /// Experts each token uses in a mixture (1..=lora_experts). Default 2.
    pub lora_top_k: u32,
    /// Mixture gates: false renormalizes the chosen experts' softmax weights to sum to 1;
    /// true keeps their softmax-over-all weights (Switch Transformer, for top-1).
    pub switch_gates: bool,
    /// Weight alpha of a mixture's load-balancing loss (alpha * E * sum_e f_e P_e per
    /// adapted projection, f_e the share of tokens routed to expert e, P_e its mean router
    /// probability). Default 0.01.
    pub balance_loss: f32,
    /// Weight of a mixture's router z-loss (mean squared log-sum-exp of the router
    /// logits). Default 0.
    pub z_loss: f32,
}

/// Default training: LoRA rank 8 on every projection, sequences of 256 tokens, AdamW at
/// 1e-3 with clipping at 1, cosine schedule over 100 steps with 5 warmup steps.
#[no_mangle]
pub extern "C" fn ember_train_default_params() -> ember_train_params {
    ember_train_params {
        struct_size: std::mem::size_of::<ember_train_params>() as u32,
        lora_rank: 8,
        lora_alpha: 0.0,
        rslora: false,
        lora_targets: 0,
        prompt_tokens: 0,
        prefix_tokens: 0,
        init_adapter: std::ptr::null(),
        seq_len: 256,
        lr: 1e-3,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        schedule: ember_lr_schedule::EMBER_LR_COSINE,
        warmup_steps: 5,
        total_steps: 100,
        seed: 0,
        distill_weight: 1.0,
        lora_experts: 0,
        lora_top_k: 2,
        switch_gates: false,
        balance_loss: 0.01,
        z_loss: 0.0,
    }
}

/// What one optimizer step did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ember_step_result {
    /// `sizeof(ember_step_result)`: set it before the call.
    pub struct_size: u32,
    /// Updates applied so far.
    pub step: u32,
    /// Mean loss over the scored tokens (before the update).
    pub loss: f64,
    /// Global gradient norm (before clipping).
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Tokens scored.
    pub tokens: u64,
    /// The loss or a gradient was not finite: the update was skipped, nothing changed.
    pub skipped: bool,
    /// Seconds the step took.
    pub seconds: f64,
    /// A mixture of LoRA experts' auxiliary losses (load balancing and z-loss, summed
    /// over adapted projections), trained beside `loss`; 0 otherwise.
    pub aux_loss: f64,
}

fn write_result(out: *mut ember_step_result, s: &StepStats) {
    if out.is_null() {
        return;
    }
    // SAFETY: the caller passes a valid struct whose first field is struct_size.
    let size = unsafe { (*out).struct_size } as usize;
    let r = ember_step_result {
        struct_size: size as u32,
        step: s.step,
        loss: s.loss,
        grad_norm: s.grad_norm,
        lr: s.lr,
        tokens: s.tokens as u64,
        skipped: s.skipped,
        seconds: s.secs,
        aux_loss: s.aux_loss,
    };
    let n = size.min(std::mem::size_of::<ember_step_result>());
    // SAFETY: at most `size` bytes, which the caller's struct holds.
    unsafe { std::ptr::copy_nonoverlapping(&r as *const _ as *const u8, out as *mut u8, n) };
}

pub(crate) fn targets(bits: u32) -> CResult<Vec<Target>> {
    if bits == 0 {
        return Ok(Target::ALL.to_vec());
    }
    if bits >= 128 {
        return Err(invalid(format!("lora_targets {bits:#x} has unknown bits")));
    }
    Ok(Target::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, t)| *t)
        .collect())
}

fn schedule(p: &ember_train_params) -> LrSchedule {
    match p.schedule {
        ember_lr_schedule::EMBER_LR_CONSTANT => LrSchedule::Constant,
        ember_lr_schedule::EMBER_LR_COSINE => LrSchedule::Cosine {
            warmup: p.warmup_steps,
            total: p.total_steps,
        },
        ember_lr_schedule::EMBER_LR_WARMUP_CONSTANT => LrSchedule::WarmupConstant {
            warmup: p.warmup_steps,
        },
    }
}

/// Refuses a `schedule` field that holds no `ember_lr_schedule` value, reading it as the
/// C `int` it is.
///
/// # Safety
/// `params` NULL or valid for its `struct_size` bytes.
unsafe fn check_schedule(params: *const ember_train_params) -> CResult<()> {
    if params.is_null() {
        return Ok(());
    }
    let off = std::mem::offset_of!(ember_train_params, schedule);
    // SAFETY: every params struct starts with a u32 struct_size.
    let size = unsafe { *(params as *const u32) } as usize;
    if size < off + std::mem::size_of::<u32>() {
        return Ok(()); // too small: read_params reports it
    }
    // SAFETY: within the caller's `size` bytes; read as an integer, never as the enum.
    let raw = unsafe { std::ptr::read_unaligned((params as *const u8).add(off) as *const u32) };
    if raw > ember_lr_schedule::EMBER_LR_WARMUP_CONSTANT as u32 {
        return Err(invalid(format!(
            "schedule is {raw}, not an ember_lr_schedule"
        )));
    }
    Ok(())
}

/// Prepares training on `model` (its weights stay frozen in their stored format). Fails
/// with `EMBER_INVALID_ARGUMENT` when nothing is to be trained, the sequence length is not a
/// multiple of 32, or `init_adapter` belongs to another base.
///
/// # Safety
/// `model` live; `params` NULL or valid (with `init_adapter` NULL or live); `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_create(
    model: *const ember_model,
    params: *const ember_train_params,
    out: *mut *mut ember_trainer,
) -> ember_status {
    guard("ember_trainer_create", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let m = unsafe { get(K_MODEL, model) }?;
        // The schedule is checked as a plain integer before the struct is copied: a value
        // outside the enum must never exist as an `ember_lr_schedule` (undefined behaviour,
        // and the check after the copy could be optimized away).
        unsafe { check_schedule(params) }?;
        let p = unsafe {
            read_params(
                params,
                ember_train_default_params(),
                std::mem::size_of::<ember_train_params>(),
                "ember_train_params",
            )
        }?;
        let model = m.model.clone();
        let mut t = Trainables::default();
        if !p.init_adapter.is_null() {
            let a = unsafe { get(K_ADAPTER, p.init_adapter) }?;
            t.lora = Some((**a.as_lora("init_adapter")?).clone());
        } else if p.lora_rank > 0 {
            let config = LoraConfig {
                rank: p.lora_rank as usize,
                alpha: if p.lora_alpha > 0.0 {
                    p.lora_alpha
                } else {
                    2.0 * p.lora_rank as f32
                },
                rslora: p.rslora,
                targets: targets(p.lora_targets)?,
                experts: (p.lora_experts > 0).then_some(LoraExperts {
                    n_experts: p.lora_experts as usize,
                    top_k: p.lora_top_k as usize,
                    renormalize: !p.switch_gates,
                }),
            };
            let mut a = LoraAdapter::init(&model.config, config, p.seed)?;
            a.base_identity = Some(model.identity);
            a.base_name = model.config.name.clone();
            t.lora = Some(a);
        }
        if p.prompt_tokens > 0 {
            let ids = model
                .tokenizer
                .encode("Answer the question accurately.", false, false)?;
            t.prompt = Some(SoftPrompt::from_tokens(
                &model,
                &ids,
                p.prompt_tokens as usize,
            )?);
        }
        if p.prefix_tokens > 0 {
            t.prefix = Some(Prefix::random(
                &model.config,
                p.prefix_tokens as usize,
                p.seed,
            )?);
        }
        if t.lora.is_none() && t.prompt.is_none() && t.prefix.is_none() {
            return Err(invalid(
                "nothing to train: set lora_rank, prompt_tokens or prefix_tokens",
            ));
        }
        for (name, v) in [
            ("lr", p.lr),
            ("weight_decay", p.weight_decay),
            ("max_grad_norm", p.max_grad_norm),
            ("beta1", p.beta1),
            ("beta2", p.beta2),
            ("eps", p.eps),
            ("distill_weight", p.distill_weight),
            ("balance_loss", p.balance_loss),
            ("z_loss", p.z_loss),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(format!("{name} is {v}")));
            }
        }
        let config = TrainConfig {
            rows: p.seq_len as usize,
            adam: AdamConfig {
                lr: p.lr,
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                weight_decay: p.weight_decay,
                max_norm: p.max_grad_norm,
            },
            schedule: schedule(&p),
            seed: p.seed,
            distill_weight: p.distill_weight,
            balance_loss: p.balance_loss,
            z_loss: p.z_loss,
            ..Default::default()
        };
        let trainer = Trainer::new(model, t, config)?;
        unsafe {
            *out = register(
                K_TRAINER,
                ember_trainer {
                    trainer,
                    seq_len: p.seq_len as usize,
                },
            )
        };
        Ok(())
    })
}

/// Frees a trainer (its GPU buffers). NULL is a no-op.
///
/// # Safety
/// `trainer` NULL or live; not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_free(trainer: *mut ember_trainer) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(unsafe { release(K_TRAINER, trainer) })
    }));
}

fn parse_records(t: &ember_trainer, jsonl: &str) -> CResult<Vec<Example>> {
    let tok = &t.trainer.model().tokenizer;
    let virt = t.trainer.virtual_tokens();
    let d = Dataset::from_jsonl(jsonl, tok, t.seq_len.saturating_sub(virt))?;
    Ok(d.examples)
}

/// One optimizer step on the JSONL records in `jsonl` (one record per line:
/// `{"messages": [...]}` scored on assistant turns, `{"prompt", "completion"}`, or
/// `{"text"}`; any of them with `"distill": true` learns the base model's distribution
/// instead, see `distill_weight`). All records form one batch (their gradients accumulate
/// into one update).
///
/// # Safety
/// `trainer` live (one thread); `jsonl` NUL-terminated UTF-8; `result` NULL or valid with
/// `struct_size` set.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_step(
    trainer: *mut ember_trainer,
    jsonl: *const c_char,
    result: *mut ember_step_result,
) -> ember_status {
    guard("ember_trainer_step", || {
        let t = unsafe { get_mut(K_TRAINER, trainer) }?;
        let text = unsafe { req_str(jsonl, "jsonl") }?;
        let batch = parse_records(t, text)?;
        let s = t.trainer.step(&batch)?;
        write_result(result, &s);
        Ok(())
    })
}

/// One optimizer step on raw token sequences: `n_seqs` sequences whose lengths are in
/// `lengths`, concatenated in `tokens`; `loss_mask` (NULL: every token) holds one byte per
/// token, nonzero where the token is scored.
///
/// # Safety
/// `trainer` live (one thread); `lengths` valid for `n_seqs`; `tokens` (and `loss_mask`
/// unless NULL) valid for the sum of the lengths; `result` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_step_tokens(
    trainer: *mut ember_trainer,
    tokens: *const u32,
    loss_mask: *const u8,
    lengths: *const usize,
    n_seqs: usize,
    result: *mut ember_step_result,
) -> ember_status {
    guard("ember_trainer_step_tokens", || {
        let t = unsafe { get_mut(K_TRAINER, trainer) }?;
        if n_seqs == 0 {
            return Err(invalid("no sequences"));
        }
        non_null(lengths, "lengths")?;
        non_null(tokens, "tokens")?;
        let lens = unsafe { std::slice::from_raw_parts(lengths, n_seqs) };
        let total = lens
            .iter()
            .try_fold(0usize, |a, &l| a.checked_add(l))
            .ok_or_else(|| invalid("lengths overflow"))?;
        let toks = unsafe { std::slice::from_raw_parts(tokens, total) };
        let mask = if loss_mask.is_null() {
            None
        } else {
            Some(unsafe { std::slice::from_raw_parts(loss_mask, total) })
        };
        let mut batch = Vec::with_capacity(n_seqs);
        let mut at = 0;
        for &l in lens {
            batch.push(Example::new(
                toks[at..at + l].to_vec(),
                match mask {
                    Some(m) => m[at..at + l].iter().map(|&b| b != 0).collect(),
                    None => vec![true; l],
                },
            ));
            at += l;
        }
        let s = t.trainer.step(&batch)?;
        write_result(result, &s);
        Ok(())
    })
}

/// Progress of `ember_trainer_train_file`: called after every step; return false to stop
/// (the call then returns `EMBER_ABORTED`, with the steps done so far kept).
pub type ember_train_callback = Option<
    unsafe extern "C" fn(
        step: u32,
        total: u32,
        result: *const ember_step_result,
        user_data: *mut c_void,
    ) -> bool,
>;

/// Trains `steps` optimizer steps on the file at `path` (JSONL records or plain text) in
/// batches of `batch_size` sequences, reshuffled every epoch by the trainer's seed.
/// `*final_loss` (optional) receives the last step's loss.
///
/// # Safety
/// `trainer` live (one thread); `path` NUL-terminated UTF-8; `callback` NULL or valid;
/// `final_loss` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_train_file(
    trainer: *mut ember_trainer,
    path: *const c_char,
    steps: u32,
    batch_size: u32,
    callback: ember_train_callback,
    user_data: *mut c_void,
    final_loss: *mut f64,
) -> ember_status {
    guard("ember_trainer_train_file", || {
        let t = unsafe { get_mut(K_TRAINER, trainer) }?;
        let path = unsafe { req_str(path, "path") }?;
        if steps == 0 || batch_size == 0 {
            return Err(invalid("steps and batch_size must be positive"));
        }
        let virt = t.trainer.virtual_tokens();
        let data = Dataset::load(
            Path::new(path),
            &t.trainer.model().tokenizer,
            t.seq_len.saturating_sub(virt),
        )?;
        let seed = t.trainer.seed();
        let (mut done, mut epoch) = (0u32, 0u64);
        while done < steps {
            for b in data.epoch(batch_size as usize, seed, epoch) {
                if done == steps {
                    break;
                }
                let s = t.trainer.step(&b)?;
                done += 1;
                if !final_loss.is_null() {
                    unsafe { *final_loss = s.loss };
                }
                if let Some(cb) = callback {
                    let mut r = ember_step_result {
                        struct_size: std::mem::size_of::<ember_step_result>() as u32,
                        ..Default::default()
                    };
                    write_result(&mut r, &s);
                    // SAFETY: the caller's callback with its user data.
                    if !unsafe { cb(done, steps, &r, user_data) } {
                        return Err(CError(
                            EMBER_ABORTED,
                            format!("the callback stopped training after {done} steps"),
                        ));
                    }
                }
            }
            epoch += 1;
        }
        Ok(())
    })
}

/// Mean loss of the JSONL records in `jsonl` with the current parameters (no update).
///
/// # Safety
/// `trainer` live; `jsonl` NUL-terminated UTF-8; `loss` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_evaluate(
    trainer: *mut ember_trainer,
    jsonl: *const c_char,
    loss: *mut f64,
) -> ember_status {
    guard("ember_trainer_evaluate", || {
        non_null(loss, "loss")?;
        let t = unsafe { get_mut(K_TRAINER, trainer) }?;
        let text = unsafe { req_str(jsonl, "jsonl") }?;
        let batch = parse_records(t, text)?;
        unsafe { *loss = t.trainer.evaluate(&batch)? };
        Ok(())
    })
}

/// A snapshot of the trained LoRA adapter as an adapter handle: attach it to sessions, or
/// hot-swap it into one with `ember_session_replace_adapter`, while training goes on. Free
/// it with `ember_adapter_free`. `EMBER_UNSUPPORTED` when the trainer trains no LoRA.
///
/// # Safety
/// `trainer` live; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_get_adapter(
    trainer: *mut ember_trainer,
    out: *mut *mut ember_adapter,
) -> ember_status {
    guard("ember_trainer_get_adapter", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let t = unsafe { get_mut(K_TRAINER, trainer) }?;
        let a = t.trainer.lora()?.ok_or_else(|| {
            CError(
                EMBER_UNSUPPORTED,
                "this trainer trains no LoRA adapter".into(),
            )
        })?;
        unsafe { *out = register(K_ADAPTER, ember_adapter::lora(a)) };
        Ok(())
    })
}

/// Saves what is trained to directory `dir` in the PEFT layout, recording the base model:
/// one trained part (a LoRA adapter, a soft prompt or a prefix) goes to `dir` itself; a LoRA
/// adapter with a soft prompt or prefix goes to `dir/lora` and `dir/prompt` or `dir/prefix`.
/// Every file is written atomically (temporary file, fsync, rename): an interrupted save
/// leaves the previous files intact.
///
/// # Safety
/// `trainer` live; `dir` NUL-terminated UTF-8.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_save(
    trainer: *mut ember_trainer,
    dir: *const c_char,
) -> ember_status {
    guard("ember_trainer_save", || {
        let t = unsafe { get_mut(K_TRAINER, trainer) }?;
        let dir = unsafe { req_str(dir, "dir") }?;
        t.trainer.save(Path::new(dir))?;
        Ok(())
    })
}

/// Writes a JSON description (trainable parameters, steps, settings, device memory, and a
/// mixture of LoRA experts' `expert_load`: per adapted projection, tokens per expert) to
/// `*out_json` (free with `ember_string_free`).
///
/// # Safety
/// `trainer` live; `out_json` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_trainer_info_json(
    trainer: *mut ember_trainer,
    out_json: *mut *mut c_char,
) -> ember_status {
    guard("ember_trainer_info_json", || {
        non_null(out_json, "out_json")?;
        unsafe { *out_json = std::ptr::null_mut() };
        let t = unsafe { get_mut(K_TRAINER, trainer) }?;
        let tr = &t.trainer;
        let v = serde_json::json!({
            "trainable_params": tr.n_params(),
            "steps": tr.steps(),
            "config": tr.config(),
            "virtual_tokens": tr.virtual_tokens(),
            "device_bytes": tr.device_bytes(),
            "dispatches_per_block": tr.dispatches_per_block(),
            "expert_load": tr.expert_load()?,
        });
        out_string(out_json, &v.to_string())
    })
}
