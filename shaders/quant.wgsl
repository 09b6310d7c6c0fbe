// Quantized weights (GGUF block formats, repacked by runtime/src/quant): matrix-vector and
// matrix-matrix products against f32 activations, and the embedding gather.
//
//   W (q, s): [n][k] quantized, `n` rows (output features) of `k` columns, in QTYPE's layout:
//             q[row][block][QW vec4 words], s[row][block][SW words]
//   X:        [m][ldx] f32 activations (k columns used); with GLU each row holds a gate and,
//             glu4 vec4s later, an up projection, and the activation is silu(gate) * up
//             (SwiGLU fused into the down projection's input)
//   Y:        [m][ldy] f32, columns y_offset .. y_offset + n written (+= with ACCUMULATE)
//
// Every format is decoded in groups of 32 consecutive columns (a Q*_0/Q*_1 block, or one
// sub-block of a K-quant super-block) into 8 vec4 of integer-valued weights q and the
// factors of  sum_i (a * q_i + b) * x_i = a * sum(q x) + b * sum(x), which is how each
// value is dequantized in ggml (a = scale, b = minimum).
//
// Kernels:
//   qmv_sg / qmm_sg        CPU-like devices with 8-wide subgroups: one weight row per lane,
//                          activations loaded one vec4 per lane and broadcast by shuffles.
//   qmv_tiled / qmm_tiled  GPUs and devices without subgroups: workgroup memory.
//   gather                 embedding rows for token ids, dequantized.
//
// With EXPERTS (Mixture-of-Experts, the vector kernels only): W stacks `experts` experts of
// `n` rows each, the first being expert `row_start` of the model; each dispatch row is one
// (token, expert) pair whose expert is ids[pair] (pairs of experts outside W are skipped),
// reading activation row pair / n_ids and writing output row pair.
//
// With GROUPED (qmm_tiled only; the batched prefill path of Mixture-of-Experts layers): the
// pairs come grouped by expert (moe.wgsl's moe_group): ids holds [all_experts] counts,
// [all_experts] offsets, then the pair indices sorted by expert. Workgroup z is expert
// row_start + z of this W; its tiles cover that expert's pairs only (tiles past its count
// exit at once), so each expert's weights are read once per 64 of its tokens, not once per
// token. Rows read activation row pair / n_ids and write output row pair.

struct QuantParams {
    m: u32,
    n: u32,
    k: u32,
    ldx: u32,
    ldy: u32,
    y_offset: u32,
    row_start: u32,
    n_ids: u32,
    glu4: u32,
    experts: u32,
    all_experts: u32,
    _pad2: u32,
}

// 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0, 4 Q5_1, 5 Q4_K, 6 Q5_K, 7 Q6_K
override QTYPE: u32 = 0u;
override ACCUMULATE: bool = false;

// vec4 quant words per block, scale words per block, 32-column groups per block.
const QWS = array<u32, 8>(2u, 1u, 1u, 1u, 1u, 8u, 10u, 12u);
const SWS = array<u32, 8>(1u, 1u, 1u, 2u, 2u, 5u, 5u, 5u);
const GPBS = array<u32, 8>(1u, 1u, 1u, 1u, 1u, 8u, 8u, 8u);
override QW: u32 = QWS[QTYPE];
override SW: u32 = SWS[QTYPE];
override GPB: u32 = GPBS[QTYPE];

@group(0) @binding(0) var<uniform> p: QuantParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> q: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> s: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> ids: array<u32>;

// 32 decoded weights: q0 holds columns 0..3 of the group, q7 columns 28..31.
struct Sub {
    q0: vec4<f32>, q1: vec4<f32>, q2: vec4<f32>, q3: vec4<f32>,
    q4: vec4<f32>, q5: vec4<f32>, q6: vec4<f32>, q7: vec4<f32>,
    // scale of columns 0..15 and 16..31 (equal except for Q6_K), and the minimum factor
    a_lo: f32,
    a_hi: f32,
    b: f32,
}

// 32 activations, x0 = columns 0..3 of the group.
struct X8 {
    x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>,
    x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>,
}

// One vec4 of activations (index in vec4s of the X binding).
fn xv(i: u32) -> vec4<f32> {
#if GLU
    let g = x[i];
    return g / (1.0 + exp(-g)) * x[i + p.glu4];
#else
    return x[i];
#endif
}

fn qword(base: u32, w: u32) -> u32 { return q[base + (w >> 2u)][w & 3u]; }
fn u4(v: u32) -> vec4<f32> { return vec4<f32>(unpack4xU8(v)); }
fn lo4(v: u32) -> vec4<f32> { return u4(v & 0x0F0F0F0Fu); }
fn hi4(v: u32) -> vec4<f32> { return u4((v >> 4u) & 0x0F0F0F0Fu); }
fn byte_of(v: u32, i: u32) -> u32 { return (v >> (8u * i)) & 0xFFu; }
fn sbyte_of(v: u32, i: u32) -> f32 { return f32(bitcast<i32>(v << (24u - 8u * i)) >> 24u); }

// Fifth bits of Q5_0/Q5_1 columns 4c .. 4c+3 (bit e of qh is column e's), times 16.
fn q5h(qh: u32, c: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(qh) >> (vec4<u32>(0u, 1u, 2u, 3u) + 4u * c)) & vec4<u32>(1u)) * 16.0;
}

// Decodes 32-column group `g` of weight row `row`.
fn decode(row: u32, g: u32) -> Sub {
    let nb = p.k / (32u * GPB);
    let blk = row * nb + g / GPB;
    let j = g % GPB;
    let qb = blk * QW;
    let sb = blk * SW;
    var o: Sub;
    switch QTYPE {
        case 0u: { // Q8_0
            let w0 = q[qb]; let w1 = q[qb + 1u];
            o.q0 = vec4<f32>(unpack4xI8(w0.x)); o.q1 = vec4<f32>(unpack4xI8(w0.y));
            o.q2 = vec4<f32>(unpack4xI8(w0.z)); o.q3 = vec4<f32>(unpack4xI8(w0.w));
            o.q4 = vec4<f32>(unpack4xI8(w1.x)); o.q5 = vec4<f32>(unpack4xI8(w1.y));
            o.q6 = vec4<f32>(unpack4xI8(w1.z)); o.q7 = vec4<f32>(unpack4xI8(w1.w));
            o.a_lo = unpack2x16float(s[sb]).x;
            o.b = 0.0;
        }
        case 1u, 2u: { // Q4_0, Q4_1
            let w = q[qb];
            o.q0 = lo4(w.x); o.q1 = lo4(w.y); o.q2 = lo4(w.z); o.q3 = lo4(w.w);
            o.q4 = hi4(w.x); o.q5 = hi4(w.y); o.q6 = hi4(w.z); o.q7 = hi4(w.w);
            let dm = unpack2x16float(s[sb]);
            o.a_lo = dm.x;
            if (QTYPE == 1u) {
                // (n - 8) * d  ==  d * n  +  (-8 d)
                o.b = -8.0 * dm.x;
            } else {
                o.b = dm.y;
            }
        }
        case 3u, 4u: { // Q5_0, Q5_1
            let w = q[qb];
            let qh = s[sb + 1u];
            o.q0 = lo4(w.x) + q5h(qh, 0u); o.q1 = lo4(w.y) + q5h(qh, 1u);
            o.q2 = lo4(w.z) + q5h(qh, 2u); o.q3 = lo4(w.w) + q5h(qh, 3u);
            o.q4 = hi4(w.x) + q5h(qh, 4u); o.q5 = hi4(w.y) + q5h(qh, 5u);
            o.q6 = hi4(w.z) + q5h(qh, 6u); o.q7 = hi4(w.w) + q5h(qh, 7u);
            let dm = unpack2x16float(s[sb]);
            o.a_lo = dm.x;
            if (QTYPE == 3u) {
                o.b = -16.0 * dm.x;
            } else {
                o.b = dm.y;
            }
        }
        case 5u, 6u: { // Q4_K, Q5_K: sub-block j uses 32 bytes shared with sub-block j^1
            let base = qb + 2u * (j / 2u);
            let w0 = q[base]; let w1 = q[base + 1u];
            let sh = 4u * (j % 2u);
            o.q0 = u4((w0.x >> sh) & 0x0F0F0F0Fu); o.q1 = u4((w0.y >> sh) & 0x0F0F0F0Fu);
            o.q2 = u4((w0.z >> sh) & 0x0F0F0F0Fu); o.q3 = u4((w0.w >> sh) & 0x0F0F0F0Fu);
            o.q4 = u4((w1.x >> sh) & 0x0F0F0F0Fu); o.q5 = u4((w1.y >> sh) & 0x0F0F0F0Fu);
            o.q6 = u4((w1.z >> sh) & 0x0F0F0F0Fu); o.q7 = u4((w1.w >> sh) & 0x0F0F0F0Fu);
            if (QTYPE == 6u) {
                // fifth bit of column l of sub-block j: bit j of qh byte l
                let h0 = q[qb + 8u]; let h1 = q[qb + 9u];
                o.q0 += u4((h0.x >> j) & 0x01010101u) * 16.0; o.q1 += u4((h0.y >> j) & 0x01010101u) * 16.0;
                o.q2 += u4((h0.z >> j) & 0x01010101u) * 16.0; o.q3 += u4((h0.w >> j) & 0x01010101u) * 16.0;
                o.q4 += u4((h1.x >> j) & 0x01010101u) * 16.0; o.q5 += u4((h1.y >> j) & 0x01010101u) * 16.0;
                o.q6 += u4((h1.z >> j) & 0x01010101u) * 16.0; o.q7 += u4((h1.w >> j) & 0x01010101u) * 16.0;
            }
            let dm = unpack2x16float(s[sb]);
            let sc = f32(byte_of(s[sb + 1u + j / 4u], j % 4u));
            let mn = f32(byte_of(s[sb + 3u + j / 4u], j % 4u));
            o.a_lo = dm.x * sc;
            o.b = -(dm.y * mn);
        }
        default: { // Q6_K: 32-column group j = quarter i of half n of the super-block
            let n = j / 4u;
            let i = j % 4u;
            let lb = qb + 4u * n + 2u * (i % 2u);
            let hb = qb + 8u + 2u * n;
            let l0 = q[lb]; let l1 = q[lb + 1u];
            let g0 = q[hb]; let g1 = q[hb + 1u];
            let ls = 4u * (i / 2u);
            let hs = 2u * i;
            let m4 = vec4<f32>(32.0);
            o.q0 = u4(((l0.x >> ls) & 0x0F0F0F0Fu) | (((g0.x >> hs) & 0x03030303u) << 4u)) - m4;
            o.q1 = u4(((l0.y >> ls) & 0x0F0F0F0Fu) | (((g0.y >> hs) & 0x03030303u) << 4u)) - m4;
            o.q2 = u4(((l0.z >> ls) & 0x0F0F0F0Fu) | (((g0.z >> hs) & 0x03030303u) << 4u)) - m4;
            o.q3 = u4(((l0.w >> ls) & 0x0F0F0F0Fu) | (((g0.w >> hs) & 0x03030303u) << 4u)) - m4;
            o.q4 = u4(((l1.x >> ls) & 0x0F0F0F0Fu) | (((g1.x >> hs) & 0x03030303u) << 4u)) - m4;
            o.q5 = u4(((l1.y >> ls) & 0x0F0F0F0Fu) | (((g1.y >> hs) & 0x03030303u) << 4u)) - m4;
            o.q6 = u4(((l1.z >> ls) & 0x0F0F0F0Fu) | (((g1.z >> hs) & 0x03030303u) << 4u)) - m4;
            o.q7 = u4(((l1.w >> ls) & 0x0F0F0F0Fu) | (((g1.w >> hs) & 0x03030303u) << 4u)) - m4;
            let d = unpack2x16float(s[sb]).x;
            let si = 8u * n + 2u * i;
            o.a_lo = d * sbyte_of(s[sb + 1u + si / 4u], si % 4u);
            o.a_hi = d * sbyte_of(s[sb + 1u + (si + 1u) / 4u], (si + 1u) % 4u);
            o.b = 0.0;
        }
    }
    if (QTYPE != 7u) { o.a_hi = o.a_lo; }
    return o;
}

fn sub_dot(w: Sub, v: X8, xsum: f32) -> f32 {
    let lo = dot(w.q0, v.x0) + dot(w.q1, v.x1) + dot(w.q2, v.x2) + dot(w.q3, v.x3);
    let hi = dot(w.q4, v.x4) + dot(w.q5, v.x5) + dot(w.q6, v.x6) + dot(w.q7, v.x7);
    return w.a_lo * lo + w.a_hi * hi + w.b * xsum;
}

fn put(row: u32, col: u32, v: f32) {
    let i = row * p.ldy + p.y_offset + col;
    if (ACCUMULATE) {
        y[i] = y[i] + v;
    } else {
        y[i] = v;
    }
}

// The activation row of dispatch row `r` and the weight row offset of its expert (EXPERTS),
// or r and 0; `ok` false when the pair's expert is not in this W.
struct Pair {
    xrow: u32,
    wbase: u32,
    ok: bool,
}

fn pair_of(r: u32) -> Pair {
#if EXPERTS
    let e = ids[r];
    let ok = e >= p.row_start && e - p.row_start < p.experts;
    return Pair(r / p.n_ids, select(0u, (e - p.row_start) * p.n, ok), ok);
#else
    return Pair(r, 0u, true);
#endif
}

#if SUBGROUP
fn hsum(v: vec4<f32>) -> f32 { return (v.x + v.y) + (v.z + v.w); }

// Group `g` of activation row `row`, held one vec4 per lane: lane l has columns 4l..4l+3.
fn lane_x(row: u32, g: u32, sl: u32) -> vec4<f32> {
    return xv((row * p.ldx) / 4u + g * 8u + sl);
}

fn spread(v: vec4<f32>) -> X8 {
    return X8(subgroupShuffle(v, 0u), subgroupShuffle(v, 1u), subgroupShuffle(v, 2u), subgroupShuffle(v, 3u),
              subgroupShuffle(v, 4u), subgroupShuffle(v, 5u), subgroupShuffle(v, 6u), subgroupShuffle(v, 7u));
}

fn lane_sum(v: f32) -> f32 {
    return ((subgroupShuffle(v, 0u) + subgroupShuffle(v, 1u)) + (subgroupShuffle(v, 2u) + subgroupShuffle(v, 3u)))
         + ((subgroupShuffle(v, 4u) + subgroupShuffle(v, 5u)) + (subgroupShuffle(v, 6u) + subgroupShuffle(v, 7u)));
}

// Y[row][col] for one activation row (wg.y) and two weight rows per lane (lid.x and
// lid.x + 64 of the workgroup's 128), which share the shuffled activations.
@compute @workgroup_size(64)
fn qmv_sg(@builtin(workgroup_id) wg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(subgroup_invocation_id) sl: u32) {
    let col0 = wg.x * 128u + lid.x;
    let col1 = col0 + 64u;
    let wrow0 = min(col0, p.n - 1u);
    let wrow1 = min(col1, p.n - 1u);
    let row = wg.y;
    let pr = pair_of(row);
    if (!pr.ok) { return; }
    var acc0 = 0.0;
    var acc1 = 0.0;
    let groups = p.k / 32u;
    for (var g = 0u; g < groups; g++) {
        let xv = lane_x(pr.xrow, g, sl);
        let v = spread(xv);
        let xs = lane_sum(hsum(xv));
        acc0 += sub_dot(decode(pr.wbase + wrow0, g), v, xs);
        acc1 += sub_dot(decode(pr.wbase + wrow1, g), v, xs);
    }
    if (col0 < p.n) { put(row, col0, acc0); }
    if (col1 < p.n) { put(row, col1, acc1); }
}

// Activation row r of the subgroup's 8 comes from lane r: its 32 values and their sum,
// dotted with two weight rows.
fn row_dots(w0: Sub, w1: Sub, v: X8, vs: f32, r: u32) -> vec2<f32> {
    let xr = X8(subgroupShuffle(v.x0, r), subgroupShuffle(v.x1, r), subgroupShuffle(v.x2, r), subgroupShuffle(v.x3, r),
                subgroupShuffle(v.x4, r), subgroupShuffle(v.x5, r), subgroupShuffle(v.x6, r), subgroupShuffle(v.x7, r));
    let s = subgroupShuffle(vs, r);
    return vec2<f32>(sub_dot(w0, xr, s), sub_dot(w1, xr, s));
}

// Y for 8 activation rows (wg.y) and two weight rows per lane (lid.x and lid.x + 64 of the
// workgroup's 128): the activations a lane loads and the subgroup shuffles serve both.
@compute @workgroup_size(64)
fn qmm_sg(@builtin(workgroup_id) wg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(subgroup_invocation_id) sl: u32) {
    let col0 = wg.x * 128u + lid.x;
    let col1 = col0 + 64u;
    let wrow0 = min(col0, p.n - 1u);
    let wrow1 = min(col1, p.n - 1u);
    let row0 = wg.y * 8u;
    let xb = (min(row0 + sl, p.m - 1u) * p.ldx) / 4u;
    var lo0 = vec4<f32>(0.0);
    var hi0 = vec4<f32>(0.0);
    var lo1 = vec4<f32>(0.0);
    var hi1 = vec4<f32>(0.0);
    let groups = p.k / 32u;
    for (var g = 0u; g < groups; g++) {
        let o = xb + g * 8u;
        let v = X8(xv(o), xv(o + 1u), xv(o + 2u), xv(o + 3u), xv(o + 4u), xv(o + 5u), xv(o + 6u), xv(o + 7u));
        let vs = hsum(v.x0 + v.x1 + v.x2 + v.x3 + v.x4 + v.x5 + v.x6 + v.x7);
        let w0 = decode(wrow0, g);
        let w1 = decode(wrow1, g);
        let t0 = row_dots(w0, w1, v, vs, 0u);
        let t1 = row_dots(w0, w1, v, vs, 1u);
        let t2 = row_dots(w0, w1, v, vs, 2u);
        let t3 = row_dots(w0, w1, v, vs, 3u);
        let t4 = row_dots(w0, w1, v, vs, 4u);
        let t5 = row_dots(w0, w1, v, vs, 5u);
        let t6 = row_dots(w0, w1, v, vs, 6u);
        let t7 = row_dots(w0, w1, v, vs, 7u);
        lo0 += vec4<f32>(t0.x, t1.x, t2.x, t3.x);
        hi0 += vec4<f32>(t4.x, t5.x, t6.x, t7.x);
        lo1 += vec4<f32>(t0.y, t1.y, t2.y, t3.y);
        hi1 += vec4<f32>(t4.y, t5.y, t6.y, t7.y);
    }
    for (var r = 0u; r < 4u; r++) {
        if (col0 < p.n) {
            if (row0 + r < p.m) { put(row0 + r, col0, lo0[r]); }
            if (row0 + 4u + r < p.m) { put(row0 + 4u + r, col0, hi0[r]); }
        }
        if (col1 < p.n) {
            if (row0 + r < p.m) { put(row0 + r, col1, lo1[r]); }
            if (row0 + 4u + r < p.m) { put(row0 + 4u + r, col1, hi1[r]); }
        }
    }
}
#endif

// ---- workgroup-memory kernels ----

var<workgroup> red: array<f32, 64>;

// 4 weight rows per workgroup, 16 invocations per row splitting the 32-column groups.
@compute @workgroup_size(64)
fn qmv_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let slot = li / 16u;
    let t = li % 16u;
    let col = wg.x * 4u + slot;
    let wrow = min(col, p.n - 1u);
    let row = wg.y;
    let pr = pair_of(row);
    if (!pr.ok) { return; }
    let groups = p.k / 32u;
    var acc = 0.0;
    for (var g = t; g < groups; g += 16u) {
        let o = (pr.xrow * p.ldx) / 4u + g * 8u;
        let v = X8(xv(o), xv(o + 1u), xv(o + 2u), xv(o + 3u), xv(o + 4u), xv(o + 5u), xv(o + 6u), xv(o + 7u));
        let sv = v.x0 + v.x1 + v.x2 + v.x3 + v.x4 + v.x5 + v.x6 + v.x7;
        acc += sub_dot(decode(pr.wbase + wrow, g), v, (sv.x + sv.y) + (sv.z + sv.w));
    }
    red[li] = acc;
    workgroupBarrier();
    for (var w = 8u; w > 0u; w >>= 1u) {
        if (t < w) { red[li] += red[li + w]; }
        workgroupBarrier();
    }
    if (t == 0u && col < p.n) { put(row, col, red[li]); }
}

// 64 activation rows x 64 weight rows per workgroup, one 32-column group per step.
var<workgroup> xa: array<vec4<f32>, 512>; // [32 k][16] rows packed by 4
var<workgroup> wb: array<vec4<f32>, 512>; // [32 k][16] weight rows packed by 4

// Column r of the tile, k-values k0 .. k0+3 (tiles are stored k-major, 4 rows per vec4).
fn put_xa(r: u32, k0: u32, v: vec4<f32>) {
    xa[k0 * 16u + r / 4u][r % 4u] = v.x;
    xa[(k0 + 1u) * 16u + r / 4u][r % 4u] = v.y;
    xa[(k0 + 2u) * 16u + r / 4u][r % 4u] = v.z;
    xa[(k0 + 3u) * 16u + r / 4u][r % 4u] = v.w;
}

fn put_wb(r: u32, k0: u32, v: vec4<f32>) {
    wb[k0 * 16u + r / 4u][r % 4u] = v.x;
    wb[(k0 + 1u) * 16u + r / 4u][r % 4u] = v.y;
    wb[(k0 + 2u) * 16u + r / 4u][r % 4u] = v.z;
    wb[(k0 + 3u) * 16u + r / 4u][r % 4u] = v.w;
}

#if GROUPED
// (count, offset) of the workgroup's expert, read once and shared uniformly.
var<workgroup> group_span: vec2<u32>;
#endif

@compute @workgroup_size(8, 8)
fn qmm_tiled(@builtin(workgroup_id) wg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let m0 = wg.y * 64u;
    let n0 = wg.x * 64u;
#if GROUPED
    let expert = p.row_start + wg.z;
    if (li == 0u) { group_span = vec2<u32>(ids[expert], ids[p.all_experts + expert]); }
    let span = workgroupUniformLoad(&group_span);
    let rows = span.x;
    if (m0 >= rows) { return; }
    let sorted = 2u * p.all_experts + span.y;
    let xr = ids[sorted + min(m0 + li, rows - 1u)] / p.n_ids;
    let wr = wg.z * p.n + min(n0 + li, p.n - 1u);
#else
    let rows = p.m;
    let xr = min(m0 + li, p.m - 1u);
    let wr = min(n0 + li, p.n - 1u);
#endif
    var acc: array<vec4<f32>, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = vec4<f32>(0.0); }
    let groups = p.k / 32u;
    for (var g = 0u; g < groups; g++) {
        let o = (xr * p.ldx) / 4u + g * 8u;
        for (var c = 0u; c < 8u; c++) { put_xa(li, 4u * c, xv(o + c)); }
        let w = decode(wr, g);
        let a = vec4<f32>(w.a_lo);
        let a2 = vec4<f32>(w.a_hi);
        let b = vec4<f32>(w.b);
        put_wb(li, 0u, fma(w.q0, a, b)); put_wb(li, 4u, fma(w.q1, a, b));
        put_wb(li, 8u, fma(w.q2, a, b)); put_wb(li, 12u, fma(w.q3, a, b));
        put_wb(li, 16u, fma(w.q4, a2, b)); put_wb(li, 20u, fma(w.q5, a2, b));
        put_wb(li, 24u, fma(w.q6, a2, b)); put_wb(li, 28u, fma(w.q7, a2, b));
        workgroupBarrier();
        for (var kk = 0u; kk < 32u; kk++) {
            let x0 = xa[kk * 16u + lid.y * 2u];
            let x1 = xa[kk * 16u + lid.y * 2u + 1u];
            let y0 = wb[kk * 16u + lid.x * 2u];
            let y1 = wb[kk * 16u + lid.x * 2u + 1u];
            acc[0] += x0.x * y0; acc[1] += x0.x * y1;
            acc[2] += x0.y * y0; acc[3] += x0.y * y1;
            acc[4] += x0.z * y0; acc[5] += x0.z * y1;
            acc[6] += x0.w * y0; acc[7] += x0.w * y1;
            acc[8] += x1.x * y0; acc[9] += x1.x * y1;
            acc[10] += x1.y * y0; acc[11] += x1.y * y1;
            acc[12] += x1.z * y0; acc[13] += x1.z * y1;
            acc[14] += x1.w * y0; acc[15] += x1.w * y1;
        }
        workgroupBarrier();
    }
    let r0 = m0 + lid.y * 8u;
    let c0 = n0 + lid.x * 8u;
    for (var i = 0u; i < 8u; i++) {
        let r = r0 + i;
        if (r >= rows) { break; }
#if GROUPED
        let out_row = ids[sorted + r];
#else
        let out_row = r;
#endif
        for (var j = 0u; j < 8u; j++) {
            let c = c0 + j;
            if (c < p.n) { put(out_row, c, acc[2u * i + j / 4u][j % 4u]); }
        }
    }
}

// Embedding rows: y[t][0..k] = dequantized row ids[t] for ids in row_start .. row_start + n
// (the rows this binding holds); one workgroup per (token, 64 groups). With TRANSPOSE the
// rows become columns: y[c][t] (stride ldy), the layout training's input gradient wants.
override TRANSPOSE: bool = false;

@compute @workgroup_size(64)
fn gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.y;
    let g = wg.x * 64u + li;
    let groups = p.k / 32u;
    if (t >= p.n_ids || g >= groups) { return; }
    let id = ids[t];
    if (id < p.row_start || id - p.row_start >= p.n) { return; }
    let w = decode(id - p.row_start, g);
    let base = t * p.ldy + g * 32u;
    let a = vec4<f32>(w.a_lo);
    let a2 = vec4<f32>(w.a_hi);
    let b = vec4<f32>(w.b);
    let vals = array<vec4<f32>, 8>(fma(w.q0, a, b), fma(w.q1, a, b), fma(w.q2, a, b), fma(w.q3, a, b),
                                   fma(w.q4, a2, b), fma(w.q5, a2, b), fma(w.q6, a2, b), fma(w.q7, a2, b));
    if (TRANSPOSE) {
        let col = g * 32u;
        for (var c = 0u; c < 8u; c++) {
            let r = (col + 4u * c) * p.ldy + t;
            y[r] = vals[c].x;
            y[r + p.ldy] = vals[c].y;
            y[r + 2u * p.ldy] = vals[c].z;
            y[r + 3u * p.ldy] = vals[c].w;
        }
        return;
    }
    for (var c = 0u; c < 8u; c++) {
        y[base + 4u * c] = vals[c].x;
        y[base + 4u * c + 1u] = vals[c].y;
        y[base + 4u * c + 2u] = vals[c].z;
        y[base + 4u * c + 3u] = vals[c].w;
    }
}
