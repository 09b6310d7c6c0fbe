//! Adapters that change a frozen base model: LoRA ([`lora`]), soft prompts and prefixes
//! ([`prompt`]), in the PEFT file layout ([`peft`]) so
//! they move between Ember, transformers/peft and llama.cpp's converters.

pub mod lora;
pub mod peft;
pub mod prompt;

pub use lora::{LoraAdapter, LoraConfig, Target};
pub use prompt::{Prefix, SoftPrompt};

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::Model;

/// A trained prompt adapter: virtual tokens that occupy the first positions of a sequence,
/// before its real tokens (which then start at position `n_virtual`, as in PEFT).
#[derive(Debug, Clone)]
pub enum PromptAdapter {
    /// Soft prompt: embeddings that run through every layer like token embeddings.
    Soft(Arc<SoftPrompt>),
    /// Prefix: keys and values written straight into every layer's cache.
    Prefix(Arc<Prefix>),
}

impl PromptAdapter {
    /// Virtual tokens it occupies.
    pub fn n_virtual(&self) -> usize {
        match self {
            PromptAdapter::Soft(p) => p.n_virtual,
            PromptAdapter::Prefix(p) => p.n_virtual,
        }
    }

    /// Identity of the base model it was made for, when known.
    pub fn base_identity(&self) -> Option<u64> {
        match self {
            PromptAdapter::Soft(p) => p.base_identity,
            PromptAdapter::Prefix(p) => p.base_identity,
        }
    }
}

/// Any adapter read from a directory.
#[derive(Debug, Clone)]
pub enum Loaded {
    /// A LoRA adapter.
    Lora(LoraAdapter),
    /// A soft prompt or a prefix.
    Prompt(PromptAdapter),
}

/// Reads the adapter(s) in `dir` for `model`, whatever their kind: a PEFT directory
/// (`adapter_config.json`: LORA, PROMPT_TUNING or PREFIX_TUNING), or a directory whose
/// subdirectories `lora`, `prompt` and `prefix` hold one each (what training several
/// kinds at once saves).
pub fn load_dir(dir: &Path, model: &Model) -> Result<Vec<Loaded>> {
    if dir.join("adapter_config.json").is_file() {
        return Ok(vec![load_one(dir, model)?]);
    }
    let mut out = Vec::new();
    for sub in ["lora", "prompt", "prefix"] {
        let d = dir.join(sub);
        if d.join("adapter_config.json").is_file() {
            out.push(load_one(&d, model)?);
        }
    }
    if out.is_empty() {
        return Err(Error::Io {
            path: dir.join("adapter_config.json"),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no adapter here (nor in lora/, prompt/ or prefix/)",
            ),
        });
    }
    Ok(out)
}

fn load_one(dir: &Path, model: &Model) -> Result<Loaded> {
    let pc = peft::PeftConfig::read(dir)?;
    Ok(match pc.peft_type() {
        Some("PROMPT_TUNING") => {
            Loaded::Prompt(PromptAdapter::Soft(Arc::new(SoftPrompt::load(dir, model)?)))
        }
        Some("PREFIX_TUNING") => {
            Loaded::Prompt(PromptAdapter::Prefix(Arc::new(Prefix::load(dir, model)?)))
        }
        _ => Loaded::Lora(LoraAdapter::load(dir, model)?),
    })
}
