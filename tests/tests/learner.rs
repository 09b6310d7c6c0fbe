//! The continual-learning `Learner` (issue 8) on the tiny Llama: updates become versions,
//! the evaluation gate rejects an update that forgets (recorded, head unchanged, trainer
//! back at the head), examples and the replay reservoir survive a restart, and bad
//! examples are refused without losing what was pending.

use std::sync::Arc;

use ember::adapters::{LoraConfig, Target};
use ember::learn::{AnswerProbe, Gate, Learner, LearnerConfig};
use ember::model::{LoadOptions, Model};
use ember::train::Example;
use ember_tests::model::{ctx, TempDir};
use ember_tests::tiny::{write_tiny_model, TinyVariant};

fn tiny() -> Arc<Model> {
    let dir = TempDir::new("learner-model");
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    Arc::new(Model::load(ctx(), dir.path(), LoadOptions::default()).unwrap())
}

/// Sequences repeating a 4-token pattern of "task" `task`, each opened by a different token.
fn task(task: u32, n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let pattern: Vec<u32> = (0..4).map(|j| task * 50 + j * 7 + 3).collect();
            let tokens = (0..20)
                .map(|j| {
                    if j == 0 {
                        200 + i as u32
                    } else {
                        pattern[j % 4]
                    }
                })
                .collect();
            Example::all(tokens)
        })
        .collect()
}

/// A gate with these thresholds (answers must all hold).
fn gate(min_new_gain: f64, max_retained_rise: f64) -> Option<Gate> {
    Some(Gate {
        min_new_gain,
        max_retained_rise,
        max_answer_drop: 0.0,
    })
}

fn config() -> LearnerConfig {
    let mut c = LearnerConfig::new(LoraConfig::new(
        4,
        8.0,
        vec![Target::Q, Target::V, Target::Down],
    ));
    c.train.rows = 64;
    c.train.adam.lr = 1e-2;
    c.steps_per_update = 12;
    c.replay_capacity = 6;
    c
}

#[test]
fn updates_become_versions_and_the_gate_rejects_forgetting() {
    let m = tiny();
    let dir = TempDir::new("learner");
    let mut c = config();
    c.l2 = 0.0;
    c.replay_ratio = 0.0;
    let mut l = Learner::open(m.clone(), dir.path(), c.clone()).unwrap();
    assert_eq!(l.head().unwrap(), None);
    assert!(
        l.add(&task(0, 8)).unwrap().is_none(),
        "no update until asked"
    );
    assert_eq!(l.pending(), 8);
    let r = l.update().unwrap();
    assert!(r.kept, "{r:?}");
    assert_eq!((r.version, l.head().unwrap()), (1, Some(1)));
    assert!(r.new_after < 0.5 * r.new_before, "{r:?}");
    assert_eq!(l.pending(), 0);
    assert_eq!((l.replay().len(), l.replay().seen()), (6, 8));
    let meta = l.store().meta(1).unwrap();
    assert!(
        meta.note.starts_with("update: new-task probe loss fell"),
        "{}",
        meta.note
    );
    assert_eq!(meta.data.examples, 8);
    assert_eq!(meta.metrics["kept"], true);
    let v1 = l.adapter().unwrap();

    // Task 1 with task 0 as the retained probes, no replay, no pull, a high rate: the
    // update forgets task 0 and the gate rejects it.
    let mut c2 = c.clone();
    c2.train.adam.lr = 5e-2;
    c2.gate = gate(0.0, 0.05);
    let mut l = Learner::open(m.clone(), dir.path(), c2).unwrap();
    assert_eq!(
        l.adapter().unwrap().weights,
        v1.weights,
        "reopened at the head"
    );
    l.set_probes(task(1, 4), task(0, 4)).unwrap();
    l.add(&task(1, 8)).unwrap();
    let r = l.update().unwrap();
    assert!(!r.kept, "{r:?}");
    assert!(
        r.reason.contains("retained probe loss rose"),
        "{}",
        r.reason
    );
    assert!(r.retained_after.unwrap() > r.retained_before.unwrap());
    assert_eq!((r.version, l.head().unwrap()), (2, Some(1)));
    assert!(l.store().meta(2).unwrap().note.starts_with("rejected: "));
    let kept: serde_json::Value = serde_json::from_slice(
        &std::fs::read(l.store().version_dir(2).join("examples.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        kept["examples"].as_array().unwrap().len(),
        8,
        "the rejected examples are kept"
    );
    assert_eq!(l.adapter().unwrap().weights, v1.weights, "back at the head");
    assert_eq!(l.pending(), 0);

    // With replay of task 0 and the L2 pull, learning task 1 keeps task 0 within the bound.
    let mut c3 = config();
    c3.replay_ratio = 0.5;
    c3.l2 = 1.0;
    c3.gate = gate(0.0, 1.0);
    let mut l = Learner::open(m.clone(), dir.path(), c3).unwrap();
    l.set_probes(task(1, 4), task(0, 4)).unwrap();
    l.add(&task(1, 8)).unwrap();
    let r = l.update().unwrap();
    assert!(r.kept, "{r:?}");
    assert_eq!((r.version, l.head().unwrap()), (3, Some(3)));
    assert_eq!(l.store().meta(3).unwrap().parent, Some(1));
}

#[test]
fn pending_examples_and_replay_survive_a_restart_and_bad_examples_are_refused() {
    let m = tiny();
    let dir = TempDir::new("learner-restart");
    let mut c = config();
    c.update_every = 6;
    c.steps_per_update = 2;
    c.gate = None;
    let mut l = Learner::open(m.clone(), dir.path(), c.clone()).unwrap();
    assert!(l.add(&task(0, 4)).unwrap().is_none());
    drop(l);
    let mut l = Learner::open(m.clone(), dir.path(), c.clone()).unwrap();
    assert_eq!(l.pending(), 4, "pending examples are kept on disk");
    // Bad examples: refused with a reason, nothing pending lost.
    let long = Example::all(vec![1; 65]);
    let err = l.add(&[long]).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
    let err = l
        .add(&[Example::all(vec![1, 999])])
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocabulary"), "{err}");
    let err = l
        .add(&[Example::new(vec![1, 2, 3], vec![false; 3])])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no scored token"), "{err}");
    assert_eq!(l.pending(), 4);
    // The policy: the sixth example triggers an update.
    let r = l
        .add(&task(2, 2))
        .unwrap()
        .expect("an update every 6 examples");
    assert!(r.kept);
    assert_eq!(l.replay().len(), 6);
    l.add(&task(3, 6)).unwrap().unwrap();
    assert_eq!((l.replay().len(), l.replay().seen()), (6, 12));
    drop(l);
    let l = Learner::open(m, dir.path(), c).unwrap();
    assert_eq!(
        (l.replay().len(), l.replay().seen(), l.head().unwrap()),
        (6, 12, Some(2))
    );
    // A corrupted pending file is a clear error naming it.
    std::fs::write(dir.path().join("pending.json"), "{").unwrap();
    drop(l);
    let err = Learner::open(tiny(), dir.path(), config())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("pending.json"), "{err}");
}

/// Updates run on the learner's thread while a session of the same model keeps serving;
/// each kept update publishes the adapter of record, which the session swaps in.
#[test]
fn background_updates_do_not_block_serving() {
    use ember::learn::BackgroundLearner;
    use ember::session::{Session, SessionParams};
    let m = tiny();
    let dir = TempDir::new("learner-bg");
    let mut c = config();
    c.gate = None;
    c.steps_per_update = 60;
    let bg = BackgroundLearner::spawn(Learner::open(m.clone(), dir.path(), c).unwrap()).unwrap();
    bg.add(task(0, 8)).unwrap();
    bg.request_update().unwrap();
    assert!(bg.busy());
    // Serving goes on meanwhile: forward passes complete while the update is still running.
    let mut s = Session::new(m.clone(), SessionParams::default()).unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| i * 7 + 1).collect();
    let base = s.logits(&prompt).unwrap();
    for _ in 0..3 {
        assert_eq!(s.logits(&prompt).unwrap(), base);
    }
    assert!(bg.busy(), "serving waited for the whole update");
    bg.wait_idle();
    let events = bg.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let r = events[0].as_ref().unwrap();
    assert!(r.kept && r.version == 1, "{r:?}");
    let (adapter, published) = bg.adapter();
    assert_eq!(published, 1);
    // The session swaps the published adapter in.
    let id = s.attach_adapter("live", adapter.unwrap()).unwrap();
    let adapted = s.logits_with(&prompt, Some((id, 1.0))).unwrap();
    assert_ne!(adapted, base);
    // Errors come back as events; the learner goes on.
    bg.add(vec![Example::all(vec![1, 999])]).unwrap();
    bg.request_update().unwrap();
    bg.wait_idle();
    let events = bg.events();
    assert!(
        events[0].as_ref().unwrap_err().contains("vocabulary"),
        "{events:?}"
    );
    assert!(
        events[1].as_ref().unwrap_err().contains("no examples"),
        "{events:?}"
    );
    let l = bg.stop().unwrap();
    assert_eq!(l.head().unwrap(), Some(1));
}

/// Anchors (general text to keep) join the replay buffer once and survive a restart; the
/// gate's retained probes default to the replay buffer; the lineage's step count, the
/// warmup's clock, is recorded in each version and carried on by a reopened learner.
#[test]
fn anchors_default_retained_probes_and_the_lineage_clock() {
    let m = tiny();
    let dir = TempDir::new("learner-anchors");
    let mut c = config();
    c.steps_per_update = 4;
    c.gate = gate(-1.0, 100.0);
    let mut l = Learner::open(m.clone(), dir.path(), c.clone()).unwrap();
    assert_eq!(l.retain(&task(4, 3)).unwrap(), 3);
    assert_eq!(l.retain(&task(4, 3)).unwrap(), 0, "already held");
    assert_eq!((l.replay().anchors(), l.replay().len()), (3, 0));
    let err = l.retain(&[Example::all(vec![1; 65])]).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    l.add(&task(0, 4)).unwrap();
    let r = l.update().unwrap();
    assert!(r.kept, "{r:?}");
    assert!(
        r.retained_before.is_some(),
        "the anchors are scored as retained probes: {r:?}"
    );
    let h = |l: &Learner, v| l.store().meta(v).unwrap().hyperparameters;
    assert_eq!(h(&l, 1)["lineage_steps"], 4);
    assert_eq!(h(&l, 1)["anchors"], 3);
    drop(l);
    let mut l = Learner::open(m.clone(), dir.path(), c.clone()).unwrap();
    assert_eq!((l.replay().anchors(), l.replay().len()), (3, 4));
    l.add(&task(1, 4)).unwrap();
    let r = l.update().unwrap();
    assert!(r.kept, "{r:?}");
    assert_eq!(h(&l, 2)["lineage_steps"], 8, "carried across processes");
    // A refused update does not advance the clock.
    drop(l);
    let mut strict = c;
    strict.gate = gate(10.0, 0.0);
    let mut l = Learner::open(m, dir.path(), strict).unwrap();
    l.add(&task(2, 4)).unwrap();
    assert!(!l.update().unwrap().kept);
    l.add(&task(2, 4)).unwrap();
    let r = l.update().unwrap();
    assert_eq!(r.version, 4);
    assert_eq!(h(&l, 4)["lineage_steps"], 12);
}

/// Greedy answers of `probes` checked by token ids (the tiny tokenizer's ids are bytes):
/// the reference the learner's exact-match scoring is compared with.
fn right_by_tokens(
    m: &Arc<Model>,
    adapter: &ember::adapters::LoraAdapter,
    probes: &[AnswerProbe],
) -> f64 {
    use ember::session::{GenerateOptions, SamplerConfig, Session, SessionParams};
    let mut s = Session::new(
        m.clone(),
        SessionParams {
            n_ctx: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let id = s.attach_adapter("a", Arc::new(adapter.clone())).unwrap();
    let mut right = 0;
    for p in probes {
        let g = s
            .generate(
                &p.prompt,
                GenerateOptions {
                    sampler: SamplerConfig::greedy(),
                    max_tokens: 8,
                    adapter: Some((id, 1.0)),
                    ..Default::default()
                },
            )
            .unwrap();
        let want: Vec<u32> = p.expect.bytes().map(u32::from).collect();
        right += g.tokens.windows(want.len()).any(|w| w == want) as usize;
    }
    right as f64 / probes.len() as f64
}

/// Exact-match probes: the gate's answer accuracies match greedy generations checked
/// independently, an update is kept only if the retained answers hold, and a rejected
/// one names the answers.
#[test]
fn answer_probes_gate_on_exact_answers() {
    let m = tiny();
    let dir = TempDir::new("learner-answers");
    let mut c = config();
    c.answer_tokens = 8;
    c.gate = gate(-10.0, 100.0);
    // Task 1's pattern is the bytes 53 60 67 74 ("5<CJ"): after "5<CJ5<" comes "CJ5<".
    let probe = |t: u32| {
        let b: Vec<u32> = (0..4).map(|j| t * 50 + j * 7 + 3).collect();
        AnswerProbe {
            prompt: vec![200, b[0], b[1], b[2], b[3], b[0], b[1]],
            expect: [b[2], b[3], b[0], b[1]]
                .iter()
                .map(|&x| x as u8 as char)
                .collect(),
        }
    };
    let mut l = Learner::open(m.clone(), dir.path(), c.clone()).unwrap();
    l.set_answer_probes(vec![probe(1)], Vec::new()).unwrap();
    l.add(&task(1, 8)).unwrap();
    let r = l.update().unwrap();
    let v1 = l.adapter().unwrap();
    assert_eq!(
        r.new_answers_after,
        Some(right_by_tokens(&m, &v1, &[probe(1)])),
        "{r:?}"
    );
    assert_eq!(r.new_answers_after, Some(1.0), "task 1 learned: {r:?}");
    assert!(r.kept && r.retained_answers_before.is_none(), "{r:?}");

    // Task 2 at a high rate with no replay or pull, task 1's answer to keep.
    let mut c2 = c;
    c2.replay_ratio = 0.0;
    c2.l2 = 0.0;
    c2.train.adam.lr = 5e-2;
    c2.steps_per_update = 16;
    let mut l = Learner::open(m.clone(), dir.path(), c2).unwrap();
    l.set_answer_probes(Vec::new(), vec![probe(1)]).unwrap();
    l.add(&task(2, 8)).unwrap();
    let r = l.update().unwrap();
    assert_eq!(r.retained_answers_before, Some(1.0), "{r:?}");
    let tried = l.store().load(r.version, &m).unwrap();
    let after = right_by_tokens(&m, &tried, &[probe(1)]);
    assert_eq!(r.retained_answers_after, Some(after), "{r:?}");
    assert_eq!(r.kept, after >= 1.0, "{r:?}");
    assert!(!r.kept, "task 2 overwrote task 1's answer: {r:?}");
    assert!(r.reason.contains("retained answers"), "{}", r.reason);
    assert_eq!(l.adapter().unwrap().weights, v1.weights, "back at the head");

    // A probe that cannot fit the context is refused.
    let long = AnswerProbe {
        prompt: vec![65; 2048],
        expect: "A".into(),
    };
    let err = l.set_answer_probes(vec![long], Vec::new()).unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
}
