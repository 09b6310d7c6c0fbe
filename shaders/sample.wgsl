// Token selection on the GPU, one workgroup per row of logits [rows][vocab]:
//
//   sample: per-row temperature, top-k, top-p, min-p and a uniform random number u
//           (drawn on the CPU from the sequence's seeded generator). Candidates are the
//           top K = min(top_k, 1024) logits, found exactly by a 4-pass radix select on
//           the float bits (ties broken by lower token id), sorted by a bitonic sort in
//           workgroup memory; then softmax over them, the top-p prefix, the min-p floor,
//           and the pick where the running sum passes u. Temperature <= 0 is greedy.
//   argmax: the first index of the largest logit.
//   nll:    per row, -log softmax(logits)[target] and the argmax (perplexity without
//           reading logits back).
// Repetition penalties are applied to the logits before, by `penalize`.

struct SampleParams {
    rows: u32,
    vocab: u32,
    ld: u32,
    _pad: u32,
}

// Per-row sampling settings.
struct RowParams {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    u: f32,
    penalty: f32,
    n_penalty: u32,
    penalty_off: u32,
}

@group(0) @binding(0) var<uniform> p: SampleParams;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> rows: array<RowParams>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
@group(0) @binding(4) var<storage, read> penalty_ids: array<u32>;
@group(0) @binding(5) var<storage, read> targets: array<u32>;
@group(0) @binding(6) var<storage, read_write> nll_out: array<vec2<f32>>;

const WG: u32 = 256u;
const KMAX: u32 = 1024u;

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> cnt_g: array<u32, WG>;
var<workgroup> cnt_e: array<u32, WG>;
var<workgroup> cv: array<f32, KMAX>;
var<workgroup> ci: array<u32, KMAX>;
var<workgroup> sh: array<u32, 4>;
var<workgroup> redf: array<f32, WG>;
var<workgroup> redu: array<u32, WG>;

// Sortable key: larger float -> larger key; NaN sorts lowest.
fn key_of(x: f32) -> u32 {
    if (x != x) { return 0u; }
    let b = bitcast<u32>(x);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn scaled(row: u32, i: u32, inv_t: f32) -> f32 {
    return logits[row * p.ld + i] * inv_t;
}

@compute @workgroup_size(WG)
fn sample(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wg.x;
    let rp = rows[row];
    let greedy = rp.temperature <= 0.0;
    let inv_t = select(1.0 / rp.temperature, 1.0, greedy);
    var k = KMAX;
    if (rp.top_k > 0u) { k = min(k, rp.top_k); }
    if (greedy) { k = 1u; }
    k = min(k, p.vocab);
    // Each invocation owns a contiguous slice, so slice order is token order.
    let per = (p.vocab + WG - 1u) / WG;
    let i0 = min(tid * per, p.vocab);
    let i1 = min(i0 + per, p.vocab);

    // Radix select of the k-th largest key, 8 bits per pass.
    var prefix = 0u;
    var mask = 0u;
    var remaining = k;
    for (var digit = 0u; digit < 4u; digit++) {
        let shift = 24u - 8u * digit;
        atomicStore(&hist[tid], 0u);
        workgroupBarrier();
        for (var i = i0; i < i1; i++) {
            let key = key_of(scaled(row, i, inv_t));
            if ((key & mask) == prefix) { atomicAdd(&hist[(key >> shift) & 255u], 1u); }
        }
        workgroupBarrier();
        if (tid == 0u) {
            var above = 0u;
            var d = 255u;
            loop {
                let c = atomicLoad(&hist[d]);
                if (above + c >= remaining || d == 0u) { break; }
                above += c;
                d -= 1u;
            }
            sh[0] = d;
            sh[1] = remaining - above;
        }
        workgroupBarrier();
        prefix |= sh[0] << shift;
        mask |= 255u << shift;
        remaining = sh[1];
        workgroupBarrier();
    }
    // prefix is the k-th largest key; `remaining` of the keys equal to it are taken.
    var ng = 0u;
    var ne = 0u;
    for (var i = i0; i < i1; i++) {
        let key = key_of(scaled(row, i, inv_t));
        ng += u32(key > prefix);
        ne += u32(key == prefix);
    }
    cnt_g[tid] = ng;
    cnt_e[tid] = ne;
    workgroupBarrier();
    if (tid == 0u) {
        var sg = 0u;
        var se = 0u;
        for (var t = 0u; t < WG; t++) {
            let a = cnt_g[t];
            let b = cnt_e[t];
            cnt_g[t] = sg;
            cnt_e[t] = se;
            sg += a;
            se += b;
        }
        sh[2] = sg;
    }
    workgroupBarrier();
    let n_greater = sh[2];
    var pg = cnt_g[tid];
    var pe = n_greater + cnt_e[tid];
    for (var i = i0; i < i1; i++) {
        let v0 = scaled(row, i, inv_t);
        let v = select(v0, -3.4028234e38, v0 != v0);
        let key = key_of(v0);
        if (key > prefix) {
            cv[pg] = v;
            ci[pg] = i;
            pg += 1u;
        } else if (key == prefix) {
            if (pe < k) {
                cv[pe] = v;
                ci[pe] = i;
            }
            pe += 1u;
        }
    }
    // Pad to a power of two and sort by (value desc, id asc).
    var n = 1u;
    while (n < k) { n <<= 1u; }
    for (var i = k + tid; i < n; i += WG) {
        cv[i] = -3.4028234e38;
        ci[i] = 0xFFFFFFFFu;
    }
    workgroupBarrier();
    for (var size = 2u; size <= n; size <<= 1u) {
        for (var stride = size / 2u; stride > 0u; stride >>= 1u) {
            for (var t = tid; t < n / 2u; t += WG) {
                let lo = 2u * stride * (t / stride) + t % stride;
                let hi = lo + stride;
                let desc = (lo & size) == 0u;
                let a_first = cv[lo] > cv[hi] || (cv[lo] == cv[hi] && ci[lo] < ci[hi]);
                if (a_first != desc) {
                    let tv = cv[lo]; cv[lo] = cv[hi]; cv[hi] = tv;
                    let ti = ci[lo]; ci[lo] = ci[hi]; ci[hi] = ti;
                }
            }
            workgroupBarrier();
        }
    }
    if (tid == 0u) {
        var pick = ci[0];
        if (!greedy) {
            let top = cv[0];
            var total = 0.0;
            for (var i = 0u; i < k; i++) { total += exp(cv[i] - top); }
            // top-p: the shortest prefix whose mass reaches top_p (at least one token).
            var keep = k;
            if (rp.top_p < 1.0) {
                var cum = 0.0;
                for (var i = 0u; i < k; i++) {
                    cum += exp(cv[i] - top);
                    if (cum >= rp.top_p * total) { keep = i + 1u; break; }
                }
            }
            // min-p: drop tokens below min_p times the top probability.
            if (rp.min_p > 0.0) {
                var i = 1u;
                while (i < keep && exp(cv[i] - top) >= rp.min_p) { i += 1u; }
                keep = i;
            }
            var kept = 0.0;
            for (var i = 0u; i < keep; i++) { kept += exp(cv[i] - top); }
            let goal = rp.u * kept;
            var cum = 0.0;
            pick = ci[keep - 1u];
            for (var i = 0u; i < keep; i++) {
                cum += exp(cv[i] - top);
                if (cum > goal) { pick = ci[i]; break; }
            }
        }
        out[row] = pick;
    }
}

// Repetition penalty (CTRL / llama.cpp style) on the distinct ids of each row's list.
@compute @workgroup_size(64)
fn penalize(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wg.x;
    let rp = rows[row];
    for (var j = tid; j < rp.n_penalty; j += 64u) {
        let id = penalty_ids[rp.penalty_off + j];
        if (id < p.vocab) {
            let i = row * p.ld + id;
            let x = logits[i];
            logits[i] = select(x * rp.penalty, x / rp.penalty, x > 0.0);
        }
    }
}

fn reduce_f(tid: u32, v: f32, is_max: bool) -> f32 {
    redf[tid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w >>= 1u) {
        if (tid < w) {
            redf[tid] = select(redf[tid] + redf[tid + w], max(redf[tid], redf[tid + w]), is_max);
        }
        workgroupBarrier();
    }
    let r = redf[0];
    workgroupBarrier();
    return r;
}

// First index of the row maximum: (max, index) reduction.
fn row_argmax(row: u32, tid: u32) -> u32 {
    var best = -3.4028234e38;
    var bi = 0xFFFFFFFFu;
    for (var i = tid; i < p.vocab; i += WG) {
        let x = logits[row * p.ld + i];
        if (x > best || (x == best && i < bi)) { best = x; bi = i; }
    }
    redf[tid] = best;
    redu[tid] = bi;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w >>= 1u) {
        if (tid < w) {
            let ob = redf[tid + w];
            let oi = redu[tid + w];
            if (ob > redf[tid] || (ob == redf[tid] && oi < redu[tid])) {
                redf[tid] = ob;
                redu[tid] = oi;
            }
        }
        workgroupBarrier();
    }
    let r = redu[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn argmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wg.x;
    let r = row_argmax(row, tid);
    if (tid == 0u) { out[row] = r; }
}

@compute @workgroup_size(WG)
fn nll(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wg.x;
    let am = row_argmax(row, tid);
    let m = logits[row * p.ld + am];
    var s = 0.0;
    for (var i = tid; i < p.vocab; i += WG) { s += exp(logits[row * p.ld + i] - m); }
    let tot = reduce_f(tid, s, false);
    if (tid == 0u) {
        let t = min(targets[row], p.vocab - 1u);
        nll_out[row] = vec2<f32>(log(tot) + m - logits[row * p.ld + t], bitcast<f32>(am));
    }
}
