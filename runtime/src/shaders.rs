//! Every WGSL kernel family, embedded in the binary (see `shaders/*.wgsl` at the workspace
//! root). Names are the file names without `.wgsl`.

/// (name, source) of every shader file.
pub const ALL: &[(&str, &str)] = &[
    ("attention", include_str!("../../shaders/attention.wgsl")),
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("embed", include_str!("../../shaders/embed.wgsl")),
    ("kv", include_str!("../../shaders/kv.wgsl")),
    ("lora", include_str!("../../shaders/lora.wgsl")),
    ("lora_moe", include_str!("../../shaders/lora_moe.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("moe", include_str!("../../shaders/moe.wgsl")),
    ("moe_dense", include_str!("../../shaders/moe_dense.wgsl")),
    ("norm", include_str!("../../shaders/norm.wgsl")),
    ("quant", include_str!("../../shaders/quant.wgsl")),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    ("sample", include_str!("../../shaders/sample.wgsl")),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
    ("train", include_str!("../../shaders/train.wgsl")),
];

/// The source of shader `name`.
pub fn source(name: &str) -> Option<&'static str> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
