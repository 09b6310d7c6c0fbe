//! `ember moe`: Mixture-of-Experts model tools.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ember::model::upcycle::{upcycle_gguf, UpcycleOptions};
use ember::Result;
use serde_json::json;

#[derive(Args)]
pub struct MoeArgs {
    #[command(subcommand)]
    command: MoeCommand,
}

#[derive(Subcommand)]
enum MoeCommand {
    /// Turn a dense Llama-family GGUF into an E-expert top-k MoE GGUF: every expert a copy
    /// of the layer's feed-forward (same quantized blocks), plus a new router. Until its
    /// experts are trained apart, the MoE computes what the dense model computes.
    Upcycle(UpcycleArgs),
}

#[derive(Args)]
struct UpcycleArgs {
    /// Dense GGUF model (llama or mistral architecture).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Output GGUF file (written atomically).
    #[arg(long = "out")]
    out: PathBuf,
    /// Experts per layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts each token uses.
    #[arg(long = "top-k", default_value_t = 2)]
    top_k: usize,
    /// Standard deviation of the router's initial weights.
    #[arg(long = "router-std", default_value_t = 0.02)]
    router_std: f32,
    /// Seed of the router's initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: MoeArgs) -> Result<()> {
    match a.command {
        MoeCommand::Upcycle(u) => {
            let r = upcycle_gguf(
                &u.model,
                &u.out,
                &UpcycleOptions {
                    experts: u.experts,
                    top_k: u.top_k,
                    router_std: u.router_std,
                    seed: u.seed,
                },
            )?;
            println!(
                "{}",
                json!({
                    "out": u.out.display().to_string(), "layers": r.layers,
                    "experts": u.experts, "top_k": u.top_k,
                    "dense_params": r.dense_params, "moe_params": r.moe_params,
                    "active_params": r.active_params,
                })
            );
            Ok(())
        }
    }
}
