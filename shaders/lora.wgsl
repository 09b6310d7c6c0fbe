// LoRA for many adapters in one batch: each activation row picks its adapter (or none)
// through `row_ad`, so sequences with different adapters share one forward pass.
//
//   x:        [rows][ldx] f32 input of the adapted linear layer, from element x_off
//   a_all:    every adapter's A matrices, A_k at table[k].x: [rank_k][in_dim]
//   b_all:    every adapter's B matrices, B_k at table[k].y: [out_dim][rank_k]
//   table:    [adapters] vec4<u32>(a_off, b_off, rank, scale as f32 bits)
//   row_ad:   [rows] u32 adapter of each row (0xFFFFFFFF: none)
//   row_scale:[rows] f32 extra scale of each row (per-sequence adapter strength)
//   t:        [rows][max_rank] scratch: A x
//   y:        [rows][ldy] f32 output, y[r][y_off + o] += scale * (B t)[o]
// lora_down computes t, lora_up adds B t.

struct LoraParams {
    rows: u32,
    in_dim: u32,
    out_dim: u32,
    ldx: u32,
    x_off: u32,
    ldy: u32,
    y_off: u32,
    max_rank: u32,
}

@group(0) @binding(0) var<uniform> p: LoraParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> a_all: array<f32>;
@group(0) @binding(3) var<storage, read> b_all: array<f32>;
@group(0) @binding(4) var<storage, read> table: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> row_ad: array<u32>;
@group(0) @binding(6) var<storage, read> row_scale: array<f32>;
@group(0) @binding(7) var<storage, read_write> t: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<f32>;

// One workgroup per row; invocation j computes t[row][j] (j < rank).
@compute @workgroup_size(64)
fn lora_down(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) j: u32) {
    let row = wg.x;
    if (row >= p.rows) { return; }
    let ad = row_ad[row];
    if (ad == 0xFFFFFFFFu) { return; }
    let e = table[ad];
    let rank = e.z;
    for (var jj = j; jj < rank; jj += 64u) {
        var s = 0.0;
        let ab = e.x + jj * p.in_dim;
        let xb = p.x_off + row * p.ldx;
        for (var i = 0u; i < p.in_dim; i++) { s += a_all[ab + i] * x[xb + i]; }
        t[row * p.max_rank + jj] = s;
    }
}

// One invocation per (output feature, row).
@compute @workgroup_size(64)
fn lora_up(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = gid.x;
    let row = gid.y;
    if (o >= p.out_dim || row >= p.rows) { return; }
    let ad = row_ad[row];
    if (ad == 0xFFFFFFFFu) { return; }
    let e = table[ad];
    let rank = e.z;
    let scale = bitcast<f32>(e.w) * row_scale[row];
    var s = 0.0;
    let bb = e.y + o * rank;
    for (var j = 0u; j < rank; j++) { s += b_all[bb + j] * t[row * p.max_rank + j]; }
    let i = row * p.ldy + p.y_off + o;
    y[i] = y[i] + scale * s;
}

// Mixtures of LoRA experts: the row's adapter has a router (routes[ad].y experts, 0 for
// plain LoRA) at routes[ad].x in router_all, [experts][in_dim]. Its logits z = R x choose
// the top routes[ad].z experts (ties: lower index); their gates are the softmax over the
// chosen logits (routes[ad].w = 1) or the softmax over all kept for the chosen; t's
// columns of expert e (rank / experts each) are scaled by its gate, 0 when not chosen.
@group(0) @binding(9) var<storage, read> router_all: array<f32>;
@group(0) @binding(10) var<storage, read> routes: array<vec4<u32>>;

var<workgroup> n_exp: u32;
var<workgroup> zs: array<f32, 32>;
var<workgroup> gates: array<f32, 32>;

// One workgroup per row; invocation e < experts computes logit e.
@compute @workgroup_size(64)
fn lora_gate(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) j: u32) {
    let row = wg.x;
    var ad = 0xFFFFFFFFu;
    if (row < p.rows) { ad = row_ad[row]; }
    if (j == 0u) {
        var n = 0u;
        if (ad != 0xFFFFFFFFu) { n = routes[ad].y; }
        n_exp = n;
    }
    let ne = workgroupUniformLoad(&n_exp);
    if (ne == 0u) { return; }
    let rt = routes[ad];
    if (j < ne) {
        var s = 0.0;
        let rb = rt.x + j * p.in_dim;
        let xb = p.x_off + row * p.ldx;
        for (var i = 0u; i < p.in_dim; i++) { s += router_all[rb + i] * x[xb + i]; }
        zs[j] = s;
    }
    workgroupBarrier();
    if (j == 0u) {
        var mx = -3.4e38;
        for (var e = 0u; e < ne; e++) { mx = max(mx, zs[e]); }
        var sum = 0.0;
        for (var e = 0u; e < ne; e++) { sum += exp(zs[e] - mx); }
        var mask = 0u;
        var ssum = 0.0;
        for (var k = 0u; k < rt.z; k++) {
            var best = 0u;
            var found = false;
            for (var e = 0u; e < ne; e++) {
                if ((mask & (1u << e)) == 0u && (!found || zs[e] > zs[best])) {
                    best = e;
                    found = true;
                }
            }
            mask |= 1u << best;
            ssum += exp(zs[best] - mx);
        }
        if (rt.w == 0u) { ssum = sum; }
        for (var e = 0u; e < ne; e++) {
            var gv = 0.0;
            if ((mask & (1u << e)) != 0u) { gv = exp(zs[e] - mx) / ssum; }
            gates[e] = gv;
        }
    }
    workgroupBarrier();
    let rank = table[ad].z;
    let er = rank / ne;
    for (var jj = j; jj < rank; jj += 64u) {
        let i = row * p.max_rank + jj;
        t[i] = t[i] * gates[jj / er];
    }
}
