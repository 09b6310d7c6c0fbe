//! Continual learning: what keeps an adapter learning for months without losing what it
//! knew or the way back. [`store`] keeps every version of an adapter on disk, crash-safely,
//! with its lineage and metrics, and moves the adapter of record back on request;
//! [`merge`] combines adapters (task arithmetic, TIES, DARE) as PEFT does; [`replay`] keeps a
//! bounded reservoir of past examples; [`learner`] ties them to the trainer's regularizers
//! and an evaluation gate, which can also hold exact answers ([`answers`]); [`background`] runs a learner on its own thread beside the
//! sessions that serve the same model.

pub mod answers;
// Threads: not in the browser (wasm32 has one).
#[cfg(not(target_arch = "wasm32"))]
pub mod background;
pub mod learner;
pub mod merge;
pub mod replay;
pub mod store;

pub use answers::{answer_accuracy, AnswerProbe};
#[cfg(not(target_arch = "wasm32"))]
pub use background::BackgroundLearner;
pub use learner::{Gate, Learner, LearnerConfig, UpdateReport};
pub use merge::{merge_adapters, MergeMethod};
pub use replay::Replay;

pub use store::{AdapterStore, DataSummary, NewVersion, TensorDiff, VersionEntry, VersionMeta};
