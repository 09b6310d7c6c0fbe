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
