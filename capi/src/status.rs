//! Status codes, the thread-local error message, and the guard every entry point runs in:
//! it catches panics (none may cross the ABI) and turns `ember::Error` into a status.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use ember::{Error, ErrorKind};

/// Result of every fallible call. The numbers are stable across versions.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_status {
    /// Success.
    EMBER_OK = 0,
    /// A NULL pointer, a value out of range, a wrong `struct_size`, a freed handle, or
    /// text that is not UTF-8.
    EMBER_INVALID_ARGUMENT = 1,
    /// Reading or writing a file failed.
    EMBER_IO = 2,
    /// A file is malformed.
    EMBER_FORMAT = 3,
    /// Well-formed input that Ember does not implement (architecture, quantization, ...).
    EMBER_UNSUPPORTED = 4,
    /// A memory budget or a device limit would be exceeded.
    EMBER_OUT_OF_MEMORY = 5,
    /// No GPU adapter, or the device was lost.
    EMBER_DEVICE_LOST = 6,
    /// A callback asked to stop.
    EMBER_ABORTED = 7,
    /// A bug in Ember (including a caught internal panic).
    EMBER_INTERNAL = 8,
    /// An output buffer is too small; the size needed was written to the size output.
    EMBER_BUFFER_TOO_SMALL = 9,
}

pub use ember_status::*;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error.
pub(crate) fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

pub(crate) fn clear_error() {
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::default());
}

/// An error of an entry point: a status and a message.
#[derive(Debug)]
pub(crate) struct CError(pub ember_status, pub String);

impl From<Error> for CError {
    fn from(e: Error) -> Self {
        let s = match e.kind() {
            ErrorKind::InvalidArgument => EMBER_INVALID_ARGUMENT,
            ErrorKind::Io => EMBER_IO,
            ErrorKind::Format => EMBER_FORMAT,
            ErrorKind::Unsupported => EMBER_UNSUPPORTED,
            ErrorKind::OutOfMemory => EMBER_OUT_OF_MEMORY,
            ErrorKind::Device => EMBER_DEVICE_LOST,
            ErrorKind::Aborted => EMBER_ABORTED,
            ErrorKind::Internal => EMBER_INTERNAL,
        };
        CError(s, e.to_string())
    }
}

/// Shorthand for an invalid-argument error.
pub(crate) fn invalid(msg: impl Into<String>) -> CError {
    CError(EMBER_INVALID_ARGUMENT, msg.into())
}

pub(crate) type CResult<T> = std::result::Result<T, CError>;

/// Runs an entry point's body: panics become `EMBER_INTERNAL`, errors set the thread's
/// last error.
pub(crate) fn guard(name: &str, f: impl FnOnce() -> CResult<()>) -> ember_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            clear_error();
            EMBER_OK
        }
        Ok(Err(CError(s, msg))) => {
            set_error(&format!("{name}: {msg}"));
            s
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("{name}: internal error (panic): {what}"));
            EMBER_INTERNAL
        }
    }
}

/// The name of a status code, e.g. `"EMBER_FORMAT"`. Static string; never NULL (unknown
/// codes give `"EMBER_UNKNOWN_STATUS"`). Thread-safe.
#[no_mangle]
pub extern "C" fn ember_status_str(status: i32) -> *const c_char {
    let s: &'static [u8] = match status {
        0 => b"EMBER_OK\0",
        1 => b"EMBER_INVALID_ARGUMENT\0",
        2 => b"EMBER_IO\0",
        3 => b"EMBER_FORMAT\0",
        4 => b"EMBER_UNSUPPORTED\0",
        5 => b"EMBER_OUT_OF_MEMORY\0",
        6 => b"EMBER_DEVICE_LOST\0",
        7 => b"EMBER_ABORTED\0",
        8 => b"EMBER_INTERNAL\0",
        9 => b"EMBER_BUFFER_TOO_SMALL\0",
        _ => b"EMBER_UNKNOWN_STATUS\0",
    };
    s.as_ptr() as *const c_char
}

/// The detailed message of the last failed call on this thread (empty after a successful
/// call). The pointer stays valid until the next Ember call on this thread; copy it to
/// keep it. Never NULL.
#[no_mangle]
pub extern "C" fn ember_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}
