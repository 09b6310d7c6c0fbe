//! Shared helpers for Ember's integration tests.

pub mod tiny;
