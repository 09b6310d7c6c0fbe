//! Writes one of the tiny test models, for the C, C++ and Python binding tests:
//!
//!     cargo run -p ember-tests --example write_tiny -- OUT [VARIANT] [gguf|hf] [f32|q8_0|q4_0|q4_1]
//!
//! VARIANT: llama (default), qwen2, tied, mixtral, qwen2_moe, olmoe.
//!
//! `gguf` (default) writes a GGUF file at OUT; `hf` writes an HF directory at OUT.
use std::path::Path;

use ember_tests::tiny::{write_tiny_gguf, write_tiny_model, TinyVariant};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let Some(out) = a.get(1) else {
        eprintln!("usage: write_tiny OUT [llama|qwen2|tied|mixtral|qwen2_moe|olmoe] [gguf|hf] [f32|q8_0|q4_0|q4_1]");
        std::process::exit(2);
    };
    let name = a.get(2).map(String::as_str).unwrap_or("llama");
    let variant = match TinyVariant::ALL.into_iter().find(|v| v.name() == name) {
        Some(v) => v,
        None => {
            eprintln!("unknown variant {name}");
            std::process::exit(2);
        }
    };
    let quant = match a.get(4).map(String::as_str).unwrap_or("f32") {
        "f32" => None,
        q => Some(ember::quant::QuantType::parse(q).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        })),
    };
    let r = match a.get(3).map(String::as_str).unwrap_or("gguf") {
        "hf" => write_tiny_model(Path::new(out), variant).map_err(|e| e.to_string()),
        _ => write_tiny_gguf(Path::new(out), variant, quant).map_err(|e| e.to_string()),
    };
    if let Err(e) = r {
        eprintln!("write_tiny: {e}");
        std::process::exit(1);
    }
}
