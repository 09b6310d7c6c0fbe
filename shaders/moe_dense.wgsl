// Mixture-of-Experts products with f32 or f16 (F16, read as packed pairs) expert weights:
// the dense counterpart of quant.wgsl's EXPERTS kernels, for HF checkpoints and f32/f16 GGUF
// experts.
//
//   W:   `experts` stacked experts of `n` rows of `k` columns, the first being expert
//        `row_start` of the model (f32, or f16 pairs in u32 words with F16)
//   ids: [pairs] u32, the expert of each (token, expert) pair; a pair whose expert is not
//        in this W is left alone (another chunk of experts writes it)
//   X:   [pairs / n_ids][ldx] f32 (a token's k pairs share its row); with glu > 0 the row
//        holds a gate at 0..k and an up projection glu columns later, and the input is
//        silu(gate) * up (SwiGLU fused into the down projection)
//   Y:   [pairs][ldy] f32, columns y_offset .. y_offset + n written (+= with accumulate)
//
// One workgroup per (pair, row): 64 lanes stride over the columns, then a tree reduction,
// so every result is summed in the same order whatever the batch.

struct DenseExpertParams {
    pairs: u32,
    n: u32,
    k: u32,
    ldx: u32,
    ldy: u32,
    y_offset: u32,
    n_ids: u32,
    glu: u32,
    row_start: u32,
    experts: u32,
    accumulate: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: DenseExpertParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
#if F16
@group(0) @binding(2) var<storage, read> w: array<u32>;
#else
@group(0) @binding(2) var<storage, read> w: array<f32>;
#endif
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, 64>;

fn xval(base: u32, c: u32) -> f32 {
    if (p.glu == 0u) { return x[base + c]; }
    let g = x[base + c];
    return g / (1.0 + exp(-g)) * x[base + p.glu + c];
}

@compute @workgroup_size(64)
fn moe_dense_mv(@builtin(workgroup_id) wg: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = wg.x + wg.y * nwg.x;
    if (i >= p.pairs * p.n) { return; }
    let pair = i / p.n;
    let row = i % p.n;
    let e = ids[pair];
    let ok = e >= p.row_start && e - p.row_start < p.experts;
    // Pairs of other chunks read row 0 and write nothing, keeping the barriers uniform.
    let wrow = select(0u, (e - p.row_start) * p.n + row, ok);
    let xb = (pair / p.n_ids) * p.ldx;
    var acc = 0.0;
#if F16
    let half_k = p.k / 2u;
    let wb = wrow * half_k;
    for (var c = li; c < half_k; c += 64u) {
        let wv = unpack2x16float(w[wb + c]);
        acc += wv.x * xval(xb, 2u * c) + wv.y * xval(xb, 2u * c + 1u);
    }
#else
    let wb = wrow * p.k;
    for (var c = li; c < p.k; c += 64u) {
        acc += w[wb + c] * xval(xb, c);
    }
#endif
    red[li] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (li < s) { red[li] += red[li + s]; }
        workgroupBarrier();
    }
    if (li == 0u && ok) {
        let o = pair * p.ldy + p.y_offset + row;
        if (p.accumulate != 0u) { y[o] = y[o] + red[0]; } else { y[o] = red[0]; }
    }
}
