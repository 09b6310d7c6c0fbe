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

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    vec![PipelineKey::new("kv", "kv_store")]
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
}
