//! Device buffers and tensors (a typed, shaped view of a buffer).

use std::sync::Arc;

use bytemuck::Pod;

use super::context::{Context, Inner};
use super::pool::{size_class, PoolHandle};
use super::wait::{blocking, scoped};
use crate::error::{Error, Result};

/// Element type of a [`Tensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float (two per 32-bit word in shaders without SHADER_F16).
    F16,
    /// 32-bit unsigned integer (also packed quantized data).
    U32,
    /// 32-bit signed integer.
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
        }
    }
}

/// Usage every Ember buffer gets: kernels read and write it, uploads and readbacks copy it.
pub(crate) const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// One allocation on the device, accounted against the context's memory budget.
pub struct DeviceBuffer {
    buffer: Option<wgpu::Buffer>,
    /// Bytes reserved (the size class for pooled buffers).
    bytes: u64,
    usage: wgpu::BufferUsages,
    pool: Option<PoolHandle>,
    ctx: Arc<Inner>,
}

impl DeviceBuffer {
    /// The wgpu buffer.
    pub fn raw(&self) -> &wgpu::Buffer {
        // Only `Drop` takes the buffer out.
        self.buffer.as_ref().unwrap_or_else(|| unreachable!())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.raw().size()
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let Some(buffer) = self.buffer.take() else {
            return;
        };
        if let Some(free) = self.pool.as_ref().and_then(|p| p.upgrade()) {
            if let Ok(mut free) = free.lock() {
                free.entry((self.usage.bits(), self.bytes))
                    .or_default()
                    .push(buffer);
                return;
            }
        }
        self.ctx
            .allocated
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Context {
    /// Allocates a storage buffer of `bytes` (rounded up to 4), checked against the device's
    /// limits and the memory budget.
    pub fn alloc(&self, bytes: u64, what: &str) -> Result<Arc<DeviceBuffer>> {
        self.alloc_with(bytes, STORAGE, what, false)
    }

    /// Like [`Context::alloc`], but reuses an idle buffer of the same size class when one is
    /// pooled, and returns the buffer to the pool when the last reference drops.
    pub fn alloc_pooled(&self, bytes: u64, what: &str) -> Result<Arc<DeviceBuffer>> {
        self.alloc_with(bytes, STORAGE, what, true)
    }

    pub(crate) fn alloc_with(
        &self,
        bytes: u64,
        usage: wgpu::BufferUsages,
        what: &str,
        pooled: bool,
    ) -> Result<Arc<DeviceBuffer>> {
        let bytes = bytes.max(4).div_ceil(4) * 4;
        let size = if pooled { size_class(bytes) } else { bytes };
        let max = self.caps().max_buffer;
        if size > max {
            return Err(Error::Limit {
                what: format!("buffer for {what}"),
                needed: size,
                limit: max,
            });
        }
        let pool = pooled.then(|| self.inner.pool.handle());
        if pooled {
            if let Some(buffer) = self.inner.pool.take(usage, size) {
                return Ok(Arc::new(DeviceBuffer {
                    buffer: Some(buffer),
                    bytes: size,
                    usage,
                    pool,
                    ctx: self.inner.clone(),
                }));
            }
        }
        self.reserve_bytes(size, what)?;
        let (buffer, error) = scoped(self.device(), wgpu::ErrorFilter::OutOfMemory, || {
            self.device().create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage,
                mapped_at_creation: false,
            })
        });
        if let Some(e) = error {
            self.release_bytes(size);
            return Err(Error::OutOfMemory(format!(
                "allocating {size} bytes for {what}: {e}"
            )));
        }
        Ok(Arc::new(DeviceBuffer {
            buffer: Some(buffer),
            bytes: size,
            usage,
            pool,
            ctx: self.inner.clone(),
        }))
    }

    /// Idle pooled buffers.
    pub fn pool_idle(&self) -> usize {
        self.inner.pool.idle()
    }

    /// Frees every idle pooled buffer.
    pub fn trim_pool(&self) {
        let freed = self.inner.pool.trim();
        self.release_bytes(freed);
    }

    /// Copies `bytes` bytes at `offset` of `buffer` to the host, through one staging buffer
    /// that is kept and reused (grown when a larger read comes). Blocks until the GPU is
    /// done; in the browser use [`Context::read_bytes_async`].
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>> {
        blocking("read_bytes", self.read_bytes_async(buffer, offset, bytes))
    }

    /// [`Context::read_bytes`] for the browser: awaits the mapping instead of blocking.
    pub async fn read_bytes_async(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        if offset % 4 != 0 || bytes % 4 != 0 || offset + bytes > buffer.size() {
            return Err(Error::Internal(format!(
                "readback of {bytes} bytes at {offset} from a {}-byte buffer",
                buffer.size()
            )));
        }
        let out = self.map_and_copy(buffer, offset, bytes).await?;
        self.take_device_error()?;
        Ok(out)
    }

    /// Encodes the copy of `buffer[offset..offset + bytes]` into `staging` and submits it.
    fn submit_copy(&self, buffer: &wgpu::Buffer, offset: u64, staging: &wgpu::Buffer, bytes: u64) {
        let mut enc = self
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(buffer, offset, staging, 0, bytes);
        self.queue().submit([enc.finish()]);
    }

    fn staging_buffer(&self, bytes: u64) -> wgpu::Buffer {
        self.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("ember staging"),
            size: size_class(bytes),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Natively: one kept staging buffer, mapped with a blocking device wait (so this
    /// future is ready when first polled).
    #[cfg(not(target_arch = "wasm32"))]
    async fn map_and_copy(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<u8>> {
        let mut staging = self
            .inner
            .staging
            .lock()
            .map_err(|_| Error::Internal("staging lock poisoned".into()))?;
        if staging.as_ref().is_none_or(|s| s.size() < bytes) {
            *staging = Some(self.staging_buffer(bytes));
        }
        let st = staging
            .as_ref()
            .ok_or_else(|| Error::Internal("no staging buffer".into()))?;
        self.submit_copy(buffer, offset, st, bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        st.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for a readback: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Device("readback never completed".into()))?
            .map_err(|e| Error::Device(format!("mapping the staging buffer: {e}")))?;
        copy_mapped(st, bytes)
    }

    /// In the browser: a staging buffer per read (two reads may be in flight, and the
    /// mapping settles only when the page's event loop runs), awaited.
    #[cfg(target_arch = "wasm32")]
    async fn map_and_copy(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<u8>> {
        let st = self.staging_buffer(bytes);
        self.submit_copy(buffer, offset, &st, bytes);
        let (tx, rx) = super::wait::map_signal();
        st.map_async(wgpu::MapMode::Read, 0..bytes, move |r| tx.send(r));
        rx.await?;
        let out = copy_mapped(&st, bytes);
        st.destroy();
        out
    }
}

/// Copies the mapped `0..bytes` of `st` out and unmaps it.
fn copy_mapped(st: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
    let out = {
        let view = st
            .get_mapped_range(0..bytes)
            .map_err(|e| Error::Device(format!("reading the staging buffer: {e}")))?;
        view.to_vec()
    };
    st.unmap();
    Ok(out)
}

/// A typed, shaped region of a device buffer. Cloning shares the buffer.
///
/// Shapes are row-major: the last dimension is contiguous.
#[derive(Clone)]
pub struct Tensor {
    buf: Arc<DeviceBuffer>,
    /// Byte offset into `buf`.
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.dtype, self.shape)
    }
}

/// Number of elements of a shape, with overflow checked.
pub fn numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::InvalidArgument(format!("shape {shape:?} overflows")))
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(ctx: &Context, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = (numel(shape)? as u64)
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::InvalidArgument("tensor size overflows".into()))?;
        let buf = ctx.alloc(bytes, "tensor")?;
        // New wgpu buffers are zero-initialised.
        Ok(Tensor {
            buf,
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A pooled scratch tensor (contents undefined until written).
    pub fn scratch(ctx: &Context, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = (numel(shape)? as u64)
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::InvalidArgument("tensor size overflows".into()))?;
        Ok(Tensor {
            buf: ctx.alloc_pooled(bytes, "scratch tensor")?,
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Uploads `data` (its element size must match `dtype`).
    pub fn from_slice<T: Pod>(
        ctx: &Context,
        shape: &[usize],
        dtype: DType,
        data: &[T],
    ) -> Result<Tensor> {
        let n = numel(shape)?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() as u64 != n as u64 * dtype.size() {
            return Err(Error::shape(
                "upload",
                format!(
                    "{} bytes of data for a {dtype:?} tensor of shape {shape:?}",
                    bytes.len()
                ),
            ));
        }
        let t = Tensor::zeros(ctx, shape, dtype)?;
        t.write(ctx, data)?;
        Ok(t)
    }

    /// Uploads f32 values.
    pub fn from_f32(ctx: &Context, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Self::from_slice(ctx, shape, DType::F32, data)
    }

    /// Uploads values converted to f16.
    pub fn from_f32_as_f16(ctx: &Context, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        // Pad to a whole number of 32-bit words.
        let mut bytes: Vec<u8> = bytemuck::cast_slice(&h).to_vec();
        let n = numel(shape)?;
        if h.len() != n {
            return Err(Error::shape(
                "upload",
                format!("{} values for shape {shape:?}", h.len()),
            ));
        }
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        let buf = ctx.alloc(bytes.len() as u64, "tensor")?;
        ctx.queue().write_buffer(buf.raw(), 0, &bytes);
        Ok(Tensor {
            buf,
            offset: 0,
            shape: shape.to_vec(),
            dtype: DType::F16,
        })
    }

    /// A tensor over an existing buffer region.
    pub fn view(
        buf: Arc<DeviceBuffer>,
        offset: u64,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let bytes = numel(shape)? as u64 * dtype.size();
        if offset % 4 != 0 || offset + bytes > buf.size() {
            return Err(Error::Internal(format!(
                "view of {bytes} bytes at {offset} in a {}-byte buffer",
                buf.size()
            )));
        }
        Ok(Tensor {
            buf,
            offset,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Overwrites the contents (host to device, queued).
    pub fn write<T: Pod>(&self, ctx: &Context, data: &[T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() as u64 > self.bytes() || bytes.len() % 4 != 0 {
            return Err(Error::shape(
                "write",
                format!(
                    "{} bytes into {:?} {:?}",
                    bytes.len(),
                    self.dtype,
                    self.shape
                ),
            ));
        }
        ctx.queue().write_buffer(self.buf.raw(), self.offset, bytes);
        Ok(())
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size in bytes (rounded up to whole 32-bit words).
    pub fn bytes(&self) -> u64 {
        (self.numel() as u64 * self.dtype.size()).div_ceil(4) * 4
    }

    /// Byte offset in the underlying buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &Arc<DeviceBuffer> {
        &self.buf
    }

    /// The same data with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape)? != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} to {shape:?}", self.shape),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// The first `n` elements as a 1-D tensor (same buffer).
    pub fn first(&self, n: usize) -> Result<Tensor> {
        if n == 0 || n > self.numel() {
            return Err(Error::shape("first", format!("{n} of {:?}", self.shape)));
        }
        Ok(Tensor {
            shape: vec![n],
            ..self.clone()
        })
    }

    /// Binding resource for a bind group.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buf.raw(),
            offset: self.offset,
            size: wgpu::BufferSize::new(self.bytes()),
        })
    }

    /// Reads the raw bytes back (blocking; [`Tensor::read_bytes_async`] in the browser).
    pub fn read_bytes(&self, ctx: &Context) -> Result<Vec<u8>> {
        ctx.read_bytes(self.buf.raw(), self.offset, self.bytes())
    }

    /// Reads the raw bytes back, awaiting the device.
    pub async fn read_bytes_async(&self, ctx: &Context) -> Result<Vec<u8>> {
        ctx.read_bytes_async(self.buf.raw(), self.offset, self.bytes())
            .await
    }

    /// Reads back as f32 (f16 tensors are converted).
    pub fn read_f32(&self, ctx: &Context) -> Result<Vec<f32>> {
        self.bytes_to_f32(self.read_bytes(ctx)?)
    }

    /// [`Tensor::read_f32`], awaiting the device.
    pub async fn read_f32_async(&self, ctx: &Context) -> Result<Vec<f32>> {
        self.bytes_to_f32(self.read_bytes_async(ctx).await?)
    }

    fn bytes_to_f32(&self, b: Vec<u8>) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&b),
            DType::F16 => {
                let h: Vec<half::f16> = bytemuck::pod_collect_to_vec(&b);
                h[..self.numel()].iter().map(|x| x.to_f32()).collect()
            }
            DType::U32 | DType::I32 => {
                return Err(Error::InvalidArgument(format!(
                    "read_f32 on a {:?} tensor",
                    self.dtype
                )))
            }
        })
    }

    /// Reads back as u32.
    pub fn read_u32(&self, ctx: &Context) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(ctx)?))
    }

    /// [`Tensor::read_u32`], awaiting the device.
    pub async fn read_u32_async(&self, ctx: &Context) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(
            &self.read_bytes_async(ctx).await?,
        ))
    }
}
