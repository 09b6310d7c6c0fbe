//! A bounded reservoir of past training examples, kept on disk beside the adapter store,
//! mixed into later updates so that what was learned keeps being rehearsed; beside it, a
//! fixed set of anchors: text whose base-model behaviour must not change (general text),
//! replayed distilled against the frozen base and never evicted.
//!
//! Reservoir sampling (Vitter's algorithm R) keeps every example seen so far with the same
//! probability `capacity / seen`, whatever the order they came in; its random choices are a
//! function of the seed and the count seen, so a reopened reservoir continues exactly. The
//! file is rewritten atomically after each change.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::Example;
use crate::util::{write_atomic, Rng};

/// An example as kept on disk (replay buffer, pending examples, rejected updates).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stored {
    tokens: Vec<u32>,
    loss: Vec<bool>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    distill: bool,
}

impl Stored {
    pub(crate) fn of(e: &Example) -> Stored {
        Stored {
            tokens: e.tokens.clone(),
            loss: e.loss.clone(),
            distill: e.distill,
        }
    }

    pub(crate) fn example(&self) -> Example {
        Example {
            tokens: self.tokens.clone(),
            loss: self.loss.clone(),
            distill: self.distill,
        }
    }

    /// Whether the token and loss lists agree in length.
    pub(crate) fn is_consistent(&self) -> bool {
        self.tokens.len() == self.loss.len()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct File {
    capacity: usize,
    seen: u64,
    seed: u64,
    examples: Vec<Stored>,
    #[serde(default)]
    anchors: Vec<Stored>,
}

/// The reservoir.
#[derive(Debug, Clone)]
pub struct Replay {
    path: PathBuf,
    file: File,
}

impl Replay {
    /// Opens `path` (created empty when missing) holding at most `capacity` examples.
    pub fn open(path: &Path, capacity: usize, seed: u64) -> Result<Replay> {
        let file = match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut f: File = serde_json::from_str(&text).map_err(|e| {
                    Error::format(Some(path), format!("invalid replay buffer: {e}"))
                })?;
                if !f
                    .examples
                    .iter()
                    .chain(&f.anchors)
                    .all(Stored::is_consistent)
                {
                    return Err(Error::format(
                        Some(path),
                        "an example's tokens and loss mask differ in length",
                    ));
                }
                // A smaller capacity keeps a prefix (still a uniform sample).
                f.examples.truncate(capacity);
                f.capacity = capacity;
                f
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File {
                capacity,
                seen: 0,
                seed,
                examples: Vec::new(),
                anchors: Vec::new(),
            },
            Err(source) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Replay {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Examples held in the reservoir (anchors not counted).
    pub fn len(&self) -> usize {
        self.file.examples.len()
    }

    /// Anchors held.
    pub fn anchors(&self) -> usize {
        self.file.anchors.len()
    }

    /// Whether it holds neither examples nor anchors.
    pub fn is_empty(&self) -> bool {
        self.file.examples.is_empty() && self.file.anchors.is_empty()
    }

    /// Adds anchors: examples replayed distilled (they learn the frozen base's
    /// distribution) and never evicted. One already held is not added twice, so offering
    /// the same text at every update is harmless. Returns how many were new.
    pub fn add_anchors(&mut self, examples: &[Example]) -> Result<usize> {
        let mut added = 0;
        for ex in examples {
            let s = Stored {
                distill: true,
                ..Stored::of(ex)
            };
            if !self.file.anchors.contains(&s) {
                self.file.anchors.push(s);
                added += 1;
            }
        }
        if added > 0 {
            self.save()?;
        }
        Ok(added)
    }

    /// Examples offered so far.
    pub fn seen(&self) -> u64 {
        self.file.seen
    }

    /// Offers `examples` (each kept with probability `capacity / seen`) and saves.
    pub fn add(&mut self, examples: &[Example]) -> Result<()> {
        let f = &mut self.file;
        for ex in examples {
            f.seen += 1;
            let stored = Stored::of(ex);
            if f.examples.len() < f.capacity {
                f.examples.push(stored);
            } else if f.capacity > 0 {
                let j = Rng::new(f.seed ^ f.seen.wrapping_mul(0x9E37_79B9)).below(f.seen) as usize;
                if j < f.capacity {
                    f.examples[j] = stored;
                }
            }
        }
        self.save()
    }

    /// `n` examples drawn with `rng` (with replacement) from the reservoir and the anchors
    /// together, each equally likely.
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<Example> {
        let (e, a) = (&self.file.examples, &self.file.anchors);
        let total = (e.len() + a.len()) as u64;
        if total == 0 {
            return Vec::new();
        }
        (0..n)
            .map(|_| {
                let i = rng.below(total) as usize;
                if i < e.len() { &e[i] } else { &a[i - e.len()] }.example()
            })
            .collect()
    }

    /// Every example held in the reservoir, then every anchor.
    pub fn examples(&self) -> Vec<Example> {
        self.file
            .examples
            .iter()
            .chain(&self.file.anchors)
            .map(Stored::example)
            .collect()
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_string(&self.file)
            .map_err(|e| Error::Internal(format!("replay buffer: {e}")))?;
        write_atomic(&self.path, text.as_bytes())
    }
}
