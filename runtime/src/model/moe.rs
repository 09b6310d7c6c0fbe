//! A Mixture-of-Experts feed-forward block on the GPU: the router's logits, top-k routing
//! ([`crate::kernels::moe::route`]), the routed (token, expert) pairs through their own
//! experts only ([`crate::kernels::quant::qmatmul_experts`]: gate|up, then down with
//! SwiGLU fused into its input), and the weighted sum of each token's k outputs added to
//! the residual stream ([`crate::kernels::moe::combine`]). All on the device: the CPU never
//! sees which experts a token chose.

use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::elementwise::swiglu;
use crate::kernels::embed::DenseChunk;
use crate::kernels::moe::{
    check_top_k, combine, dense_experts, group, route, DenseExperts, Gating, RouteStats,
};
use crate::kernels::quant::{
    qmatmul_experts, qmatmul_experts_grouped, ExpertDesc, QChunk, QExperts, QShape,
};
use crate::kernels::Variant;
use crate::model::config::{ModelConfig, MoeConfig};
use crate::model::count_formats;
use crate::model::loader::{LayerWeight, WeightName, WeightSource};
use crate::model::weights::{HostMatrix, HostTensor, Linear, Mat, Rows};
use crate::quant::repack;

/// The stacked experts of one projection, quantized or f32/f16.
#[derive(Debug, Clone)]
pub enum ExpertMats {
    /// GGUF-quantized experts.
    Quant(QExperts),
    /// f32 or f16 experts.
    Dense(DenseExperts),
}

impl From<QExperts> for ExpertMats {
    fn from(q: QExperts) -> Self {
        ExpertMats::Quant(q)
    }
}

impl From<DenseExperts> for ExpertMats {
    fn from(d: DenseExperts) -> Self {
        ExpertMats::Dense(d)
    }
}

impl ExpertMats {
    /// Uploads `t` (`n_experts` experts stacked by rows), keeping its format.
    pub fn upload(ctx: &Context, t: &HostTensor, n_experts: usize) -> Result<ExpertMats> {
        if n_experts == 0 || t.rows % n_experts != 0 {
            return Err(Error::format(
                t.source.as_deref(),
                format!(
                    "{} has {} rows, not a whole number for {n_experts} experts",
                    t.name, t.rows
                ),
            ));
        }
        let rows = t.rows / n_experts;
        Ok(match &t.data {
            HostMatrix::Quant(ty, b) => {
                let r = repack(*ty, t.rows, t.cols, b)?;
                ExpertMats::Quant(QExperts::upload(ctx, &r, n_experts)?)
            }
            HostMatrix::F32(v) => ExpertMats::Dense(DenseExperts::upload(
                ctx,
                v,
                n_experts,
                rows,
                t.cols,
                DType::F32,
            )?),
            HostMatrix::F16(_) => ExpertMats::Dense(DenseExperts::upload(
                ctx,
                &t.to_f32()?,
                n_experts,
                rows,
                t.cols,
                DType::F16,
            )?),
        })
    }

    /// Experts.
    pub fn n_experts(&self) -> usize {
        match self {
            ExpertMats::Quant(q) => q.n_experts,
            ExpertMats::Dense(d) => d.n_experts,
        }
    }

    /// Rows (output features) per expert.
    pub fn rows(&self) -> usize {
        match self {
            ExpertMats::Quant(q) => q.rows,
            ExpertMats::Dense(d) => d.rows,
        }
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        match self {
            ExpertMats::Quant(q) => q.mat.cols,
            ExpertMats::Dense(d) => d.mat.cols,
        }
    }

    /// Device bytes.
    pub fn bytes(&self) -> u64 {
        match self {
            ExpertMats::Quant(q) => q.mat.bytes(),
            ExpertMats::Dense(d) => d.mat.bytes(),
        }
    }

    /// Format name (`f32`, `f16`, `Q4_K`, ...).
    pub fn format(&self) -> String {
        match self {
            ExpertMats::Quant(q) => q.mat.ty.name().into(),
            ExpertMats::Dense(d) if d.mat.dtype == DType::F16 => "f16".into(),
            ExpertMats::Dense(_) => "f32".into(),
        }
    }

    /// These experts and one more (`t`, `rows x cols` in the same format) stored as its own
    /// chunk: nothing already on the device is copied or rewritten.
    pub fn with_expert(&self, ctx: &Context, t: &HostTensor) -> Result<ExpertMats> {
        t.expect_shape(self.rows(), self.cols())?;
        let start = self.n_experts() * self.rows();
        let wrong = |have: String| {
            Error::InvalidArgument(format!(
                "new expert {} is {have}, the layer's experts are {}",
                t.name,
                self.format()
            ))
        };
        Ok(match (self, &t.data) {
            (ExpertMats::Quant(q), HostMatrix::Quant(ty, b)) if *ty == q.mat.ty => {
                let r = repack(*ty, t.rows, t.cols, b)?;
                let mut q = q.clone();
                q.mat.chunks.push(QChunk {
                    row_start: start,
                    rows: t.rows,
                    q: Tensor::from_slice(ctx, &[r.q.len()], DType::U32, &r.q)?,
                    s: Tensor::from_slice(ctx, &[r.s.len()], DType::U32, &r.s)?,
                });
                q.mat.rows += t.rows;
                q.n_experts += 1;
                ExpertMats::Quant(q)
            }
            (ExpertMats::Dense(d), HostMatrix::F32(_) | HostMatrix::F16(_)) => {
                let v = t.to_f32()?;
                let shape = [t.rows, t.cols];
                let tensor = if d.mat.dtype == DType::F16 {
                    Tensor::from_f32_as_f16(ctx, &shape, &v)?
                } else {
                    Tensor::from_f32(ctx, &shape, &v)?
                };
                let mut d = d.clone();
                d.mat.chunks.push(DenseChunk {
                    row_start: start,
                    rows: t.rows,
                    t: tensor,
                });
                d.mat.rows += t.rows;
                d.n_experts += 1;
                ExpertMats::Dense(d)
            }
            (_, HostMatrix::Quant(ty, _)) => return Err(wrong(ty.name().into())),
            (_, HostMatrix::F32(_)) => return Err(wrong("f32".into())),
            (_, HostMatrix::F16(_)) => return Err(wrong("f16".into())),
        })
    }

    /// Dispatches of the routed product `d` (see [`ExpertDesc`]): per pair, or, with
    /// `grouped` (the pairs grouped by expert, quantized experts only), as one matrix
    /// product per expert.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ctx: &Context,
        y: &Tensor,
        x: &Tensor,
        ids: &Tensor,
        grouped: Option<&Tensor>,
        d: &ExpertDesc,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        match (self, grouped) {
            (ExpertMats::Quant(q), Some(g)) => qmatmul_experts_grouped(ctx, y, x, g, q, d),
            (ExpertMats::Quant(q), None) => qmatmul_experts(ctx, y, x, ids, q, d, variant),
            (ExpertMats::Dense(w), _) => dense_experts(ctx, y, x, ids, w, d),
        }
    }
}

/// One layer's new expert for [`crate::model::Model::with_expert`]: its router row and its
/// SwiGLU weights, in the format of the layer's other experts.
#[derive(Debug, Clone)]
pub struct NewExpert {
    /// Router weights, `[hidden]`.
    pub router_row: Vec<f32>,
    /// Gate projection, `[ff][hidden]`.
    pub gate: HostTensor,
    /// Up projection, `[ff][hidden]`.
    pub up: HostTensor,
    /// Down projection, `[hidden][ff]`.
    pub down: HostTensor,
}

/// Qwen2-MoE's shared expert: a SwiGLU MLP every token goes through, its output scaled by
/// `sigmoid(gate . h)` when the model has that gate.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// Fused gate|up, `[2 ff][hidden]`.
    pub gate_up: Linear,
    /// Down projection, `[hidden][ff]`.
    pub down: Linear,
    /// The output gate, `[1][hidden]`.
    pub gate: Option<Linear>,
}

impl SharedExpert {
    /// Width of the MLP.
    pub fn ff(&self) -> usize {
        self.down.cols
    }
}

/// The weights of one MoE feed-forward block.
#[derive(Debug, Clone)]
pub struct MoeFfn {
    /// Router (gating) weights, `[n_experts][hidden]`.
    pub router: Linear,
    /// Every expert's gate and up projections: expert `e` is rows `e * 2 ff ..`, its gate
    /// rows first, then its up rows (`[n_experts][2 ff][hidden]`).
    pub gate_up: ExpertMats,
    /// Every expert's down projection, `[n_experts][hidden][ff]`.
    pub down: ExpertMats,
    /// Experts each token uses.
    pub top_k: usize,
    /// How router logits become weights.
    pub gating: Gating,
    /// The shared expert (Qwen2-MoE).
    pub shared: Option<SharedExpert>,
}

/// The shared expert's buffers for `rows` tokens.
struct SharedScratch {
    /// gate|up `[rows][2 ff]`.
    gate_up: Tensor,
    /// SwiGLU output `[rows][ff]` (dense down projections, which do not fuse it).
    act: Tensor,
    /// The expert's output before its gate `[rows][hidden]`.
    out: Tensor,
    /// Gate logit `[rows]`, its sigmoid `[rows]`, and the (single) expert id the gate's
    /// routing writes `[rows]` u32.
    gate_logit: Tensor,
    gate: Tensor,
    gate_id: Tensor,
}

/// Scratch buffers of [`MoeFfn::forward`] for up to `rows` tokens.
pub struct MoeScratch {
    rows: usize,
    /// Router logits `[rows][n_experts]`.
    logits: Tensor,
    /// Chosen experts `[rows][k]` u32.
    ids: Tensor,
    /// The pairs grouped by expert ([`crate::kernels::moe::group`]).
    group: Tensor,
    weights: Tensor,
    gu: Tensor,
    out: Tensor,
    /// The shared expert's buffers.
    shared: Option<SharedScratch>,
    /// Expert loads, `[layers][n_experts]` u32: how many tokens each layer sent to each
    /// expert since the last reset ([`MoeScratch::expert_counts`]).
    pub counts: Tensor,
    n_experts: usize,
}

impl MoeScratch {
    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        let mut n: u64 = [
            &self.logits,
            &self.ids,
            &self.group,
            &self.weights,
            &self.gu,
            &self.out,
            &self.counts,
        ]
        .iter()
        .map(|t| t.bytes())
        .sum();
        if let Some(b) = &self.shared {
            n += [
                &b.gate_up,
                &b.act,
                &b.out,
                &b.gate_logit,
                &b.gate,
                &b.gate_id,
            ]
            .iter()
            .map(|t| t.bytes())
            .sum::<u64>();
        }
        n
    }

    /// Buffers for `rows` tokens through `layers` layers shaped like `ffn`.
    pub fn new(ctx: &Context, ffn: &MoeFfn, rows: usize, layers: usize) -> Result<MoeScratch> {
        let shared_ff = ffn.shared.as_ref().map(|s| s.ff());
        Self::for_shape(
            ctx,
            rows,
            layers,
            ffn.n_experts(),
            ffn.top_k,
            ffn.down.cols(),
            ffn.router.cols,
            shared_ff,
        )
    }

    /// Buffers for `rows` tokens through `layers` layers of `n_experts` experts of width
    /// `ff` of which `k` are used, `hidden` wide, with a shared expert of width `shared_ff`.
    #[allow(clippy::too_many_arguments)]
    pub fn for_shape(
        ctx: &Context,
        rows: usize,
        layers: usize,
        n_experts: usize,
        k: usize,
        ff: usize,
        hidden: usize,
        shared_ff: Option<usize>,
    ) -> Result<MoeScratch> {
        let pairs = rows * k;
        let f = |n: usize| Tensor::zeros(ctx, &[n.max(1)], DType::F32);
        let shared = match shared_ff {
            None => None,
            Some(sff) => Some(SharedScratch {
                gate_up: f(rows * 2 * sff)?,
                act: f(rows * sff)?,
                out: f(rows * hidden)?,
                gate_logit: f(rows)?,
                gate: f(rows)?,
                gate_id: Tensor::zeros(ctx, &[rows], DType::U32)?,
            }),
        };
        Ok(MoeScratch {
            rows,
            logits: f(rows * n_experts)?,
            ids: Tensor::zeros(ctx, &[pairs], DType::U32)?,
            group: Tensor::zeros(ctx, &[2 * n_experts + pairs], DType::U32)?,
            weights: f(pairs)?,
            gu: f(pairs * 2 * ff)?,
            out: f(pairs * hidden)?,
            shared,
            counts: Tensor::zeros(ctx, &[(layers * n_experts).max(1)], DType::U32)?,
            n_experts,
        })
    }

    /// Tokens each layer sent to each expert since the last [`MoeScratch::reset_counts`],
    /// `[layer][expert]`.
    pub fn expert_counts(&self, ctx: &Context) -> Result<Vec<Vec<u64>>> {
        let v = self.counts.read_u32(ctx)?;
        Ok(v.chunks(self.n_experts.max(1))
            .map(|c| c.iter().map(|&n| n as u64).collect())
            .collect())
    }

    /// Zeroes the expert counters.
    pub fn reset_counts(&self, ctx: &Context) -> Result<()> {
        self.counts.write(ctx, &vec![0u32; self.counts.numel()])
    }
}

impl MoeFfn {
    /// Checks that the parts fit together (expert counts, sizes, top-k).
    pub fn new(
        router: Linear,
        gate_up: ExpertMats,
        down: ExpertMats,
        top_k: usize,
        gating: Gating,
        shared: Option<SharedExpert>,
    ) -> Result<MoeFfn> {
        let e = router.rows;
        check_top_k(e, top_k)?;
        let hidden = router.cols;
        let ff = down.cols();
        if gate_up.n_experts() != e || down.n_experts() != e {
            return Err(Error::InvalidArgument(format!(
                "the router has {e} experts but the expert tensors hold {} and {}",
                gate_up.n_experts(),
                down.n_experts()
            )));
        }
        if gate_up.rows() != 2 * ff || gate_up.cols() != hidden || down.rows() != hidden {
            return Err(Error::InvalidArgument(format!(
                "expert shapes: gate|up {}x{}, down {}x{} for hidden {hidden}",
                gate_up.rows(),
                gate_up.cols(),
                down.rows(),
                ff
            )));
        }
        if let Some(s) = &shared {
            let g_ok = s
                .gate
                .as_ref()
                .is_none_or(|g| g.rows == 1 && g.cols == hidden);
            if s.gate_up.rows != 2 * s.ff()
                || s.gate_up.cols != hidden
                || s.down.rows != hidden
                || !g_ok
            {
                return Err(Error::InvalidArgument(format!(
                    "shared expert shapes: gate|up {}x{}, down {}x{} for hidden {hidden}",
                    s.gate_up.rows, s.gate_up.cols, s.down.rows, s.down.cols
                )));
            }
        }
        Ok(MoeFfn {
            router,
            gate_up,
            down,
            top_k,
            gating,
            shared,
        })
    }

    /// Experts.
    pub fn n_experts(&self) -> usize {
        self.router.rows
    }

    /// This block with one more expert (`x`): its router row becomes the last router
    /// output, its weights the last expert.
    pub fn with_expert(&self, ctx: &Context, x: &NewExpert) -> Result<MoeFfn> {
        let hidden = self.router.cols;
        if x.router_row.len() != hidden || x.router_row.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "the new expert's router row has {} values (finite ones needed: {hidden})",
                x.router_row.len()
            )));
        }
        let gate_up = HostTensor::concat_rows(&[x.gate.clone(), x.up.clone()], "new gate|up")
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "the new expert's gate and up are in different formats or widths".into(),
                )
            })?;
        let mut router = self.router.clone();
        let row = HostTensor {
            name: "new router row".into(),
            source: None,
            rows: 1,
            cols: hidden,
            data: HostMatrix::F32(x.router_row.clone()),
        };
        router.parts.push((router.rows, Mat::upload(ctx, &row)?));
        router.rows += 1;
        MoeFfn::new(
            router,
            self.gate_up.with_expert(ctx, &gate_up)?,
            self.down.with_expert(ctx, &x.down)?,
            self.top_k,
            self.gating,
            self.shared.clone(),
        )
    }

    /// Width of each expert.
    pub fn ff(&self) -> usize {
        self.down.cols()
    }

    /// Device bytes of the block's weights.
    pub fn bytes(&self) -> u64 {
        let shared = self.shared.as_ref().map_or(0, |s| {
            s.gate_up.bytes() + s.down.bytes() + s.gate.as_ref().map_or(0, |g| g.bytes())
        });
        self.router.bytes() + self.gate_up.bytes() + self.down.bytes() + shared
    }

    /// Dispatches of `x[..m] += MoE(h[..m])` (`x` and `h` are `[m][hidden]`) as layer
    /// `layer` (whose expert loads it counts in `s`). Where `shape` would multiply `m`
    /// rows with the matrix kernel (prefill) and the variant is the tiled one, the tokens
    /// are grouped by expert so that quantized experts multiply all their tokens at once;
    /// otherwise (decode, or the subgroup variant) each (token, expert) pair is its own
    /// product, whose result does not depend on the rest of the batch.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ctx: &Context,
        x: &Tensor,
        h: &Tensor,
        s: &MoeScratch,
        layer: usize,
        m: usize,
        shape: QShape,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        if m == 0 || m > s.rows {
            return Err(Error::shape(
                "moe",
                format!("{m} tokens with scratch for {}", s.rows),
            ));
        }
        let (e, k, hidden) = (self.n_experts(), self.top_k, self.router.cols);
        let ff = self.ff();
        let pairs = m * k;
        let rows = |ldy: usize| Rows {
            m,
            ldx: hidden,
            ldy,
            y_off: 0,
            accumulate: false,
            glu: 0,
        };
        let mut ops = self
            .router
            .forward(ctx, &s.logits, h, rows(e), variant, QShape::Vector)?;
        ops.push(route(
            ctx,
            &s.logits,
            &s.ids,
            &s.weights,
            m,
            e,
            k,
            e,
            self.gating,
            Some(RouteStats {
                counts: &s.counts,
                offset: layer * e,
            }),
        )?);
        // Grouping feeds the workgroup-memory tiled kernel, which GPUs run well; with the
        // subgroup kernels (CPU Vulkan drivers) the per-pair vector products are 8-12x
        // faster for prefill than the tiled grouped product (measured on lavapipe).
        let grouped = variant.resolve(ctx) == Variant::Tiled
            && !shape.vector(m, false)
            && matches!(self.gate_up, ExpertMats::Quant(_));
        if grouped {
            ops.push(group(ctx, &s.ids, &s.group, m, e, k)?);
        }
        let grouped = grouped.then_some(&s.group);
        let gate_up = ExpertDesc {
            pairs,
            pairs_per_x: k,
            ldx: hidden,
            ldy: 2 * ff,
            y_offset: 0,
            accumulate: false,
            glu: 0,
        };
        ops.extend(
            self.gate_up
                .forward(ctx, &s.gu, h, &s.ids, grouped, &gate_up, variant)?,
        );
        let down = ExpertDesc {
            pairs,
            pairs_per_x: 1,
            ldx: 2 * ff,
            ldy: hidden,
            y_offset: 0,
            accumulate: false,
            glu: ff,
        };
        ops.extend(
            self.down
                .forward(ctx, &s.out, &s.gu, &s.ids, grouped, &down, variant)?,
        );
        ops.push(combine(
            ctx, x, &s.out, &s.weights, m, k, hidden, hidden, hidden, true,
        )?);
        if let Some(sh) = &self.shared {
            let b = s
                .shared
                .as_ref()
                .ok_or_else(|| Error::Internal("MoE scratch without a shared expert".into()))?;
            let sff = sh.ff();
            ops.extend(sh.gate_up.forward(
                ctx,
                &b.gate_up,
                h,
                rows(2 * sff),
                variant,
                QShape::Vector,
            )?);
            // Quantized down projections read silu(gate) * up from the gate|up rows.
            let (input, ldx, glu) = if sh.down.fuses_glu() {
                (&b.gate_up, 2 * sff, sff)
            } else {
                ops.push(swiglu(ctx, &b.act, &b.gate_up, None, m, sff)?);
                (&b.act, sff, 0)
            };
            // Ungated, the output goes straight into the residual.
            let r = Rows {
                m,
                ldx,
                ldy: hidden,
                y_off: 0,
                accumulate: sh.gate.is_none(),
                glu,
            };
            let target = if sh.gate.is_some() { &b.out } else { x };
            ops.extend(
                sh.down
                    .forward(ctx, target, input, r, variant, QShape::Vector)?,
            );
            if let Some(gate) = &sh.gate {
                ops.extend(gate.forward(
                    ctx,
                    &b.gate_logit,
                    h,
                    rows(1),
                    variant,
                    QShape::Vector,
                )?);
                ops.push(route(
                    ctx,
                    &b.gate_logit,
                    &b.gate_id,
                    &b.gate,
                    m,
                    1,
                    1,
                    1,
                    Gating::Sigmoid,
                    None,
                )?);
                ops.push(combine(
                    ctx, x, &b.out, &b.gate, m, 1, hidden, hidden, hidden, true,
                )?);
            }
        }
        Ok(ops)
    }
}

/// Stacks a layer's experts of one projection: the file's stacked tensor (GGUF
/// `ffn_*_exps`) or each expert's own tensor (HF checkpoints), checked to be `rows x cols`
/// per expert.
fn expert_stack(
    src: &dyn WeightSource,
    layer: usize,
    stacked: LayerWeight,
    single: fn(usize) -> LayerWeight,
    n_experts: usize,
    rows: usize,
    cols: usize,
) -> Result<HostTensor> {
    if let Some(t) = src.get(WeightName::Layer(layer, stacked))? {
        t.expect_shape(n_experts * rows, cols)?;
        return Ok(t);
    }
    let mut parts = Vec::with_capacity(n_experts);
    let stacked_name = src.tensor_name(WeightName::Layer(layer, stacked));
    if src.get(WeightName::Layer(layer, single(0)))?.is_none() {
        // Neither layout: name what a file of this kind should have.
        let want = if stacked_name.starts_with("blk.") {
            stacked_name.clone()
        } else {
            src.tensor_name(WeightName::Layer(layer, single(0)))
        };
        return Err(Error::format(
            Some(src.path()),
            format!("missing tensor {want} (layer {layer}'s experts)"),
        ));
    }
    for e in 0..n_experts {
        let t = src.need(WeightName::Layer(layer, single(e)))?;
        t.expect_shape(rows, cols)?;
        parts.push(t);
    }
    // A tensor for an expert the config does not have means the counts disagree.
    if src
        .get(WeightName::Layer(layer, single(n_experts)))?
        .is_some()
    {
        return Err(Error::format(
            Some(src.path()),
            format!(
                "layer {layer} has more than the {n_experts} experts the config declares ({})",
                src.tensor_name(WeightName::Layer(layer, single(n_experts)))
            ),
        ));
    }
    HostTensor::concat_rows(&parts, &stacked_name).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: layer {layer}'s experts are stored in different formats",
            src.path().display()
        ))
    })
}

/// `[E][2 ff][cols]` from `[E][ff][cols]` gate and up stacks: each expert's gate rows, then
/// its up rows (the layout [`MoeFfn::gate_up`] reads).
fn interleave_experts(gate: &HostTensor, up: &HostTensor, n_experts: usize) -> Result<HostTensor> {
    let rows = gate.rows / n_experts;
    let mismatch = || {
        Error::Unsupported(format!(
            "{} and {} are stored in different formats",
            gate.name, up.name
        ))
    };
    fn weave<T: Copy>(g: &[T], u: &[T], n_experts: usize) -> Vec<T> {
        let per = g.len() / n_experts;
        let mut out = Vec::with_capacity(2 * g.len());
        for e in 0..n_experts {
            out.extend_from_slice(&g[e * per..(e + 1) * per]);
            out.extend_from_slice(&u[e * per..(e + 1) * per]);
        }
        out
    }
    let data = match (&gate.data, &up.data) {
        (HostMatrix::F32(g), HostMatrix::F32(u)) => HostMatrix::F32(weave(g, u, n_experts)),
        (HostMatrix::F16(g), HostMatrix::F16(u)) => HostMatrix::F16(weave(g, u, n_experts)),
        (HostMatrix::Quant(tg, g), HostMatrix::Quant(tu, u)) if tg == tu => {
            let need = n_experts * rows * tg.row_bytes(gate.cols)?;
            if g.len() != need || u.len() != need {
                return Err(Error::format(
                    gate.source.as_deref(),
                    format!("{}: {} bytes of blocks for {need}", gate.name, g.len()),
                ));
            }
            HostMatrix::Quant(*tg, weave(g, u, n_experts))
        }
        _ => return Err(mismatch()),
    };
    Ok(HostTensor {
        name: format!("{} + {}", gate.name, up.name),
        source: gate.source.clone(),
        rows: 2 * gate.rows,
        cols: gate.cols,
        data,
    })
}

/// Loads layer `i`'s Mixture-of-Experts feed-forward; also returns the router's first row
/// (for the model's fingerprint).
pub(crate) fn load_layer(
    ctx: &Context,
    src: &dyn WeightSource,
    i: usize,
    c: &ModelConfig,
    mc: &MoeConfig,
    counts: &mut Vec<(String, usize)>,
) -> Result<(MoeFfn, Vec<f32>)> {
    let (e, ff, hidden) = (mc.n_experts, mc.expert_ff, c.hidden);
    let router = src.need(WeightName::Layer(i, LayerWeight::Router))?;
    router.expect_shape(e, hidden)?;
    let gate = expert_stack(
        src,
        i,
        LayerWeight::ExpertsGate,
        LayerWeight::ExpertGate,
        e,
        ff,
        hidden,
    )?;
    let up = expert_stack(
        src,
        i,
        LayerWeight::ExpertsUp,
        LayerWeight::ExpertUp,
        e,
        ff,
        hidden,
    )?;
    let down = expert_stack(
        src,
        i,
        LayerWeight::ExpertsDown,
        LayerWeight::ExpertDown,
        e,
        hidden,
        ff,
    )?;
    count_formats(&[&router, &gate, &up, &down], counts);
    let gate_up = interleave_experts(&gate, &up, e)?;
    drop((gate, up));
    let shared = if mc.shared_ff > 0 {
        let w = |lw| src.need(WeightName::Layer(i, lw));
        let (sg, su, sd) = (
            w(LayerWeight::SharedGate)?,
            w(LayerWeight::SharedUp)?,
            w(LayerWeight::SharedDown)?,
        );
        sg.expect_shape(mc.shared_ff, hidden)?;
        su.expect_shape(mc.shared_ff, hidden)?;
        sd.expect_shape(hidden, mc.shared_ff)?;
        count_formats(&[&sg, &su, &sd], counts);
        let gate = match src.get(WeightName::Layer(i, LayerWeight::SharedRouter))? {
            Some(t) => {
                t.expect_shape(1, hidden)?;
                count_formats(&[&t], counts);
                Some(Linear::from_parts(ctx, vec![t], "shared_expert_gate")?)
            }
            None => None,
        };
        Some(SharedExpert {
            gate_up: Linear::from_parts(ctx, vec![sg, su], "shared_gate_up")?,
            down: Linear::from_parts(ctx, vec![sd], "shared_down")?,
            gate,
        })
    } else {
        None
    };
    let row0 = router.row_f32(0)?;
    let ffn = MoeFfn::new(
        Linear::from_parts(ctx, vec![router], "router")?,
        ExpertMats::upload(ctx, &gate_up, e)?,
        ExpertMats::upload(ctx, &down, e)?,
        mc.top_k,
        mc.gating,
        shared,
    )
    .map_err(|err| Error::format(Some(src.path()), format!("layer {i}: {err}")))?;
    Ok((ffn, row0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::moe::route_ref;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::model::weights::{HostMatrix, HostTensor};
    use crate::quant::{dequantize, random_blocks, repack, QuantType};
    use crate::util::Rng;

    fn experts(
        ctx: &Context,
        ty: QuantType,
        e: usize,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (ExpertMats, Vec<f32>) {
        let raw = random_blocks(ty, &mut Rng::new(seed), e * rows * cols / ty.block_elems());
        let r = repack(ty, e * rows, cols, &raw).unwrap();
        (
            QExperts::upload(ctx, &r, e).unwrap().into(),
            dequantize(ty, &raw).unwrap(),
        )
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// A token's MoE output by the textbook formula, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        h: &[f32],
        router: &[f32],
        gu: &[f32],
        down: &[f32],
        e: usize,
        k: usize,
        ff: usize,
        gating: Gating,
    ) -> Vec<f64> {
        let hidden = h.len();
        let logits: Vec<f32> = (0..e)
            .map(|i| dot(&router[i * hidden..][..hidden], h) as f32)
            .collect();
        let (ids, w) = route_ref(&logits, k, gating);
        let mut out = vec![0.0f64; hidden];
        for (&ex, &wt) in ids.iter().zip(&w) {
            let base = ex as usize * 2 * ff;
            let act: Vec<f32> = (0..ff)
                .map(|j| {
                    let g = dot(&gu[(base + j) * hidden..][..hidden], h);
                    let u = dot(&gu[(base + ff + j) * hidden..][..hidden], h);
                    (g / (1.0 + (-g).exp()) * u) as f32
                })
                .collect();
            for (c, o) in out.iter_mut().enumerate() {
                *o += wt as f64 * dot(&down[(ex as usize * hidden + c) * ff..][..ff], &act);
            }
        }
        out
    }

    #[test]
    fn moe_block_matches_the_textbook_formula() {
        let ctx = ctx();
        let (hidden, ff, e, k, m) = (64, 32, 4, 2, 70);
        let mut rng = Rng::new(21);
        let router_w = rng.vec(e * hidden, -0.5, 0.5);
        let router = Linear::from_parts(
            ctx,
            vec![HostTensor {
                name: "router".into(),
                source: None,
                rows: e,
                cols: hidden,
                data: HostMatrix::F32(router_w.clone()),
            }],
            "router",
        )
        .unwrap();
        let (gu, guf) = experts(ctx, QuantType::Q8_0, e, 2 * ff, hidden, 1);
        let (dn, dnf) = experts(ctx, QuantType::Q4_1, e, hidden, ff, 2);
        // The same values as f32 experts, and rounded to f16 as f16 experts.
        let dense = |v: &[f32], rows: usize, cols: usize, dt: DType| -> ExpertMats {
            DenseExperts::upload(ctx, v, e, rows, cols, dt)
                .unwrap()
                .into()
        };
        let to_f16 = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        };
        let (guh, dnh) = (to_f16(&guf), to_f16(&dnf));
        let cases = [
            ("quantized", gu.clone(), dn.clone(), &guf, &dnf),
            (
                "f32",
                dense(&guf, 2 * ff, hidden, DType::F32),
                dense(&dnf, hidden, ff, DType::F32),
                &guf,
                &dnf,
            ),
            (
                "f16",
                dense(&guf, 2 * ff, hidden, DType::F16),
                dense(&dnf, hidden, ff, DType::F16),
                &guh,
                &dnh,
            ),
        ];
        for ((what, gu, dn, guf, dnf), gating) in cases
            .iter()
            .flat_map(|c| [Gating::SoftmaxRenorm, Gating::Softmax].map(|g| (c, g)))
        {
            let ffn = MoeFfn::new(router.clone(), gu.clone(), dn.clone(), k, gating, None).unwrap();
            let s = MoeScratch::new(ctx, &ffn, 80, 1).unwrap();
            let hv = rng.vec(m * hidden, -1.0, 1.0);
            let xv = rng.vec(m * hidden, -1.0, 1.0);
            let h = Tensor::from_f32(ctx, &[m, hidden], &hv).unwrap();
            let x = Tensor::from_f32(ctx, &[m, hidden], &xv).unwrap();
            let runs = Variant::all(ctx)
                .into_iter()
                .flat_map(|v| [(v, QShape::Vector), (v, QShape::Matrix)]);
            for (variant, shape) in runs {
                x.write(ctx, &xv).unwrap();
                ctx.run(&ffn.forward(ctx, &x, &h, &s, 0, m, shape, variant).unwrap())
                    .unwrap();
                let mut want = Vec::new();
                for t in 0..m {
                    let r = reference(
                        &hv[t * hidden..][..hidden],
                        &router_w,
                        guf,
                        dnf,
                        e,
                        k,
                        ff,
                        gating,
                    );
                    want.extend((0..hidden).map(|c| (xv[t * hidden + c] as f64 + r[c]) as f32));
                }
                assert_close(
                    &format!("MoE {what} {gating:?} {variant:?} {shape:?}"),
                    &x.read_f32(ctx).unwrap(),
                    &want,
                    2e-4,
                    1e-4,
                );
            }
        }
        // Mismatched parts are refused.
        let (gu3, _) = experts(ctx, QuantType::Q8_0, 3, 2 * ff, hidden, 1);
        let err = MoeFfn::new(router.clone(), gu3, dn.clone(), k, Gating::Softmax, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("router has 4 experts"), "{err}");
        let err = MoeFfn::new(router, gu, dn, 5, Gating::Softmax, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("top-k of 5"), "{err}");
    }
}
