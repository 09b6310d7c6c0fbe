//! `ember`: the command-line interface of the Ember runtime.

mod adapter_cmds;
mod bench_kernels;
mod info;
mod learn_cmds;
mod model_cmds;
mod moe_cmds;
mod train_cmds;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "Run and teach language models on any GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the GPU adapter, backend, driver, features and limits Ember would use.
    Info(info::InfoArgs),
    /// Run every kernel family on random data against its CPU reference.
    Selfcheck(info::SelfcheckArgs),
    /// Measure kernel throughput (GFLOP/s, GB/s) on this device.
    BenchKernels(bench_kernels::BenchArgs),
    /// Generate text from a prompt, streaming it as it is produced.
    Generate(model_cmds::GenerateArgs),
    /// Chat interactively with the model's chat template.
    Chat(model_cmds::ChatArgs),
    /// Perplexity of a text file (llama.cpp's definition).
    Perplexity(model_cmds::PerplexityArgs),
    /// Prefill and decode speed, dispatches per token and memory, as JSON.
    Bench(model_cmds::BenchArgs),
    /// Convert a GGUF model into an HF directory (safetensors, f32 or f16).
    Convert(model_cmds::ConvertArgs),
    /// Teach the model on a dataset: LoRA, soft prompt or prefix, trained on this GPU.
    Finetune(train_cmds::FinetuneArgs),
    /// Training speed against the forward pass, and memory, as JSON.
    BenchTrain(train_cmds::BenchTrainArgs),
    /// Ask the questions of a JSONL file (chat template, greedy) and score the answers.
    EvalQa(train_cmds::EvalQaArgs),
    /// Mixture-of-Experts tools (upcycle a dense model).
    Moe(moe_cmds::MoeArgs),
    /// The versioned adapter store: list, show, diff, rollback, export, commit, merge.
    Adapter(adapter_cmds::AdapterArgs),
    /// Continual learning: add examples to a versioned store and run one gated update.
    Learn(learn_cmds::LearnArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info::run_info(a),
        Command::Selfcheck(a) => info::run_selfcheck(a),
        Command::BenchKernels(a) => bench_kernels::run(a),
        Command::Generate(a) => model_cmds::run_generate(a),
        Command::Chat(a) => model_cmds::run_chat(a),
        Command::Perplexity(a) => model_cmds::run_perplexity(a),
        Command::Bench(a) => model_cmds::run_bench(a),
        Command::Convert(a) => model_cmds::run_convert(a),
        Command::Finetune(a) => train_cmds::run_finetune(a),
        Command::BenchTrain(a) => train_cmds::run_bench_train(a),
        Command::EvalQa(a) => train_cmds::run_eval_qa(a),
        Command::Moe(a) => moe_cmds::run(a),
        Command::Adapter(a) => adapter_cmds::run(a),
        Command::Learn(a) => learn_cmds::run(a),
    };
    if let Err(e) = result {
        eprintln!("ember: {e}");
        std::process::exit(1);
    }
}
