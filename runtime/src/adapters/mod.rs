//! Adapters that change a frozen base model: LoRA ([`lora`]), soft prompts and prefixes
//! ([`prompt`]), in the PEFT file layout ([`peft`]) so
//! they move between Ember, transformers/peft and llama.cpp's converters.

pub mod lora;
pub mod peft;
pub mod prompt;

pub use lora::{LoraAdapter, LoraConfig, Target};
pub use prompt::{Prefix, SoftPrompt};
