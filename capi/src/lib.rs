//! `libember`: the C ABI of the Ember runtime. The header `include/ember.h` is generated
//! from this crate by cbindgen (`capi/cbindgen.toml`); a test fails when it is stale.
//!
//! Conventions (see the header's preamble): opaque handles, `*_default_params()` returned
//! by value with a `struct_size` field, every fallible call returns an `ember_status` and
//! sets a thread-local message (`ember_last_error`), no panic crosses the ABI.
#![allow(non_camel_case_types)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod adapters;
mod handles;
mod learn;
mod status;
mod train;

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::Arc;

use ember::gpu::{AdapterSelector, BackendChoice, ContextOptions};
use ember::model::{LoadOptions, Model};
use ember::session::{GenerateOptions, SamplerConfig, Session, SessionParams, StopReason};
use ember::tokenizer::ChatMessage;
use ember::Context;

use adapters::adapter_choice;
pub use adapters::*;
use handles::{get, get_mut, register, release};
pub use learn::*;
use status::*;
pub use status::{ember_last_error, ember_status, ember_status_str};
pub use train::*;

/// ABI version of this header. `ember_abi_version()` returns the library's; they must be
/// equal (checked by `EMBER_CHECK_ABI()` in C code).
pub const EMBER_ABI_VERSION: u32 = 1;

const K_CONTEXT: &str = "ember_context";
pub(crate) const K_MODEL: &str = "ember_model";
pub(crate) const K_SESSION: &str = "ember_session";

/// A GPU device and its caches. Thread-safe: may be shared by any number of threads.
pub struct ember_context {
    ctx: Context,
}

/// A loaded model (weights, tokenizer, configuration). Immutable and thread-safe: many
/// sessions on many threads may share one. It stays alive while sessions use it, even after
/// `ember_model_free`.
pub struct ember_model {
    pub(crate) model: Arc<Model>,
}

/// A key/value cache with its sequences. Use one session from one thread at a time.
pub struct ember_session {
    pub(crate) session: Session,
}

/// Version string of the library (e.g. `"0.1.0"`). Static; never NULL; never free it.
#[no_mangle]
pub extern "C" fn ember_version() -> *const c_char {
    static V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr() as *const c_char
}

/// ABI version of the library; compare with `EMBER_ABI_VERSION` of the header you compiled
/// against.
#[no_mangle]
pub extern "C" fn ember_abi_version() -> u32 {
    EMBER_ABI_VERSION
}

/// Frees a string returned by Ember (`char **` outputs). NULL is a no-op.
///
/// # Safety
/// `s` must be NULL or a string returned by this library, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ember_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: the caller passes back a pointer from `CString::into_raw` below.
        drop(unsafe { CString::from_raw(s) });
    }
}

pub(crate) fn out_string(out: *mut *mut c_char, s: &str) -> CResult<()> {
    let c = CString::new(s.replace('\0', " ")).map_err(|_| invalid("string with NUL"))?;
    // SAFETY: `out` was checked non-NULL by the callers.
    unsafe { *out = c.into_raw() };
    Ok(())
}

pub(crate) unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> CResult<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller promises a NUL-terminated string.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map(Some)
        .map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

pub(crate) unsafe fn req_str<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    unsafe { opt_str(p, what) }?.ok_or_else(|| invalid(format!("{what} is NULL")))
}

pub(crate) fn non_null<T>(p: *const T, what: &str) -> CResult<()> {
    if p.is_null() {
        Err(invalid(format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

/// Reads a params struct whose first field is `struct_size`: at least the struct's first
/// ABI version (`min` bytes, today the whole struct) must be present; fields a future
/// version adds keep their defaults for older callers, fields a newer caller added are
/// ignored.
pub(crate) unsafe fn read_params<T: Copy>(
    p: *const T,
    default: T,
    min: usize,
    what: &str,
) -> CResult<T> {
    if p.is_null() {
        return Ok(default);
    }
    // SAFETY: every params struct starts with a u32 struct_size.
    let size = unsafe { *(p as *const u32) } as usize;
    if size < min {
        return Err(invalid(format!(
            "{what}.struct_size is {size}, at least {min} expected (use {what}'s *_default_params())"
        )));
    }
    let mut out = default;
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: the caller's struct holds `size` bytes; we copy at most that many.
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, &mut out as *mut T as *mut u8, n) };
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------

/// Log levels passed to the log callback.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_log_level {
    /// Errors.
    EMBER_LOG_ERROR = 1,
    /// Warnings.
    EMBER_LOG_WARN = 2,
    /// Information (device chosen, model loaded).
    EMBER_LOG_INFO = 3,
    /// Debugging detail.
    EMBER_LOG_DEBUG = 4,
}

/// Receives Ember's log messages: `message` is NUL-terminated and valid only during the
/// call. May be called from any thread Ember runs on.
pub type ember_log_callback = Option<
    unsafe extern "C" fn(level: ember_log_level, message: *const c_char, user_data: *mut c_void),
>;

struct CLogger;
static LOG_CB: std::sync::Mutex<(ember_log_callback, usize)> = std::sync::Mutex::new((None, 0));

impl log::Log for CLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("ember") || m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let (cb, ud) = *LOG_CB.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cb) = cb {
            let level = match r.level() {
                log::Level::Error => ember_log_level::EMBER_LOG_ERROR,
                log::Level::Warn => ember_log_level::EMBER_LOG_WARN,
                log::Level::Info => ember_log_level::EMBER_LOG_INFO,
                _ => ember_log_level::EMBER_LOG_DEBUG,
            };
            if let Ok(msg) = CString::new(format!("{}", r.args()).replace('\0', " ")) {
                let _ = std::panic::catch_unwind(|| {
                    // SAFETY: the callback and user data come from the caller.
                    unsafe { cb(level, msg.as_ptr(), ud as *mut c_void) }
                });
            }
        }
    }
    fn flush(&self) {}
}

/// Sets (or with NULL clears) the process-wide log callback. Thread-safe.
///
/// # Safety
/// `callback` must stay callable, and `user_data` valid for it, until replaced.
#[no_mangle]
pub unsafe extern "C" fn ember_set_log_callback(
    callback: ember_log_callback,
    user_data: *mut c_void,
) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        static LOGGER: CLogger = CLogger;
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
    });
    *LOG_CB.lock().unwrap_or_else(|p| p.into_inner()) = (callback, user_data as usize);
}

// ---------------------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------------------

/// How to create a context. Get defaults from `ember_context_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_context_params {
    /// `sizeof(ember_context_params)`; set by the default-params function.
    pub struct_size: u32,
    /// `"vulkan"`, `"metal"`, `"dx12"`, `"gl"` or `"any"`; NULL reads `EMBER_BACKEND`.
    pub backend: *const c_char,
    /// Adapter index (`"0"`) or name substring; NULL reads `EMBER_ADAPTER`.
    pub adapter: *const c_char,
    /// Device memory budget in bytes (0: the device's limits).
    pub memory_budget: u64,
    /// Do not use SHADER_F16 even if available.
    pub disable_f16: bool,
    /// Do not use subgroup operations even if available.
    pub disable_subgroups: bool,
}

/// Default context parameters (environment-chosen backend and adapter, no budget).
#[no_mangle]
pub extern "C" fn ember_context_default_params() -> ember_context_params {
    ember_context_params {
        struct_size: std::mem::size_of::<ember_context_params>() as u32,
        backend: std::ptr::null(),
        adapter: std::ptr::null(),
        memory_budget: 0,
        disable_f16: false,
        disable_subgroups: false,
    }
}

/// Creates a context on a GPU adapter. `params` may be NULL (defaults). On success
/// `*out` owns a context to free with `ember_context_free`; on failure `*out` is NULL.
///
/// # Safety
/// `out` must be a valid pointer; `params` NULL or a valid struct.
#[no_mangle]
pub unsafe extern "C" fn ember_context_create(
    params: *const ember_context_params,
    out: *mut *mut ember_context,
) -> ember_status {
    guard("ember_context_create", || {
        non_null(out, "out")?;
        // SAFETY: checked non-NULL.
        unsafe { *out = std::ptr::null_mut() };
        let p = unsafe {
            read_params(
                params,
                ember_context_default_params(),
                std::mem::size_of::<ember_context_params>(),
                "ember_context_params",
            )
        }?;
        let mut opts = ContextOptions::from_env()?;
        if let Some(b) = unsafe { opt_str(p.backend, "backend") }? {
            opts.backend = BackendChoice::parse(b)?;
        }
        if let Some(a) = unsafe { opt_str(p.adapter, "adapter") }? {
            opts.adapter = AdapterSelector::parse(a);
        }
        if p.memory_budget > 0 {
            opts.memory_budget = Some(p.memory_budget);
        }
        opts.disable_f16 |= p.disable_f16;
        opts.disable_subgroups |= p.disable_subgroups;
        let ctx = Context::with_options(opts)?;
        unsafe { *out = register(K_CONTEXT, ember_context { ctx }) };
        Ok(())
    })
}

/// Frees a context. NULL is a no-op; freeing twice is undefined (detected and ignored when
/// possible). Models and sessions made from it keep the device alive until they are freed.
///
/// # Safety
/// `ctx` must be NULL or a context from `ember_context_create`.
#[no_mangle]
pub unsafe extern "C" fn ember_context_free(ctx: *mut ember_context) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(unsafe { release(K_CONTEXT, ctx) })
    }));
}

/// Writes a JSON description of the adapter (name, backend, driver, features, limits) to
/// `*out_json`; free it with `ember_string_free`.
///
/// # Safety
/// `ctx` a live context; `out_json` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_context_info_json(
    ctx: *const ember_context,
    out_json: *mut *mut c_char,
) -> ember_status {
    guard("ember_context_info_json", || {
        non_null(out_json, "out_json")?;
        // SAFETY: checked non-NULL; a failure leaves NULL there, as for every output.
        unsafe { *out_json = std::ptr::null_mut() };
        let c = unsafe { get(K_CONTEXT, ctx) }?;
        let v = serde_json::json!({"adapter": c.ctx.info(), "capabilities": c.ctx.caps()});
        out_string(out_json, &v.to_string())
    })
}

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

/// Called during loading with the fraction done (0..1); return false to abort the load
/// (`ember_model_load` then returns `EMBER_ABORTED`).
pub type ember_progress_callback =
    Option<unsafe extern "C" fn(progress: f32, user_data: *mut c_void) -> bool>;

/// How to load a model. Get defaults from `ember_model_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_model_params {
    /// `sizeof(ember_model_params)`.
    pub struct_size: u32,
    /// Optional progress/abort callback (called on the loading thread).
    pub progress: ember_progress_callback,
    /// Passed to `progress`.
    pub progress_user_data: *mut c_void,
}

/// Default model parameters (no callback).
#[no_mangle]
pub extern "C" fn ember_model_default_params() -> ember_model_params {
    ember_model_params {
        struct_size: std::mem::size_of::<ember_model_params>() as u32,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
    }
}

/// Loads a GGUF file or an HF model directory (`config.json`, `model.safetensors` or
/// shards, `tokenizer.json`) onto the context's device. On success `*out` owns the model
/// (free with `ember_model_free`); on failure it is NULL and nothing is leaked.
///
/// # Safety
/// `ctx` a live context; `path` a NUL-terminated UTF-8 path; `params` NULL or valid; `out`
/// valid.
#[no_mangle]
pub unsafe extern "C" fn ember_model_load(
    ctx: *const ember_context,
    path: *const c_char,
    params: *const ember_model_params,
    out: *mut *mut ember_model,
) -> ember_status {
    guard("ember_model_load", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let c = unsafe { get(K_CONTEXT, ctx) }?;
        let path = PathBuf::from(unsafe { req_str(path, "path") }?);
        let p = unsafe {
            read_params(
                params,
                ember_model_default_params(),
                std::mem::size_of::<ember_model_params>(),
                "ember_model_params",
            )
        }?;
        let mut cb = |f: f32| match p.progress {
            // SAFETY: the caller's callback with its user data.
            Some(cb) => unsafe { cb(f, p.progress_user_data) },
            None => true,
        };
        let opts = LoadOptions {
            progress: Some(&mut cb),
            ..Default::default()
        };
        let model = Model::load(&c.ctx, &path, opts)?;
        unsafe {
            *out = register(
                K_MODEL,
                ember_model {
                    model: Arc::new(model),
                },
            )
        };
        Ok(())
    })
}

/// Frees a model handle. NULL is a no-op. Sessions created from it keep working (they hold
/// their own reference) until they are freed.
///
/// # Safety
/// `model` NULL or a model from `ember_model_load`.
#[no_mangle]
pub unsafe extern "C" fn ember_model_free(model: *mut ember_model) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(unsafe { release(K_MODEL, model) })
    }));
}

/// Numbers describing a loaded model.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ember_model_info {
    /// `sizeof(ember_model_info)`: set it before calling `ember_model_get_info`.
    pub struct_size: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// Hidden size.
    pub hidden: u32,
    /// Transformer blocks.
    pub n_layers: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads.
    pub n_kv_heads: u32,
    /// Head size.
    pub head_dim: u32,
    /// Feed-forward size.
    pub ff: u32,
    /// Training context length.
    pub train_ctx: u32,
    /// BOS token id, or -1.
    pub bos: i32,
    /// EOS token id, or -1.
    pub eos: i32,
    /// Parameter count.
    pub n_params: u64,
    /// Device bytes taken by the weights.
    pub weight_bytes: u64,
    /// Routed experts per layer of a Mixture-of-Experts model (0 for a dense model).
    pub n_experts: u32,
    /// Experts each token uses (0 for a dense model).
    pub n_experts_used: u32,
    /// Parameters one token goes through (`n_params` for a dense model).
    pub n_active_params: u64,
}

/// Fills `*info` (whose `struct_size` the caller sets; fields beyond it are not written).
///
/// # Safety
/// `model` live; `info` valid for `info->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_model_get_info(
    model: *const ember_model,
    info: *mut ember_model_info,
) -> ember_status {
    guard("ember_model_get_info", || {
        non_null(info, "info")?;
        let m = unsafe { get(K_MODEL, model) }?;
        let size = unsafe { (*info).struct_size } as usize;
        if size < 4 {
            return Err(invalid("ember_model_info.struct_size is not set"));
        }
        let c = &m.model.config;
        let t = &m.model.tokenizer;
        let v = ember_model_info {
            struct_size: size as u32,
            vocab: c.vocab as u32,
            hidden: c.hidden as u32,
            n_layers: c.n_layers as u32,
            n_heads: c.n_heads as u32,
            n_kv_heads: c.n_kv_heads as u32,
            head_dim: c.head_dim as u32,
            ff: c.ff as u32,
            train_ctx: c.train_ctx as u32,
            bos: t.bos().map(|b| b as i32).unwrap_or(-1),
            eos: t.eos().map(|b| b as i32).unwrap_or(-1),
            n_params: m.model.n_params(),
            weight_bytes: m.model.weight_bytes(),
            n_experts: c.moe.as_ref().map_or(0, |x| x.n_experts as u32),
            n_experts_used: c.moe.as_ref().map_or(0, |x| x.top_k as u32),
            n_active_params: m.model.n_active_params(),
        };
        let n = size.min(std::mem::size_of::<ember_model_info>());
        // SAFETY: the caller's struct has `size` bytes.
        unsafe { std::ptr::copy_nonoverlapping(&v as *const _ as *const u8, info as *mut u8, n) };
        Ok(())
    })
}

/// Writes a JSON description of the model (config, source, weight formats) to `*out_json`;
/// free it with `ember_string_free`.
///
/// # Safety
/// `model` live; `out_json` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_model_info_json(
    model: *const ember_model,
    out_json: *mut *mut c_char,
) -> ember_status {
    guard("ember_model_info_json", || {
        non_null(out_json, "out_json")?;
        // SAFETY: checked non-NULL; a failure leaves NULL there, as for every output.
        unsafe { *out_json = std::ptr::null_mut() };
        let m = unsafe { get(K_MODEL, model) }?;
        let v = serde_json::json!({
            "config": m.model.config, "source": m.model.source,
            "n_params": m.model.n_params(), "n_active_params": m.model.n_active_params(),
        });
        out_string(out_json, &v.to_string())
    })
}

/// Tokenizes `text_len` bytes of UTF-8 `text` into `tokens` (capacity `capacity`).
/// `*n_tokens` receives the count; if it exceeds `capacity` the call returns
/// `EMBER_BUFFER_TOO_SMALL` and writes nothing to `tokens` (call again with a larger
/// buffer). `add_bos` adds the model's BOS if its tokenizer asks for one; `parse_special`
/// turns special-token text such as `<|im_start|>` into its id.
///
/// # Safety
/// `model` live; `text` valid for `text_len` bytes; `tokens` valid for `capacity` ids (may
/// be NULL when `capacity` is 0); `n_tokens` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_tokenize(
    model: *const ember_model,
    text: *const c_char,
    text_len: usize,
    add_bos: bool,
    parse_special: bool,
    tokens: *mut u32,
    capacity: usize,
    n_tokens: *mut usize,
) -> ember_status {
    guard("ember_tokenize", || {
        non_null(n_tokens, "n_tokens")?;
        let m = unsafe { get(K_MODEL, model) }?;
        if text.is_null() && text_len > 0 {
            return Err(invalid("text is NULL"));
        }
        let bytes = if text_len == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(text as *const u8, text_len) }
        };
        let s = std::str::from_utf8(bytes)
            .map_err(|e| invalid(format!("text is not valid UTF-8: {e}")))?;
        let ids = m.model.tokenizer.encode(s, add_bos, parse_special)?;
        unsafe { *n_tokens = ids.len() };
        if ids.len() > capacity {
            return Err(CError(
                EMBER_BUFFER_TOO_SMALL,
                format!("{} tokens do not fit in {capacity}", ids.len()),
            ));
        }
        if !ids.is_empty() {
            non_null(tokens, "tokens")?;
            unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), tokens, ids.len()) };
        }
        Ok(())
    })
}

/// Turns tokens back into UTF-8 text, written NUL-terminated into `buf` (capacity
/// `capacity` bytes including the NUL). `*text_len` receives the text length without the
/// NUL; if the text does not fit, returns `EMBER_BUFFER_TOO_SMALL`. `skip_special` leaves out
/// control tokens.
///
/// # Safety
/// `model` live; `tokens` valid for `n` ids; `buf` valid for `capacity` bytes; `text_len`
/// valid.
#[no_mangle]
pub unsafe extern "C" fn ember_detokenize(
    model: *const ember_model,
    tokens: *const u32,
    n: usize,
    skip_special: bool,
    buf: *mut c_char,
    capacity: usize,
    text_len: *mut usize,
) -> ember_status {
    guard("ember_detokenize", || {
        non_null(text_len, "text_len")?;
        let m = unsafe { get(K_MODEL, model) }?;
        if tokens.is_null() && n > 0 {
            return Err(invalid("tokens is NULL"));
        }
        let ids = if n == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(tokens, n) }
        };
        let vocab = m.model.tokenizer.vocab_size();
        if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(format!(
                "token {t} is outside the vocabulary of {vocab}"
            )));
        }
        let s = m.model.tokenizer.decode(ids, skip_special)?;
        unsafe { *text_len = s.len() };
        if s.len() + 1 > capacity {
            return Err(CError(
                EMBER_BUFFER_TOO_SMALL,
                format!("{} bytes of text do not fit in {capacity}", s.len() + 1),
            ));
        }
        non_null(buf, "buf")?;
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf as *mut u8, s.len());
            *buf.add(s.len()) = 0;
        }
        Ok(())
    })
}

/// Whether `token` ends generation (EOS, end-of-turn).
///
/// # Safety
/// `model` live (a dead handle gives false).
#[no_mangle]
pub unsafe extern "C" fn ember_token_is_eog(model: *const ember_model, token: u32) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        unsafe { get(K_MODEL, model) }
            .map(|m| m.model.tokenizer.is_end_of_generation(token))
            .unwrap_or(false)
    }))
    .unwrap_or(false)
}

/// One chat message.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_chat_message {
    /// `"system"`, `"user"` or `"assistant"` (NUL-terminated UTF-8).
    pub role: *const c_char,
    /// The text (NUL-terminated UTF-8).
    pub content: *const c_char,
}

/// Renders `n` messages with the model's chat template (from the GGUF or
/// tokenizer_config.json) into `*out` (free with `ember_string_free`).
/// `add_generation_prompt` appends the opening of the assistant's turn.
///
/// # Safety
/// `model` live; `messages` valid for `n` entries; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_chat_template_apply(
    model: *const ember_model,
    messages: *const ember_chat_message,
    n: usize,
    add_generation_prompt: bool,
    out: *mut *mut c_char,
) -> ember_status {
    guard("ember_chat_template_apply", || {
        non_null(out, "out")?;
        // SAFETY: checked non-NULL; a failure leaves NULL there, as for every output.
        unsafe { *out = std::ptr::null_mut() };
        let m = unsafe { get(K_MODEL, model) }?;
        if messages.is_null() && n > 0 {
            return Err(invalid("messages is NULL"));
        }
        let msgs = if n == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(messages, n) }
        };
        let mut v = Vec::with_capacity(n);
        for (i, msg) in msgs.iter().enumerate() {
            let role = unsafe { req_str(msg.role, &format!("messages[{i}].role")) }?;
            let content = unsafe { req_str(msg.content, &format!("messages[{i}].content")) }?;
            v.push(ChatMessage::new(role, content));
        }
        let s = m
            .model
            .tokenizer
            .apply_chat_template(&v, add_generation_prompt)?;
        out_string(out, &s)
    })
}

// ---------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------

/// Sizes of a session. Get defaults from `ember_session_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_session_params {
    /// `sizeof(ember_session_params)`.
    pub struct_size: u32,
    /// Tokens each sequence can hold (0: the model's training context, capped by
    /// `kv_budget`).
    pub n_ctx: u32,
    /// Sequences that can be active at once.
    pub n_seq: u32,
    /// Tokens per prefill chunk.
    pub n_batch: u32,
    /// Bytes the key/value cache may take (0: no limit beyond the device's).
    pub kv_budget: u64,
}

/// Default session parameters (2048 tokens, 1 sequence, 256-token prefill chunks).
#[no_mangle]
pub extern "C" fn ember_session_default_params() -> ember_session_params {
    let d = SessionParams::default();
    ember_session_params {
        struct_size: std::mem::size_of::<ember_session_params>() as u32,
        n_ctx: d.n_ctx as u32,
        n_seq: d.n_seq as u32,
        n_batch: d.n_batch as u32,
        kv_budget: d.kv_budget,
    }
}

/// Creates a session on a model. On success `*out` owns it (free with
/// `ember_session_free`).
///
/// # Safety
/// `model` live; `params` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_session_create(
    model: *const ember_model,
    params: *const ember_session_params,
    out: *mut *mut ember_session,
) -> ember_status {
    guard("ember_session_create", || {
        non_null(out, "out")?;
        unsafe { *out = std::ptr::null_mut() };
        let m = unsafe { get(K_MODEL, model) }?;
        let p = unsafe {
            read_params(
                params,
                ember_session_default_params(),
                std::mem::size_of::<ember_session_params>(),
                "ember_session_params",
            )
        }?;
        let sp = SessionParams {
            n_ctx: p.n_ctx as usize,
            n_seq: p.n_seq as usize,
            n_batch: p.n_batch as usize,
            kv_budget: p.kv_budget,
        };
        let session = Session::new(m.model.clone(), sp)?;
        unsafe { *out = register(K_SESSION, ember_session { session }) };
        Ok(())
    })
}

/// Frees a session. NULL is a no-op.
///
/// # Safety
/// `session` NULL or a session from `ember_session_create`, not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn ember_session_free(session: *mut ember_session) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(unsafe { release(K_SESSION, session) })
    }));
}

/// Forgets every sequence of the session (the cache is reused).
///
/// # Safety
/// `session` live, used by one thread at a time.
#[no_mangle]
pub unsafe extern "C" fn ember_session_reset(session: *mut ember_session) -> ember_status {
    guard("ember_session_reset", || {
        unsafe { get_mut(K_SESSION, session) }?.session.reset();
        Ok(())
    })
}

/// Expert loads of a Mixture-of-Experts model: how many tokens each layer sent to each
/// expert since the session was created or `ember_session_reset_expert_counts`, every
/// forward pass counted (prefill, decode, evaluate, perplexity). Writes `n_layers *
/// n_experts` counts, layer-major (`counts[layer * n_experts + expert]`), and sets
/// `*n_counts` to that number (0 for a dense model, which is not an error). If they do not
/// fit in `capacity`, returns `EMBER_BUFFER_TOO_SMALL` and writes no counts.
///
/// # Safety
/// `session` live, used by one thread at a time; `counts` valid for `capacity` values (may
/// be NULL when `capacity` is 0); `n_counts` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_session_expert_counts(
    session: *mut ember_session,
    counts: *mut u64,
    capacity: usize,
    n_counts: *mut usize,
) -> ember_status {
    guard("ember_session_expert_counts", || {
        non_null(n_counts, "n_counts")?;
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let flat: Vec<u64> = s.session.expert_counts()?.unwrap_or_default().concat();
        // SAFETY: checked non-NULL.
        unsafe { *n_counts = flat.len() };
        if flat.len() > capacity {
            return Err(CError(
                EMBER_BUFFER_TOO_SMALL,
                format!("{} counts do not fit in {capacity}", flat.len()),
            ));
        }
        if !flat.is_empty() {
            non_null(counts, "counts")?;
            // SAFETY: the caller gave `capacity` >= flat.len() values.
            unsafe { std::ptr::copy_nonoverlapping(flat.as_ptr(), counts, flat.len()) };
        }
        Ok(())
    })
}

/// Zeroes the counters of `ember_session_expert_counts` (nothing for a dense model).
///
/// # Safety
/// `session` live, used by one thread at a time.
#[no_mangle]
pub unsafe extern "C" fn ember_session_reset_expert_counts(
    session: *mut ember_session,
) -> ember_status {
    guard("ember_session_reset_expert_counts", || {
        unsafe { get_mut(K_SESSION, session) }?
            .session
            .reset_expert_counts()?;
        Ok(())
    })
}

/// How a sequence picks tokens. Get defaults from `ember_sampler_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_sampler_params {
    /// `sizeof(ember_sampler_params)`.
    pub struct_size: u32,
    /// Temperature; 0 = greedy.
    pub temperature: f32,
    /// Top-k (0 = off; at most 1024 tokens are considered).
    pub top_k: u32,
    /// Top-p (1 = off).
    pub top_p: f32,
    /// Min-p (0 = off).
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    pub repeat_penalty: f32,
    /// Recent tokens the penalty looks at (at most 256).
    pub repeat_last_n: u32,
    /// Random seed.
    pub seed: u64,
}

/// Default sampling: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no penalty, seed 0.
#[no_mangle]
pub extern "C" fn ember_sampler_default_params() -> ember_sampler_params {
    let d = SamplerConfig::default();
    ember_sampler_params {
        struct_size: std::mem::size_of::<ember_sampler_params>() as u32,
        temperature: d.temperature,
        top_k: d.top_k,
        top_p: d.top_p,
        min_p: d.min_p,
        repeat_penalty: d.repeat_penalty,
        repeat_last_n: d.repeat_last_n as u32,
        seed: d.seed,
    }
}

unsafe fn sampler_from(p: *const ember_sampler_params) -> CResult<SamplerConfig> {
    let s = unsafe {
        read_params(
            p,
            ember_sampler_default_params(),
            std::mem::size_of::<ember_sampler_params>(),
            "ember_sampler_params",
        )
    }?;
    Ok(SamplerConfig {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n as usize,
        seed: s.seed,
    })
}

/// Receives each generated token and the text it completes (`piece`, `piece_len` bytes,
/// NUL-terminated, valid only during the call; empty while a UTF-8 character is incomplete).
/// Return false to stop: the generation then returns `EMBER_ABORTED` with its result filled.
pub type ember_token_callback = Option<
    unsafe extern "C" fn(
        token: u32,
        piece: *const c_char,
        piece_len: usize,
        user_data: *mut c_void,
    ) -> bool,
>;

/// What `ember_session_generate` produces. Get defaults from
/// `ember_generate_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_generate_params {
    /// `sizeof(ember_generate_params)`.
    pub struct_size: u32,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling.
    pub sampler: ember_sampler_params,
    /// Stop strings (`n_stop` NUL-terminated strings; may be NULL when `n_stop` is 0).
    pub stop: *const *const c_char,
    /// Number of stop strings.
    pub n_stop: usize,
    /// Wrap the prompt as a user message of the model's chat template.
    pub chat: bool,
    /// Streaming callback (optional), called on the calling thread.
    pub on_token: ember_token_callback,
    /// Passed to `on_token`.
    pub user_data: *mut c_void,
    /// Adapter to generate with: an id from `ember_session_attach_adapter`, or -1 (default)
    /// for the base model.
    pub adapter: i32,
    /// Strength of `adapter` (default 1).
    pub adapter_scale: f32,
}

/// Default generation: 128 tokens, default sampling, no stop strings, no template.
#[no_mangle]
pub extern "C" fn ember_generate_default_params() -> ember_generate_params {
    ember_generate_params {
        struct_size: std::mem::size_of::<ember_generate_params>() as u32,
        max_tokens: 128,
        sampler: ember_sampler_default_params(),
        stop: std::ptr::null(),
        n_stop: 0,
        chat: false,
        on_token: None,
        user_data: std::ptr::null_mut(),
        adapter: -1,
        adapter_scale: 1.0,
    }
}

/// Why a generation ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_stop_reason {
    /// End-of-generation token.
    EMBER_STOP_EOS = 0,
    /// `max_tokens` reached.
    EMBER_STOP_LENGTH = 1,
    /// A stop string appeared (not included in the text).
    EMBER_STOP_STRING = 2,
    /// The context is full.
    EMBER_STOP_CONTEXT = 3,
    /// The callback returned false.
    EMBER_STOP_CALLBACK = 4,
}

/// Outcome of a generation.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_generate_result {
    /// `sizeof(ember_generate_result)`: set it before the call.
    pub struct_size: u32,
    /// Prompt tokens.
    pub n_prompt_tokens: u32,
    /// Generated tokens.
    pub n_tokens: u32,
    /// Why it ended.
    pub stop_reason: ember_stop_reason,
    /// Prompt processing speed (tokens/s).
    pub prefill_tok_s: f64,
    /// Generation speed (tokens/s).
    pub decode_tok_s: f64,
}

/// Generates a continuation of `prompt` in a fresh sequence of the session (the session
/// needs a free sequence slot). `*out_text` (optional) receives the whole generated text
/// (free with `ember_string_free`); `*result` (optional, `struct_size` set by the caller)
/// receives counts and timing. Returns `EMBER_ABORTED` when the callback stopped it (the
/// outputs are still filled).
///
/// # Safety
/// `session` live and used by this thread only; `prompt` NUL-terminated UTF-8; `params`
/// NULL or valid; `result` NULL or valid; `out_text` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn ember_session_generate(
    session: *mut ember_session,
    prompt: *const c_char,
    params: *const ember_generate_params,
    result: *mut ember_generate_result,
    out_text: *mut *mut c_char,
) -> ember_status {
    guard("ember_session_generate", || {
        if !out_text.is_null() {
            unsafe { *out_text = std::ptr::null_mut() };
        }
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let prompt = unsafe { req_str(prompt, "prompt") }?;
        let p = unsafe {
            read_params(
                params,
                ember_generate_default_params(),
                std::mem::size_of::<ember_generate_params>(),
                "ember_generate_params",
            )
        }?;
        let sampler = unsafe { sampler_from(&p.sampler) }?;
        let mut stop = Vec::new();
        if p.n_stop > 0 {
            non_null(p.stop, "stop")?;
            let list = unsafe { std::slice::from_raw_parts(p.stop, p.n_stop) };
            for (i, &c) in list.iter().enumerate() {
                stop.push(unsafe { req_str(c, &format!("stop[{i}]")) }?.to_string());
            }
        }
        let model = s.session.model().clone();
        let text = if p.chat {
            model
                .tokenizer
                .apply_chat_template(&[ChatMessage::new("user", prompt)], true)?
        } else {
            prompt.to_string()
        };
        let ids = model.tokenizer.encode(&text, true, true)?;
        let mut cb = |t: u32, piece: &str| -> bool {
            match p.on_token {
                Some(f) => {
                    let c = CString::new(piece.replace('\0', " ")).unwrap_or_default();
                    // SAFETY: the caller's callback with its user data.
                    unsafe { f(t, c.as_ptr(), piece.len(), p.user_data) }
                }
                None => true,
            }
        };
        let g = s.session.generate(
            &ids,
            GenerateOptions {
                sampler,
                max_tokens: p.max_tokens as usize,
                stop,
                on_token: Some(&mut cb),
                adapter: adapter_choice(p.adapter, p.adapter_scale)?,
                prompt: None,
            },
        )?;
        if !result.is_null() {
            let size = unsafe { (*result).struct_size } as usize;
            let r = ember_generate_result {
                struct_size: size as u32,
                n_prompt_tokens: g.prompt_tokens as u32,
                n_tokens: g.tokens.len() as u32,
                stop_reason: match g.stop {
                    StopReason::Eos => ember_stop_reason::EMBER_STOP_EOS,
                    StopReason::Length => ember_stop_reason::EMBER_STOP_LENGTH,
                    StopReason::StopString => ember_stop_reason::EMBER_STOP_STRING,
                    StopReason::ContextFull => ember_stop_reason::EMBER_STOP_CONTEXT,
                    StopReason::Callback => ember_stop_reason::EMBER_STOP_CALLBACK,
                },
                prefill_tok_s: g.prompt_tokens as f64 / g.prefill_secs.max(1e-9),
                decode_tok_s: g.tokens.len().saturating_sub(1) as f64 / g.decode_secs.max(1e-9),
            };
            let n = size.min(std::mem::size_of::<ember_generate_result>());
            unsafe {
                std::ptr::copy_nonoverlapping(&r as *const _ as *const u8, result as *mut u8, n)
            };
        }
        if !out_text.is_null() {
            out_string(out_text, &g.text)?;
        }
        if g.stop == StopReason::Callback {
            return Err(CError(
                EMBER_ABORTED,
                "the token callback stopped the generation".into(),
            ));
        }
        Ok(())
    })
}

/// Runs `n` tokens through a fresh sequence and writes the logits of every position to
/// `logits` (`n * vocab` floats, row-major). If `capacity` (in floats) is smaller, returns
/// `EMBER_BUFFER_TOO_SMALL` and sets `*n_logits` to the size needed.
///
/// # Safety
/// `session` live (one thread); `tokens` valid for `n`; `logits` valid for `capacity`
/// floats; `n_logits` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_session_evaluate(
    session: *mut ember_session,
    tokens: *const u32,
    n: usize,
    logits: *mut f32,
    capacity: usize,
    n_logits: *mut usize,
) -> ember_status {
    guard("ember_session_evaluate", || {
        non_null(n_logits, "n_logits")?;
        let s = unsafe { get_mut(K_SESSION, session) }?;
        non_null(tokens, "tokens")?;
        let ids = unsafe { std::slice::from_raw_parts(tokens, n) };
        let need = n * s.session.model().config.vocab;
        unsafe { *n_logits = need };
        if need > capacity {
            return Err(CError(
                EMBER_BUFFER_TOO_SMALL,
                format!("{need} logits do not fit in {capacity}"),
            ));
        }
        non_null(logits, "logits")?;
        let v = s.session.logits(ids)?;
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), logits, v.len()) };
        Ok(())
    })
}

/// Perplexity of a UTF-8 text (tokenized without BOS) over consecutive windows of
/// `window` tokens, llama.cpp's definition; writes the perplexity and the number of scored
/// tokens. `window` must not exceed the session's context.
///
/// # Safety
/// `session` live (one thread); `text` NUL-terminated; `ppl`, `scored` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_session_perplexity(
    session: *mut ember_session,
    text: *const c_char,
    window: u32,
    ppl: *mut f64,
    scored: *mut usize,
) -> ember_status {
    guard("ember_session_perplexity", || {
        non_null(ppl, "ppl")?;
        non_null(scored, "scored")?;
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let text = unsafe { req_str(text, "text") }?;
        let ids = s.session.model().tokenizer.encode(text, false, false)?;
        let r = s.session.perplexity(&ids, window as usize)?;
        unsafe {
            *ppl = r.ppl;
            *scored = r.scored;
        }
        Ok(())
    })
}

/// Adds a sequence with its own sampler to the session; `*seq` receives its id.
///
/// # Safety
/// `session` live (one thread); `sampler` NULL (defaults) or valid; `seq` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_seq_add(
    session: *mut ember_session,
    sampler: *const ember_sampler_params,
    seq: *mut u64,
) -> ember_status {
    guard("ember_seq_add", || {
        non_null(seq, "seq")?;
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let cfg = unsafe { sampler_from(sampler) }?;
        let id = s.session.add_sequence(cfg)?;
        unsafe { *seq = id.0 };
        Ok(())
    })
}

/// Removes a sequence, freeing its cache region.
///
/// # Safety
/// `session` live (one thread).
#[no_mangle]
pub unsafe extern "C" fn ember_seq_remove(session: *mut ember_session, seq: u64) -> ember_status {
    guard("ember_seq_remove", || {
        let s = unsafe { get_mut(K_SESSION, session) }?;
        s.session.remove_sequence(ember::session::SeqId(seq))?;
        Ok(())
    })
}

/// Feeds `n` prompt tokens to a sequence and samples its next token into `*next`.
///
/// # Safety
/// `session` live (one thread); `tokens` valid for `n`; `next` valid.
#[no_mangle]
pub unsafe extern "C" fn ember_seq_prefill(
    session: *mut ember_session,
    seq: u64,
    tokens: *const u32,
    n: usize,
    next: *mut u32,
) -> ember_status {
    guard("ember_seq_prefill", || {
        non_null(next, "next")?;
        non_null(tokens, "tokens")?;
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let ids = unsafe { std::slice::from_raw_parts(tokens, n) };
        let t = s.session.prefill(ember::session::SeqId(seq), ids)?;
        unsafe { *next = t };
        Ok(())
    })
}

/// One batched decode step: each of the `n` sequences feeds the token it last sampled and
/// samples the next, written to `next[i]`. Sequences of one step may have any lengths.
///
/// # Safety
/// `session` live (one thread); `seqs` valid for `n`; `next` valid for `n`.
#[no_mangle]
pub unsafe extern "C" fn ember_seq_decode(
    session: *mut ember_session,
    seqs: *const u64,
    n: usize,
    next: *mut u32,
) -> ember_status {
    guard("ember_seq_decode", || {
        non_null(seqs, "seqs")?;
        non_null(next, "next")?;
        let s = unsafe { get_mut(K_SESSION, session) }?;
        let ids: Vec<ember::session::SeqId> = unsafe { std::slice::from_raw_parts(seqs, n) }
            .iter()
            .map(|&i| ember::session::SeqId(i))
            .collect();
        let out = s.session.decode(&ids)?;
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), next, out.len()) };
        Ok(())
    })
}

/// Testing hook: panics inside Ember and returns the status the guard turns it into
/// (`EMBER_INTERNAL`), proving no panic crosses the ABI. Not for production use.
#[no_mangle]
pub extern "C" fn ember_debug_internal_panic() -> ember_status {
    guard("ember_debug_internal_panic", || {
        panic!("deliberate panic for testing")
    })
}

#[cfg(test)]
mod tests;
