// Mixture-of-Experts routing: from a token's router (gating) logits, the k experts it goes to
// and their mixing weights.
//
//   logits:  [rows][ld] f32, n_experts used per row
//   ids:     [rows][k] u32, the chosen experts, highest logit first (ties: lower index)
//   weights: [rows][k] f32, their weights
//
// mode 0: softmax over all experts, top k, renormalized to sum 1 (Mixtral, Qwen3-MoE; the
//         same as a softmax over the k chosen logits)
// mode 1: softmax over all experts, top k, not renormalized (Qwen2-MoE, OLMoE with
//         norm_topk_prob = false)
// mode 2: sigmoid of each logit, top k, renormalized (sigmoid-gated routers)
// mode 3: sigmoid of each logit, top k, as they are (Qwen2-MoE's shared-expert gate)
// The choice compares raw logits, which every mode orders the same way.
// With STATS each choice also adds 1 to counts[stats_off + expert] (expert load statistics).
//
// moe_combine: out[t][c] (+)= sum_j weights[t][j] * expert_out[t * k + j][c], the weighted
// sum of a token's k expert outputs (expert_out rows of stride ld, out rows of ld_out).

struct MoeParams {
    rows: u32,
    n_experts: u32,
    k: u32,
    ld: u32,
    mode: u32,
    cols: u32,
    ld_out: u32,
    accumulate: u32,
    stats_off: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: MoeParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> weights: array<f32>;
#if STATS
@group(0) @binding(6) var<storage, read_write> counts: array<atomic<u32>>;
#endif

// One invocation per row (n_experts <= 256, k <= 16).
@compute @workgroup_size(64)
fn moe_route(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 64u;
    if (row >= p.rows) { return; }
    let b = row * p.ld;
    var mx = -3.0e38;
    for (var e = 0u; e < p.n_experts; e++) { mx = max(mx, logits[b + e]); }
    var sum = 0.0;
    for (var e = 0u; e < p.n_experts; e++) { sum += exp(logits[b + e] - mx); }
    var taken = array<u32, 8>(0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u);
    var total = 0.0;
    let o = row * p.k;
    for (var j = 0u; j < p.k; j++) {
        var best = 0u;
        var best_v = -3.4e38;
        var found = false;
        for (var e = 0u; e < p.n_experts; e++) {
            let free = (taken[e >> 5u] & (1u << (e & 31u))) == 0u;
            let v = logits[b + e];
            if (free && (!found || v > best_v)) {
                best = e;
                best_v = v;
                found = true;
            }
        }
        taken[best >> 5u] |= 1u << (best & 31u);
        var w = exp(best_v - mx) / sum;
        if (p.mode >= 2u) { w = 1.0 / (1.0 + exp(-best_v)); }
        ids[o + j] = best;
        weights[o + j] = w;
#if STATS
        atomicAdd(&counts[p.stats_off + best], 1u);
#endif
        total += w;
    }
    if ((p.mode == 0u || p.mode == 2u) && total > 0.0) {
        for (var j = 0u; j < p.k; j++) { weights[o + j] /= total; }
    }
}

@group(0) @binding(4) var<storage, read> expert_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// One invocation per (token, column); the k terms are added in order.
@compute @workgroup_size(64)
fn moe_combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.rows * p.cols) { return; }
    let t = i / p.cols;
    let c = i % p.cols;
    var acc = 0.0;
    for (var j = 0u; j < p.k; j++) {
        acc += weights[t * p.k + j] * expert_out[(t * p.k + j) * p.ld + c];
    }
    let o = t * p.ld_out + c;
    if (p.accumulate != 0u) { out[o] = out[o] + acc; } else { out[o] = acc; }
}

// moe_group: the routed pairs grouped by expert, for the grouped (prefill) expert products:
// group = [n_experts] counts, [n_experts] offsets (exclusive prefix sums), then the pair
// indices 0 .. rows * k sorted by expert (ascending pair order within an expert, so the
// grouping is deterministic). One workgroup of 256 invocations, invocation e owning expert e.
@group(0) @binding(7) var<storage, read_write> group: array<u32>;
var<workgroup> group_counts: array<u32, 256>;

@compute @workgroup_size(256)
fn moe_group(@builtin(local_invocation_index) e: u32) {
    let pairs = p.rows * p.k;
    var count = 0u;
    if (e < p.n_experts) {
        for (var i = 0u; i < pairs; i++) {
            if (ids[i] == e) { count++; }
        }
    }
    group_counts[e] = count;
    workgroupBarrier();
    if (e < p.n_experts) {
        var off = 0u;
        for (var j = 0u; j < e; j++) { off += group_counts[j]; }
        group[e] = count;
        group[p.n_experts + e] = off;
        let base = 2u * p.n_experts + off;
        var n = 0u;
        for (var i = 0u; i < pairs; i++) {
            if (ids[i] == e) {
                group[base + n] = i;
                n++;
            }
        }
    }
}
