//! A pool of device buffers, so that plans built again for a new batch shape (and scratch
//! buffers of benchmarks and tests) reuse allocations instead of asking the driver each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Idle buffers by (usage bits, size class).
type FreeLists = Mutex<HashMap<(u32, u64), Vec<wgpu::Buffer>>>;

/// Free buffers by (usage bits, size class).
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Arc<FreeLists>,
}

/// Size class of a request: the next power of two at or above `size`, at least 256 bytes, so a
/// returned buffer serves any later request of the same class.
pub(crate) fn size_class(size: u64) -> u64 {
    size.max(256).next_power_of_two()
}

impl BufferPool {
    /// A free buffer of this class and usage, if one is waiting.
    pub(crate) fn take(&self, usage: wgpu::BufferUsages, class: u64) -> Option<wgpu::Buffer> {
        let mut free = self.free.lock().ok()?;
        free.get_mut(&(usage.bits(), class)).and_then(|v| v.pop())
    }

    /// Handle used by buffers to come back on drop.
    pub(crate) fn handle(&self) -> PoolHandle {
        Arc::downgrade(&self.free)
    }

    /// Number of buffers waiting for reuse.
    pub(crate) fn idle(&self) -> usize {
        self.free
            .lock()
            .map(|f| f.values().map(|v| v.len()).sum())
            .unwrap_or(0)
    }

    /// Drops every idle buffer; returns the bytes freed.
    pub(crate) fn trim(&self) -> u64 {
        let Ok(mut free) = self.free.lock() else {
            return 0;
        };
        let bytes = free
            .iter()
            .map(|((_, class), v)| class * v.len() as u64)
            .sum();
        free.clear();
        bytes
    }
}

/// Where a [`super::tensor::DeviceBuffer`] goes when dropped.
pub(crate) type PoolHandle = Weak<FreeLists>;
