//! LoRA adapters through the C ABI: load and save in the PEFT layout, combine (task
//! arithmetic), attach many to one session, hot-swap, scale, and choose one per sequence.

use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;

use ember::adapters::{load_dir, Loaded, LoraAdapter, PromptAdapter};
use ember::session::{AdapterId, SeqId};

use crate::handles::{get, get_mut, register, release};
use crate::status::*;
use crate::{ember_model, ember_session, non_null, out_string, req_str, K_MODEL, K_SESSION};

pub(crate) const K_ADAPTER: &str = "ember_adapter";

/// An adapter held in host memory (immutable; thread-safe): LoRA, soft prompt or prefix.
/// Attaching it to sessions copies its weights to the GPU; the handle may be freed
/// afterwards.
pub struct ember_adapter {
    pub(crate) held: Held,
}

/// What an adapter handle holds.
pub(crate) enum Held {
    Lora(Arc<LoraAdapter>),
    Prompt(PromptAdapter),
}

impl ember_adapter {
    pub(crate) fn lora(a: LoraAdapter) -> ember_adapter {
        ember_adapter {
            held: Held::Lora(Arc::new(a)),
        }
    }

    /// The LoRA adapter, or UNSUPPORTED naming `what` cannot take a prompt adapter.
    pub(crate) fn as_lora(&self, what: &str) -> CResult<&Arc<LoraAdapter>> {
        match &self.held {
            Held::Lora(a) => Ok(a),
            Held::Prompt(_) => Err(CError(
                EMBER_UNSUPPORTED,
                format!("{what} takes LoRA adapters, not a soft prompt or prefix"),
            )),
        }
    }
}

/// An attached adapter's id as the session knows it, or `None` for -1.
pub(crate) fn adapter_choice(id: i32, scale: f32) -> CResult<Option<(AdapterId, f32)>> {
    match id {
        -1 => Ok(None),
        i if i >= 0 => Ok(Some((AdapterId(i as usize), scale))),
        i => Err(invalid(format!("adapter id {i} (use -1 for none)"))),
    }
}

fn attached_id(id: i32) -> CResult<AdapterId> {
    adapter_choice(id, 1.0)?
        .map(|(a, _)| a)
        .ok_or_else(|| invalid("adapter id -1 names no adapter"))
}

/// Loads an adapter saved in the PEFT layout (`adapter_config.json` +
/// `adapter_model.safetensors`) from directory `dir` — LoRA, prompt tuning (soft prompt) or
/// prefix tuning — and checks it against `model`: shapes, targets, and the base model
/// identity when the adapter records one (adapters saved by Ember do). A mismatch gives
/// `EMBER_INVALID_ARGUMENT` or `EMBER_FORMAT` with a message. A directory that holds
/// several kinds (subdirectories `lora/`, `prompt/`, `prefix/`, as a trainer saves them)
/// gives `EMBER_INVALID_ARGUMENT`: load each subdirectory.
///
/// # Safety
/// `model` live; `dir` NUL-terminated UTF-8; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_adapter_load(
    model: *const ember_model,
    dir: *const c_char,
    out: *mut *mut ember_adapter,
) -> ember_status {
    guard("ember_adapter_load", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let m = unsafe { get(K_MODEL, model) }?;
        let dir = unsafe { req_str(dir, "dir") }?;
        let mut loaded = load_dir(Path::new(dir), &m.model)?;
        if loaded.len() != 1 {
            return Err(invalid(format!(
                "{dir} holds {} adapters (lora/, prompt/, prefix/): load each directory",
                loaded.len()
            )));
        }
        let held = match loaded.remove(0) {
            Loaded::Lora(a) => Held::Lora(Arc::new(a)),
            Loaded::Prompt(p) => Held::Prompt(p),
        };
        unsafe { *out = register(K_ADAPTER, ember_adapter { held }) };
        Ok(())
    })
}

/// Frees an adapter handle (sessions it is attached to keep their copy). NULL is a no-op.
///
/// # Safety
/// `adapter` NULL or live; not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ember_adapter_free(adapter: *mut ember_adapter) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(unsafe { release(K_ADAPTER, adapter) })
    }));
}

/// Saves an adapter to directory `dir` in the PEFT layout, recording `model`'s identity so
/// that loading it on another base fails. Each file is written atomically (temporary file,
/// fsync, rename): an interrupted save leaves the previous files intact.
///
/// # Safety
/// `adapter`, `model` live; `dir` NUL-terminated UTF-8.
#[no_mangle]
pub unsafe extern "C" fn ember_adapter_save(
    adapter: *const ember_adapter,
    model: *const ember_model,
    dir: *const c_char,
) -> ember_status {
    guard("ember_adapter_save", || {
        let a = unsafe { get(K_ADAPTER, adapter) }?;
        let m = unsafe { get(K_MODEL, model) }?;
        let dir = unsafe { req_str(dir, "dir") }?;
        let dir = Path::new(dir);
        match &a.held {
            Held::Lora(l) => l.save(dir, &m.model)?,
            Held::Prompt(PromptAdapter::Soft(p)) => p.save(dir, &m.model)?,
            Held::Prompt(PromptAdapter::Prefix(p)) => p.save(dir, &m.model)?,
        }
        Ok(())
    })
}

/// Writes a JSON description of the adapter (rank, alpha, rslora, targets, layers,
/// parameter count, base model) to `*out_json` (free with `ember_string_free`).
///
/// # Safety
/// `adapter` live; `out_json` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_adapter_info_json(
    adapter: *const ember_adapter,
    out_json: *mut *mut c_char,
) -> ember_status {
    guard("ember_adapter_info_json", || {
        non_null(out_json, "out_json")?;
        unsafe { *out_json = std::ptr::null_mut() };
        let a = match &unsafe { get(K_ADAPTER, adapter) }?.held {
            Held::Lora(a) => a,
            Held::Prompt(p) => {
                let (kind, base) = match p {
                    PromptAdapter::Soft(p) => ("prompt_tuning", p.base_identity),
                    PromptAdapter::Prefix(p) => ("prefix_tuning", p.base_identity),
                };
                let v = serde_json::json!({
                    "kind": kind,
                    "n_virtual": p.n_virtual(),
                    "base_identity": base.map(|i| format!("{i:016x}")),
                });
                return out_string(out_json, &v.to_string());
            }
        };
        let mut layers: Vec<usize> = a.weights.keys().map(|(l, _)| *l).collect();
        layers.dedup();
        let mut targets: Vec<&str> = a.config.targets.iter().map(|t| t.module()).collect();
        targets.sort();
        let v = serde_json::json!({
            "kind": "lora",
            "rank": a.config.rank,
            "alpha": a.config.alpha,
            "rslora": a.config.rslora,
            "scale": a.config.scale(),
            "experts": a.config.experts.map_or(0, |e| e.n_experts),
            "top_k": a.config.experts.map_or(0, |e| e.top_k),
            "targets": targets,
            "layers": layers,
            "n_params": a.n_params(),
            "base_model": a.base_name,
            "base_identity": a.base_identity.map(|i| format!("{i:016x}")),
        });
        out_string(out_json, &v.to_string())
    })
}

/// Combines `n` adapters made for the same base into one (task arithmetic): the result
/// applies `sum_i weights[i] * adapter_i` (ranks concatenate, so nothing is approximated).
/// `weights` may be NULL (all 1). Free the result with `ember_adapter_free`.
///
/// # Safety
/// `adapters` valid for `n` live handles; `weights` NULL or valid for `n`; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_adapter_combine(
    adapters: *const *const ember_adapter,
    weights: *const f32,
    n: usize,
    out: *mut *mut ember_adapter,
) -> ember_status {
    guard("ember_adapter_combine", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let parts = unsafe { lora_parts(adapters, weights, n, "ember_adapter_combine") }?;
        let combined = LoraAdapter::stack(&parts)?;
        unsafe { *out = register(K_ADAPTER, ember_adapter::lora(combined)) };
        Ok(())
    })
}

/// The LoRA adapters of a C array with their strengths (`weights` NULL: all 1), for `what`.
///
/// # Safety
/// `adapters` valid for `n` handles; `weights` NULL or valid for `n`.
unsafe fn lora_parts<'a>(
    adapters: *const *const ember_adapter,
    weights: *const f32,
    n: usize,
    what: &str,
) -> CResult<Vec<(&'a LoraAdapter, f32)>> {
    if n == 0 {
        return Err(invalid(format!("{what}: no adapters")));
    }
    non_null(adapters, "adapters")?;
    let list = unsafe { std::slice::from_raw_parts(adapters, n) };
    let w = if weights.is_null() {
        vec![1.0; n]
    } else {
        unsafe { std::slice::from_raw_parts(weights, n) }.to_vec()
    };
    let mut parts = Vec::with_capacity(n);
    for (i, &p) in list.iter().enumerate() {
        let a: &'a ember_adapter = unsafe { get(K_ADAPTER, p) }?;
        if !w[i].is_finite() {
            return Err(invalid(format!("weights[{i}] is {}", w[i])));
        }
        parts.push((&**a.as_lora(what)?, w[i]));
    }
    Ok(parts)
}

/// Attaches an adapter to a session under `name` (for logs; may be NULL) without reloading
/// the base; `*out_id` receives its id in this session (>= 0). Many adapters may be attached:
/// each sequence chooses one with `ember_seq_set_adapter` or a generation with
/// `ember_generate_params.adapter`, and sequences with different adapters share one forward
/// pass. A soft prompt or prefix is attached the same way; a sequence that chooses it starts
/// with its virtual tokens. Fails when the adapter was made for another base model.
///
/// # Safety
/// `session` live (one thread); `adapter` live; `name` NULL or NUL-terminated; `out_id` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_session_attach_adapter(
    session: *mut ember_session,
    adapter: *const ember_adapter,
    name: *const c_char,
    out_id: *mut i32,
) -> ember_status {
    guard("ember_session_attach_adapter", || {
        non_null(out_id, "out_id")?;
        unsafe { *out_id = -1 };
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let a = unsafe { get(K_ADAPTER, adapter) }?;
        let name = unsafe { crate::opt_str(name, "name") }?.unwrap_or("adapter");
        let id = match &a.held {
            Held::Lora(l) => s.session.attach_adapter(name, l.clone())?,
            Held::Prompt(p) => s.session.attach_prompt(name, p.clone())?,
        };
        unsafe { *out_id = id.0 as i32 };
        Ok(())
    })
}

/// Detaches adapter `id`; sequences that used it continue with the base model.
///
/// # Safety
/// `session` live (one thread).
#[no_mangle]
pub unsafe extern "C" fn ember_session_detach_adapter(
    session: *mut ember_session,
    id: i32,
) -> ember_status {
    guard("ember_session_detach_adapter", || {
        let s = unsafe { get_mut(K_SESSION, session) }?;
        s.session.detach_adapter(attached_id(id)?)?;
        Ok(())
    })
}

/// Hot-swaps the weights of attached adapter `id` for `adapter`'s (between requests; the
/// base is not reloaded and the sequences using `id` keep using it). On failure the old
/// adapter stays attached.
///
/// # Safety
/// `session` live (one thread); `adapter` live.
#[no_mangle]
pub unsafe extern "C" fn ember_session_replace_adapter(
    session: *mut ember_session,
    id: i32,
    adapter: *const ember_adapter,
) -> ember_status {
    guard("ember_session_replace_adapter", || {
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let a = unsafe { get(K_ADAPTER, adapter) }?;
        s.session.replace_adapter(
            attached_id(id)?,
            a.as_lora("ember_session_replace_adapter")?.clone(),
        )?;
        Ok(())
    })
}

/// Sets attached adapter `id`'s strength (1 = as trained, 0 = off, negative subtracts it).
///
/// # Safety
/// `session` live (one thread).
#[no_mangle]
pub unsafe extern "C" fn ember_session_set_adapter_scale(
    session: *mut ember_session,
    id: i32,
    scale: f32,
) -> ember_status {
    guard("ember_session_set_adapter_scale", || {
        let s = unsafe { get_mut(K_SESSION, session) }?;
        s.session.set_adapter_scale(attached_id(id)?, scale)?;
        Ok(())
    })
}

/// Chooses the adapter of sequence `seq` (an attached id, or -1 for the base model) and its
/// strength, for the tokens it processes from now on. The id of an attached soft prompt or
/// prefix instead puts its virtual tokens at the start of the sequence, which must be empty
/// (`scale` unused); a sequence may have one LoRA adapter and one prompt adapter: choose
/// the LoRA first. -1 removes the LoRA adapter only.
///
/// # Safety
/// `session` live (one thread).
#[no_mangle]
pub unsafe extern "C" fn ember_seq_set_adapter(
    session: *mut ember_session,
    seq: u64,
    id: i32,
    scale: f32,
) -> ember_status {
    guard("ember_seq_set_adapter", || {
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let choice = adapter_choice(id, scale)?;
        s.session
            .set_sequence_adapter(SeqId(seq), choice.map(|c| c.0), scale)?;
        Ok(())
    })
}

/// Merges `n` LoRA adapters (each at strength `weights[i]`; `weights` NULL means all 1)
/// into a copy of `model`'s f32/f16 weights and returns it as a new model in `*out`
/// (free it with `ember_model_free`). The new model shares every tensor the adapters do not
/// touch with `model`, which is left unchanged: to unmerge, keep using `model` (exact, bit
/// for bit). Negative strengths subtract an adapter (task arithmetic). Quantized bases
/// give `EMBER_UNSUPPORTED`; adapters made for another base `EMBER_INVALID_ARGUMENT`.
///
/// # Safety
/// `model` live; `adapters` valid for `n` live handles; `weights` NULL or valid for `n`;
/// `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_model_merge_adapters(
    model: *const ember_model,
    adapters: *const *const ember_adapter,
    weights: *const f32,
    n: usize,
    out: *mut *mut ember_model,
) -> ember_status {
    guard("ember_model_merge_adapters", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let m = unsafe { get(K_MODEL, model) }?;
        let parts = unsafe { lora_parts(adapters, weights, n, "ember_model_merge_adapters") }?;
        let merged = m.model.merge_lora(&parts)?;
        unsafe {
            *out = register(
                K_MODEL,
                ember_model {
                    model: Arc::new(merged),
                },
            )
        };
        Ok(())
    })
}
