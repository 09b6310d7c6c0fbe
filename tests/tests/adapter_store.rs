//! The versioned adapter store (issue 8): commits with lineage and metadata, head and
//! rollback, export and diff, and bad input (another base, corrupted metadata, a dangling
//! head, staging debris) handled with clear errors while the store stays usable. The
//! crash-safety test (a child process killed mid-commit) is in the CLI tests.

use std::sync::Arc;

use ember::adapters::{LoraAdapter, LoraConfig, Target};
use ember::learn::store::{summarize, version_name};
use ember::learn::{AdapterStore, NewVersion};
use ember::model::{LoadOptions, Model};
use ember::util::Rng;
use ember_tests::model::{ctx, TempDir};
use ember_tests::tiny::{write_tiny_model, TinyVariant};
use serde_json::json;

fn tiny(v: TinyVariant) -> Arc<Model> {
    let dir = TempDir::new("store-model");
    write_tiny_model(dir.path(), v).unwrap();
    Arc::new(Model::load(ctx(), dir.path(), LoadOptions::default()).unwrap())
}

fn adapter(m: &Model, seed: u64) -> LoraAdapter {
    let mut a = LoraAdapter::init(
        &m.config,
        LoraConfig::new(2, 4.0, vec![Target::Q, Target::V]),
        seed,
    )
    .unwrap();
    let mut rng = Rng::new(seed);
    for p in a.weights.values_mut() {
        p.b = rng.vec(p.b.len(), -0.1, 0.1);
    }
    a.base_identity = Some(m.identity);
    a
}

fn new(note: &str, examples: &[Vec<u32>]) -> NewVersion {
    NewVersion {
        data: summarize(examples.iter().map(|e| e.as_slice())),
        hyperparameters: json!({"lr": 1e-3}),
        metrics: json!({"loss": 1.5}),
        note: note.into(),
        files: Vec::new(),
    }
}

#[test]
fn versions_lineage_rollback_export_and_diff() {
    let m = tiny(TinyVariant::Llama);
    let dir = TempDir::new("store");
    let store = AdapterStore::open_or_create(dir.path(), &m).unwrap();
    assert_eq!(store.head().unwrap(), None);
    assert!(store.versions().unwrap().is_empty());
    let (a1, a2, a3) = (adapter(&m, 1), adapter(&m, 2), adapter(&m, 3));
    let data = vec![vec![1u32, 2, 3], vec![4, 5]];
    assert_eq!(store.commit(&a1, &m, new("first", &data)).unwrap(), 1);
    assert_eq!(store.commit(&a2, &m, new("second", &data[..1])).unwrap(), 2);
    assert_eq!(store.head().unwrap(), Some(2));
    let m2 = store.meta(2).unwrap();
    assert_eq!(
        (m2.version, m2.parent, m2.note.as_str()),
        (2, Some(1), "second")
    );
    assert_eq!((m2.data.examples, m2.data.tokens), (1, 3));
    assert_ne!(m2.data.hash, store.meta(1).unwrap().data.hash);
    assert_eq!(m2.base_identity, format!("{:016x}", m.identity));
    assert_eq!(m2.metrics["loss"], 1.5);
    // Each version loads back exactly; the head is the latest.
    assert_eq!(store.load(1, &m).unwrap().weights, a1.weights);
    assert_eq!(store.load_head(&m).unwrap().unwrap().weights, a2.weights);

    // Rollback moves the head back and keeps the later version; the next commit's parent
    // is the head it was trained from.
    store.rollback(1).unwrap();
    assert_eq!(store.head().unwrap(), Some(1));
    assert_eq!(store.load_head(&m).unwrap().unwrap().weights, a1.weights);
    assert_eq!(store.commit(&a3, &m, new("third", &data)).unwrap(), 3);
    assert_eq!(store.meta(3).unwrap().parent, Some(1));
    assert_eq!(store.version_numbers().unwrap(), vec![1, 2, 3]);
    let err = store.rollback(9).unwrap_err().to_string();
    assert!(err.contains("no version v0009"), "{err}");

    // Export gives a plain PEFT adapter directory.
    let out = TempDir::new("store-export");
    store.export(2, out.path()).unwrap();
    assert_eq!(
        LoraAdapter::load(out.path(), &m).unwrap().weights,
        a2.weights
    );

    // Diff: same tensors, the differences of the B matrices (A equal only for equal seeds).
    let d = store.diff(1, 2).unwrap();
    assert_eq!(d.len(), 2 * 2 * 2, "A and B of q and v on 2 layers");
    for t in &d {
        assert!(t.norm_a.unwrap() > 0.0 && t.norm_b.unwrap() > 0.0);
        assert!(t.norm_diff.unwrap() > 0.0, "{t:?}");
    }
    let same = store.diff(2, 2).unwrap();
    assert!(same.iter().all(|t| t.norm_diff == Some(0.0)));

    // Extra files go beside the adapter; names that would escape or clobber it do not.
    let mut extra = new("with notes", &data);
    extra.files = vec![("notes.txt".into(), b"hello".to_vec())];
    let v = store.commit(&a3, &m, extra).unwrap();
    assert_eq!(
        std::fs::read(store.version_dir(v).join("notes.txt")).unwrap(),
        b"hello"
    );
    for bad in ["../x", "meta.json", "adapter_config.json", "a/b"] {
        let mut e = new("bad", &data);
        e.files = vec![(bad.into(), Vec::new())];
        let err = store.commit(&a3, &m, e).unwrap_err().to_string();
        assert!(err.contains("extra file"), "{bad}: {err}");
    }
    assert_eq!(
        store.head().unwrap(),
        Some(v),
        "failed commits leave the head"
    );
    store.rollback(3).unwrap();

    // Reopening sees the same store.
    let again = AdapterStore::open_or_create(dir.path(), &m).unwrap();
    assert_eq!(again.head().unwrap(), Some(3));
}

#[test]
fn bad_stores_give_clear_errors_and_stay_usable() {
    let m = tiny(TinyVariant::Llama);
    let dir = TempDir::new("store-bad");
    let store = AdapterStore::open_or_create(dir.path(), &m).unwrap();
    store
        .commit(&adapter(&m, 1), &m, NewVersion::default())
        .unwrap();
    store
        .commit(&adapter(&m, 2), &m, NewVersion::default())
        .unwrap();

    // Another base model.
    let other = tiny(TinyVariant::Qwen2);
    let err = AdapterStore::open_or_create(dir.path(), &other)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another base model"), "{err}");
    assert!(store.load(1, &other).is_err());

    // A corrupted meta.json: that version reports it; the others, the head and commits work.
    let meta2 = store.version_dir(2).join("meta.json");
    std::fs::write(&meta2, "{\"version\": 2, \"parent\": ").unwrap();
    let versions = store.versions().unwrap();
    assert!(versions[0].meta.is_ok());
    let err = versions[1].meta.as_ref().unwrap_err().to_string();
    assert!(
        err.contains("meta.json") && err.contains("invalid version metadata"),
        "{err}"
    );
    assert!(store.rollback(2).is_err());
    store.rollback(1).unwrap();
    assert_eq!(
        store
            .commit(&adapter(&m, 3), &m, NewVersion::default())
            .unwrap(),
        3
    );
    // A meta.json that names another version.
    std::fs::write(
        &meta2,
        serde_json::to_string(&store.meta(1).unwrap()).unwrap(),
    )
    .unwrap();
    let err = store.meta(2).unwrap_err().to_string();
    assert!(err.contains("says version 1 in v0002"), "{err}");

    // A head naming a missing version, or garbage.
    let head = dir.path().join("HEAD");
    std::fs::write(&head, "v0042").unwrap();
    let err = store.head().unwrap_err().to_string();
    assert!(
        err.contains("HEAD") && err.contains("v0042 does not exist"),
        "{err}"
    );
    std::fs::write(&head, "latest").unwrap();
    assert!(store
        .head()
        .unwrap_err()
        .to_string()
        .contains("names no version"));
    store.rollback(3).unwrap();
    assert_eq!(store.head().unwrap(), Some(3));

    // Staging debris of an interrupted commit is removed on open and never listed.
    let debris = dir.path().join(".staging-1234-4");
    std::fs::create_dir_all(&debris).unwrap();
    std::fs::write(debris.join("adapter_config.json"), "{").unwrap();
    let reopened = AdapterStore::open(dir.path()).unwrap();
    assert!(!debris.exists());
    assert_eq!(reopened.version_numbers().unwrap(), vec![1, 2, 3]);

    // A store file that is not one.
    std::fs::write(dir.path().join("store.json"), "[]").unwrap();
    let err = AdapterStore::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("store.json"), "{err}");
    assert_eq!(version_name(12), "v0012");
}
