//! Shared helpers for kernel tests: one context per test process, tolerances.

use std::sync::OnceLock;

use crate::gpu::{Context, ContextOptions};

/// The context every kernel test uses (chosen by `EMBER_BACKEND` / `EMBER_ADAPTER`).
pub(crate) fn ctx() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| {
        let opts = ContextOptions::from_env().expect("EMBER_* environment");
        Context::with_options(opts).expect("a GPU adapter for tests (install mesa-vulkan-drivers)")
    })
}

/// The default context, and one with SHADER_F16 and subgroups turned off and WebGPU's
/// default limits, so every fallback runs on the same inputs as the fast paths.
pub(crate) fn contexts() -> [&'static Context; 2] {
    static RESTRICTED: OnceLock<Context> = OnceLock::new();
    let r = RESTRICTED.get_or_init(|| {
        let opts = ContextOptions {
            disable_f16: true,
            disable_subgroups: true,
            webgpu_default_limits: true,
            ..ContextOptions::from_env().expect("EMBER_* environment")
        };
        Context::with_options(opts).expect("a GPU adapter for tests")
    });
    [ctx(), r]
}

/// Asserts `got` is within `atol + rtol * |want|` of `want`, element-wise, with a readable
/// report of the worst element.
#[track_caller]
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let tol = atol + rtol * w.abs();
        if err <= tol {
            continue;
        }
        let r = if err.is_nan() || tol == 0.0 {
            f32::INFINITY
        } else {
            err / tol
        };
        if r > worst.1 {
            worst = (i, r);
        }
    }
    assert!(
        worst.1 == 0.0,
        "{what}: element {} is {} but the reference is {} ({}x the tolerance)",
        worst.0,
        got[worst.0],
        want[worst.0],
        worst.1
    );
}
