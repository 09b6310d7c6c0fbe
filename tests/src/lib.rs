//! Shared helpers for Ember's integration tests.
