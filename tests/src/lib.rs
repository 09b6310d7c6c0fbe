//! Shared helpers for Ember's integration tests.

pub mod model;
pub mod tiny;
