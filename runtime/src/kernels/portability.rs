//! Every shader, in every specialization Ember builds, must parse and validate in naga and
//! translate to SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and GLSL ES (GL). And every
//! uniform struct declared in Rust must match its WGSL twin field for field.

use std::collections::BTreeMap;

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};

use crate::gpu::{preprocess, PipelineKey, ShaderDefs, Uniform};
use crate::kernels::*;

fn all_keys() -> Vec<PipelineKey> {
    [
        attention::keys(),
        elementwise::keys(),
        embed::keys(),
        kv::keys(),
        lora::keys(),
        lora_moe::keys(),
        matmul::keys(),
        norm::keys(),
        quant::keys(),
        rope::keys(),
        sample::keys(),
        softmax::keys(),
        moe::keys(),
        train::keys(),
    ]
    .concat()
}

fn capabilities(defs: &ShaderDefs) -> Capabilities {
    // pack/unpack2x16float: every backend wgpu supports for compute has them (wgpu's
    // downlevel flag SHADER_F16_IN_F32); no other capability is assumed.
    let mut c = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if defs.has("F16") {
        c |= Capabilities::SHADER_FLOAT16;
    }
    if defs.has("SUBGROUP") {
        c |= Capabilities::SUBGROUP;
    }
    c
}

fn parse(shader: &'static str, defs: &ShaderDefs) -> (naga::Module, ModuleInfo) {
    let src = crate::shaders::source(shader).unwrap();
    let text = preprocess(shader, src, defs).unwrap();
    let module = naga::front::wgsl::parse_str(&text)
        .unwrap_or_else(|e| panic!("{shader} {defs:?}: {}", e.emit_to_string(&text)));
    let info = Validator::new(ValidationFlags::all(), capabilities(defs))
        .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
        .validate(&module)
        .unwrap_or_else(|e| {
            panic!(
                "{shader} {defs:?}: {}\n{:?}",
                e.emit_to_string(&text),
                e.as_inner()
            )
        });
    (module, info)
}

fn translate(key: &PipelineKey, module: &naga::Module, info: &ModuleInfo) {
    let what = format!(
        "{}::{} {:?} {:?}",
        key.shader, key.entry, key.defs, key.constants
    );
    let mut constants = naga::back::PipelineConstants::default();
    for (name, value) in key.constant_values() {
        constants.insert(name.to_string(), value);
    }
    let ep = (naga::ShaderStage::Compute, key.entry);
    let (m, i) =
        naga::back::pipeline_constants::process_overrides(module, info, Some(ep), &constants)
            .unwrap_or_else(|e| panic!("{what}: overrides: {e}"));
    let (m, i) = (m.as_ref(), i.as_ref());

    let spv_opts = spv::Options {
        lang_version: (1, 3),
        ..Default::default()
    };
    let spv_pipe = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: key.entry.into(),
    };
    spv::write_vec(m, i, &spv_opts, Some(&spv_pipe))
        .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e}"));

    let msl_opts = msl::Options {
        lang_version: (2, 4),
        ..Default::default()
    };
    let msl_pipe = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, key.entry.into())),
        ..Default::default()
    };
    msl::write_string(m, i, &msl_opts, &msl_pipe).unwrap_or_else(|e| panic!("{what}: MSL: {e}"));

    let modern = key.defs.has("F16") || key.defs.has("SUBGROUP");
    let hlsl_opts = hlsl::Options {
        shader_model: if modern {
            hlsl::ShaderModel::V6_2
        } else {
            hlsl::ShaderModel::V5_1
        },
        ..Default::default()
    };
    let hlsl_pipe = hlsl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, key.entry.into())),
    };
    let mut out = String::new();
    hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe)
        .write(m, i, None)
        .unwrap_or_else(|e| panic!("{what}: HLSL: {e}"));

    // wgpu's GL backend offers neither SHADER_F16 nor subgroups: those variants never run
    // there, every other one must.
    if !modern {
        let glsl_opts = glsl::Options {
            version: glsl::Version::new_gles(310),
            ..Default::default()
        };
        let glsl_pipe = glsl::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: key.entry.into(),
            multiview: None,
        };
        let mut out = String::new();
        glsl::Writer::new(
            &mut out,
            m,
            i,
            &glsl_opts,
            &glsl_pipe,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write())
        .unwrap_or_else(|e| panic!("{what}: GLSL: {e}"));
    }
}

#[test]
fn every_shader_file_is_registered_and_specialized() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shaders");
    let keys = all_keys();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        assert!(
            crate::shaders::source(&name).is_some(),
            "{name}.wgsl is not in shaders::ALL"
        );
        assert!(
            keys.iter().any(|k| k.shader == name),
            "{name}.wgsl has no specialization listed"
        );
        assert_eq!(
            crate::shaders::source(&name).unwrap(),
            std::fs::read_to_string(&path).unwrap(),
            "{name}: embedded source differs from the file"
        );
    }
}

#[test]
fn every_specialization_translates_to_all_backends() {
    let mut by_module: BTreeMap<(&'static str, ShaderDefs), Vec<PipelineKey>> = BTreeMap::new();
    for k in all_keys() {
        by_module
            .entry((k.shader, k.defs.clone()))
            .or_default()
            .push(k);
    }
    let mut n = 0;
    for ((shader, defs), keys) in &by_module {
        let (module, info) = parse(shader, defs);
        for k in keys {
            translate(k, &module, &info);
            n += 1;
        }
    }
    assert!(n > 300, "only {n} specializations checked");
}

fn check_uniform<U: Uniform>(shader: &'static str) {
    let (module, _) = parse(shader, &ShaderDefs::none().with("SUBGROUP", true));
    let ty = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(U::NAME))
        .unwrap_or_else(|| panic!("{shader}.wgsl declares no struct {}", U::NAME));
    let naga::TypeInner::Struct { members, span } = &ty.1.inner else {
        panic!("{} is not a struct", U::NAME)
    };
    assert_eq!(members.len(), U::FIELDS.len(), "{}: field count", U::NAME);
    for (i, (m, (name, rust_ty))) in members.iter().zip(U::FIELDS).enumerate() {
        assert_eq!(m.name.as_deref(), Some(*name), "{} field {i}", U::NAME);
        assert_eq!(m.offset as usize, 4 * i, "{}.{name} offset", U::NAME);
        let wgsl_ty = match &module.types[m.ty].inner {
            naga::TypeInner::Scalar(s) => match (s.kind, s.width) {
                (naga::ScalarKind::Uint, 4) => "u32",
                (naga::ScalarKind::Sint, 4) => "i32",
                (naga::ScalarKind::Float, 4) => "f32",
                other => panic!("{}.{name}: unexpected scalar {other:?}", U::NAME),
            },
            other => panic!("{}.{name}: not a scalar: {other:?}", U::NAME),
        };
        assert_eq!(wgsl_ty, *rust_ty, "{}.{name} type", U::NAME);
    }
    assert_eq!(*span as usize, std::mem::size_of::<U>(), "{} size", U::NAME);
}

#[test]
fn uniform_structs_match_their_wgsl_twins() {
    check_uniform::<matmul::MatmulParams>("matmul");
    check_uniform::<quant::QuantParams>("quant");
    check_uniform::<norm::NormParams>("norm");
    check_uniform::<rope::RopeParams>("rope");
    check_uniform::<softmax::SoftmaxParams>("softmax");
    check_uniform::<moe::MoeParams>("moe");
    check_uniform::<moe::DenseExpertParams>("moe_dense");
    check_uniform::<elementwise::EltParams>("elementwise");
    check_uniform::<embed::EmbedParams>("embed");
    check_uniform::<attention::AttnParams>("attention");
    check_uniform::<sample::SampleParams>("sample");
    check_uniform::<sample::RowParams>("sample");
    check_uniform::<kv::KvParams>("kv");
    check_uniform::<kv::RopeStoreParams>("kv");
    check_uniform::<lora::LoraParams>("lora");
    check_uniform::<lora_moe::MixParams>("lora_moe");
    check_uniform::<train::TrainParams>("train");
    check_uniform::<train::AdamParams>("train");
}
