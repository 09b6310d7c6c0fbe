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
