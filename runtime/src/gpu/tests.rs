//! Tests of the device layer itself.

use super::*;
use crate::kernels::testing::ctx;

#[test]
fn pool_reuses_buffers_of_a_size_class() {
    let ctx = ctx();
    let a = Tensor::scratch(ctx, &[1000], DType::F32).unwrap();
    let raw = a.buffer().raw().clone();
    drop(a);
    assert!(ctx.pool_idle() >= 1);
    // 900 floats fall in the same 4 KiB class: the same buffer comes back.
    let b = Tensor::scratch(ctx, &[900], DType::F32).unwrap();
    assert_eq!(b.buffer().raw(), &raw);
}

#[test]
fn pipelines_are_cached_by_key() {
    let ctx = ctx();
    let key = PipelineKey::new("softmax", "softmax").constant("WG", 64.0);
    let x = Tensor::zeros(ctx, &[4], DType::F32).unwrap();
    let u = ctx.uniform(&crate::kernels::softmax::SoftmaxParams {
        rows: 1,
        cols: 4,
        scale: 1.0,
        _pad: 0,
    });
    ctx.dispatch("t", &key, &[Bind::U(&u), Bind::T(&x)], [1, 1, 1])
        .unwrap();
    let n = ctx.pipelines_compiled();
    for _ in 0..3 {
        ctx.dispatch("t", &key, &[Bind::U(&u), Bind::T(&x)], [1, 1, 1])
            .unwrap();
    }
    assert_eq!(ctx.pipelines_compiled(), n);
    // Constants are part of the key, in any order of insertion.
    let a = PipelineKey::new("x", "y")
        .constant("A", 1.0)
        .constant("B", 2.0);
    let b = PipelineKey::new("x", "y")
        .constant("B", 2.0)
        .constant("A", 1.0);
    assert_eq!(a, b);
    assert_ne!(
        a,
        PipelineKey::new("x", "y")
            .constant("A", 1.0)
            .constant("B", 3.0)
    );
}

#[test]
fn readback_round_trips_and_checks_ranges() {
    let ctx = ctx();
    let data: Vec<u32> = (0..5000).collect();
    let t = Tensor::from_slice(ctx, &[5000], DType::U32, &data).unwrap();
    assert_eq!(t.read_u32(ctx).unwrap(), data);
    // A smaller read after a larger one reuses the staging buffer.
    let small = Tensor::from_slice(ctx, &[3], DType::U32, &[7u32, 8, 9]).unwrap();
    assert_eq!(small.read_u32(ctx).unwrap(), vec![7, 8, 9]);
    assert!(ctx.read_bytes(t.buffer().raw(), 0, 1 << 20).is_err());
    assert!(ctx.read_bytes(t.buffer().raw(), 2, 4).is_err());
}

#[test]
fn memory_budget_is_enforced() {
    let ctx = Context::with_options(ContextOptions {
        memory_budget: Some(1 << 20),
        ..ContextOptions::from_env().unwrap()
    })
    .unwrap();
    let a = Tensor::zeros(&ctx, &[128 * 1024], DType::F32).unwrap(); // 512 KiB
    let e = Tensor::zeros(&ctx, &[256 * 1024], DType::F32).unwrap_err(); // 1 MiB more
    assert_eq!(e.kind(), crate::ErrorKind::OutOfMemory);
    assert!(e.to_string().contains("budget"), "{e}");
    drop(a);
    assert_eq!(ctx.allocated_bytes(), 0);
    Tensor::zeros(&ctx, &[256 * 1024], DType::F32).unwrap();
}

#[test]
fn shapes_and_limits_are_errors_not_panics() {
    let ctx = ctx();
    assert!(Tensor::zeros(ctx, &[usize::MAX, 2], DType::F32).is_err());
    assert!(Tensor::from_f32(ctx, &[3], &[1.0, 2.0]).is_err());
    let t = Tensor::zeros(ctx, &[6], DType::F32).unwrap();
    assert!(t.reshape(&[4]).is_err());
    assert_eq!(t.reshape(&[2, 3]).unwrap().shape(), &[2, 3]);
}

#[test]
fn missing_backend_explains_itself() {
    // A backend this platform does not have, or an adapter name nobody has.
    let opts = ContextOptions {
        adapter: AdapterSelector::Name("no-such-gpu-anywhere".into()),
        ..Default::default()
    };
    let e = Context::with_options(opts).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Device);
    let msg = e.to_string();
    assert!(
        msg.contains("no-such-gpu-anywhere") && msg.contains("available adapters"),
        "{msg}"
    );
    assert!(BackendChoice::parse("cuda")
        .unwrap_err()
        .to_string()
        .contains("vulkan"));
}

#[test]
fn info_reports_the_device() {
    let ctx = ctx();
    let info = ctx.info();
    assert!(!info.name.is_empty());
    assert!(["vulkan", "metal", "dx12", "gl", "webgpu"].contains(&info.backend.as_str()));
    assert!(ctx.caps().max_binding >= 1 << 20);
    let json = serde_json::to_value(info).unwrap();
    assert!(
        json["limits"]["maxStorageBufferBindingSize"]
            .as_u64()
            .unwrap()
            > 0
    );
}
