// Embedding gather from an f32 or f16 table (quantized tables: quant.wgsl `gather`).
//
//   table: rows row_start .. row_start + rows of a [vocab][cols] table (one binding's chunk)
//   ids:   [n_ids] u32
//   out:   [n_ids][cols] f32; ids outside this chunk are left untouched
// F16 tables are read as packed pairs (cols is even).

struct EmbedParams {
    n_ids: u32,
    cols: u32,
    row_start: u32,
    rows: u32,
}

override HALF: bool = false;

@group(0) @binding(0) var<uniform> p: EmbedParams;
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// One invocation per (token, column).
@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    if (c >= p.cols || t >= p.n_ids) { return; }
    let id = ids[t];
    if (id < p.row_start || id - p.row_start >= p.rows) { return; }
    let e = (id - p.row_start) * p.cols + c;
    if (HALF) {
        out[t * p.cols + c] = unpack2x16float(table[e / 2u])[e % 2u];
    } else {
        out[t * p.cols + c] = bitcast<f32>(table[e]);
    }
}
