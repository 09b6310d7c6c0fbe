//! Live-handle registry: every handle given to C is recorded, so a freed or forged handle
//! passed back is detected (`EMBER_INVALID_ARGUMENT`) instead of dereferenced.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::status::{invalid, CResult};

static LIVE: Mutex<Option<HashSet<(usize, &'static str)>>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut HashSet<(usize, &'static str)>) -> R) -> R {
    let mut g = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(HashSet::new))
}

/// Boxes `v` and records the pointer as a live handle of kind `kind`.
pub(crate) fn register<T>(kind: &'static str, v: T) -> *mut T {
    let p = Box::into_raw(Box::new(v));
    with(|s| s.insert((p as usize, kind)));
    p
}

/// The object behind a live handle (shared use).
///
/// # Safety
/// `p` must be NULL or a pointer this library returned for `kind` (checked) that is not
/// being freed concurrently.
pub(crate) unsafe fn get<'a, T>(kind: &'static str, p: *const T) -> CResult<&'a T> {
    if p.is_null() {
        return Err(invalid(format!("{kind} is NULL")));
    }
    if !with(|s| s.contains(&(p as usize, kind))) {
        return Err(invalid(format!(
            "{kind} {p:p} is not a live handle (freed, or not an {kind})"
        )));
    }
    // SAFETY: registered handles point to live boxes until `release`.
    Ok(unsafe { &*p })
}

/// The object behind a live handle (exclusive use: the caller's thread-safety contract
/// promises one thread at a time).
///
/// # Safety
/// As [`get`], and no other reference to the object may be in use.
pub(crate) unsafe fn get_mut<'a, T>(kind: &'static str, p: *mut T) -> CResult<&'a mut T> {
    unsafe { get(kind, p as *const T) }?;
    // SAFETY: checked live above; exclusivity is the caller's contract.
    Ok(unsafe { &mut *p })
}

/// Forgets a handle and returns its box (NULL or unknown: `None`).
///
/// # Safety
/// `p` must not be used after this.
pub(crate) unsafe fn release<T>(kind: &'static str, p: *mut T) -> Option<Box<T>> {
    if p.is_null() || !with(|s| s.remove(&(p as usize, kind))) {
        return None;
    }
    // SAFETY: it was registered by `register` and is now removed, so freed only once.
    Some(unsafe { Box::from_raw(p) })
}
