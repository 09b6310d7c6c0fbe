//! The CLI as other tools call it: exit codes and JSON output.

use std::process::Command;

fn ember(args: &[&str]) -> (bool, String, String) {
    ember_env(args, &[])
}

#[test]
fn info_json_describes_the_adapter() {
    let (ok, out, err) = ember(&["info", "--json", "--all"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!v["adapter"]["name"].as_str().unwrap().is_empty());
    assert!(
        v["adapter"]["limits"]["maxStorageBufferBindingSize"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(v["capabilities"]["f16"].is_boolean());
    assert!(!v["adapters"].as_array().unwrap().is_empty());
}

#[test]
fn selfcheck_passes() {
    let (ok, out, err) = ember(&["selfcheck", "--json"]);
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["ok"] == true));
}

#[test]
fn bench_kernels_prints_json_with_the_device() {
    let (ok, out, err) = ember(&["bench-kernels", "--json", "--quick", "--variant", "auto"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["device"].is_string() && v["backend"].is_string());
    let results = v["results"].as_array().unwrap();
    assert!(results
        .iter()
        .any(|r| r["kernel"] == "matmul" && r["gflops"].as_f64().unwrap() > 0.0));
    assert!(results
        .iter()
        .any(|r| r["kernel"] == "qmatvec" && r["gb_s"].as_f64().unwrap() > 0.0));
}

#[test]
fn bad_environment_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["info"])
        .env("EMBER_BACKEND", "glide")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown backend") && err.contains("vulkan"),
        "{err}"
    );
}

fn model() -> Option<String> {
    match std::env::var("EMBER_TEST_MODEL") {
        Ok(m) if !m.is_empty() => Some(m),
        _ => {
            assert!(
                std::env::var_os("EMBER_REQUIRE_MODEL").is_none(),
                "EMBER_TEST_MODEL unset"
            );
            eprintln!("EMBER_TEST_MODEL is not set: skipping");
            None
        }
    }
}

fn fixture_text(name: &str) -> String {
    format!(
        "{}/../../tests/fixtures/text/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn perplexity_prints_ppl_and_json() {
    let Some(m) = model() else { return };
    let f = fixture_text("short.txt");
    let (ok, out, err) = ember(&["perplexity", "-m", &m, "-f", &f, "--ctx", "512", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tokens"], 19);
    assert_eq!(v["scored"], 18);
    assert_eq!(v["top1"].as_array().unwrap().len(), 18);
    assert!((v["ppl"].as_f64().unwrap() - 22.512).abs() < 0.05, "{v}");
    let (ok, out, err) = ember(&["perplexity", "-m", &m, "-f", &f]);
    assert!(ok, "{err}");
    assert!(out.trim().starts_with("ppl: 22.5"), "{out}");
}

#[test]
fn generate_streams_text() {
    let Some(m) = model() else { return };
    let (ok, out, err) = ember(&[
        "generate",
        "-m",
        &m,
        "-p",
        "The capital of France is",
        "-n",
        "8",
        "--temp",
        "0",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Paris"), "{out}");
    let (ok, out, err) = ember(&[
        "generate", "-m", &m, "-p", "Hi", "-n", "4", "--temp", "0.7", "--seed", "3", "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["tokens"].as_array().unwrap().len() <= 4);
}

#[test]
fn bench_reports_the_documented_fields() {
    let Some(m) = model() else { return };
    let (ok, out, err) = ember(&[
        "bench", "-m", &m, "--prompt", "16", "--gen", "4", "--reps", "1", "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "prefill_tok_s",
        "decode_tok_s",
        "dispatches_per_token",
        "peak_rss_mb",
        "gpu_mem_mb",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k} in {v}");
    }
    for k in ["model", "device", "backend"] {
        assert!(v[k].is_string(), "{k} in {v}");
    }
}

#[test]
fn chat_answers_from_stdin() {
    use std::io::Write;
    let Some(m) = model() else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["chat", "-m", &m, "-n", "6", "--temp", "0"])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is 2+2?\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn missing_model_is_a_clear_error() {
    let (ok, _, err) = ember(&["generate", "-m", "/nonexistent/model.gguf", "-p", "x"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

/// `ember moe upcycle`, then `generate --expert-stats` and `bench` on the result: the
/// upcycled model writes the dense model's greedy text, reports each layer's expert loads,
/// and bench reports its experts and active parameters. A dense model has no expert stats.
#[test]
fn moe_upcycle_expert_stats_and_bench() {
    use ember_tests::tiny::{write_tiny_gguf, TinyVariant};
    let dir = ember_tests::model::temp_dir("cli-moe");
    let dense = dir.join("dense.gguf");
    write_tiny_gguf(
        &dense,
        TinyVariant::Llama,
        Some(ember::quant::QuantType::Q8_0),
    )
    .unwrap();
    let moe = dir.join("moe.gguf");
    let (d, m) = (dense.to_str().unwrap(), moe.to_str().unwrap());
    let (ok, out, err) = ember(&[
        "moe",
        "upcycle",
        "-m",
        d,
        "--out",
        m,
        "--experts",
        "4",
        "--top-k",
        "2",
        "--router-std",
        "0.5",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["experts"].as_u64(), v["layers"].as_u64()),
        (Some(4), Some(2))
    );
    assert!(v["active_params"].as_u64() < v["moe_params"].as_u64());

    let gen = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "generate", "-m", model, "-p", "Hello", "-n", "6", "--temp", "0",
        ];
        args.extend_from_slice(extra);
        ember(&args)
    };
    let (ok, out, err) = gen(m, &["--expert-stats", "--json"]);
    assert!(ok, "{err}");
    let g: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let load = g["expert_load"].as_array().unwrap();
    assert_eq!(load.len(), 2);
    for l in load {
        let counts: Vec<u64> = l["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(counts.len(), 4);
        assert!(counts.iter().sum::<u64>() > 0 && counts.iter().sum::<u64>() % 2 == 0);
        assert!(l["imbalance"].as_f64().unwrap() >= 1.0);
    }
    let (ok, dense_out, err) = gen(d, &["--json"]);
    assert!(ok, "{err}");
    let dg: serde_json::Value = serde_json::from_str(dense_out.trim()).unwrap();
    assert_eq!(
        g["tokens"], dg["tokens"],
        "upcycled greedy tokens differ from dense"
    );
    // The table goes to stderr when not printing JSON.
    let (ok, _, err) = gen(m, &["--expert-stats"]);
    assert!(
        ok && err.contains("expert load") && err.contains("layer   1"),
        "{err}"
    );
    let (ok, _, err) = gen(d, &["--expert-stats"]);
    assert!(
        !ok && err.contains("not a Mixture-of-Experts model"),
        "{err}"
    );

    let (ok, out, err) = ember(&[
        "bench", "-m", m, "--prompt", "8", "--gen", "2", "--reps", "1", "--json",
    ]);
    assert!(ok, "{err}");
    let b: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(b["experts"]["n"], 4);
    assert_eq!(b["experts"]["top_k"], 2);
    assert!(b["active_params"].as_u64() < b["params"].as_u64());
    assert_eq!(b["expert_load"].as_array().unwrap().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn finetune_a_mixture_of_lora_experts_and_generate_with_it() {
    use ember_tests::tiny::{write_tiny_gguf, TinyVariant};
    let dir = ember_tests::model::TempDir::new("cli-moe-lora");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, TinyVariant::Llama, None).unwrap();
    let out = dir.path().join("mix");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let data = fixture_text("short.txt");
    let (ok, stdout, err) = ember(&[
        "finetune",
        "-m",
        m,
        "--data",
        &data,
        "--out",
        o,
        "--lora-rank",
        "2",
        "--lora-targets",
        "q,v,down",
        "--lora-experts",
        "4",
        "--lora-top-k",
        "2",
        "--balance-loss",
        "0.05",
        "--z-loss",
        "0.001",
        "--seq",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "6",
        "--lr",
        "1e-2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    assert!(lines[..6]
        .iter()
        .all(|s| s["aux_loss"].as_f64().unwrap() > 0.0));
    let summary = &lines[6];
    let load = summary["expert_load"].as_array().unwrap();
    assert_eq!(load.len(), 3 * 2, "q, v, down on 2 layers");
    for l in load {
        let counts = l["counts"].as_array().unwrap();
        assert_eq!(counts.len(), 4);
        assert!(counts.iter().map(|c| c.as_u64().unwrap()).sum::<u64>() > 0);
    }
    let cfg = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    assert!(cfg.contains("EMBER_MOE_LORA"), "{cfg}");
    let (ok, stdout, err) = ember(&[
        "generate",
        "-m",
        m,
        "--adapter",
        o,
        "-p",
        "Hello",
        "-n",
        "4",
        "--temp",
        "0",
        "--json",
    ]);
    assert!(ok, "{err}");
    let g: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(g["tokens"].as_array().map(|t| t.len()), Some(4), "{g}");
}

fn ember_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .envs(env.iter().copied())
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run ember");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The adapter store survives a process killed mid-commit at every step of the commit:
/// afterwards it opens, every version it lists is complete, the head is the old or the new
/// version, and the next commit works.
#[test]
fn adapter_store_survives_a_killed_commit_and_the_cli_manages_versions() {
    use ember::adapters::{LoraAdapter, LoraConfig, Target};
    use ember_tests::tiny::{write_tiny_gguf, TinyVariant};
    let dir = ember_tests::model::TempDir::new("cli-store");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, TinyVariant::Llama, None).unwrap();
    let m = ember::model::Model::load(
        ember_tests::model::ctx(),
        &model,
        ember::model::LoadOptions::default(),
    )
    .unwrap();
    let adapter_dir = dir.path().join("adapter");
    let mut a = LoraAdapter::init(&m.config, LoraConfig::new(2, 4.0, vec![Target::Q]), 1).unwrap();
    a.base_identity = Some(m.identity);
    a.save(&adapter_dir, &m).unwrap();
    let (mp, ap) = (model.to_str().unwrap(), adapter_dir.to_str().unwrap());
    for (i, point) in ["staged", "renamed", "head"].iter().enumerate() {
        let store = dir.path().join(format!("store-{point}"));
        let sp = store.to_str().unwrap();
        let commit = |env: &[(&str, &str)]| {
            ember_env(
                &[
                    "adapter",
                    "commit",
                    "--store",
                    sp,
                    "-m",
                    mp,
                    "--adapter",
                    ap,
                ],
                env,
            )
        };
        let (ok, _, err) = commit(&[]);
        assert!(ok, "{err}");
        let (ok, _, _) = commit(&[("EMBER_STORE_CRASH_AT", point)]);
        assert!(!ok, "the commit was to be killed at {point}");
        // The store is consistent: it opens, lists only complete versions, and its head is
        // the old version (killed before HEAD moved) or the new one.
        let (ok, out, err) = ember(&["adapter", "list", "--store", sp, "--json"]);
        assert!(ok, "{point}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let versions = v["versions"].as_array().unwrap();
        assert!(
            versions.iter().all(|e| e.get("meta").is_some()),
            "{point}: {v}"
        );
        let want_head = if i == 2 { 2 } else { 1 };
        assert_eq!(v["head"], want_head, "{point}: {v}");
        assert_eq!(versions.len(), if i == 0 { 1 } else { 2 }, "{point}: {v}");
        assert!(
            std::fs::read_dir(&store)
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(".staging")),
            "{point}: staging debris left after open"
        );
        let (ok, out, err) = commit(&[]);
        assert!(ok, "{point}: {err}");
        let want_next = if i == 0 { 2 } else { 3 };
        assert!(
            out.contains(&format!("\"version\":{want_next}")),
            "{point}: {out}"
        );
    }
    // The other commands on the last store: show, diff, rollback, export.
    let sp = dir.path().join("store-head");
    let sp = sp.to_str().unwrap();
    let (ok, out, err) = ember(&["adapter", "show", "--store", sp, "v0002"]);
    assert!(ok, "{err}");
    let meta: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (meta["version"].as_u64(), meta["parent"].as_u64()),
        (Some(2), Some(1))
    );
    let (ok, out, err) = ember(&["adapter", "diff", "--store", sp, "1", "3"]);
    assert!(ok, "{err}");
    let d: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(d["tensors"].as_array().unwrap().len(), 4);
    let (ok, _, err) = ember(&["adapter", "rollback", "--store", sp, "1"]);
    assert!(ok, "{err}");
    let (ok, out, _) = ember(&["adapter", "list", "--store", sp]);
    assert!(
        ok && out.lines().next().unwrap().starts_with("* v0001"),
        "{out}"
    );
    let export = dir.path().join("exported");
    let (ok, _, err) = ember(&[
        "adapter",
        "export",
        "--store",
        sp,
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(LoraAdapter::load(&export, &m).unwrap().weights, a.weights);
    let (ok, _, err) = ember(&["adapter", "rollback", "--store", sp, "v0009"]);
    assert!(!ok && err.contains("no version v0009"), "{err}");
    // A TIES merge of two versions becomes the head, its lineage in its metadata.
    let (ok, out, err) = ember(&[
        "adapter",
        "merge",
        "--store",
        sp,
        "-m",
        mp,
        "--method",
        "ties",
        "--density",
        "0.5",
        "--weights",
        "1,0.5",
        "1",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"version\":4"), "{out}");
    let (ok, out, _) = ember(&["adapter", "show", "--store", sp]);
    assert!(ok && out.contains("ties merge of v0001 v0003"), "{out}");
    let (ok, _, err) = ember(&[
        "adapter",
        "merge",
        "--store",
        sp,
        "-m",
        mp,
        "--weights",
        "1",
        "1",
        "3",
    ]);
    assert!(!ok && err.contains("1 weights for 2 versions"), "{err}");
}

#[test]
fn learn_updates_a_store_and_the_gate_reports() {
    use ember_tests::tiny::{write_tiny_gguf, TinyVariant};
    let dir = ember_tests::model::TempDir::new("cli-learn");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, TinyVariant::Llama, None).unwrap();
    let store = dir.path().join("store");
    let (mp, sp) = (model.to_str().unwrap(), store.to_str().unwrap());
    let data = fixture_text("short.txt");
    let learn = |extra: &[&str]| {
        let mut args = vec![
            "learn",
            "--store",
            sp,
            "-m",
            mp,
            "--data",
            &data,
            "--lora-rank",
            "2",
            "--seq",
            "64",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--json",
        ];
        args.extend_from_slice(extra);
        ember(&args)
    };
    let (ok, out, err) = learn(&[]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (r["version"].as_u64(), r["kept"].as_bool()),
        (Some(1), Some(true)),
        "{r}"
    );
    assert!(r["new_after"].as_f64() < r["new_before"].as_f64(), "{r}");
    // Retained probes that must not get worse at all, with an impossible gain: rejected.
    let (ok, out, err) = learn(&["--probe-retained", &data, "--min-new-gain", "10"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (r["version"].as_u64(), r["kept"].as_bool()),
        (Some(2), Some(false)),
        "{r}"
    );
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("new-task probe loss"),
        "{r}"
    );
    let (ok, out, _) = ember(&["adapter", "list", "--store", sp, "--json"]);
    assert!(ok);
    let l: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(l["head"], 1, "{l}");
    assert!(l["versions"][1]["meta"]["note"]
        .as_str()
        .unwrap()
        .starts_with("rejected"));
    // Shorter sequences than before: new data is cut by the loader, replayed data by the
    // learner.
    let (ok, out, err) = ember(&[
        "learn",
        "--store",
        sp,
        "-m",
        mp,
        "--data",
        &data,
        "--lora-rank",
        "2",
        "--seq",
        "32",
        "--steps",
        "2",
        "--no-gate",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"version\":3"), "{out}");
    // Text to retain becomes anchors of the replay buffer, recorded in the version.
    let (ok, out, err) = learn(&["--retain", &data, "--no-gate"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"version\":4"), "{out}");
    let (ok, out, err) = ember(&["adapter", "show", "--store", sp]);
    assert!(ok, "{err}");
    let meta: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        meta["hyperparameters"]["anchors"].as_u64() > Some(0),
        "{meta}"
    );
    // Malformed data is a clear error and the store is untouched.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": 1}\n").unwrap();
    let (ok, _, err) = ember(&[
        "learn",
        "--store",
        sp,
        "-m",
        mp,
        "--data",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("bad.jsonl"), "{err}");
    let (_, out, _) = ember(&["adapter", "list", "--store", sp, "--json"]);
    let l: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (l["head"].as_u64(), l["versions"].as_array().unwrap().len()),
        (Some(4), 4)
    );
}
