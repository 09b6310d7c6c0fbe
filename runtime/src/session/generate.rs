//! One-sequence text generation on top of the session primitives: prefill, decode until an
//! end-of-generation token, a stop string, the token limit, a full context or the caller's
//! callback, with streaming text that never splits a UTF-8 character.

use web_time::Instant;

use serde::Serialize;

use super::{SamplerConfig, Session};
use crate::error::{Error, Result};
use crate::gpu::blocking;
use crate::tokenizer::StreamDecoder;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// `max_tokens` were produced.
    Length,
    /// A stop string appeared (it is not part of the text).
    StopString,
    /// The sequence filled its context.
    ContextFull,
    /// The callback returned `false`.
    Callback,
}

/// Streaming callback: the new token and the text it completes; `false` stops.
pub type TokenCallback<'a> = &'a mut dyn FnMut(u32, &str) -> bool;

/// What to generate.
pub struct GenerateOptions<'a> {
    /// Sampling settings.
    pub sampler: SamplerConfig,
    /// Tokens to produce at most.
    pub max_tokens: usize,
    /// Stop when any of these appears in the text.
    pub stop: Vec<String>,
    /// Called with each new token and the text it completes (possibly empty while a UTF-8
    /// character is incomplete); returning `false` stops the generation.
    pub on_token: Option<TokenCallback<'a>>,
    /// Adapter (attached to the session) and strength for this generation.
    pub adapter: Option<(super::AdapterId, f32)>,
    /// Soft prompt or prefix for this generation.
    pub prompt: Option<crate::adapters::PromptAdapter>,
}

impl Default for GenerateOptions<'_> {
    fn default() -> Self {
        GenerateOptions {
            sampler: SamplerConfig::default(),
            max_tokens: 128,
            stop: Vec::new(),
            on_token: None,
            adapter: None,
            prompt: None,
        }
    }
}

/// The result of [`Session::generate`].
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The generated text (without the prompt and without a stop string).
    pub text: String,
    /// The generated tokens.
    pub tokens: Vec<u32>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub stop: StopReason,
    /// Seconds spent on the prompt.
    pub prefill_secs: f64,
    /// Seconds spent decoding.
    pub decode_secs: f64,
}

impl Session {
    /// Generates a continuation of `prompt` (token ids) in a new sequence of this session,
    /// which is removed afterwards.
    pub fn generate(&mut self, prompt: &[u32], opts: GenerateOptions<'_>) -> Result<Generation> {
        blocking("Session::generate", self.generate_async(prompt, opts))
    }

    /// [`Session::generate`], awaiting the device at each token (the form the browser
    /// needs: the page's event loop runs, and can show each token, between steps).
    pub async fn generate_async(
        &mut self,
        prompt: &[u32],
        opts: GenerateOptions<'_>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("the prompt is empty".into()));
        }
        let adapters = super::SeqAdapters {
            lora: opts.adapter,
            prompt: opts.prompt.clone(),
        };
        let seq = self.start_sequence(opts.sampler, &adapters)?;
        let r = self.generate_in(seq, prompt, opts).await;
        self.remove_sequence(seq)?;
        r
    }

    async fn generate_in(
        &mut self,
        seq: super::SeqId,
        prompt: &[u32],
        mut opts: GenerateOptions<'_>,
    ) -> Result<Generation> {
        let model = self.model().clone();
        let tok = &model.tokenizer;
        let t0 = Instant::now();
        let mut t = self.prefill_async(seq, prompt).await?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut dec = StreamDecoder::new(tok);
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut stop = StopReason::Length;
        while tokens.len() < opts.max_tokens {
            if tok.is_end_of_generation(t) {
                stop = StopReason::Eos;
                break;
            }
            tokens.push(t);
            let piece = dec.push(t)?;
            let before = text.len();
            text.push_str(&piece);
            if let Some(pos) = opts
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                // Emit only what precedes the stop string.
                let emit = if pos > before {
                    text[before..pos].to_string()
                } else {
                    String::new()
                };
                text.truncate(pos);
                if let Some(cb) = opts.on_token.as_mut() {
                    cb(t, &emit);
                }
                stop = StopReason::StopString;
                break;
            }
            if let Some(cb) = opts.on_token.as_mut() {
                if !cb(t, &piece) {
                    stop = StopReason::Callback;
                    break;
                }
            }
            if tokens.len() >= opts.max_tokens {
                break;
            }
            if self.tokens(seq)?.len() + 1 >= self.params().n_ctx {
                stop = StopReason::ContextFull;
                break;
            }
            t = self.decode_async(&[seq]).await?[0];
        }
        if stop != StopReason::StopString {
            let rest = dec.finish();
            if !rest.is_empty() {
                text.push_str(&rest);
                if let Some(cb) = opts.on_token.as_mut() {
                    cb(u32::MAX, &rest);
                }
            }
        }
        Ok(Generation {
            text,
            tokens,
            prompt_tokens: prompt.len(),
            stop,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}
