//! Every WGSL kernel family, embedded in the binary (see `shaders/*.wgsl` at the workspace
//! root). Names are the file names without `.wgsl`.

/// (name, source) of every shader file.
pub const ALL: &[(&str, &str)] = &[
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("quant", include_str!("../../shaders/quant.wgsl")),
];

/// The source of shader `name`.
pub fn source(name: &str) -> Option<&'static str> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
