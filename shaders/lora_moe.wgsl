// Training kernels of a mixture of LoRA experts on one adapted layer: E experts of rank r,
// stacked (A [E r][in], B [out][E r]), and a router R [E][in]. Forward per row:
//   z = R x (a matmul), route: p = softmax(z), S = the top-k of z (ties: lower index),
//   g_e = softmax of z over S (renormalize) or p_e (not), for e in S; 0 elsewhere;
//   t = A x (a matmul), gate: u[c] = g[c / r] * t[c]; y += s u B^T (a matmul).
// Backward per row, du = s dY B (a matmul) on entry:
//   gate_backward: dg_e = sum over expert e's columns of du * t; du[c] *= g[c / r] (now dt)
//   aux_stats (once per block, after the forward): per expert, the block's load
//     f_e = (tokens choosing e) / (k * tokens) and the Switch Transformer loss term
//     aux_w * f_e * sum_rows w * p_e (aux_w = alpha * E, w = 1 / tokens of the step on
//     token rows, 0 on padding and virtual rows), and the z-loss z_w * sum_rows w * lse(z)^2;
//     loss terms and choice counts accumulate (over the step's blocks) at slot `slot`.
//   router_backward: dz over dg in place: the gates' Jacobian, plus the load-balancing
//     term through p (f held constant, as Switch does), plus the z-loss term.
//
//   z, g, pr, dg: [rows][E] f32; sel: [rows] u32 bit mask of S (experts 0..31; a chosen
//   expert is one whose gate is not 0); t, u: [rows][E r] f32; w: [rows] f32; f: [E] f32;
//   counts: [slots][E] u32; loss: [slots][E + 1] f32. E <= 256 (32 with aux_stats).
//
// The same route and router backward serve a frozen Mixture-of-Experts base's own router
// in training (rank unused, no auxiliary loss), with two helpers for its experts, computed
// one expert e (`slot`) at a time over every row:
//   rows_dot:   dg[row][slot] = sum over `rank` columns of t[row][c] * u[row][c]
//   rows_scale: u[row][c] = g[row][slot] * t[row][c]
// and, for a shared expert's sigmoid gate (E = 1), sigmoid_backward: dg *= g (1 - g).

struct MixParams {
    rows: u32,
    n_experts: u32,
    top_k: u32,
    renorm: u32,
    rank: u32,
    slot: u32,
    aux_w: f32,
    z_w: f32,
}

@group(0) @binding(0) var<uniform> p: MixParams;
@group(0) @binding(1) var<storage, read> z: array<f32>;
@group(0) @binding(2) var<storage, read_write> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> pr: array<f32>;
@group(0) @binding(4) var<storage, read_write> sel: array<u32>;
@group(0) @binding(5) var<storage, read> t: array<f32>;
@group(0) @binding(6) var<storage, read_write> u: array<f32>;
@group(0) @binding(7) var<storage, read_write> dg: array<f32>;
@group(0) @binding(8) var<storage, read> w: array<f32>;
@group(0) @binding(9) var<storage, read_write> f: array<f32>;
@group(0) @binding(10) var<storage, read_write> counts: array<u32>;
@group(0) @binding(11) var<storage, read_write> loss: array<f32>;

fn row_max(b: u32) -> f32 {
    var mx = -3.4e38;
    for (var e = 0u; e < p.n_experts; e++) { mx = max(mx, z[b + e]); }
    return mx;
}

// One invocation per row.
@compute @workgroup_size(64)
fn mix_route(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    if (row >= p.rows) { return; }
    let b = row * p.n_experts;
    let mx = row_max(b);
    var sum = 0.0;
    for (var e = 0u; e < p.n_experts; e++) { sum += exp(z[b + e] - mx); }
    // g marks the chosen experts (1) while choosing.
    for (var e = 0u; e < p.n_experts; e++) { g[b + e] = 0.0; }
    var mask = 0u;
    var ssum = 0.0;
    for (var j = 0u; j < p.top_k; j++) {
        var best = 0u;
        var best_v = -3.4e38;
        var found = false;
        for (var e = 0u; e < p.n_experts; e++) {
            if (g[b + e] == 0.0 && (!found || z[b + e] > best_v)) {
                best = e;
                best_v = z[b + e];
                found = true;
            }
        }
        g[b + best] = 1.0;
        if (best < 32u) { mask |= 1u << best; }
        ssum += exp(best_v - mx);
    }
    sel[row] = mask;
    for (var e = 0u; e < p.n_experts; e++) {
        let x = exp(z[b + e] - mx);
        pr[b + e] = x / sum;
        var gv = 0.0;
        if (g[b + e] != 0.0) {
            if (p.renorm != 0u) { gv = x / ssum; } else { gv = x / sum; }
        }
        g[b + e] = gv;
    }
}

// One invocation per element of u.
@compute @workgroup_size(64)
fn mix_gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    let width = p.n_experts * p.rank;
    if (i >= p.rows * width) { return; }
    let row = i / width;
    let e = (i % width) / p.rank;
    u[i] = t[i] * g[row * p.n_experts + e];
}

// One invocation per (row, expert); u holds du on entry and dt on exit.
@compute @workgroup_size(64)
fn mix_gate_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.rows * p.n_experts) { return; }
    let row = i / p.n_experts;
    let e = i % p.n_experts;
    let base = row * p.n_experts * p.rank + e * p.rank;
    let ge = g[i];
    var s = 0.0;
    for (var j = 0u; j < p.rank; j++) {
        let d = u[base + j];
        s += d * t[base + j];
        u[base + j] = d * ge;
    }
    dg[i] = s;
}

var<workgroup> red: array<f32, 64>;
var<workgroup> redc: array<u32, 64>;
var<workgroup> redt: array<u32, 64>;

// Workgroup e < E: expert e's load and loss term; workgroup E: the z-loss.
@compute @workgroup_size(64)
fn mix_aux_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = wg.x;
    var ps = 0.0;
    var cnt = 0u;
    var tok = 0u;
    for (var row = li; row < p.rows; row += 64u) {
        let wr = w[row];
        if (wr <= 0.0) { continue; }
        tok += 1u;
        let b = row * p.n_experts;
        if (e < p.n_experts) {
            ps += wr * pr[b + e];
            cnt += (sel[row] >> e) & 1u;
        } else {
            let mx = row_max(b);
            var sum = 0.0;
            for (var k = 0u; k < p.n_experts; k++) { sum += exp(z[b + k] - mx); }
            let lse = mx + log(sum);
            ps += wr * lse * lse;
        }
    }
    red[li] = ps;
    redc[li] = cnt;
    redt[li] = tok;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] += red[li + s];
            redc[li] += redc[li + s];
            redt[li] += redt[li + s];
        }
        workgroupBarrier();
    }
    if (li != 0u) { return; }
    let lo = p.slot * (p.n_experts + 1u) + e;
    if (e < p.n_experts) {
        var fe = 0.0;
        if (redt[0] > 0u) { fe = f32(redc[0]) / f32(p.top_k * redt[0]); }
        f[e] = fe;
        loss[lo] += p.aux_w * fe * red[0];
        counts[p.slot * p.n_experts + e] += redc[0];
    } else {
        loss[lo] += p.z_w * red[0];
    }
}

// One invocation per row: dg (dL/dg) in, dL/dz out, in place.
@compute @workgroup_size(64)
fn mix_router_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    if (row >= p.rows) { return; }
    let b = row * p.n_experts;
    let wr = w[row];
    // Sums over the chosen experts (gates' Jacobian) and over all (load term).
    var sg = 0.0;
    var sa = 0.0;
    for (var e = 0u; e < p.n_experts; e++) {
        let on = g[b + e] > 0.0;
        if (on) {
            if (p.renorm != 0u) { sg += g[b + e] * dg[b + e]; } else { sg += pr[b + e] * dg[b + e]; }
        }
        sa += pr[b + e] * f[e];
    }
    var lse = 0.0;
    if (p.z_w != 0.0 && wr > 0.0) {
        let mx = row_max(b);
        var sum = 0.0;
        for (var e = 0u; e < p.n_experts; e++) { sum += exp(z[b + e] - mx); }
        lse = mx + log(sum);
    }
    for (var e = 0u; e < p.n_experts; e++) {
        let on = g[b + e] > 0.0;
        let pe = pr[b + e];
        var d = 0.0;
        if (p.renorm != 0u) {
            if (on) { d = g[b + e] * (dg[b + e] - sg); }
        } else {
            var de = 0.0;
            if (on) { de = dg[b + e]; }
            d = pe * (de - sg);
        }
        d += p.aux_w * wr * pe * (f[e] - sa);
        d += 2.0 * p.z_w * wr * lse * pe;
        dg[b + e] = d;
    }
}

// One invocation per row.
@compute @workgroup_size(64)
fn mix_rows_dot(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    if (row >= p.rows) { return; }
    let base = row * p.rank;
    var s = 0.0;
    for (var c = 0u; c < p.rank; c++) { s += t[base + c] * u[base + c]; }
    dg[row * p.n_experts + p.slot] = s;
}

// One invocation per element.
@compute @workgroup_size(64)
fn mix_rows_scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.rows * p.rank) { return; }
    u[i] = g[(i / p.rank) * p.n_experts + p.slot] * t[i];
}

// One invocation per row (one gate per row): dg = dL/dsigma in, dL/dlogit out, with g the
// sigmoid (a shared expert's gate).
@compute @workgroup_size(64)
fn mix_sigmoid_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    if (row >= p.rows) { return; }
    let s = g[row];
    dg[row] = dg[row] * s * (1.0 - s);
}
