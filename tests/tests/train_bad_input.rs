//! Training meets bad input: a non-finite loss or gradient skips the step and leaves the
//! adapter (and the optimizer) as they were; a save killed at any moment (a child process
//! killed with SIGKILL while it saves in a loop) leaves an adapter that loads, equal to one of
//! the versions saved, never a mixture.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember::adapters::{LoraAdapter, LoraConfig, SoftPrompt, Target};
use ember::model::{LoadOptions, Model};
use ember::train::{Example, TrainConfig, Trainables, Trainer};
use ember::util::Rng;
use ember::Context;
use ember_tests::model::temp_dir;
use ember_tests::tiny::{write_tiny_model, TinyVariant};

fn tiny(tag: &str) -> Arc<Model> {
    let dir = temp_dir(tag);
    write_tiny_model(&dir, TinyVariant::Llama).unwrap();
    let ctx = Context::new().unwrap();
    let m = Model::load(&ctx, &dir, LoadOptions::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Arc::new(m)
}

fn lora(m: &Model, rank: usize) -> LoraAdapter {
    LoraAdapter::init(
        &m.config,
        LoraConfig {
            rank,
            alpha: 16.0,
            rslora: false,
            targets: Target::ALL.to_vec(),
            experts: None,
        },
        3,
    )
    .unwrap()
}

#[test]
fn a_non_finite_loss_skips_the_step_and_keeps_the_adapter() {
    let m = tiny("train-nan");
    let mut prompt = SoftPrompt::random(&m.config, 2, 5).unwrap();
    let batch = vec![Example::all(vec![5, 17, 200, 3, 99, 42, 7])];
    let config = TrainConfig {
        rows: 32,
        ..Default::default()
    };
    // A clean trainer moves the adapter.
    let t = |prompt: SoftPrompt| Trainables {
        lora: Some(lora(&m, 4)),
        prompt: Some(prompt),
        prefix: None,
    };
    let mut clean = Trainer::new(m.clone(), t(prompt.clone()), config.clone()).unwrap();
    let before = clean.lora().unwrap().unwrap();
    let s = clean.step(&batch).unwrap();
    assert!(!s.skipped && s.loss.is_finite());
    assert_ne!(clean.lora().unwrap().unwrap().weights, before.weights);

    // One NaN in the soft prompt poisons the loss: the step is skipped, nothing changes.
    prompt.values[3] = f32::NAN;
    let mut tr = Trainer::new(m.clone(), t(prompt), config).unwrap();
    let before = tr.lora().unwrap().unwrap();
    let steps = tr.steps();
    for _ in 0..2 {
        let s = tr.step(&batch).unwrap();
        assert!(s.skipped, "{s:?}");
        assert!(!s.loss.is_finite());
    }
    assert_eq!(
        tr.steps(),
        steps,
        "skipped steps do not advance the optimizer"
    );
    let after = tr.lora().unwrap().unwrap();
    assert_eq!(after.weights, before.weights);
}

/// The child side of the interrupted-save test: saves versions 1, 2, 3, ... of a large
/// adapter (rank 256 on every linear: ~3 MB) into `dir` forever (every value of version k
/// is k).
fn save_forever(dir: &Path) -> ! {
    let m = tiny("save-child");
    let mut a = lora(&m, 256);
    for k in 1.. {
        for p in a.weights.values_mut() {
            p.a.iter_mut().for_each(|x| *x = k as f32);
            p.b.iter_mut().for_each(|x| *x = k as f32);
        }
        a.save(dir, &m).unwrap();
        println!("saved {k}");
    }
    unreachable!()
}

#[test]
fn a_save_killed_midway_leaves_a_whole_adapter() {
    if let Some(dir) = std::env::var_os("EMBER_SAVE_FOREVER") {
        save_forever(Path::new(&dir));
    }
    let m = tiny("save-parent");
    let dir = temp_dir("interrupted-save").join("adapter");
    let mut rng = Rng::new(9);
    let mut versions_seen = Vec::new();
    for round in 0..4 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_save_killed_midway_leaves_a_whole_adapter",
                "--nocapture",
            ])
            .env("EMBER_SAVE_FOREVER", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the first save of this child can exist, then kill it at a random
        // moment of its save loop.
        let t0 = Instant::now();
        while !dir.join("adapter_config.json").exists() && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        child.kill().unwrap();
        child.wait().unwrap();
        let a = LoraAdapter::load(&dir, &m)
            .unwrap_or_else(|e| panic!("round {round}: the adapter left behind: {e}"));
        assert_eq!(a.config.rank, 256);
        let k = a.weights.values().next().unwrap().a[0];
        for p in a.weights.values() {
            assert!(
                p.a.iter().chain(&p.b).all(|&x| x == k),
                "round {round}: a mixture of versions"
            );
        }
        versions_seen.push(k);
    }
    assert!(versions_seen.iter().all(|&k| k >= 1.0));
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}
