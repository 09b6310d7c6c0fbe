// Dense matrix multiply: C = alpha * op(A) . op(B) (+ C when ACCUMULATE), batched.
//
//   A: [batch][M][K] (default) or [batch][K][M] when A_KM
//   B: [batch][N][K] (default: the weight layout, rows = output features) or [batch][K][N] when B_KN
//   C: [batch][M][ldc], written at columns c_offset .. c_offset + N
// Each operand starts at an element offset (off_a, off_b, off_c); batch z reads B's batch
// z / b_div (grouped-query attention: several query heads share one key/value head).
// Elements are f32; B may be f16 (B_F16), read natively with SHADER_F16 (F16) or unpacked
// from 32-bit words otherwise. A_VEC4 / B_VEC4 declare the arrays as vec4 (the leading
// dimension and offsets are then multiples of 4) for 4x fewer load instructions.
//
// Two kernels:
//   matmul_sg    for CPU-like devices with 8-wide subgroups (lavapipe): a subgroup computes
//                8 rows x 32 columns; each lane loads one row's 4 k-values of A and the
//                subgroup broadcasts them with constant-index shuffles (a vector shuffle on
//                a SIMD CPU) instead of loading shared memory lane by lane.
//   matmul_tiled for GPUs and devices without subgroups: 64x64 tiles through workgroup
//                memory, 8x8 outputs per invocation.
#if F16
enable f16;
#endif

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    c_offset: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    alpha: f32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    b_div: u32,
}

override A_KM: bool = false;
override B_KN: bool = false;
override ACCUMULATE: bool = false;
// matmul_sg: the 8 subgroups of a workgroup split RS ways over rows and 8/RS ways over
// columns (RS > 1 for narrow products, so that lanes are not idle).
override RS: u32 = 1u;

@group(0) @binding(0) var<uniform> p: MatmulParams;

#if A_VEC4
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
fn a4(i: u32) -> vec4<f32> { return a[i >> 2u]; }
fn a1(i: u32) -> f32 { return a[i >> 2u][i & 3u]; }
#else
@group(0) @binding(1) var<storage, read> a: array<f32>;
fn a4(i: u32) -> vec4<f32> { return vec4<f32>(a[i], a[i + 1u], a[i + 2u], a[i + 3u]); }
fn a1(i: u32) -> f32 { return a[i]; }
#endif

#if B_F16
#if F16
#if B_VEC4
@group(0) @binding(2) var<storage, read> b: array<vec4<f16>>;
fn b4(i: u32) -> vec4<f32> { return vec4<f32>(b[i >> 2u]); }
fn b1(i: u32) -> f32 { return f32(b[i >> 2u][i & 3u]); }
#else
@group(0) @binding(2) var<storage, read> b: array<f16>;
fn b4(i: u32) -> vec4<f32> { return vec4<f32>(f32(b[i]), f32(b[i + 1u]), f32(b[i + 2u]), f32(b[i + 3u])); }
fn b1(i: u32) -> f32 { return f32(b[i]); }
#endif
#else
#if B_VEC4
@group(0) @binding(2) var<storage, read> b: array<vec2<u32>>;
fn b4(i: u32) -> vec4<f32> { let w = b[i >> 2u]; return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }
fn b1(i: u32) -> f32 { return unpack2x16float(b[i >> 2u][(i >> 1u) & 1u])[i & 1u]; }
#else
@group(0) @binding(2) var<storage, read> b: array<u32>;
fn b1(i: u32) -> f32 { return unpack2x16float(b[i >> 1u])[i & 1u]; }
fn b4(i: u32) -> vec4<f32> { return vec4<f32>(b1(i), b1(i + 1u), b1(i + 2u), b1(i + 3u)); }
#endif
#endif
#else
#if B_VEC4
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
fn b4(i: u32) -> vec4<f32> { return b[i >> 2u]; }
fn b1(i: u32) -> f32 { return b[i >> 2u][i & 3u]; }
#else
@group(0) @binding(2) var<storage, read> b: array<f32>;
fn b4(i: u32) -> vec4<f32> { return vec4<f32>(b[i], b[i + 1u], b[i + 2u], b[i + 3u]); }
fn b1(i: u32) -> f32 { return b[i]; }
#endif
#endif

@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// Element (row, kk) of op(A) in batch base `ab`.
fn a_at(ab: u32, row: u32, kk: u32) -> f32 {
    if (A_KM) { return a1(ab + kk * p.lda + row); }
    return a1(ab + row * p.lda + kk);
}

// Element (kk, col) of op(B), i.e. B[col][kk] in the default layout.
fn b_at(bb: u32, col: u32, kk: u32) -> f32 {
    if (B_KN) { return b1(bb + kk * p.ldb + col); }
    return b1(bb + col * p.ldb + kk);
}

fn store(cb: u32, row: u32, col: u32, v: f32) {
    let i = cb + row * p.ldc + p.c_offset + col;
    if (ACCUMULATE) {
        c[i] = c[i] + p.alpha * v;
    } else {
        c[i] = p.alpha * v;
    }
}

fn store4(cb: u32, row: u32, col: u32, v: vec4<f32>) {
    if (row >= p.m) { return; }
    if (col < p.n) { store(cb, row, col, v.x); }
    if (col + 1u < p.n) { store(cb, row, col + 1u, v.y); }
    if (col + 2u < p.n) { store(cb, row, col + 2u, v.z); }
    if (col + 3u < p.n) { store(cb, row, col + 3u, v.w); }
}

#if SUBGROUP
// 4 k-values (k0 .. k0+3) of row `row` of op(A); zero past K (only the tail step can go past).
fn a_k4(ab: u32, row: u32, k0: u32, full: bool) -> vec4<f32> {
    if (full) {
        if (A_KM) {
            let i = ab + k0 * p.lda + row;
            return vec4<f32>(a1(i), a1(i + p.lda), a1(i + 2u * p.lda), a1(i + 3u * p.lda));
        }
        return a4(ab + row * p.lda + k0);
    }
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (k0 + j < p.k) { v[j] = a_at(ab, row, k0 + j); }
    }
    return v;
}

// t[i] = op(B)[k0 + i][col .. col + 4]: four k-rows of four consecutive columns.
struct BT { t0: vec4<f32>, t1: vec4<f32>, t2: vec4<f32>, t3: vec4<f32> }

fn b_tile(bb: u32, col: u32, k0: u32, full: bool) -> BT {
    let last = p.n - 1u;
    if (full) {
        if (B_KN) {
            if (col + 3u <= last) {
                let i = bb + k0 * p.ldb + col;
                return BT(b4(i), b4(i + p.ldb), b4(i + 2u * p.ldb), b4(i + 3u * p.ldb));
            }
        } else {
            let w0 = b4(bb + min(col, last) * p.ldb + k0);
            let w1 = b4(bb + min(col + 1u, last) * p.ldb + k0);
            let w2 = b4(bb + min(col + 2u, last) * p.ldb + k0);
            let w3 = b4(bb + min(col + 3u, last) * p.ldb + k0);
            return BT(vec4<f32>(w0.x, w1.x, w2.x, w3.x), vec4<f32>(w0.y, w1.y, w2.y, w3.y),
                      vec4<f32>(w0.z, w1.z, w2.z, w3.z), vec4<f32>(w0.w, w1.w, w2.w, w3.w));
        }
    }
    var t: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            let kk = k0 + i;
            let cc = col + j;
            t[i][j] = select(0.0, b_at(bb, min(cc, last), min(kk, p.k - 1u)), kk < p.k && cc < p.n);
        }
    }
    return BT(t[0], t[1], t[2], t[3]);
}

fn fma_row(acc: vec4<f32>, x: vec4<f32>, t: BT) -> vec4<f32> {
    return acc + x.x * t.t0 + x.y * t.t1 + x.z * t.t2 + x.w * t.t3;
}

struct Acc8 { c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>,
              c4: vec4<f32>, c5: vec4<f32>, c6: vec4<f32>, c7: vec4<f32> }

// One 4-deep k step: row r of the subgroup's 8 rows comes from lane r.
fn sg_step(acc: Acc8, av: vec4<f32>, t: BT) -> Acc8 {
    return Acc8(fma_row(acc.c0, subgroupShuffle(av, 0u), t), fma_row(acc.c1, subgroupShuffle(av, 1u), t),
                fma_row(acc.c2, subgroupShuffle(av, 2u), t), fma_row(acc.c3, subgroupShuffle(av, 3u), t),
                fma_row(acc.c4, subgroupShuffle(av, 4u), t), fma_row(acc.c5, subgroupShuffle(av, 5u), t),
                fma_row(acc.c6, subgroupShuffle(av, 6u), t), fma_row(acc.c7, subgroupShuffle(av, 7u), t));
}

@compute @workgroup_size(64)
fn matmul_sg(@builtin(workgroup_id) wg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>,
             @builtin(subgroup_invocation_id) sl: u32) {
    let sg = lid.x / 8u;
    let row0 = (wg.y * RS + sg % RS) * 8u;
    let col = wg.x * (256u / RS) + (sg / RS) * 32u + sl * 4u;
    let ab = p.off_a + wg.z * p.stride_a;
    let bb = p.off_b + (wg.z / p.b_div) * p.stride_b;
    let cb = p.off_c + wg.z * p.stride_c;
    let my_row = min(row0 + sl, p.m - 1u);
    let z = vec4<f32>(0.0);
    var acc = Acc8(z, z, z, z, z, z, z, z);
    let k4 = p.k & ~3u;
    for (var k0 = 0u; k0 < k4; k0 += 4u) {
        acc = sg_step(acc, a_k4(ab, my_row, k0, true), b_tile(bb, col, k0, true));
    }
    if (k4 < p.k) {
        acc = sg_step(acc, a_k4(ab, my_row, k4, false), b_tile(bb, col, k4, false));
    }
    store4(cb, row0, col, acc.c0);
    store4(cb, row0 + 1u, col, acc.c1);
    store4(cb, row0 + 2u, col, acc.c2);
    store4(cb, row0 + 3u, col, acc.c3);
    store4(cb, row0 + 4u, col, acc.c4);
    store4(cb, row0 + 5u, col, acc.c5);
    store4(cb, row0 + 6u, col, acc.c6);
    store4(cb, row0 + 7u, col, acc.c7);
}
#endif

// ---- tiled kernel: 64x64 tile per workgroup of 8x8 invocations, 8x8 outputs each ----
const TILE: u32 = 64u;
const TK: u32 = 16u;
// Tiles stored k-major, 4 rows (or columns) per vec4: as_[kk * 16 + r / 4][r % 4].
var<workgroup> as_: array<vec4<f32>, 256>;
var<workgroup> bs_: array<vec4<f32>, 256>;

@compute @workgroup_size(8, 8)
fn matmul_tiled(@builtin(workgroup_id) wg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let m0 = wg.y * TILE;
    let n0 = wg.x * TILE;
    let ab = p.off_a + wg.z * p.stride_a;
    let bb = p.off_b + (wg.z / p.b_div) * p.stride_b;
    let cb = p.off_c + wg.z * p.stride_c;
    var acc: array<vec4<f32>, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = vec4<f32>(0.0); }
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // 64 invocations load 64x16 of A and of B: 16 elements each.
        for (var e = li; e < TILE * TK; e += 64u) {
            var r: u32; var kk: u32;
            if (A_KM) { kk = e / TILE; r = e % TILE; } else { r = e / TK; kk = e % TK; }
            let gk = k0 + kk;
            let ok_a = gk < p.k && m0 + r < p.m;
            as_[kk * 16u + r / 4u][r % 4u] = select(0.0, a_at(ab, min(m0 + r, p.m - 1u), min(gk, p.k - 1u)), ok_a);
            var cidx: u32; var kb: u32;
            if (B_KN) { kb = e / TILE; cidx = e % TILE; } else { cidx = e / TK; kb = e % TK; }
            let gkb = k0 + kb;
            let ok_b = gkb < p.k && n0 + cidx < p.n;
            bs_[kb * 16u + cidx / 4u][cidx % 4u] = select(0.0, b_at(bb, min(n0 + cidx, p.n - 1u), min(gkb, p.k - 1u)), ok_b);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let x0 = as_[kk * 16u + lid.y * 2u];
            let x1 = as_[kk * 16u + lid.y * 2u + 1u];
            let y0 = bs_[kk * 16u + lid.x * 2u];
            let y1 = bs_[kk * 16u + lid.x * 2u + 1u];
            acc[0] += x0.x * y0; acc[1] += x0.x * y1;
            acc[2] += x0.y * y0; acc[3] += x0.y * y1;
            acc[4] += x0.z * y0; acc[5] += x0.z * y1;
            acc[6] += x0.w * y0; acc[7] += x0.w * y1;
            acc[8] += x1.x * y0; acc[9] += x1.x * y1;
            acc[10] += x1.y * y0; acc[11] += x1.y * y1;
            acc[12] += x1.z * y0; acc[13] += x1.z * y1;
            acc[14] += x1.w * y0; acc[15] += x1.w * y1;
        }
        workgroupBarrier();
    }
    let r0 = m0 + lid.y * 8u;
    let col = n0 + lid.x * 8u;
    for (var i = 0u; i < 8u; i++) {
        store4(cb, r0 + i, col, acc[2u * i]);
        store4(cb, r0 + i, col + 4u, acc[2u * i + 1u]);
    }
}
