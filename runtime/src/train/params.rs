//! Trainable parameters in one flat f32 buffer, with their gradients and AdamW moments in
//! three buffers of the same layout: one optimizer dispatch updates everything, one norm
//! covers every gradient, and each parameter is a view aligned for binding.

use std::collections::HashMap;

use crate::adapters::Target;
use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Tensor};

/// Which tensor a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamKey {
    /// LoRA A `[rank][in]` of a layer's target.
    LoraA(usize, Target),
    /// LoRA B `[out][rank]` (model row order).
    LoraB(usize, Target),
    /// Router `[experts][in]` of a mixture of LoRA experts.
    Router(usize, Target),
    /// Soft prompt `[virtual tokens][hidden]`.
    Prompt,
    /// Prefix keys|values of a layer `[virtual tokens][2 kv_dim]` (model column order).
    Prefix(usize),
}

/// Elements between slot starts are a multiple of this (256 bytes: the binding alignment).
const ALIGN: usize = 64;

/// The flat buffers and where each parameter lives in them.
pub struct ParamStore {
    /// Parameters.
    pub param: Tensor,
    /// Gradients (accumulated over the micro-batches of a step).
    pub grad: Tensor,
    /// AdamW first moments.
    pub m: Tensor,
    /// AdamW second moments.
    pub v: Tensor,
    /// Elements in each buffer (padding included).
    pub n: usize,
    slots: HashMap<ParamKey, (usize, usize)>,
    order: Vec<ParamKey>,
}

impl ParamStore {
    /// Uploads `values` (in order) as the initial parameters; moments and gradients start
    /// at zero.
    pub fn new(ctx: &Context, values: Vec<(ParamKey, Vec<f32>)>) -> Result<ParamStore> {
        if values.is_empty() {
            return Err(Error::InvalidArgument("nothing to train".into()));
        }
        let mut flat = Vec::new();
        let mut slots = HashMap::new();
        let mut order = Vec::new();
        for (k, v) in values {
            if v.is_empty() || slots.contains_key(&k) {
                return Err(Error::Internal(format!(
                    "parameter {k:?} empty or repeated"
                )));
            }
            slots.insert(k, (flat.len(), v.len()));
            order.push(k);
            flat.extend_from_slice(&v);
            flat.resize(flat.len().next_multiple_of(ALIGN), 0.0);
        }
        let n = flat.len();
        Ok(ParamStore {
            param: Tensor::from_f32(ctx, &[n], &flat)?,
            grad: Tensor::zeros(ctx, &[n], DType::F32)?,
            m: Tensor::zeros(ctx, &[n], DType::F32)?,
            v: Tensor::zeros(ctx, &[n], DType::F32)?,
            n,
            slots,
            order,
        })
    }

    /// Whether `k` is trained.
    pub fn has(&self, k: ParamKey) -> bool {
        self.slots.contains_key(&k)
    }

    /// Parameter keys in layout order.
    pub fn keys(&self) -> &[ParamKey] {
        &self.order
    }

    /// Trainable values (padding excluded).
    pub fn n_params(&self) -> usize {
        self.slots.values().map(|s| s.1).sum()
    }

    fn view(&self, t: &Tensor, k: ParamKey) -> Result<Tensor> {
        let (off, len) = *self
            .slots
            .get(&k)
            .ok_or_else(|| Error::Internal(format!("no trainable {k:?}")))?;
        Tensor::view(
            t.buffer().clone(),
            t.offset() + 4 * off as u64,
            &[len],
            DType::F32,
        )
    }

    /// The parameter `k` as a tensor view.
    pub fn value(&self, k: ParamKey) -> Result<Tensor> {
        self.view(&self.param, k)
    }

    /// The gradient of `k` as a tensor view.
    pub fn gradient(&self, k: ParamKey) -> Result<Tensor> {
        self.view(&self.grad, k)
    }

    /// Reads every parameter back.
    pub fn read(&self, ctx: &Context) -> Result<HashMap<ParamKey, Vec<f32>>> {
        self.read_from(ctx, &self.param)
    }

    /// Reads every gradient back.
    pub fn read_gradients(&self, ctx: &Context) -> Result<HashMap<ParamKey, Vec<f32>>> {
        self.read_from(ctx, &self.grad)
    }

    /// [`ParamStore::read`], awaiting the device.
    pub async fn read_async(&self, ctx: &Context) -> Result<HashMap<ParamKey, Vec<f32>>> {
        let all = self.param.read_f32_async(ctx).await?;
        Ok(self.split(all))
    }

    /// Reads every parameter's slot out of `t` (a buffer of the parameters' layout).
    pub fn read_from(&self, ctx: &Context, t: &Tensor) -> Result<HashMap<ParamKey, Vec<f32>>> {
        Ok(self.split(t.read_f32(ctx)?))
    }

    /// Cuts a flat buffer of the parameters' layout into the parameters.
    fn split(&self, all: Vec<f32>) -> HashMap<ParamKey, Vec<f32>> {
        self.slots
            .iter()
            .map(|(k, &(off, len))| (*k, all[off..off + len].to_vec()))
            .collect()
    }

    /// Overwrites every parameter (same keys and sizes) and resets the moments.
    pub fn write(&self, ctx: &Context, values: &HashMap<ParamKey, Vec<f32>>) -> Result<()> {
        let mut flat = vec![0.0f32; self.n];
        for (k, &(off, len)) in &self.slots {
            let v = values.get(k).filter(|v| v.len() == len).ok_or_else(|| {
                Error::InvalidArgument(format!("parameter {k:?} missing or resized"))
            })?;
            flat[off..off + len].copy_from_slice(v);
        }
        self.param.write(ctx, &flat)?;
        let zeros = vec![0.0f32; self.n];
        self.m.write(ctx, &zeros)?;
        self.v.write(ctx, &zeros)
    }

    /// Device bytes of the four buffers.
    pub fn bytes(&self) -> u64 {
        4 * self.param.bytes()
    }
}
