//! A bounded reservoir of past training examples, kept on disk beside the adapter store,
//! mixed into later updates so that what was learned keeps being rehearsed.
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    tokens: Vec<u32>,
    loss: Vec<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct File {
    capacity: usize,
    seen: u64,
    seed: u64,
    examples: Vec<Stored>,
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
                if f.examples.iter().any(|e| e.tokens.len() != e.loss.len()) {
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

    /// Examples held.
    pub fn len(&self) -> usize {
        self.file.examples.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.file.examples.is_empty()
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
            let stored = Stored {
                tokens: ex.tokens.clone(),
                loss: ex.loss.clone(),
            };
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

    /// `n` examples drawn with `rng` (with replacement).
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<Example> {
        if self.file.examples.is_empty() {
            return Vec::new();
        }
        (0..n)
            .map(|_| {
                let s = &self.file.examples[rng.below(self.file.examples.len() as u64) as usize];
                Example::new(s.tokens.clone(), s.loss.clone())
            })
            .collect()
    }

    /// Every example held.
    pub fn examples(&self) -> Vec<Example> {
        self.file
            .examples
            .iter()
            .map(|s| Example::new(s.tokens.clone(), s.loss.clone()))
            .collect()
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_string(&self.file)
            .map_err(|e| Error::Internal(format!("replay buffer: {e}")))?;
        write_atomic(&self.path, text.as_bytes())
    }
}
