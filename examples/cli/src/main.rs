//! `ember`: the command-line interface of the Ember runtime.

mod bench_kernels;
mod info;

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info::run_info(a),
        Command::Selfcheck(a) => info::run_selfcheck(a),
        Command::BenchKernels(a) => bench_kernels::run(a),
    };
    if let Err(e) = result {
        eprintln!("ember: {e}");
        std::process::exit(1);
    }
}
