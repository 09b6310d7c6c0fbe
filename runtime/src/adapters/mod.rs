//! Adapters that change a frozen base model: LoRA ([`lora`]), in the PEFT file layout so
//! they move between Ember, transformers/peft and llama.cpp's converters.

pub mod lora;

pub use lora::{LoraAdapter, LoraConfig, Target};
