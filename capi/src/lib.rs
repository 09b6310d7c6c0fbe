//! `libember`: the C ABI of the Ember runtime. See `capi/include/ember.h`.
#![deny(missing_docs)]

use std::ffi::c_char;

/// Version string of the library, NUL-terminated, static (never free it).
#[no_mangle]
pub extern "C" fn ember_version() -> *const c_char {
    static V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr() as *const c_char
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_matches_the_crate() {
        let v = unsafe { std::ffi::CStr::from_ptr(super::ember_version()) };
        assert_eq!(v.to_str().unwrap(), ember::VERSION);
    }
}
