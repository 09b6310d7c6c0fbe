//! HF checkpoints in f16, bf16 and sharded form load to exactly what their values say: a
//! model stored as f16 (or bf16) gives the logits of the f32 model whose weights were
//! rounded to f16 (bf16) first, and a sharded checkpoint the logits of the single file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ember::model::{LoadOptions, Model};
use ember::session::{Session, SessionParams};
use ember::Context;
use ember_tests::model::temp_dir;
use ember_tests::tiny::{tiny_tensors, write_tiny_model, TinyVariant};
use safetensors::{tensor::TensorView, Dtype};

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn write_safetensors(path: &Path, tensors: &Tensors, dtype: Dtype) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let b: Vec<u8> = match dtype {
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                other => panic!("{other:?}"),
            };
            (n.clone(), s.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn logits(dir: &Path) -> Vec<f32> {
    let ctx = Context::new().unwrap();
    let m = Arc::new(Model::load(&ctx, dir, LoadOptions::default()).unwrap());
    let mut s = Session::new(
        m,
        SessionParams {
            n_ctx: 64,
            n_seq: 1,
            n_batch: 16,
            kv_budget: 0,
        },
    )
    .unwrap();
    s.logits(&[5, 17, 200, 3, 99, 42, 7, 250, 1]).unwrap()
}

fn rounded(t: &Tensors, f: impl Fn(f32) -> f32) -> Tensors {
    t.iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.iter().map(|&x| f(x)).collect()))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn f16_bf16_and_sharded_checkpoints() {
    let v = TinyVariant::Llama;
    let base = temp_dir("hf-dtypes");
    let tensors = tiny_tensors(v);
    let variant_dir = |name: &str| {
        let d = base.join(name);
        write_tiny_model(&d, v).unwrap();
        d
    };
    // f16 on disk vs f32 holding the f16-rounded values.
    let f16_dir = variant_dir("f16");
    write_safetensors(&f16_dir.join("model.safetensors"), &tensors, Dtype::F16);
    let r16 = variant_dir("f32-r16");
    write_safetensors(
        &r16.join("model.safetensors"),
        &rounded(&tensors, |x| half::f16::from_f32(x).to_f32()),
        Dtype::F32,
    );
    let d = max_diff(&logits(&f16_dir), &logits(&r16));
    assert!(d < 1e-5, "f16 checkpoint vs f16-rounded f32: {d}");

    // bf16 on disk (converted to f32 at load) vs f32 holding the bf16-rounded values.
    let bf_dir = variant_dir("bf16");
    write_safetensors(&bf_dir.join("model.safetensors"), &tensors, Dtype::BF16);
    let rbf = variant_dir("f32-rbf16");
    write_safetensors(
        &rbf.join("model.safetensors"),
        &rounded(&tensors, |x| half::bf16::from_f32(x).to_f32()),
        Dtype::F32,
    );
    assert_eq!(
        logits(&bf_dir),
        logits(&rbf),
        "bf16 checkpoint vs bf16-rounded f32"
    );

    // Two shards and an index vs the single file.
    let single = variant_dir("single");
    let sharded = variant_dir("sharded");
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let (a, b): (Tensors, Tensors) = tensors
        .iter()
        .cloned()
        .partition(|(n, _, _)| n.contains("layers.0") || n.contains("embed"));
    write_safetensors(
        &sharded.join("model-00001-of-00002.safetensors"),
        &a,
        Dtype::F32,
    );
    write_safetensors(
        &sharded.join("model-00002-of-00002.safetensors"),
        &b,
        Dtype::F32,
    );
    let mut map: HashMap<String, String> = HashMap::new();
    for (n, _, _) in &a {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, _, _) in &b {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(logits(&sharded), logits(&single), "sharded vs single file");
    let _ = std::fs::remove_dir_all(&base);
}
