//! `ember bench-kernels`: kernel throughput on this device, as JSON.

use std::time::Instant;

use clap::Args;
use ember::gpu::{DType, Dispatch};
use ember::kernels::attention::{attention_prefill, AttnLayout};
use ember::kernels::matmul::{matmul, MatmulDesc};
use ember::kernels::quant::{qmatmul, QMatmulDesc, QMatrix, QShape};
use ember::kernels::Variant;
use ember::quant::{random_blocks, repack, QuantType};
use ember::util::Rng;
use ember::{Context, Result, Tensor};
use serde_json::json;

#[derive(Args)]
pub struct BenchArgs {
    /// Print JSON only.
    #[arg(long)]
    json: bool,
    /// Smaller shapes and fewer repetitions (a quick smoke run).
    #[arg(long)]
    quick: bool,
    /// Kernel variant: auto, subgroup or tiled (default: every variant the device runs).
    #[arg(long)]
    variant: Option<String>,
}

/// Median seconds per run of `ops`, `reps` runs encoded per submission, `rounds` submissions.
fn time_ops(ctx: &Context, ops: &[Dispatch], reps: usize, rounds: usize) -> Result<f64> {
    ctx.run(ops)?; // warm-up: pipelines, first-touch
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        for _ in 0..reps {
            ctx.encode(&mut enc, ops);
        }
        let t = Instant::now();
        ctx.queue().submit([enc.finish()]);
        ctx.sync()?;
        times.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn variants(ctx: &Context, arg: &Option<String>) -> Result<Vec<Variant>> {
    Ok(match arg.as_deref() {
        None => Variant::all(ctx),
        Some("auto") => vec![Variant::Auto.resolve(ctx)],
        Some("subgroup") => vec![Variant::Subgroup],
        Some("tiled") => vec![Variant::Tiled],
        Some(v) => {
            return Err(ember::Error::InvalidArgument(format!(
                "unknown variant {v:?}: auto, subgroup or tiled"
            )))
        }
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    let ctx = Context::new()?;
    let mut rng = Rng::new(1);
    let mut results = Vec::new();
    let (reps, rounds) = if a.quick { (1, 3) } else { (3, 5) };
    let mm_shapes: &[(usize, usize, usize)] = if a.quick {
        &[(256, 256, 256), (512, 576, 576)]
    } else {
        &[(1024, 1024, 1024), (4096, 576, 576), (256, 1536, 576)]
    };
    let vs = variants(&ctx, &a.variant)?;
    for &variant in &vs {
        for &(m, n, k) in mm_shapes {
            for dtype in [DType::F32, DType::F16] {
                let x = Tensor::from_f32(&ctx, &[m, k], &rng.vec(m * k, -1.0, 1.0))?;
                let wv = rng.vec(n * k, -1.0, 1.0);
                let w = if dtype == DType::F32 {
                    Tensor::from_f32(&ctx, &[n, k], &wv)?
                } else {
                    Tensor::from_f32_as_f16(&ctx, &[n, k], &wv)?
                };
                let y = Tensor::zeros(&ctx, &[m, n], DType::F32)?;
                let op = matmul(&ctx, &y, &x, &w, &MatmulDesc::new(m, n, k), variant)?;
                let s = time_ops(&ctx, std::slice::from_ref(&op), reps, rounds)?;
                let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
                let r = json!({"kernel": "matmul", "weights": if dtype == DType::F32 {"f32"} else {"f16"},
                    "variant": format!("{variant:?}").to_lowercase(), "m": m, "n": n, "k": k,
                    "ms": s * 1e3, "gflops": gflops});
                if !a.json {
                    eprintln!("{r}");
                }
                results.push(r);
            }
        }
    }
    // Training layouts: input gradients read B as [K][N] (b_kn); weight gradients also read
    // A as [K][M] (a_km).
    let train_shapes: &[(usize, usize, usize, bool, bool)] = if a.quick {
        &[(256, 576, 512, false, true)]
    } else {
        &[
            (256, 576, 3072, false, true),
            (256, 576, 3072, false, false),
            (256, 1536, 576, false, true),
            (576, 8, 256, true, true),
            (8, 576, 256, true, true),
        ]
    };
    for &variant in &vs {
        for &(m, n, k, a_km, b_kn) in train_shapes {
            let x = Tensor::from_f32(&ctx, &[m * k], &rng.vec(m * k, -1.0, 1.0))?;
            let w = Tensor::from_f32(&ctx, &[n * k], &rng.vec(n * k, -1.0, 1.0))?;
            let y = Tensor::zeros(&ctx, &[m, n], DType::F32)?;
            let d = MatmulDesc::new(m, n, k).layout(a_km, b_kn);
            let op = matmul(&ctx, &y, &x, &w, &d, variant)?;
            let s = time_ops(&ctx, std::slice::from_ref(&op), reps, rounds)?;
            let r = json!({"kernel": "matmul", "weights": "f32", "a_km": a_km, "b_kn": b_kn,
                "variant": format!("{variant:?}").to_lowercase(), "m": m, "n": n, "k": k,
                "ms": s * 1e3, "gflops": 2.0 * (m * n * k) as f64 / s / 1e9});
            if !a.json {
                eprintln!("{r}");
            }
            results.push(r);
        }
    }
    let mv_shapes: &[(usize, usize)] = if a.quick {
        &[(1536, 576)]
    } else {
        &[(1536, 576), (49152, 576)]
    };
    for &variant in &vs {
        for ty in [
            QuantType::Q4_1,
            QuantType::Q8_0,
            QuantType::Q4_K,
            QuantType::Q4_0,
            QuantType::Q6_K,
        ] {
            for &(n, k) in mv_shapes {
                let k = k.div_ceil(ty.block_elems()) * ty.block_elems();
                let raw = random_blocks(ty, &mut rng, n * k / ty.block_elems());
                let w = QMatrix::upload(&ctx, &repack(ty, n, k, &raw)?)?;
                let x = Tensor::from_f32(&ctx, &[1, k], &rng.vec(k, -1.0, 1.0))?;
                let y = Tensor::zeros(&ctx, &[1, n], DType::F32)?;
                let ops = qmatmul(
                    &ctx,
                    &y,
                    &x,
                    &w,
                    &QMatmulDesc::new(1, &w),
                    variant,
                    QShape::Vector,
                )?;
                let s = time_ops(&ctx, &ops, reps * 4, rounds)?;
                let bytes = raw.len() as f64;
                let r = json!({"kernel": "qmatvec", "type": ty.name(), "variant": format!("{variant:?}").to_lowercase(),
                    "n": n, "k": k, "ms": s * 1e3, "gb_s": bytes / s / 1e9, "gflops": 2.0 * (n * k) as f64 / s / 1e9});
                if !a.json {
                    eprintln!("{r}");
                }
                results.push(r);
            }
            // Prefill-shaped product with the same weights.
            let (n, k) = mv_shapes[0];
            let k = k.div_ceil(ty.block_elems()) * ty.block_elems();
            let m = if a.quick { 64 } else { 256 };
            let raw = random_blocks(ty, &mut rng, n * k / ty.block_elems());
            let w = QMatrix::upload(&ctx, &repack(ty, n, k, &raw)?)?;
            let x = Tensor::from_f32(&ctx, &[m, k], &rng.vec(m * k, -1.0, 1.0))?;
            let y = Tensor::zeros(&ctx, &[m, n], DType::F32)?;
            let ops = qmatmul(
                &ctx,
                &y,
                &x,
                &w,
                &QMatmulDesc::new(m, &w),
                variant,
                QShape::Matrix,
            )?;
            let s = time_ops(&ctx, &ops, reps, rounds)?;
            let r = json!({"kernel": "qmatmul", "type": ty.name(), "variant": format!("{variant:?}").to_lowercase(),
                "m": m, "n": n, "k": k, "ms": s * 1e3, "gflops": 2.0 * (m * n * k) as f64 / s / 1e9});
            if !a.json {
                eprintln!("{r}");
            }
            results.push(r);
        }
    }
    // Attention of a SmolLM2-shaped layer (9 query heads over 3 kv heads of 64): a causal
    // prefill of T tokens (matmul path) and one decode token over T keys.
    for &variant in &vs {
        let t = if a.quick { 64 } else { 256 };
        let l = AttnLayout::packed(9, 3, 64);
        let q = Tensor::from_f32(&ctx, &[t, l.q_ld], &rng.vec(t * l.q_ld, -1.0, 1.0))?;
        let k = Tensor::from_f32(&ctx, &[t, l.kv_ld], &rng.vec(t * l.kv_ld, -1.0, 1.0))?;
        let v = Tensor::from_f32(&ctx, &[t, l.kv_ld], &rng.vec(t * l.kv_ld, -1.0, 1.0))?;
        let lens: Vec<u32> = (1..=t as u32).collect();
        let lt = Tensor::from_slice(&ctx, &[t], DType::U32, &lens)?;
        let s = Tensor::zeros(
            &ctx,
            &[ember::kernels::attention::prefill_scores_len(9, t, t)],
            DType::F32,
        )?;
        let o = Tensor::zeros(&ctx, &[t, l.o_ld], DType::F32)?;
        let ops = attention_prefill(&ctx, &o, &q, &k, &v, &s, &lt, t, 0, t, &l, 0.125, variant)?;
        let secs = time_ops(&ctx, &ops, reps, rounds)?;
        let flops = 4.0 * 9.0 * (t * t * 64) as f64;
        let r = json!({"kernel": "attention_prefill", "variant": format!("{variant:?}").to_lowercase(),
            "tokens": t, "heads": "9:3x64", "ms": secs * 1e3, "gflops": flops / secs / 1e9});
        if !a.json {
            eprintln!("{r}");
        }
        results.push(r);
        for (name, op) in ["qk", "softmax", "pv"].iter().zip(&ops) {
            let secs = time_ops(&ctx, std::slice::from_ref(op), reps, rounds)?;
            let r = json!({"kernel": format!("attention_prefill.{name}"), "variant": format!("{variant:?}").to_lowercase(),
                "tokens": t, "ms": secs * 1e3});
            if !a.json {
                eprintln!("{r}");
            }
            results.push(r);
        }
    }
    let info = ctx.info();
    let out = json!({
        "device": info.name, "backend": info.backend, "driver": info.driver_info,
        "device_type": info.device_type, "ember_version": ember::VERSION,
        "auto_variant": format!("{:?}", Variant::Auto.resolve(&ctx)).to_lowercase(),
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}
