// Causal attention over a key/value cache with grouped-query heads.
//
//   q:    [tokens][q_ld] f32; query head h of token t at t * q_ld + q_off + h * HD
//   k, v: [slots][kv_ld] f32 caches of one layer; kv head g of slot s at s * kv_ld + g * HD
//   ranges: [tokens] vec2<u32>(first slot, number of slots) that token t attends to (its
//         sequence's cache, up to and including its own position)
//   o:    [tokens][o_ld] f32; head h at t * o_ld + h * HD
// GROUP query heads share one kv head (head h uses kv head h / GROUP).
//
// attn_decode: one workgroup per (kv head, token) computes its GROUP query heads with an
//   online softmax over blocks of 64 keys: invocation j scores key j of the block against
//   all GROUP heads (one pass over the key row), then invocations own 4 value dimensions
//   and split the block's keys. Any mix of tokens works (decode steps of many sequences,
//   or prefill tokens); long prefills use the matmul path below instead.
// softmax_masked / softmax_rows: the softmax of the matmul prefill path, S[h][t][j] -> P
//   (rows of s_ld, a multiple of 4), with keys at and past lens[t] masked out; one
//   workgroup per row (GPUs) or one invocation per row with vec4 loads and no barriers
//   (CPU-like devices, where workgroup reductions cost more than the row itself).

struct AttnParams {
    n_tokens: u32,
    n_heads: u32,
    q_ld: u32,
    q_off: u32,
    kv_ld: u32,
    o_ld: u32,
    scale: f32,
    rows: u32,
    cols: u32,
    q_tokens: u32,
    s_ld: u32,
    _pad1: u32,
}

override HD: u32 = 64u;
override GROUP: u32 = 1u;

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> ranges: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read_write> o: array<vec4<f32>>;

const BK: u32 = 64u;
const GMAX: u32 = 8u;
override HD4: u32 = HD / 4u;
// Invocations per value row (4 dims each) and key groups splitting a block.
override DV: u32 = HD / 4u;
override KG: u32 = 64u / (HD / 4u);

var<workgroup> q_s: array<vec4<f32>, 512>;   // [GROUP][HD4], reused to combine key groups
var<workgroup> sc: array<f32, 512>;          // [GROUP][BK] scores, then probabilities
var<workgroup> red: array<f32, 512>;         // [GROUP][BK] reductions

fn reduce_rows(j: u32, is_max: bool) {
    for (var w = BK / 2u; w > 0u; w >>= 1u) {
        if (j < w) {
            for (var h = 0u; h < GROUP; h++) {
                let a = red[h * BK + j];
                let b = red[h * BK + j + w];
                red[h * BK + j] = select(a + b, max(a, b), is_max);
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(64)
fn attn_decode(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) j: u32) {
    let g = wg.x;
    let t = wg.y;
    let mt = ranges[t];
    let base = mt.x;
    let len = mt.y;
    // Queries of this group into workgroup memory.
    for (var e = j; e < GROUP * HD4; e += 64u) {
        let h = g * GROUP + e / HD4;
        q_s[e] = q[(t * p.q_ld + p.q_off + h * HD) / 4u + e % HD4];
    }
    var m: array<f32, GMAX>;
    var l: array<f32, GMAX>;
    var acc: array<vec4<f32>, GMAX>;
    for (var h = 0u; h < GROUP; h++) {
        m[h] = -3.0e38;
        l[h] = 0.0;
        acc[h] = vec4<f32>(0.0);
    }
    workgroupBarrier();
    let kg = j / DV;
    let dv = j % DV;
    let n_blocks = (len + BK - 1u) / BK;
    for (var blk = 0u; blk < n_blocks; blk++) {
        // Scores: invocation j takes key blk * BK + j.
        let key = blk * BK + j;
        let valid = key < len;
        var s: array<f32, GMAX>;
        for (var h = 0u; h < GROUP; h++) { s[h] = 0.0; }
        if (valid) {
            let kb = ((base + key) * p.kv_ld + g * HD) / 4u;
            for (var d = 0u; d < HD4; d++) {
                let kv = k[kb + d];
                for (var h = 0u; h < GROUP; h++) { s[h] += dot(q_s[h * HD4 + d], kv); }
            }
        }
        for (var h = 0u; h < GROUP; h++) {
            let sv = select(-3.0e38, s[h] * p.scale, valid);
            sc[h * BK + j] = sv;
            red[h * BK + j] = sv;
        }
        workgroupBarrier();
        reduce_rows(j, true);
        var alpha: array<f32, GMAX>;
        for (var h = 0u; h < GROUP; h++) {
            let m_new = max(m[h], red[h * BK]);
            alpha[h] = exp(m[h] - m_new);
            m[h] = m_new;
        }
        workgroupBarrier();
        for (var h = 0u; h < GROUP; h++) {
            let pj = select(0.0, exp(sc[h * BK + j] - m[h]), valid);
            sc[h * BK + j] = pj;
            red[h * BK + j] = pj;
        }
        workgroupBarrier();
        reduce_rows(j, false);
        for (var h = 0u; h < GROUP; h++) {
            l[h] = l[h] * alpha[h] + red[h * BK];
            acc[h] *= alpha[h];
        }
        // Values: invocation (kg, dv) adds keys kg, kg + KG, ... of the block.
        if (kg < KG) {
            let kend = min(BK, len - blk * BK);
            for (var kk = kg; kk < kend; kk += KG) {
                let vv = v[((base + blk * BK + kk) * p.kv_ld + g * HD) / 4u + dv];
                for (var h = 0u; h < GROUP; h++) { acc[h] += sc[h * BK + kk] * vv; }
            }
        }
        workgroupBarrier();
    }
    // Combine the key groups' partial sums.
    if (kg < KG) {
        for (var h = 0u; h < GROUP; h++) { q_s[(kg * GROUP + h) * DV + dv] = acc[h]; }
    }
    workgroupBarrier();
    if (kg == 0u) {
        for (var h = 0u; h < GROUP; h++) {
            var tot = vec4<f32>(0.0);
            for (var c = 0u; c < KG; c++) { tot += q_s[(c * GROUP + h) * DV + dv]; }
            let inv = select(0.0, 1.0 / l[h], l[h] > 0.0);
            o[(t * p.o_ld + (g * GROUP + h) * HD) / 4u + dv] = tot * inv;
        }
    }
}

// ---- matmul prefill path: masked softmax over S[rows = heads * q_tokens][cols] ----

@group(0) @binding(6) var<storage, read_write> s_mat: array<f32>;
@group(0) @binding(7) var<storage, read> lens: array<u32>;
@group(0) @binding(8) var<storage, read_write> s_mat4: array<vec4<f32>>;

var<workgroup> red1: array<f32, 64>;

fn reduce1(li: u32, x: f32, is_max: bool) -> f32 {
    red1[li] = x;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if (li < w) {
            red1[li] = select(red1[li] + red1[li + w], max(red1[li], red1[li + w]), is_max);
        }
        workgroupBarrier();
    }
    let r = red1[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn softmax_masked(@builtin(workgroup_id) wg: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) { return; }
    let valid = min(lens[row % p.q_tokens], p.cols);
    let b = row * p.s_ld;
    var mx = -3.0e38;
    for (var c = li; c < valid; c += 64u) { mx = max(mx, s_mat[b + c]); }
    mx = reduce1(li, mx, true);
    var sum = 0.0;
    for (var c = li; c < p.cols; c += 64u) {
        var e = 0.0;
        if (c < valid) { e = exp(s_mat[b + c] - mx); }
        s_mat[b + c] = e;
        sum += e;
    }
    let tot = reduce1(li, sum, false);
    let inv = select(0.0, 1.0 / tot, tot > 0.0);
    for (var c = li; c < valid; c += 64u) { s_mat[b + c] *= inv; }
}

@compute @workgroup_size(64)
fn softmax_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 64u;
    if (row >= p.rows) { return; }
    let valid = min(lens[row % p.q_tokens], p.cols);
    let b = row * (p.s_ld / 4u);
    let n4 = (p.cols + 3u) / 4u;
    let lane = vec4<u32>(0u, 1u, 2u, 3u);
    var mx = -3.0e38;
    for (var c = 0u; c < n4; c++) {
        let keep = (lane + 4u * c) < vec4<u32>(valid);
        let v = select(vec4<f32>(-3.0e38), s_mat4[b + c], keep);
        mx = max(mx, max(max(v.x, v.y), max(v.z, v.w)));
    }
    var sum = 0.0;
    for (var c = 0u; c < n4; c++) {
        let keep = (lane + 4u * c) < vec4<u32>(valid);
        let e = select(vec4<f32>(0.0), exp(s_mat4[b + c] - mx), keep);
        s_mat4[b + c] = e;
        sum += (e.x + e.y) + (e.z + e.w);
    }
    let inv = select(0.0, 1.0 / sum, sum > 0.0);
    for (var c = 0u; c < n4; c++) {
        s_mat4[b + c] *= inv;
    }
}
