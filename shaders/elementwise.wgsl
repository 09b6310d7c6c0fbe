// Elementwise operations over n f32 values, vectorized by 4 when n allows.
//
//   binary:  out[i] = a[i] OP b[i % b_len]     (b broadcasts: a bias row, a scalar)
//   unary:   out[i] = F(a[i])
//   swiglu:  out[r][j] = silu(a[r][j]) * a[r][ff + j]  (gate and up fused in one row of 2*ff)
//            or silu(a[i]) * b[i] with SEPARATE
//   *_inplace variants read and write `out` (one binding: no aliasing).
// OP: 0 add, 1 mul, 2 sub.   F: 0 silu, 1 gelu (tanh), 2 gelu (erf), 3 scale, 4 copy.

struct EltParams {
    n: u32,
    b_len: u32,
    ff: u32,
    scale: f32,
}

override OP: u32 = 0u;
override F: u32 = 0u;
override SEPARATE: bool = false;

@group(0) @binding(0) var<uniform> p: EltParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn idx(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * 64u; }

fn bin(x: f32, y: f32) -> f32 {
    switch OP {
        case 0u: { return x + y; }
        case 1u: { return x * y; }
        default: { return x - y; }
    }
}

fn silu(x: f32) -> f32 { return x / (1.0 + exp(-x)); }

// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
fn erf_(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-x * x);
    return select(-y, y, x >= 0.0);
}

fn un(x: f32) -> f32 {
    switch F {
        case 0u: { return silu(x); }
        case 1u: {
            // ggml's tanh approximation
            let c = 0.7978845608028654;
            return 0.5 * x * (1.0 + tanh(c * x * (1.0 + 0.044715 * x * x)));
        }
        case 2u: { return 0.5 * x * (1.0 + erf_(x * 0.7071067811865476)); }
        case 3u: { return x * p.scale; }
        default: { return x; }
    }
}

@compute @workgroup_size(64)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i < p.n) { out[i] = bin(a[i], b[i % p.b_len]); }
}

@compute @workgroup_size(64)
fn binary_inplace(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i < p.n) { out[i] = bin(out[i], b[i % p.b_len]); }
}

@compute @workgroup_size(64)
fn unary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i < p.n) { out[i] = un(a[i]); }
}

@compute @workgroup_size(64)
fn unary_inplace(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i < p.n) { out[i] = un(out[i]); }
}

// n = rows * ff outputs.
@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    if (SEPARATE) {
        out[i] = silu(a[i]) * b[i];
    } else {
        let r = i / p.ff;
        let j = i % p.ff;
        out[i] = silu(a[r * 2u * p.ff + j]) * a[r * 2u * p.ff + p.ff + j];
    }
}
