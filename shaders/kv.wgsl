// Key/value cache writes: the new tokens' keys and values, taken from their fused QKV rows,
// go to their cache slots.
//
//   src:   [tokens][src_ld] f32; keys at k_off .. k_off + kv_dim, values at v_off .. v_off + kv_dim
//   slots: [tokens] u32 cache slot of each token
//   k, v:  [slots][kv_dim] f32 caches of one layer

struct KvParams {
    tokens: u32,
    kv_dim: u32,
    src_ld: u32,
    k_off: u32,
    v_off: u32,
    n_slots: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: KvParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> slots: array<u32>;
@group(0) @binding(3) var<storage, read_write> k: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

// One invocation per (token, element).
@compute @workgroup_size(64)
fn kv_store(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x;
    let t = gid.y;
    if (e >= p.kv_dim || t >= p.tokens) { return; }
    let s = slots[t];
    if (s >= p.n_slots) { return; }
    k[s * p.kv_dim + e] = src[t * p.src_ld + p.k_off + e];
    v[s * p.kv_dim + e] = src[t * p.src_ld + p.v_off + e];
}

// ---- rope_store: RoPE on the query heads (in place) and the key heads (into the cache),
// and the values copied into the cache, in one pass over a fused q|k|v row. ----

struct RopeStoreParams {
    tokens: u32,
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    n_rot: u32,
    src_ld: u32,
    n_slots: u32,
    max_pos: u32,
}

override NEOX: bool = false;

@group(0) @binding(5) var<uniform> rp: RopeStoreParams;
@group(0) @binding(6) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(7) var<storage, read> pos: array<u32>;
@group(0) @binding(8) var<storage, read> table: array<vec2<f32>>;

// Indices of the two elements of pair `i` of a head starting at `base`.
fn pair(base: u32, i: u32) -> vec2<u32> {
    let half = rp.n_rot / 2u;
    if (NEOX) { return vec2<u32>(base + i, base + i + half); }
    return vec2<u32>(base + 2u * i, base + 2u * i + 1u);
}

// One invocation per (item, token): query pairs, key pairs, unrotated key dims, values.
@compute @workgroup_size(64)
fn rope_store(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    if (t >= rp.tokens) { return; }
    let half = rp.n_rot / 2u;
    let hd = rp.head_dim;
    let kv_dim = rp.n_kv * hd;
    let q_pairs = rp.n_heads * half;
    let k_pairs = rp.n_kv * half;
    let k_rest = rp.n_kv * (hd - rp.n_rot);
    let s = slots[t];
    let row = t * rp.src_ld;
    var i = gid.x;
    if (i < q_pairs) {
        let h = i / half;
        let pi = i % half;
        let c = table[min(pos[t], rp.max_pos - 1u) * half + pi];
        let ix = pair(row + h * hd, pi);
        let a = qkv[ix.x];
        let b = qkv[ix.y];
        qkv[ix.x] = a * c.x - b * c.y;
        qkv[ix.y] = a * c.y + b * c.x;
        return;
    }
    i -= q_pairs;
    if (s >= rp.n_slots) { return; }
    let k_row = row + rp.n_heads * hd;
    if (i < k_pairs) {
        let h = i / half;
        let pi = i % half;
        let c = table[min(pos[t], rp.max_pos - 1u) * half + pi];
        let src = pair(k_row + h * hd, pi);
        let dst = pair(s * kv_dim + h * hd, pi);
        let a = qkv[src.x];
        let b = qkv[src.y];
        k[dst.x] = a * c.x - b * c.y;
        k[dst.y] = a * c.y + b * c.x;
        return;
    }
    i -= k_pairs;
    if (i < k_rest) {
        let h = i / (hd - rp.n_rot);
        let d = rp.n_rot + i % (hd - rp.n_rot);
        k[s * kv_dim + h * hd + d] = qkv[k_row + h * hd + d];
        return;
    }
    i -= k_rest;
    if (i < kv_dim) {
        v[s * kv_dim + i] = qkv[k_row + kv_dim + i];
    }
}
