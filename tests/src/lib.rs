//! Shared helpers for Ember's integration tests.

pub mod model;
pub mod quantize;
pub mod reference;
pub mod tiny;
