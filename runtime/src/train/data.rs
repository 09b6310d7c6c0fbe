//! Training data: JSONL records turned into token sequences with loss masks, and seeded
//! shuffled batches.
//!
//! Each line of a `.jsonl` file is one of
//! - `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}`:
//!   rendered with the model's chat template; the loss covers the assistant turns only
//!   (their text and the template's end-of-turn tokens, so the model learns to stop);
//! - `{"prompt": "...", "completion": "..."}`: the loss covers the completion and an
//!   end-of-sequence token;
//! - `{"text": "..."}`: every token is scored.
//!
//! Any record may add `"distill": true`: its scored positions then learn the frozen base
//! model's next-token distribution rather than its tokens (see [`Example::distill`]).
//!
//! Any other file is plain text, cut into sequences of the block length. Sequences longer
//! than a block are truncated (counted in [`Dataset::truncated`]).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::train::batch::Example;
use crate::util::Rng;

/// Tokenized training sequences.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The sequences.
    pub examples: Vec<Example>,
    /// Sequences cut to the maximum length.
    pub truncated: usize,
}

impl Dataset {
    /// Reads `path` (JSONL records, or plain text) for sequences of at most `max_tokens`
    /// tokens.
    pub fn load(path: &Path, tok: &Tokenizer, max_tokens: usize) -> Result<Dataset> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let jsonl = path
            .extension()
            .is_some_and(|e| e == "jsonl" || e == "json")
            || text.trim_start().starts_with('{');
        if jsonl {
            Self::from_jsonl(&text, tok, max_tokens)
                .map_err(|e| Error::format(Some(path), e.to_string()))
        } else {
            Self::from_text(&text, tok, max_tokens)
        }
    }

    /// Appends the sequences of `other` (e.g. replay text mixed into new facts).
    pub fn extend(&mut self, other: Dataset) {
        self.examples.extend(other.examples);
        self.truncated += other.truncated;
    }

    /// Marks every sequence as distilled: its scored positions learn the frozen base
    /// model's distribution instead of their tokens ([`Example::distill`]).
    pub fn distilled(self) -> Dataset {
        Dataset {
            examples: self.examples.into_iter().map(Example::distilled).collect(),
            ..self
        }
    }

    /// Parses JSONL records (see the module docs).
    pub fn from_jsonl(text: &str, tok: &Tokenizer, max_tokens: usize) -> Result<Dataset> {
        let mut d = Dataset::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                Error::InvalidArgument(format!("line {}: invalid JSON: {e}", i + 1))
            })?;
            let e = record(&v, tok)
                .map_err(|e| Error::InvalidArgument(format!("line {}: {e}", i + 1)))?;
            d.push(e, max_tokens);
        }
        if d.examples.is_empty() {
            return Err(Error::InvalidArgument("no training records".into()));
        }
        Ok(d)
    }

    /// Plain text cut into sequences of `max_tokens` tokens, every token scored.
    pub fn from_text(text: &str, tok: &Tokenizer, max_tokens: usize) -> Result<Dataset> {
        let ids = tok.encode(text, true, false)?;
        if ids.len() < 2 {
            return Err(Error::InvalidArgument(
                "the text has fewer than 2 tokens".into(),
            ));
        }
        Ok(Dataset {
            examples: ids
                .chunks(max_tokens.max(2))
                .filter(|c| c.len() >= 2)
                .map(|c| Example::all(c.to_vec()))
                .collect(),
            truncated: 0,
        })
    }

    fn push(&mut self, mut e: Example, max_tokens: usize) {
        if e.tokens.len() > max_tokens {
            e.tokens.truncate(max_tokens);
            e.loss.truncate(max_tokens);
            self.truncated += 1;
        }
        if e.tokens.len() >= 2 && e.loss.iter().any(|&b| b) {
            self.examples.push(e);
        }
    }

    /// Tokens scored over the whole set.
    pub fn n_targets(&self) -> usize {
        self.examples.iter().map(|e| e.n_targets()).sum()
    }

    /// The batches of epoch `epoch`: the examples shuffled by `seed` and the epoch, cut
    /// into batches of `batch_size` (the last may be smaller).
    pub fn epoch(&self, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<Example>> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
            .chunks(batch_size.max(1))
            .map(|c| c.iter().map(|&i| self.examples[i].clone()).collect())
            .collect()
    }
}

fn text_field<'a>(v: &'a Value, k: &str) -> Result<&'a str> {
    v.get(k)
        .and_then(|s| s.as_str())
        .ok_or_else(|| Error::InvalidArgument(format!("{k:?} must be a string")))
}

/// One record as a sequence with its loss mask; `"distill": true` in a record marks it
/// distilled from the base model ([`Example::distill`]).
pub fn record(v: &Value, tok: &Tokenizer) -> Result<Example> {
    let e = record_tokens(v, tok)?;
    match v.get("distill") {
        None | Some(Value::Bool(false)) => Ok(e),
        Some(Value::Bool(true)) => Ok(e.distilled()),
        Some(_) => Err(Error::InvalidArgument(
            "\"distill\" must be true or false".into(),
        )),
    }
}

fn record_tokens(v: &Value, tok: &Tokenizer) -> Result<Example> {
    if let Some(msgs) = v.get("messages") {
        let list = msgs
            .as_array()
            .ok_or_else(|| Error::InvalidArgument("\"messages\" must be a list".into()))?;
        let mut messages = Vec::with_capacity(list.len());
        for m in list {
            messages.push(ChatMessage::new(
                text_field(m, "role")?,
                text_field(m, "content")?,
            ));
        }
        return chat_example(&messages, tok);
    }
    if let (Some(_), Some(_)) = (v.get("prompt"), v.get("completion")) {
        let mut tokens = tok.encode(text_field(v, "prompt")?, true, false)?;
        let n_prompt = tokens.len();
        tokens.extend(tok.encode(text_field(v, "completion")?, false, false)?);
        if let Some(eos) = tok.eos() {
            tokens.push(eos);
        }
        let loss = (0..tokens.len()).map(|i| i >= n_prompt).collect();
        return Ok(Example::new(tokens, loss));
    }
    if v.get("text").is_some() {
        return Ok(Example::all(tok.encode(
            text_field(v, "text")?,
            true,
            false,
        )?));
    }
    Err(Error::InvalidArgument(
        "a record needs \"messages\", \"prompt\" + \"completion\", or \"text\"".into(),
    ))
}

/// A conversation rendered with the chat template; only the assistant turns are scored.
///
/// The rendered text is cut where each assistant turn starts (the render of the turns
/// before it with the generation prompt) and ends (the render up to it); the pieces are
/// tokenized separately, which keeps special tokens at the cut points whole.
pub fn chat_example(messages: &[ChatMessage], tok: &Tokenizer) -> Result<Example> {
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(Error::InvalidArgument(
            "a conversation needs an assistant message to learn from".into(),
        ));
    }
    let full = tok.apply_chat_template(messages, false)?;
    let mut cuts: Vec<(usize, bool)> = Vec::new(); // (end of piece, piece is scored)
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = tok.apply_chat_template(&messages[..i], true)?.len();
        let end = tok.apply_chat_template(&messages[..=i], false)?.len();
        let prev = cuts.last().map(|c| c.0).unwrap_or(0);
        if start < prev
            || end < start
            || end > full.len()
            || !full.is_char_boundary(start)
            || !full.is_char_boundary(end)
        {
            return Err(Error::Unsupported(
                "the chat template does not render conversations prefix by prefix".into(),
            ));
        }
        cuts.push((start, false));
        cuts.push((end, true));
    }
    cuts.push((full.len(), false));
    let (mut tokens, mut loss) = (Vec::new(), Vec::new());
    let mut from = 0;
    for (end, scored) in cuts {
        if end > from {
            let ids = tok.encode(&full[from..end], from == 0, true)?;
            loss.extend(std::iter::repeat_n(scored, ids.len()));
            tokens.extend(ids);
        }
        from = end;
    }
    Ok(Example::new(tokens, loss))
}
