// Kernels of the training path (backward passes, loss, optimizer). Each has a CPU reference
// and a finite-difference gradient test in runtime/src/kernels/train.rs.
//
//   rmsnorm_backward  dx (+)= d/dx RMSNorm(x) . dy           (weight frozen)
//   swiglu_backward   dgu = d/dgu [silu(gate) * up] . da
//   softmax_ranges    P = softmax over keys [start, end) of each row (masked elsewhere to 0)
//   softmax_backward  dS = P * (dP - sum(P * dP)), in place over dP
//   xent              per row: loss = w * (logsumexp - logit[target]); dlogits = w * (softmax - onehot)
//   xent_distill      xent, or per marked row KL(teacher || softmax) and its gradient (distillation)
//   rows_accumulate   dst[map[r]] += src[r] for rows with a destination
//   rows_gather       dst[r] = src[map[r]] for rows with a source
//   fill              dst[..n] = value
//   sumsq_partial / sumsq_final   sum of squares of a vector (global gradient norm)
//   adamw             torch's AdamW (decoupled weight decay, bias correction) with optional
//                     clipping by the global norm; a non-finite norm skips the update

struct TrainParams {
    rows: u32,
    cols: u32,
    ld: u32,
    ld2: u32,
    eps: f32,
    accumulate: u32,
    q_rows: u32,
    n: u32,
    off_src: u32,
    off_dst: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: TrainParams;
@group(0) @binding(1) var<storage, read> xin: array<f32>;
@group(0) @binding(2) var<storage, read> win: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

var<workgroup> red: array<f32, 64>;

fn wg_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (li < s) { red[li] += red[li + s]; }
        workgroupBarrier();
    }
    let t = red[0];
    workgroupBarrier();
    return t;
}

// One workgroup per row. x: [rows][cols] (row stride ld), w: [cols], dy: [rows][ld2],
// dx: [rows][ld2] (+= with accumulate).
@compute @workgroup_size(64)
fn rmsnorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) { return; }
    let xb = row * p.ld;
    let db = row * p.ld2;
    var ss = 0.0;
    for (var c = li; c < p.cols; c += 64u) { ss += xin[xb + c] * xin[xb + c]; }
    let n = f32(p.cols);
    let r = 1.0 / sqrt(wg_sum(li, ss) / n + p.eps);
    // mean over columns of (w * dy) * xhat
    var gx = 0.0;
    for (var c = li; c < p.cols; c += 64u) { gx += win[c] * dy[db + c] * xin[xb + c] * r; }
    let m = wg_sum(li, gx) / n;
    for (var c = li; c < p.cols; c += 64u) {
        let g = r * (win[c] * dy[db + c] - xin[xb + c] * r * m);
        if (p.accumulate != 0u) { dx[db + c] += g; } else { dx[db + c] = g; }
    }
}

// gu: [rows][2 * cols] (gate | up), da: [rows][cols], dgu: [rows][2 * cols].
@compute @workgroup_size(64)
fn swiglu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.rows * p.cols) { return; }
    let r = i / p.cols;
    let j = i % p.cols;
    let g = xin[r * 2u * p.cols + j];
    let u = xin[r * 2u * p.cols + p.cols + j];
    let d = dy[i];
    let s = 1.0 / (1.0 + exp(-g));
    dx[r * 2u * p.cols + j] = d * u * s * (1.0 + g * (1.0 - s));
    dx[r * 2u * p.cols + p.cols + j] = d * g * s;
}

// ---- attention pieces over score rows [rows = heads * q_rows][ld] ----

@group(0) @binding(5) var<storage, read_write> s4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> ranges: array<vec2<u32>>;
@group(0) @binding(7) var<storage, read> p4: array<vec4<f32>>;

// One invocation per row; row r is query r % q_rows, keys [ranges[q].x, ranges[q].y) kept.
@compute @workgroup_size(64)
fn softmax_ranges(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 64u;
    if (row >= p.rows) { return; }
    let rg = ranges[row % p.q_rows];
    let b = row * (p.ld / 4u);
    let n4 = (p.cols + 3u) / 4u;
    let lane = vec4<u32>(0u, 1u, 2u, 3u);
    var mx = -3.0e38;
    for (var c = 0u; c < n4; c++) {
        let j = lane + 4u * c;
        let keep = (j >= vec4<u32>(rg.x)) & (j < vec4<u32>(rg.y));
        let v = select(vec4<f32>(-3.0e38), s4[b + c], keep);
        mx = max(mx, max(max(v.x, v.y), max(v.z, v.w)));
    }
    var sum = 0.0;
    for (var c = 0u; c < n4; c++) {
        let j = lane + 4u * c;
        let keep = (j >= vec4<u32>(rg.x)) & (j < vec4<u32>(rg.y));
        let e = select(vec4<f32>(0.0), exp(s4[b + c] - mx), keep);
        s4[b + c] = e;
        sum += (e.x + e.y) + (e.z + e.w);
    }
    let inv = select(0.0, 1.0 / sum, sum > 0.0);
    for (var c = 0u; c < n4; c++) { s4[b + c] *= inv; }
}

// dS = P * (dP - sum_j P_j dP_j), written over dP (s4); P in p4. One invocation per row.
@compute @workgroup_size(64)
fn softmax_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 64u;
    if (row >= p.rows) { return; }
    let b = row * (p.ld / 4u);
    let n4 = p.ld / 4u;
    var d = 0.0;
    for (var c = 0u; c < n4; c++) { d += dot(p4[b + c], s4[b + c]); }
    for (var c = 0u; c < n4; c++) { s4[b + c] = p4[b + c] * (s4[b + c] - vec4<f32>(d)); }
}

// ---- loss ----

@group(0) @binding(8) var<storage, read> targets: array<u32>;
@group(0) @binding(9) var<storage, read> weights: array<f32>;
@group(0) @binding(10) var<storage, read_write> loss: array<f32>;

fn wg_max(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (li < s) { red[li] = max(red[li], red[li + s]); }
        workgroupBarrier();
    }
    let t = red[0];
    workgroupBarrier();
    return t;
}

// Log-sum-exp of row `b` of the logits (dx), reduced over the workgroup.
fn lse_logits(b: u32, li: u32) -> f32 {
    var mx = -3.0e38;
    for (var c = li; c < p.cols; c += 64u) { mx = max(mx, dx[b + c]); }
    mx = wg_max(li, mx);
    var se = 0.0;
    for (var c = li; c < p.cols; c += 64u) { se += exp(dx[b + c] - mx); }
    return mx + log(wg_sum(li, se));
}

// Log-sum-exp of row `b` of a teacher's logits (xin).
fn lse_teacher(b: u32, li: u32) -> f32 {
    var mx = -3.0e38;
    for (var c = li; c < p.cols; c += 64u) { mx = max(mx, xin[b + c]); }
    mx = wg_max(li, mx);
    var se = 0.0;
    for (var c = li; c < p.cols; c += 64u) { se += exp(xin[b + c] - mx); }
    return mx + log(wg_sum(li, se));
}

// Row `row` (at `b`) of an ignored target: zero gradient and loss.
fn ignore_row(row: u32, b: u32, li: u32) {
    for (var c = li; c < p.cols; c += 64u) { dx[b + c] = 0.0; }
    if (li == 0u) { loss[row] = 0.0; }
}

// Row `row` (at `b`) with target `t` < cols: cross-entropy and its gradient, in place.
fn ce_row(row: u32, b: u32, li: u32, t: u32, w: f32) {
    let lse = lse_logits(b, li);
    let target_logit = dx[b + t];
    workgroupBarrier();
    for (var c = li; c < p.cols; c += 64u) {
        dx[b + c] = w * (exp(dx[b + c] - lse) - select(0.0, 1.0, c == t));
    }
    if (li == 0u) { loss[row] = w * (lse - target_logit); }
}

// One workgroup per row of logits [rows][cols] (stride ld), in place: logits become dlogits.
// A row whose target is 0xFFFFFFFF (ignored) gets zero gradient and zero loss.
@compute @workgroup_size(64)
fn xent(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) { return; }
    let t = targets[row];
    if (t >= p.cols) {
        ignore_row(row, row * p.ld, li);
    } else {
        ce_row(row, row * p.ld, li, t, weights[row]);
    }
}

// xent where a row may instead be distilled from a teacher's logits (xin, same layout):
// target 0xFFFFFFFE means loss = w * KL(P_teacher || softmax(logits)) and
// dlogits = w * (softmax(logits) - P_teacher). Other targets as in xent.
@compute @workgroup_size(64)
fn xent_distill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) { return; }
    let b = row * p.ld;
    let t = targets[row];
    let w = weights[row];
    if (t < p.cols) {
        ce_row(row, b, li, t, w);
        return;
    }
    if (t != 0xFFFFFFFEu) {
        ignore_row(row, b, li);
        return;
    }
    let lse = lse_logits(b, li);
    let lse_t = lse_teacher(b, li);
    var kl = 0.0;
    for (var c = li; c < p.cols; c += 64u) {
        let lp = xin[b + c] - lse_t;
        let lq = dx[b + c] - lse;
        let pt = exp(lp);
        kl += pt * (lp - lq);
        dx[b + c] = w * (exp(lq) - pt);
    }
    let total = wg_sum(li, kl);
    if (li == 0u) { loss[row] = w * total; }
}

// ---- rows_accumulate: dst[map[r]][0..cols] += src[r][0..cols]; one invocation per column,
// looping over the rows in order (no races, deterministic). ----

@group(0) @binding(11) var<storage, read> row_map: array<u32>;

@compute @workgroup_size(64)
fn rows_accumulate(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.cols) { return; }
    for (var r = 0u; r < p.rows; r++) {
        let d = row_map[r];
        if (d != 0xFFFFFFFFu) { dx[p.off_dst + d * p.ld2 + c] += dy[p.off_src + r * p.ld + c]; }
    }
}

// ---- rows_gather: dst[r][0..cols] = src[map[r]][0..cols] (rows mapped to 0xFFFFFFFF kept) ----

@compute @workgroup_size(64)
fn rows_gather(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let r = gid.y;
    if (c >= p.cols || r >= p.rows) { return; }
    let s = row_map[r];
    if (s != 0xFFFFFFFFu) { dx[p.off_dst + r * p.ld2 + c] = dy[p.off_src + s * p.ld + c]; }
}

// ---- fill: dst[0..n] = value (p.eps) ----

@compute @workgroup_size(64)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i < p.n) { dx[i] = p.eps; }
}

// ---- global norm: sumsq_partial writes one partial sum per workgroup of 256 elements x 16,
// sumsq_final adds the partials (deterministic order). ----

var<workgroup> red256: array<f32, 256>;

@compute @workgroup_size(256)
fn sumsq_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = wg.x * 4096u;
    var s = 0.0;
    for (var k = 0u; k < 16u; k++) {
        let i = base + k * 256u + li;
        if (i < p.n) { s += dy[i] * dy[i]; }
    }
    red256[li] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) { red256[li] += red256[li + w]; }
        workgroupBarrier();
    }
    if (li == 0u) { dx[wg.x] = red256[0]; }
}

@compute @workgroup_size(256)
fn sumsq_final(@builtin(local_invocation_index) li: u32) {
    var s = 0.0;
    for (var i = li; i < p.rows; i += 256u) { s += dy[i]; }
    red256[li] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) { red256[li] += red256[li + w]; }
        workgroupBarrier();
    }
    if (li == 0u) { dx[0] = sqrt(red256[0]); }
}

// ---- AdamW ----

struct AdamParams {
    n: u32,
    clip: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2_sqrt: f32,
    max_norm: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(12) var<uniform> ap: AdamParams;
@group(0) @binding(13) var<storage, read_write> param: array<f32>;
@group(0) @binding(14) var<storage, read_write> grad: array<f32>;
@group(0) @binding(15) var<storage, read_write> m1: array<f32>;
@group(0) @binding(16) var<storage, read_write> m2: array<f32>;
@group(0) @binding(17) var<storage, read> gnorm: array<f32>;

@compute @workgroup_size(64)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= ap.n) { return; }
    let norm = gnorm[0];
    // A NaN or infinite gradient skips the whole step (every invocation sees the same norm).
    if (!(norm <= 3.4e38)) { return; }
    var g = grad[i];
    if (ap.clip != 0u) {
        let coef = ap.max_norm / (norm + 1e-6);
        if (coef < 1.0) { g *= coef; }
    }
    var w = param[i] * (1.0 - ap.lr * ap.weight_decay);
    let m = ap.beta1 * m1[i] + (1.0 - ap.beta1) * g;
    let v = ap.beta2 * m2[i] + (1.0 - ap.beta2) * g * g;
    m1[i] = m;
    m2[i] = v;
    let denom = sqrt(v) / ap.bc2_sqrt + ap.eps;
    w -= (ap.lr / ap.bc1) * m / denom;
    param[i] = w;
}
