//! How Ember waits on the device. Natively it blocks (the thread waits on the GPU); in the
//! browser nothing may block: WebGPU settles error scopes and buffer mappings only when the
//! page's event loop runs, so waiting there means awaiting a future.
//!
//! The runtime's readback paths are written once, as `async` functions; the blocking API
//! runs them with [`blocking`], which natively completes at once (every await inside is a
//! blocking device wait that is already done) and on the web refuses with an error that
//! points to the `_async` methods.

use std::future::Future;

use crate::error::Result;

/// Runs a readback future to completion on this thread.
#[cfg(not(target_arch = "wasm32"))]
pub fn blocking<T>(what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    let _ = what;
    pollster::block_on(fut)
}

/// In the browser a blocking wait would hang the page: refuse, pointing to the async methods.
#[cfg(target_arch = "wasm32")]
pub fn blocking<T>(what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    drop(fut);
    Err(crate::error::Error::Unsupported(format!(
        "{what} blocks until the GPU is done, which the browser does not allow; use the async \
         methods (Session::generate_async, Trainer::step_async, ...)"
    )))
}

/// Runs `f` (which creates something on `device`) inside an error scope of `filter` and
/// returns what it made with the error it raised, if any.
///
/// In the browser an error scope resolves only after control returns to the event loop, so
/// no scope is pushed there: an error goes to the device's uncaptured-error handler, which
/// the context records and turns into an `Error` at the next readback or sync.
pub(crate) fn scoped<T>(
    device: &wgpu::Device,
    filter: wgpu::ErrorFilter,
    f: impl FnOnce() -> T,
) -> (T, Option<wgpu::Error>) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let scope = device.push_error_scope(filter);
        let made = f();
        (made, pollster::block_on(scope.pop()))
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (device, filter);
        (f(), None)
    }
}

/// A one-shot mapping result: `map_async`'s callback fills it, the readback awaits it.
#[cfg(target_arch = "wasm32")]
pub(crate) fn map_signal() -> (MapSender, MapFuture) {
    let shared = std::rc::Rc::new(std::cell::RefCell::new(MapState::default()));
    (MapSender(shared.clone()), MapFuture(shared))
}

#[cfg(target_arch = "wasm32")]
#[derive(Default)]
pub(crate) struct MapState {
    done: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
    waker: Option<std::task::Waker>,
}

#[cfg(target_arch = "wasm32")]
pub(crate) struct MapSender(std::rc::Rc<std::cell::RefCell<MapState>>);

#[cfg(target_arch = "wasm32")]
impl MapSender {
    pub(crate) fn send(self, r: std::result::Result<(), wgpu::BufferAsyncError>) {
        let waker = {
            let mut s = self.0.borrow_mut();
            s.done = Some(r);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub(crate) struct MapFuture(std::rc::Rc<std::cell::RefCell<MapState>>);

#[cfg(target_arch = "wasm32")]
impl Future for MapFuture {
    type Output = Result<()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut s = self.0.borrow_mut();
        match s.done.take() {
            Some(r) => std::task::Poll::Ready(r.map_err(|e| {
                crate::error::Error::Device(format!("mapping the staging buffer: {e}"))
            })),
            None => {
                s.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn blocking_runs_a_ready_future_natively() {
        assert_eq!(blocking("x", async { Ok(7) }).unwrap(), 7);
        let e = blocking::<u8>("x", async { Err(Error::Aborted) }).unwrap_err();
        assert!(matches!(e, Error::Aborted));
    }
}
