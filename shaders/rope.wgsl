// Rotary position embedding, in place, from a precomputed cos/sin table.
//
//   x:     [tokens][ld] f32; head h of token t starts at t * ld + offset + h * head_dim
//   pos:   [tokens] u32 positions
//   table: [max_pos][n_rot / 2] vec2(cos, sin), built on the CPU in f64 (YaRN included)
// Pairs rotated: (2i, 2i+1) in the normal mode, (i, i + n_rot/2) with NEOX; dimensions at
// and past n_rot are left as they are. INVERSE rotates by -theta (the backward pass).

struct RopeParams {
    tokens: u32,
    heads: u32,
    head_dim: u32,
    n_rot: u32,
    ld: u32,
    offset: u32,
    max_pos: u32,
    _pad: u32,
}

override NEOX: bool = false;
override INVERSE: bool = false;

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> pos: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<vec2<f32>>;

// One invocation per (token, head, pair).
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.n_rot / 2u;
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.tokens * p.heads * half) { return; }
    let pair = i % half;
    let h = (i / half) % p.heads;
    let t = i / (half * p.heads);
    let base = t * p.ld + p.offset + h * p.head_dim;
    var i0: u32;
    var i1: u32;
    if (NEOX) {
        i0 = base + pair;
        i1 = base + pair + half;
    } else {
        i0 = base + 2u * pair;
        i1 = i0 + 1u;
    }
    let cs = table[min(pos[t], p.max_pos - 1u) * half + pair];
    var s = cs.y;
    if (INVERSE) { s = -s; }
    let a = x[i0];
    let b = x[i1];
    x[i0] = a * cs.x - b * s;
    x[i1] = a * s + b * cs.x;
}
