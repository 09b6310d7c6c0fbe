//! `ember adapter`: the versioned adapter store (list, show, diff, rollback, export, and
//! commit of an existing adapter as a new version).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ember::adapters::LoraAdapter;
use ember::learn::{merge_adapters, AdapterStore, MergeMethod, NewVersion};
use ember::{Context, Error, Result};
use serde_json::json;

use crate::model_cmds::load_model;

#[derive(Args)]
pub struct AdapterArgs {
    #[command(subcommand)]
    command: AdapterCommand,
}

#[derive(Subcommand)]
enum AdapterCommand {
    /// Versions of a store, oldest first; the head (adapter of record) is marked.
    List(StoreArg),
    /// One version's metadata (lineage, data, settings, metrics) as JSON.
    Show(VersionArg),
    /// Per-tensor norms and differences between two versions.
    Diff(DiffArgs),
    /// Make an earlier (or later) version the head again; no version is deleted.
    Rollback(VersionArg),
    /// Copy a version's adapter out in the PEFT layout.
    Export(ExportArgs),
    /// Add an existing PEFT LoRA adapter as a new version and make it the head.
    Commit(CommitArgs),
    /// Merge versions (task arithmetic, TIES, DARE; PEFT's semantics) into a new version
    /// that becomes the head.
    Merge(MergeArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// The store directory.
    #[arg(long)]
    store: PathBuf,
    /// The base model.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// linear, magnitude_prune, ties, dare_linear or dare_ties.
    #[arg(long, default_value = "ties")]
    method: String,
    /// Fraction of each tensor kept (pruning methods).
    #[arg(long, default_value_t = 0.5)]
    density: f32,
    /// Weights, comma-separated, one per version (default: 1 each).
    #[arg(long)]
    weights: Option<String>,
    /// Seed of DARE's drop masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Versions to merge.
    #[arg(required = true, num_args = 2..)]
    versions: Vec<String>,
}

#[derive(Args)]
struct StoreArg {
    /// The store directory.
    #[arg(long)]
    store: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VersionArg {
    /// The store directory.
    #[arg(long)]
    store: PathBuf,
    /// Version: `v0003` or `3` (default for show: the head).
    version: Option<String>,
}

#[derive(Args)]
struct DiffArgs {
    /// The store directory.
    #[arg(long)]
    store: PathBuf,
    /// First version.
    a: String,
    /// Second version.
    b: String,
}

#[derive(Args)]
struct ExportArgs {
    /// The store directory.
    #[arg(long)]
    store: PathBuf,
    /// Version (default: the head).
    version: Option<String>,
    /// Destination directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct CommitArgs {
    /// The store directory (created when missing or empty).
    #[arg(long)]
    store: PathBuf,
    /// The base model the adapter was made for.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// The adapter directory (PEFT layout).
    #[arg(long)]
    adapter: PathBuf,
    /// Why this version exists.
    #[arg(long, default_value = "commit")]
    note: String,
}

fn parse_version(s: &str) -> Result<u32> {
    s.trim_start_matches('v')
        .parse::<u32>()
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::InvalidArgument(format!("{s:?} is not a version (v0003 or 3)")))
}

fn version_or_head(store: &AdapterStore, v: &Option<String>) -> Result<u32> {
    match v {
        Some(s) => parse_version(s),
        None => store
            .head()?
            .ok_or_else(|| Error::InvalidArgument("the store has no versions yet".into())),
    }
}

pub fn run(a: AdapterArgs) -> Result<()> {
    match a.command {
        AdapterCommand::List(a) => {
            let store = AdapterStore::open(&a.store)?;
            let head = store.head()?;
            let versions = store.versions()?;
            if a.json {
                let list: Vec<_> = versions
                    .iter()
                    .map(|e| match &e.meta {
                        Ok(m) => json!({"version": e.version, "head": head == Some(e.version), "meta": m}),
                        Err(err) => json!({"version": e.version, "head": head == Some(e.version), "error": err.to_string()}),
                    })
                    .collect();
                println!("{}", json!({"head": head, "versions": list}));
            } else {
                for e in &versions {
                    let mark = if head == Some(e.version) { "*" } else { " " };
                    let name = ember::learn::store::version_name(e.version);
                    match &e.meta {
                        Ok(m) => println!(
                            "{mark} {name}  parent {:>5}  {:>6} examples  {}",
                            m.parent
                                .map(ember::learn::store::version_name)
                                .unwrap_or_else(|| "-".into()),
                            m.data.examples,
                            m.note
                        ),
                        Err(err) => println!("{mark} {name}  unreadable: {err}"),
                    }
                }
                if versions.is_empty() {
                    println!("(no versions)");
                }
            }
        }
        AdapterCommand::Show(a) => {
            let store = AdapterStore::open(&a.store)?;
            let v = version_or_head(&store, &a.version)?;
            let meta = store.meta(v)?;
            let text = serde_json::to_string_pretty(&meta)
                .map_err(|e| Error::Internal(format!("meta: {e}")))?;
            println!("{text}");
        }
        AdapterCommand::Diff(a) => {
            let store = AdapterStore::open(&a.store)?;
            let d = store.diff(parse_version(&a.a)?, parse_version(&a.b)?)?;
            println!("{}", json!({"a": a.a, "b": a.b, "tensors": d}));
        }
        AdapterCommand::Rollback(a) => {
            let store = AdapterStore::open(&a.store)?;
            let v = version_or_head(&store, &a.version)?;
            store.rollback(v)?;
            eprintln!("head is now {}", ember::learn::store::version_name(v));
        }
        AdapterCommand::Export(a) => {
            let store = AdapterStore::open(&a.store)?;
            let v = version_or_head(&store, &a.version)?;
            store.export(v, &a.out)?;
            eprintln!(
                "exported {} to {}",
                ember::learn::store::version_name(v),
                a.out.display()
            );
        }
        AdapterCommand::Commit(a) => {
            let ctx = Context::new()?;
            let model = load_model(&ctx, &a.model)?;
            let adapter = LoraAdapter::load(&a.adapter, &model)?;
            let store = AdapterStore::open_or_create(&a.store, &model)?;
            let v = store.commit(
                &adapter,
                &model,
                NewVersion {
                    note: a.note,
                    hyperparameters: json!({"rank": adapter.config.rank, "alpha": adapter.config.alpha}),
                    ..Default::default()
                },
            )?;
            println!("{}", json!({"version": v, "head": v}));
        }
        AdapterCommand::Merge(a) => {
            let method = MergeMethod::parse(&a.method, a.density, a.seed)?;
            let versions: Vec<u32> = a
                .versions
                .iter()
                .map(|v| parse_version(v))
                .collect::<Result<_>>()?;
            let weights: Vec<f32> = match &a.weights {
                Some(w) => w
                    .split(',')
                    .map(|x| {
                        x.trim().parse::<f32>().map_err(|_| {
                            Error::InvalidArgument(format!("weight {x:?} is not a number"))
                        })
                    })
                    .collect::<Result<_>>()?,
                None => vec![1.0; versions.len()],
            };
            if weights.len() != versions.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} weights for {} versions",
                    weights.len(),
                    versions.len()
                )));
            }
            let ctx = Context::new()?;
            let model = load_model(&ctx, &a.model)?;
            let store = AdapterStore::open_or_create(&a.store, &model)?;
            let adapters = versions
                .iter()
                .map(|&v| store.load(v, &model))
                .collect::<Result<Vec<_>>>()?;
            let parts: Vec<(&LoraAdapter, f32)> =
                adapters.iter().zip(weights.iter().copied()).collect();
            let merged = merge_adapters(&parts, method)?;
            let names: Vec<String> = versions
                .iter()
                .map(|&v| ember::learn::store::version_name(v))
                .collect();
            let v = store.commit(
                &merged,
                &model,
                NewVersion {
                    note: format!("{} merge of {}", a.method, names.join(" ")),
                    hyperparameters: json!({"method": a.method, "density": a.density,
                        "weights": weights, "seed": a.seed, "versions": versions}),
                    ..Default::default()
                },
            )?;
            println!("{}", json!({"version": v, "head": v, "merged": versions}));
        }
    }
    Ok(())
}
