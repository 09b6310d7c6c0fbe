//! The real test model (SmolLM2-135M-Instruct Q4_1, fetched by `scripts/fetch-model.sh`).

use std::path::PathBuf;

/// Path of the GGUF from `EMBER_TEST_MODEL`. `scripts/test.sh` always sets it, and sets
/// `EMBER_REQUIRE_MODEL=1` so that a missing model fails instead of skipping.
pub fn test_model() -> Option<PathBuf> {
    match std::env::var_os("EMBER_TEST_MODEL") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(
                p.exists(),
                "EMBER_TEST_MODEL={} does not exist",
                p.display()
            );
            Some(p)
        }
        _ => {
            assert!(
                std::env::var_os("EMBER_REQUIRE_MODEL").is_none(),
                "EMBER_REQUIRE_MODEL is set but EMBER_TEST_MODEL is not"
            );
            eprintln!("EMBER_TEST_MODEL is not set: skipping (scripts/test.sh sets it)");
            None
        }
    }
}

/// The path of a committed fixture (under `tests/fixtures`).
pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// A committed fixture as JSON.
pub fn fixture(rel: &str) -> serde_json::Value {
    let p = fixture_path(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A committed text file.
pub fn text(rel: &str) -> String {
    let p = fixture_path(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// A fresh, unique directory under the system temp dir (process id, a counter and the time
/// in its name, so parallel tests never share one), removed with everything in it on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `ember-{tag}-...`.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "ember-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The GPU context the tests of one binary share (lavapipe in CI).
pub fn ctx() -> &'static ember::Context {
    static CTX: std::sync::OnceLock<ember::Context> = std::sync::OnceLock::new();
    CTX.get_or_init(|| ember::Context::new().expect("a GPU context (lavapipe in CI)"))
}
