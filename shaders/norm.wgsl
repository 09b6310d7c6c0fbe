// Row normalization: RMSNorm (LAYER = false) or LayerNorm (LAYER = true).
//
//   x:   [rows][ld_x] f32 from element x_off, cols used
//   w:   [cols] f32 scale (HAS_WEIGHT), b: [cols] f32 shift (HAS_BIAS, LayerNorm)
//   out: [rows][ld_out] f32 from element out_off
// With heads > 1, rows come in groups of `heads` consecutive cols-wide segments of one
// strided row (per-head norms of q or k): row r starts at (r / heads) * ld + (r % heads) *
// cols. IN_PLACE reads `out` instead of `x` (normalizing a buffer where it is; x is then
// bound to any other buffer and unused).
// RMSNorm:   out = x / sqrt(mean(x^2) + eps) * w
// LayerNorm: out = (x - mean) / sqrt(var + eps) * w + b   (var from a second pass)
// One workgroup per row; WG invocations stride over the columns and reduce in workgroup
// memory.

struct NormParams {
    rows: u32,
    cols: u32,
    ld_x: u32,
    ld_out: u32,
    eps: f32,
    x_off: u32,
    out_off: u32,
    heads: u32,
}

override LAYER: bool = false;
override HAS_WEIGHT: bool = true;
override HAS_BIAS: bool = false;
override WG: u32 = 64u;
override IN_PLACE: bool = false;

@group(0) @binding(0) var<uniform> p: NormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, WG>;

fn xin(i: u32) -> f32 {
    if (IN_PLACE) { return out[i]; }
    return x[i];
}

fn reduce_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) { red[li] += red[li + s]; }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(WG)
fn norm(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) { return; }
    let g = row / p.heads;
    let seg = (row % p.heads) * p.cols;
    let xb = p.x_off + g * p.ld_x + seg;
    let ob = p.out_off + g * p.ld_out + seg;
    let n = f32(p.cols);
    var mean = 0.0;
    if (LAYER) {
        var s = 0.0;
        for (var c = li; c < p.cols; c += WG) { s += xin(xb + c); }
        mean = reduce_sum(li, s) / n;
    }
    var ss = 0.0;
    for (var c = li; c < p.cols; c += WG) {
        let d = xin(xb + c) - mean;
        ss += d * d;
    }
    let scale = 1.0 / sqrt(reduce_sum(li, ss) / n + p.eps);
    for (var c = li; c < p.cols; c += WG) {
        var v = (xin(xb + c) - mean) * scale;
        if (HAS_WEIGHT) { v *= w[c]; }
        if (HAS_BIAS) { v += b[c]; }
        out[ob + c] = v;
    }
}
