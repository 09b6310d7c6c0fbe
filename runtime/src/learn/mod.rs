//! Continual learning: what keeps an adapter learning for months without losing what it
//! knew or the way back. [`store`] keeps every version of an adapter on disk, crash-safely,
//! with its lineage and metrics, and moves the adapter of record back on request;
//! [`merge`] combines adapters (task arithmetic, TIES, DARE) as PEFT does.

pub mod merge;
pub mod store;

pub use merge::{merge_adapters, MergeMethod};

pub use store::{AdapterStore, DataSummary, NewVersion, TensorDiff, VersionEntry, VersionMeta};
