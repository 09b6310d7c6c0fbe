// Row softmax: out[r][c] = exp(scale * x[r][c] - max) / sum, numerically stable.
//   x, out: [rows][cols] f32 (may be the same tensor with IN_PLACE, bound once)

struct SoftmaxParams {
    rows: u32,
    cols: u32,
    scale: f32,
    _pad: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: SoftmaxParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

var<workgroup> red: array<f32, WG>;

fn reduce(li: u32, v: f32, is_max: bool) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            if (is_max) { red[li] = max(red[li], red[li + s]); } else { red[li] += red[li + s]; }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// In place, one workgroup per row.
@compute @workgroup_size(WG)
fn softmax(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    var m = -3.4028234e38;
    for (var c = li; c < p.cols; c += WG) { m = max(m, p.scale * x[base + c]); }
    m = reduce(li, m, true);
    var s = 0.0;
    for (var c = li; c < p.cols; c += WG) {
        let e = exp(p.scale * x[base + c] - m);
        x[base + c] = e;
        s += e;
    }
    let inv = 1.0 / reduce(li, s, false);
    for (var c = li; c < p.cols; c += WG) { x[base + c] *= inv; }
}
