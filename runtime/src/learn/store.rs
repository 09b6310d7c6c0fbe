//! A directory of adapter versions for one base model, safe against crashes.
//!
//! ```text
//! store/
//!   store.json          base model identity and name (written once)
//!   HEAD                the adapter of record, e.g. "v0003" (replaced atomically)
//!   v0001/              adapter_config.json, adapter_model.safetensors (PEFT layout), meta.json
//!   v0002/ ...
//!   .staging-*/         a version being written (removed on open; never read)
//! ```
//!
//! A commit writes the new version's files into a staging directory (each file flushed),
//! renames the directory to its version name (atomic), then replaces `HEAD` (atomic). A
//! process killed at any point leaves either the old head or the new one, and every version
//! directory complete: a crash before the rename leaves only staging debris, which the next
//! open removes; a crash between the rename and `HEAD` leaves a complete version that is not
//! the head (listed, and usable by `rollback`). Versions are never modified; a rollback
//! moves `HEAD` back and keeps the history.

use std::path::{Path, PathBuf};
use web_time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::adapters::LoraAdapter;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::util::write_atomic;

/// What a version records besides its weights (`meta.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// This version's number.
    pub version: u32,
    /// The head when it was made (the version it was trained from), if any.
    pub parent: Option<u32>,
    /// Identity of the base model (16 hex digits).
    pub base_identity: String,
    /// Name of the base model.
    pub base_name: String,
    /// Seconds since the Unix epoch at commit.
    pub created: u64,
    /// The data the update trained on.
    pub data: DataSummary,
    /// Training settings (free-form JSON).
    pub hyperparameters: Value,
    /// Measurements (losses, probe scores; free-form JSON).
    pub metrics: Value,
    /// Why the version exists (e.g. "update", "merge of v0002 v0003").
    pub note: String,
}

/// A summary of training data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    /// Examples.
    pub examples: usize,
    /// Tokens.
    pub tokens: usize,
    /// Fingerprint of the examples' tokens (FNV-1a, 16 hex digits).
    pub hash: String,
}

/// What the caller says about a new version ([`AdapterStore::commit`] fills in the rest).
#[derive(Debug, Clone, Default)]
pub struct NewVersion {
    /// The data it trained on.
    pub data: DataSummary,
    /// Training settings.
    pub hyperparameters: Value,
    /// Measurements.
    pub metrics: Value,
    /// Why it exists.
    pub note: String,
    /// Further files written into the version's directory (name, bytes), e.g. a rejected
    /// update's examples. Names are plain file names.
    pub files: Vec<(String, Vec<u8>)>,
}

/// One entry of [`AdapterStore::versions`]: its number and its metadata, or why that could
/// not be read (the other versions stay usable).
#[derive(Debug)]
pub struct VersionEntry {
    /// Version number.
    pub version: u32,
    /// Its `meta.json`, or the error reading it.
    pub meta: Result<VersionMeta>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoreFile {
    format: String,
    base_identity: String,
    base_name: String,
}

const FORMAT: &str = "ember-adapter-store-1";

/// A directory of adapter versions for one base model.
#[derive(Debug, Clone)]
pub struct AdapterStore {
    dir: PathBuf,
    base_identity: u64,
    base_name: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `v0001`.
pub fn version_name(v: u32) -> String {
    format!("v{v:04}")
}

fn parse_version(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('v')?;
    if digits.len() < 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&v| v > 0)
}

/// Test hook for the crash-safety tests: with `EMBER_STORE_CRASH_AT=<point>` (`staged`,
/// `renamed` or `head`) the process exits at once at that point of a commit, as if killed:
/// no cleanup runs.
fn crash_point(point: &str) {
    if std::env::var("EMBER_STORE_CRASH_AT").is_ok_and(|p| p == point) {
        std::process::exit(137);
    }
}

impl AdapterStore {
    /// Opens the store in `dir` for `model`, creating it when `dir` does not exist or is
    /// empty. Refuses a store made for another base model.
    pub fn open_or_create(dir: &Path, model: &Model) -> Result<AdapterStore> {
        let empty = match std::fs::read_dir(dir) {
            Ok(mut it) => it.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(io(dir)(e)),
        };
        if empty {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let f = StoreFile {
                format: FORMAT.into(),
                base_identity: format!("{:016x}", model.identity),
                base_name: model.config.name.clone(),
            };
            let text = serde_json::to_string_pretty(&f)
                .map_err(|e| Error::Internal(format!("store.json: {e}")))?;
            write_atomic(&dir.join("store.json"), text.as_bytes())?;
        }
        let store = Self::open(dir)?;
        if store.base_identity != model.identity {
            return Err(Error::InvalidArgument(format!(
                "{}: the adapter store belongs to another base model ({}, identity {:016x}; this model is {:016x})",
                dir.display(),
                store.base_name,
                store.base_identity,
                model.identity
            )));
        }
        Ok(store)
    }

    /// Opens an existing store (any base), removing staging debris of interrupted commits.
    pub fn open(dir: &Path) -> Result<AdapterStore> {
        let path = dir.join("store.json");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let f: StoreFile = serde_json::from_str(&text)
            .map_err(|e| Error::format(Some(&path), format!("invalid store file: {e}")))?;
        if f.format != FORMAT {
            return Err(Error::format(
                Some(&path),
                format!("format {:?}, expected {FORMAT:?}", f.format),
            ));
        }
        let base_identity = u64::from_str_radix(&f.base_identity, 16).map_err(|_| {
            Error::format(
                Some(&path),
                format!("base_identity {:?} is not hex", f.base_identity),
            )
        })?;
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".staging-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(AdapterStore {
            dir: dir.to_path_buf(),
            base_identity,
            base_name: f.base_name,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The base model's identity.
    pub fn base_identity(&self) -> u64 {
        self.base_identity
    }

    /// A version's directory (which may not exist).
    pub fn version_dir(&self, v: u32) -> PathBuf {
        self.dir.join(version_name(v))
    }

    /// Version numbers present, ascending.
    pub fn version_numbers(&self) -> Result<Vec<u32>> {
        let mut v: Vec<u32> = std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| parse_version(&e.file_name().to_string_lossy()))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Every version with its metadata (or the error reading it), ascending.
    pub fn versions(&self) -> Result<Vec<VersionEntry>> {
        Ok(self
            .version_numbers()?
            .into_iter()
            .map(|version| VersionEntry {
                version,
                meta: self.meta(version),
            })
            .collect())
    }

    /// The head (the adapter of record), if any version was committed.
    pub fn head(&self) -> Result<Option<u32>> {
        let path = self.dir.join("HEAD");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let v = parse_version(text.trim()).ok_or_else(|| {
            Error::format(Some(&path), format!("{:?} names no version", text.trim()))
        })?;
        if !self.version_dir(v).is_dir() {
            return Err(Error::format(
                Some(&path),
                format!("head {} does not exist", version_name(v)),
            ));
        }
        Ok(Some(v))
    }

    /// Version `v`'s metadata.
    pub fn meta(&self, v: u32) -> Result<VersionMeta> {
        let path = self.version_dir(v).join("meta.json");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let m: VersionMeta = serde_json::from_str(&text)
            .map_err(|e| Error::format(Some(&path), format!("invalid version metadata: {e}")))?;
        if m.version != v {
            return Err(Error::format(
                Some(&path),
                format!("says version {} in {}", m.version, version_name(v)),
            ));
        }
        Ok(m)
    }

    /// Version `v`'s adapter, for `model` (which must be the store's base).
    pub fn load(&self, v: u32, model: &Model) -> Result<LoraAdapter> {
        self.check_model(model)?;
        self.meta(v)?;
        LoraAdapter::load(&self.version_dir(v), model)
    }

    /// The head's adapter, if there is a head.
    pub fn load_head(&self, model: &Model) -> Result<Option<LoraAdapter>> {
        match self.head()? {
            Some(v) => self.load(v, model).map(Some),
            None => Ok(None),
        }
    }

    fn check_model(&self, model: &Model) -> Result<()> {
        if model.identity != self.base_identity {
            return Err(Error::InvalidArgument(format!(
                "{}: the adapter store belongs to another base model ({}, identity {:016x}; this model is {:016x})",
                self.dir.display(),
                self.base_name,
                self.base_identity,
                model.identity
            )));
        }
        Ok(())
    }

    /// Writes `adapter` as a new version whose parent is the current head, and makes it the
    /// head. Returns its number.
    pub fn commit(&self, adapter: &LoraAdapter, model: &Model, new: NewVersion) -> Result<u32> {
        self.write_version(adapter, model, new, true)
    }

    /// Writes `adapter` as a new version whose parent is the current head, leaving the head
    /// where it is: an update the evaluation gate rejected, kept for the record with its
    /// reason in `note`.
    pub fn record_rejected(
        &self,
        adapter: &LoraAdapter,
        model: &Model,
        new: NewVersion,
    ) -> Result<u32> {
        self.write_version(adapter, model, new, false)
    }

    fn write_version(
        &self,
        adapter: &LoraAdapter,
        model: &Model,
        new: NewVersion,
        make_head: bool,
    ) -> Result<u32> {
        self.check_model(model)?;
        let parent = self.head()?;
        let version = self.version_numbers()?.last().copied().unwrap_or(0) + 1;
        let staging = self
            .dir
            .join(format!(".staging-{}-{version}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let result = (|| {
            adapter.save(&staging, model)?;
            let meta = VersionMeta {
                version,
                parent,
                base_identity: format!("{:016x}", model.identity),
                base_name: model.config.name.clone(),
                created: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                data: new.data.clone(),
                hyperparameters: new.hyperparameters.clone(),
                metrics: new.metrics.clone(),
                note: new.note.clone(),
            };
            for (name, bytes) in &new.files {
                let plain = Path::new(name)
                    .file_name()
                    .is_some_and(|f| f == name.as_str());
                if !plain || name == "meta.json" || name.starts_with("adapter_") {
                    return Err(Error::InvalidArgument(format!(
                        "{name:?} cannot be a version's extra file"
                    )));
                }
                write_atomic(&staging.join(name), bytes)?;
            }
            let text = serde_json::to_string_pretty(&meta)
                .map_err(|e| Error::Internal(format!("meta.json: {e}")))?;
            write_atomic(&staging.join("meta.json"), text.as_bytes())?;
            crash_point("staged");
            let target = self.version_dir(version);
            std::fs::rename(&staging, &target).map_err(io(&target))?;
            sync_dir(&self.dir);
            crash_point("renamed");
            if make_head {
                self.set_head(version)?;
            }
            crash_point("head");
            Ok(version)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result
    }

    fn set_head(&self, v: u32) -> Result<()> {
        write_atomic(&self.dir.join("HEAD"), version_name(v).as_bytes())
    }

    /// Makes version `v` the head again (its metadata must be readable); later versions
    /// stay in the store.
    pub fn rollback(&self, v: u32) -> Result<()> {
        if !self.version_dir(v).is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{}: no version {}",
                self.dir.display(),
                version_name(v)
            )));
        }
        self.meta(v)?;
        self.set_head(v)
    }

    /// Copies version `v`'s adapter files (PEFT layout) to `dest`, each atomically.
    pub fn export(&self, v: u32, dest: &Path) -> Result<()> {
        self.meta(v)?;
        std::fs::create_dir_all(dest).map_err(io(dest))?;
        for name in ["adapter_model.safetensors", "adapter_config.json"] {
            let src = self.version_dir(v).join(name);
            let bytes = std::fs::read(&src).map_err(io(&src))?;
            write_atomic(&dest.join(name), &bytes)?;
        }
        Ok(())
    }

    /// Per tensor of versions `a` and `b`: norms and differences.
    pub fn diff(&self, a: u32, b: u32) -> Result<Vec<TensorDiff>> {
        let read = |v: u32| -> Result<Vec<(String, Vec<f32>)>> {
            self.meta(v)?;
            let (path, bytes) = crate::adapters::peft::read_tensors(&self.version_dir(v))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| Error::format(Some(&path), format!("invalid safetensors: {e}")))?;
            let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
            names.sort();
            names
                .into_iter()
                .map(|n| {
                    let (v, _) = crate::adapters::peft::read_f32(&st, &n, &path)?
                        .ok_or_else(|| Error::Internal(format!("{n} listed but absent")))?;
                    Ok((n, v))
                })
                .collect()
        };
        let (ta, tb) = (read(a)?, read(b)?);
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mut out = Vec::new();
        for (name, va) in &ta {
            let vb = tb.iter().find(|(n, _)| n == name).map(|(_, v)| v);
            let (nb, nd, max) = match vb {
                Some(vb) if vb.len() == va.len() => {
                    let d: Vec<f32> = va.iter().zip(vb).map(|(x, y)| y - x).collect();
                    let max = d.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    (Some(norm(vb)), Some(norm(&d)), Some(max))
                }
                Some(vb) => (Some(norm(vb)), None, None),
                None => (None, None, None),
            };
            out.push(TensorDiff {
                name: name.clone(),
                norm_a: Some(norm(va)),
                norm_b: nb,
                norm_diff: nd,
                max_abs_diff: max,
            });
        }
        for (name, vb) in &tb {
            if !ta.iter().any(|(n, _)| n == name) {
                out.push(TensorDiff {
                    name: name.clone(),
                    norm_a: None,
                    norm_b: Some(norm(vb)),
                    norm_diff: None,
                    max_abs_diff: None,
                });
            }
        }
        Ok(out)
    }
}

/// How one tensor differs between two versions (`None`: absent there, or shapes differ).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorDiff {
    /// Tensor name (PEFT key).
    pub name: String,
    /// L2 norm in the first version.
    pub norm_a: Option<f64>,
    /// L2 norm in the second version.
    pub norm_b: Option<f64>,
    /// L2 norm of the second minus the first.
    pub norm_diff: Option<f64>,
    /// Largest absolute element difference.
    pub max_abs_diff: Option<f32>,
}

/// The data summary of token sequences: counts and a fingerprint of every token.
pub fn summarize<'a>(sequences: impl Iterator<Item = &'a [u32]>) -> DataSummary {
    let mut h = crate::util::Fnv64::new();
    let (mut examples, mut tokens) = (0, 0);
    for s in sequences {
        examples += 1;
        tokens += s.len();
        h.update(&(s.len() as u64).to_le_bytes());
        for t in s {
            h.update(&t.to_le_bytes());
        }
    }
    DataSummary {
        examples,
        tokens,
        hash: format!("{:016x}", h.finish()),
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
