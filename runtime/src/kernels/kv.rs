//! Writes new keys and values into a layer's cache (`shaders/kv.wgsl`).

use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/kv.wgsl`.
    pub struct KvParams {
        tokens: u32,
        kv_dim: u32,
        src_ld: u32,
        k_off: u32,
        v_off: u32,
        n_slots: u32,
        _pad0: u32,
        _pad1: u32,
    }
}

/// Copies `src[t][k_off ..][..kv_dim]` to `k[slots[t]]` and `src[t][v_off ..]` to
/// `v[slots[t]]` for `tokens` tokens. Slots past the cache are skipped (callers check them).
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    ctx: &Context,
    k: &Tensor,
    v: &Tensor,
    src: &Tensor,
    slots: &Tensor,
    tokens: usize,
    kv_dim: usize,
    src_ld: usize,
    k_off: usize,
    v_off: usize,
) -> Result<Dispatch> {
    let n_slots = k.numel().min(v.numel()) / kv_dim.max(1);
    if tokens == 0
        || tokens > 65535
        || kv_dim == 0
        || src_ld < k_off.max(v_off) + kv_dim
        || src.numel() < (tokens - 1) * src_ld + k_off.max(v_off) + kv_dim
        || slots.dtype() != DType::U32
        || slots.numel() < tokens
        || n_slots == 0
    {
        return Err(Error::shape(
            "kv_store",
            format!(
                "{tokens} tokens of {kv_dim} from {:?} (ld {src_ld}, k at {k_off}, v at {v_off}) into {:?}",
                src.shape(),
                k.shape()
            ),
        ));
    }
    let u = ctx.uniform(&KvParams {
        tokens: tokens as u32,
        kv_dim: kv_dim as u32,
        src_ld: src_ld as u32,
        k_off: k_off as u32,
        v_off: v_off as u32,
        n_slots: n_slots as u32,
        ..Default::default()
    });
    ctx.dispatch(
        "kv_store",
        &PipelineKey::new("kv", "kv_store"),
        &[
            Bind::U(&u),
            Bind::T(src),
            Bind::T(slots),
            Bind::T(k),
            Bind::T(v),
        ],
        [kv_dim.div_ceil(64) as u32, tokens as u32, 1],
    )
}

uniform! {
    /// Second uniform of `shaders/kv.wgsl` (`rope_store`).
    pub struct RopeStoreParams {
        tokens: u32,
        n_heads: u32,
        n_kv: u32,
        head_dim: u32,
        n_rot: u32,
        src_ld: u32,
        n_slots: u32,
        max_pos: u32,
    }
}

/// Heads of a fused q|k|v row: `n_heads` query heads, then `n_kv` key heads, then `n_kv`
/// value heads, `head_dim` each; rows `src_ld` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvLayout {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Row stride.
    pub src_ld: usize,
}

/// RoPE on the query heads of `qkv` (in place) and on its key heads (written to
/// `k[slots[t]]`), values copied to `v[slots[t]]`: [`crate::kernels::rope::rope`] and
/// [`kv_store`] in one dispatch. Positions `pos`, table `table`.
#[allow(clippy::too_many_arguments)]
pub fn rope_store(
    ctx: &Context,
    k: &Tensor,
    v: &Tensor,
    qkv: &Tensor,
    pos: &Tensor,
    slots: &Tensor,
    table: &crate::kernels::rope::RopeTable,
    tokens: usize,
    l: QkvLayout,
) -> Result<Dispatch> {
    let kv_dim = l.n_kv * l.head_dim;
    let n_rot = table.config.n_rot;
    let n_slots = k.numel().min(v.numel()) / kv_dim.max(1);
    let row = (l.n_heads + 2 * l.n_kv) * l.head_dim;
    if tokens == 0
        || tokens > 65535
        || kv_dim == 0
        || n_rot > l.head_dim
        || l.src_ld < row
        || qkv.numel() < (tokens - 1) * l.src_ld + row
        || pos.numel() < tokens
        || slots.numel() < tokens
        || pos.dtype() != DType::U32
        || slots.dtype() != DType::U32
        || n_slots == 0
    {
        return Err(Error::shape(
            "rope_store",
            format!(
                "{tokens} tokens of {l:?} (n_rot {n_rot}) from {:?} into {:?}",
                qkv.shape(),
                k.shape()
            ),
        ));
    }
    let u = ctx.uniform(&RopeStoreParams {
        tokens: tokens as u32,
        n_heads: l.n_heads as u32,
        n_kv: l.n_kv as u32,
        head_dim: l.head_dim as u32,
        n_rot: n_rot as u32,
        src_ld: l.src_ld as u32,
        n_slots: n_slots as u32,
        max_pos: table.max_pos as u32,
    });
    let items = (l.n_heads + l.n_kv) * n_rot / 2 + l.n_kv * (l.head_dim - n_rot) + kv_dim;
    let key =
        PipelineKey::new("kv", "rope_store").constant("NEOX", table.config.neox as u32 as f64);
    ctx.dispatch(
        "rope_store",
        &key,
        &[
            Bind::Skip,
            Bind::Skip,
            Bind::T(slots),
            Bind::T(k),
            Bind::T(v),
            Bind::U(&u),
            Bind::T(qkv),
            Bind::T(pos),
            Bind::T(&table.table),
        ],
        [items.div_ceil(64) as u32, tokens as u32, 1],
    )
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    vec![
        PipelineKey::new("kv", "kv_store"),
        PipelineKey::new("kv", "rope_store").constant("NEOX", 0.0),
        PipelineKey::new("kv", "rope_store").constant("NEOX", 1.0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::ctx;
    use crate::util::Rng;

    #[test]
    fn stores_rows_at_slots() {
        let ctx = ctx();
        let (tokens, kv_dim, ld, slots_n) = (3, 10, 40, 8);
        let src = Rng::new(1).vec(tokens * ld, -1.0, 1.0);
        let slots: Vec<u32> = vec![5, 0, 7];
        let s = Tensor::from_f32(ctx, &[tokens, ld], &src).unwrap();
        let st = Tensor::from_slice(ctx, &[tokens], DType::U32, &slots).unwrap();
        let k = Tensor::zeros(ctx, &[slots_n, kv_dim], DType::F32).unwrap();
        let v = Tensor::zeros(ctx, &[slots_n, kv_dim], DType::F32).unwrap();
        ctx.run(&[kv_store(ctx, &k, &v, &s, &st, tokens, kv_dim, ld, 12, 25).unwrap()])
            .unwrap();
        let (kg, vg) = (k.read_f32(ctx).unwrap(), v.read_f32(ctx).unwrap());
        for (t, &sl) in slots.iter().enumerate() {
            let sl = sl as usize;
            assert_eq!(&kg[sl * kv_dim..][..kv_dim], &src[t * ld + 12..][..kv_dim]);
            assert_eq!(&vg[sl * kv_dim..][..kv_dim], &src[t * ld + 25..][..kv_dim]);
        }
        assert!(kg[kv_dim..2 * kv_dim].iter().all(|&x| x == 0.0) || slots.contains(&1));
        assert!(kv_store(ctx, &k, &v, &s, &st, tokens, kv_dim, ld, 35, 0).is_err());
    }

    #[test]
    fn rope_store_equals_rope_then_kv_store() {
        use crate::kernels::rope::{rope, HeadLayout, RopeConfig, RopeTable};
        let ctx = ctx();
        for (neox, n_rot) in [(false, 16), (true, 16), (true, 8), (false, 12)] {
            let (nh, nkv, hd, tokens, slots_n) = (6, 2, 16, 5, 9);
            let ld = (nh + 2 * nkv) * hd + 4;
            let src = Rng::new(3).vec(tokens * ld, -1.0, 1.0);
            let pos: Vec<u32> = vec![0, 3, 7, 100, 8];
            let slots: Vec<u32> = vec![2, 0, 8, 5, 1];
            let table = RopeTable::new(ctx, RopeConfig::new(n_rot, 10000.0, neox), 128).unwrap();
            let pt = Tensor::from_slice(ctx, &[tokens], DType::U32, &pos).unwrap();
            let st = Tensor::from_slice(ctx, &[tokens], DType::U32, &slots).unwrap();
            // Reference: rope over q and k heads, then kv_store.
            let a = Tensor::from_f32(ctx, &[tokens, ld], &src).unwrap();
            let (k1, v1) = (
                Tensor::zeros(ctx, &[slots_n, nkv * hd], DType::F32).unwrap(),
                Tensor::zeros(ctx, &[slots_n, nkv * hd], DType::F32).unwrap(),
            );
            let heads = HeadLayout {
                tokens,
                heads: nh + nkv,
                head_dim: hd,
                ld,
                offset: 0,
            };
            ctx.run(&[
                rope(ctx, &a, &pt, &table, heads, false).unwrap(),
                kv_store(
                    ctx,
                    &k1,
                    &v1,
                    &a,
                    &st,
                    tokens,
                    nkv * hd,
                    ld,
                    nh * hd,
                    (nh + nkv) * hd,
                )
                .unwrap(),
            ])
            .unwrap();
            // Fused.
            let b = Tensor::from_f32(ctx, &[tokens, ld], &src).unwrap();
            let (k2, v2) = (
                Tensor::zeros(ctx, &[slots_n, nkv * hd], DType::F32).unwrap(),
                Tensor::zeros(ctx, &[slots_n, nkv * hd], DType::F32).unwrap(),
            );
            let l = QkvLayout {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
                src_ld: ld,
            };
            ctx.run(&[rope_store(ctx, &k2, &v2, &b, &pt, &st, &table, tokens, l).unwrap()])
                .unwrap();
            let (qa, qb) = (a.read_f32(ctx).unwrap(), b.read_f32(ctx).unwrap());
            for t in 0..tokens {
                assert_eq!(
                    &qa[t * ld..t * ld + nh * hd],
                    &qb[t * ld..t * ld + nh * hd],
                    "queries"
                );
            }
            assert_eq!(k1.read_f32(ctx).unwrap(), k2.read_f32(ctx).unwrap(), "keys");
            assert_eq!(
                v1.read_f32(ctx).unwrap(),
                v2.read_f32(ctx).unwrap(),
                "values"
            );
        }
    }
}
