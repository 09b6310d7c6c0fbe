//! Exact-match probes for the evaluation gate: a prompt and the text its greedy answer must
//! contain. They are answered by an inference session with the adapter being judged
//! attached (the path an app serves with), so the gate can hold answers, not only losses:
//! a fact the adapter got right must still come out right after an update.

use std::path::Path;
use std::sync::Arc;

use crate::adapters::LoraAdapter;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::session::{GenerateOptions, SamplerConfig, Session, SessionParams};
use crate::tokenizer::ChatMessage;

/// A prompt (token ids) and the text its greedy answer must contain (case-insensitive).
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerProbe {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Text the answer must contain.
    pub expect: String,
}

impl AnswerProbe {
    /// A question asked as a user turn through the model's chat template.
    pub fn question(model: &Model, question: &str, expect: &str) -> Result<AnswerProbe> {
        let text = model
            .tokenizer
            .apply_chat_template(&[ChatMessage::new("user", question)], true)?;
        AnswerProbe::text(model, &text, expect)
    }

    /// A raw text prompt (no template).
    pub fn text(model: &Model, prompt: &str, expect: &str) -> Result<AnswerProbe> {
        if expect.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "an answer probe with nothing to expect".into(),
            ));
        }
        let prompt = model.tokenizer.encode(prompt, true, true)?;
        if prompt.is_empty() {
            return Err(Error::InvalidArgument(
                "an answer probe with an empty prompt".into(),
            ));
        }
        Ok(AnswerProbe {
            prompt,
            expect: expect.to_string(),
        })
    }

    /// Parses JSONL: `{"question", "expect"}` (asked through the chat template) or
    /// `{"prompt", "expect"}` (raw text) per line; `source` names the input in errors.
    pub fn from_jsonl(
        model: &Model,
        text: &str,
        source: Option<&Path>,
    ) -> Result<Vec<AnswerProbe>> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |what: String| Error::format(source, format!("line {}: {what}", i + 1));
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let Some(expect) = v["expect"].as_str() else {
                return Err(bad("needs an \"expect\" string".into()));
            };
            let probe = match (v["question"].as_str(), v["prompt"].as_str()) {
                (Some(q), None) => AnswerProbe::question(model, q, expect),
                (None, Some(p)) => AnswerProbe::text(model, p, expect),
                _ => return Err(bad("needs a \"question\" or a \"prompt\" string".into())),
            };
            out.push(probe.map_err(|e| bad(e.to_string()))?);
        }
        Ok(out)
    }
}

/// The fraction of `probes` whose greedy answer of at most `max_tokens` tokens contains
/// the expected text (case-insensitive), with `adapter` attached (None: the base model).
pub fn answer_accuracy(
    model: &Arc<Model>,
    adapter: Option<&LoraAdapter>,
    probes: &[AnswerProbe],
    max_tokens: usize,
) -> Result<f64> {
    if probes.is_empty() {
        return Ok(0.0);
    }
    let longest = probes.iter().map(|p| p.prompt.len()).max().unwrap_or(0);
    let mut sess = Session::new(
        model.clone(),
        SessionParams {
            n_ctx: (longest + max_tokens).max(2),
            ..Default::default()
        },
    )?;
    let id = match adapter {
        Some(a) => Some((sess.attach_adapter("judged", Arc::new(a.clone()))?, 1.0)),
        None => None,
    };
    let mut right = 0;
    for p in probes {
        let g = sess.generate(
            &p.prompt,
            GenerateOptions {
                sampler: SamplerConfig::greedy(),
                max_tokens,
                adapter: id,
                ..Default::default()
            },
        )?;
        right += g.text.to_lowercase().contains(&p.expect.to_lowercase()) as usize;
    }
    Ok(right as f64 / probes.len() as f64)
}
