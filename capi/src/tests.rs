//! Rust-side checks of the ABI (the C, C++ and Python tests exercise it from those
//! languages).

use super::*;

#[test]
fn version_matches_the_crate() {
    let v = unsafe { CStr::from_ptr(ember_version()) };
    assert_eq!(v.to_str().unwrap(), ember::VERSION);
    assert_eq!(ember_abi_version(), EMBER_ABI_VERSION);
}

#[test]
fn panics_become_internal_errors() {
    assert_eq!(ember_debug_internal_panic(), EMBER_INTERNAL);
    let msg = unsafe { CStr::from_ptr(ember_last_error()) }
        .to_str()
        .unwrap();
    assert!(msg.contains("deliberate panic"), "{msg}");
    assert_eq!(
        unsafe { CStr::from_ptr(ember_status_str(8)) }
            .to_str()
            .unwrap(),
        "EMBER_INTERNAL"
    );
    assert_eq!(
        unsafe { CStr::from_ptr(ember_status_str(1234)) }
            .to_str()
            .unwrap(),
        "EMBER_UNKNOWN_STATUS"
    );
}

#[test]
fn null_and_dead_handles_are_rejected() {
    unsafe {
        let mut m: *mut ember_model = std::ptr::null_mut();
        let st = ember_model_load(std::ptr::null(), c"x".as_ptr(), std::ptr::null(), &mut m);
        assert_eq!(st, EMBER_INVALID_ARGUMENT);
        assert!(m.is_null());
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(std::ptr::null(), &mut ctx), EMBER_OK);
        let mut json: *mut c_char = std::ptr::null_mut();
        assert_eq!(ember_context_info_json(ctx, &mut json), EMBER_OK);
        assert!(CStr::from_ptr(json).to_str().unwrap().contains("adapter"));
        ember_string_free(json);
        ember_context_free(ctx);
        // Used after free: detected.
        assert_eq!(
            ember_context_info_json(ctx, &mut json),
            EMBER_INVALID_ARGUMENT
        );
        let msg = CStr::from_ptr(ember_last_error()).to_str().unwrap();
        assert!(msg.contains("not a live handle"), "{msg}");
        // Freeing twice or NULL: no crash.
        ember_context_free(ctx);
        ember_context_free(std::ptr::null_mut());
        ember_string_free(std::ptr::null_mut());
    }
}

#[test]
fn struct_size_is_checked() {
    unsafe {
        let mut p = ember_context_default_params();
        p.struct_size = 2;
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(&p, &mut ctx), EMBER_INVALID_ARGUMENT);
        let msg = CStr::from_ptr(ember_last_error()).to_str().unwrap();
        assert!(msg.contains("struct_size"), "{msg}");
        assert!(ctx.is_null());
    }
}

#[test]
fn header_is_up_to_date() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    let committed = std::fs::read_to_string(dir.join("include/ember.h")).unwrap_or_default();
    if String::from_utf8_lossy(&out) != committed {
        if std::env::var_os("EMBER_BLESS_HEADER").is_some() {
            std::fs::write(dir.join("include/ember.h"), &out).unwrap();
        } else {
            panic!("capi/include/ember.h is stale: run `EMBER_BLESS_HEADER=1 cargo test -p ember-capi header` and commit it");
        }
    }
}
