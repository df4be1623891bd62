// The fused linear head (src/linear): the loss of logits z = H W^T + b (H [rows, dim], W [vocab,
// dim], b [vocab]) and the gradients dH = G W, dW = G^T H, db = sum_rows G, with G = dL/dz,
// without a rows x vocab buffer. The vocabulary is cut into blocks of LQ.block_tiles tiles of
// MM_TILE entries; a block is a vocabulary shard of one device: its per-row statistics are a
// `ShardRecord` in the shards' block layout (records.wgsl), merged the same way.
//
// Passes (src/linear/plan.rs encodes them; setup and finalize are the loss's own):
//   setup:             the mean's denominator, the weighted off-mass, the label check.
//   linear_stats:      per (row tile, vocabulary block): the tiles' logits (matmul.wgsl), and in
//                      the epilogue, while the tile is in workgroup memory, the block's running
//                      max, sum of exp, target sums and argmax per row; one ShardRecord per row
//                      and block. Chunked mode also writes the logits of its rows.
//                      Reads H and W (2 rows x vocab x dim flops), writes 32 bytes per row and
//                      block (+ 4 bytes per logit, chunked).
//   linear_merge:      per row, the blocks' records merged in block order: loss, lse,
//                      accuracy, and the row's gradient constants (a ShardMergedRow).
//                      Reads 32 bytes per row and block, writes 24 bytes per row.
//   finalize:          the per-row losses reduced (Sum, Mean).
//   linear_logit_grad: chunked mode: G over the stored logits, in place. Reads and writes 4
//                      bytes per logit of the chunk.
//   linear_grad_hidden: per row tile, owning its rows of dH: for every vocabulary tile in
//                      order, the tile of G (recomputed from H and W with the merged row
//                      constants while in registers, or read from the chunk), then dH += G W.
//                      2 (recompute) or 1 matmul-equivalents; reads and writes the tile's dH
//                      rows once per vocabulary tile.
//   linear_grad_head:  per vocabulary tile, owning its rows of dW and its db: for every row
//                      tile in order, the tile of G, then dW += G^T H and db += the column sums.
// No float atomics: every output word has one owner, which adds its terms in a fixed order.
//
// Mirror: src/linear/cpu.rs (z = H W^T + b, cpu::compute, then the two products).

var<private> LQ: LinearParams;

fn load_linear() {
    LQ = LP;
}

// The merged row constants of row r (global): max, coefficient of exp(z - max), scale (times
// the logit scale), kind; and the label.
struct RowConsts {
    m: f32,
    coef: f32,
    scale: f32,
    kind: u32,
    label: u32,
}

fn row_consts(r: u32) -> RowConsts {
    let at = LQ.merged_base + r * SHARD_MERGED_WORDS;
    var label = 0u;
    if (!SOFT_TARGETS) {
        // The local entry of the label (NONE_U32 when another vocabulary slice holds it).
        label = local_label(row_label(r));
    }
    return RowConsts(record_word(at + SHARD_MERGED_MAX), record_word(at + SHARD_MERGED_COEF), record_word(at + SHARD_MERGED_SCALE), atomicLoad(&control[at + SHARD_MERGED_KIND]), label);
}

// The gradient dL/dz of four logits x (raw, bias included) of row r at vocabulary entries c.
fn logit_grad(k: RowConsts, r: u32, c: vec4<u32>, x: vec4<f32>) -> vec4<f32> {
    let valid = c < vec4<u32>(LQ.vocab);
    if (k.kind != ROW_VALID) {
        return select(vec4<f32>(0.0), vec4<f32>(unusable_value(k.kind)), valid);
    }
    let z = transform_logit(x);
    let ez = exp(z - vec4<f32>(k.m));
    let g = grad_value(c, vec4<u32>(r * LQ.vocab) + c, ez, z, k.label, vec2<f32>(k.coef, k.scale));
    return select(vec4<f32>(0.0), g, valid);
}

@compute @workgroup_size(MM_INVOCATIONS)
fn linear_stats(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    load_params();
    load_linear();
    let r0 = LQ.row_begin + wid.x * MM_TILE;
    let block = LQ.block_begin + wid.y;
    let tx = lid % 8u;
    let ty = lid / 8u;
    // The epilogue: invocation lid sums row lid of the tile, its 64 columns in 16 units.
    let r = r0 + lid;
    let in_rows = r < LQ.row_begin + LQ.row_count;
    var kind = ROW_IGNORED;
    var label_i = 0;
    if (in_rows) {
        label_i = row_label(r);
        kind = classify_label(label_i);
    }
    let v_begin = block * LQ.block_tiles * MM_TILE;
    let v_end = min(v_begin + LQ.block_tiles * MM_TILE, LQ.vocab);
    // The label's vocabulary entry when this block holds it.
    var label = NONE_U32;
    if (!SOFT_TARGETS && kind == ROW_VALID) {
        // Local: Q.class_begin is the first class of a vocabulary slice (0 for the whole head).
        let local = local_label(label_i);
        if (local >= v_begin && local < v_end) {
            label = local;
        }
    }
    var m4 = vec4<f32>(NEG_BIG);
    var s4 = vec4<f32>(0.0);
    var shifted4 = vec4<f32>(0.0);
    var mass4 = vec4<f32>(0.0);
    var best = argmax_none();
    var z_label = 0.0;
    let neg = vec4<f32>(neg_inf());
    for (var v0 = v_begin; v0 < v_end; v0 += MM_TILE) {
        let tile = mm_logits(lid, r0, v0);
        for (var h = 0u; h < 2u; h++) {
            let cols = block_cols(v0, tx, h == 1u);
            let b = bias4(cols);
            for (var i = 0u; i < 8u; i++) {
                let m = ty + 8u * i;
                let x = block_row(tile, i, h == 1u) + b;
                put_row_major(m, cols - vec4<u32>(v0), x);
                let row = r0 + m;
                if (LQ.store_logits != 0u && row < LQ.row_begin + LQ.row_count) {
                    // The chunk's logits, row-major [row_count, vocab], in the loss's `logits`.
                    let at = (row - LQ.chunk_begin) * LQ.vocab;
                    for (var j = 0u; j < 4u; j++) {
                        if (cols[j] < LQ.vocab) {
                            logits[at + cols[j]] = x[j];
                        }
                    }
                }
            }
        }
        workgroupBarrier();
        if (in_rows && kind == ROW_VALID) {
            for (var u = 0u; u < 16u; u++) {
                let x = mm_tile[lid * 16u + u];
                let c = vec4<u32>(v0 + 4u * u) + LANES;
                let valid = c < vec4<u32>(v_end);
                let z = select(neg, transform_logit(x), valid);
                push_unit(&m4, &s4, &shifted4, &mass4, c, vec4<u32>(r * LQ.vocab) + c, z, valid);
                argmax_push(&best, x, c, valid);
                if (label != NONE_U32 && label >= v0 + 4u * u && label < v0 + 4u * u + 4u) {
                    z_label = z[label - v0 - 4u * u];
                }
            }
        }
    }
    if (!in_rows) {
        return;
    }
    let at = shard_record(block, r);
    if (kind != ROW_VALID) {
        write_unusable_record(at, label_i, kind);
        return;
    }
    let all = merge_lanes(m4, s4, shifted4, mass4);
    // The block's target mass and sum relative to its max: for a class label the off-value
    // times the receiving classes' (weighted) count and shifted logits swept above, plus the
    // label's own extra coefficient where the block holds it.
    var sums = vec2<f32>(all.v.z, all.v.y);
    if (!SOFT_TARGETS) {
        var extra = 0.0;
        if (label != NONE_U32) {
            extra = label_extra(label);
        }
        sums = vec2<f32>(Q.off * all.v.z + extra, Q.off * all.v.y + extra * (all.m - z_label));
    }
    // `label` is the local label where the block holds it (write_record adds class_begin to
    // the argmax's class).
    write_record(at, all, sums, argmax_lanes(best), label_i, label);
}

@compute @workgroup_size(MM_INVOCATIONS)
fn linear_merge(@builtin(global_invocation_id) gid: vec3<u32>) {
    load_params();
    load_linear();
    if (gid.x >= LQ.row_count) {
        return;
    }
    let r = LQ.row_begin + gid.x;
    let label_i = row_label(r);
    let kind = classify_label(label_i);
    let at = LQ.merged_base + r * SHARD_MERGED_WORDS;
    atomicStore(&control[at + SHARD_MERGED_KIND], kind);
    if (kind != ROW_VALID) {
        store_row(r, unusable_value(kind), unusable_value(kind));
        return;
    }
    let k = finish_merged_row(r, bitcast<f32>(atomicLoad(&control[SUMMARY_DENOMINATOR])));
    set_record_word(at + SHARD_MERGED_MAX, k.x);
    set_record_word(at + SHARD_MERGED_COEF, k.y);
    set_record_word(at + SHARD_MERGED_SCALE, k.z);
}

// Unfused: the logits z = H W^T + b of the dispatch's rows and the window's entries into the
// caller's `logits` ([rows, vocab] f32), tile by tile. Reads H and W, writes 4 N V bytes.
@compute @workgroup_size(MM_INVOCATIONS)
fn linear_logits(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    load_params();
    load_linear();
    let tx = lid % 8u;
    let ty = lid / 8u;
    let r0 = LQ.row_begin + wid.x * MM_TILE;
    let v0 = LQ.window_begin + wid.y * MM_TILE;
    let tile = mm_logits(lid, r0, v0);
    for (var h = 0u; h < 2u; h++) {
        let c = block_cols(v0, tx, h == 1u);
        let b = bias4(c);
        for (var i = 0u; i < 8u; i++) {
            let row = r0 + ty + 8u * i;
            if (row < LQ.row_begin + LQ.row_count) {
                let x = block_row(tile, i, h == 1u) + b;
                for (var j = 0u; j < 4u; j++) {
                    if (c[j] < LQ.window_end) {
                        logits[(row - LQ.chunk_begin) * LQ.vocab + c[j]] = x[j];
                    }
                }
            }
        }
    }
}

// Chunked mode: G over the chunk's logits, in place; one invocation per four logits.
@compute @workgroup_size(MM_INVOCATIONS)
fn linear_logit_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    load_linear();
    let quads = (LQ.vocab + 3u) / 4u;
    let i = gid.y * nwg.x * MM_INVOCATIONS + gid.x;
    let rr = i / quads;
    if (rr >= LQ.row_count) {
        return;
    }
    let c = vec4<u32>((i % quads) * 4u) + LANES;
    let at = (LQ.row_begin + rr - LQ.chunk_begin) * LQ.vocab;
    let n = LQ.vocab - 1u;
    let x = vec4<f32>(logits[at + min(c.x, n)], logits[at + min(c.y, n)], logits[at + min(c.z, n)], logits[at + min(c.w, n)]);
    let g = logit_grad(row_consts(LQ.row_begin + rr), LQ.row_begin + rr, c, x);
    for (var j = 0u; j < 4u; j++) {
        if (c[j] < LQ.vocab) {
            logits[at + c[j]] = g[j];
        }
    }
}

// Puts four values of row m of a tile into mm_tile, at tile columns n (row-major: element
// (m, n) at mm_tile[m * 16 + n / 4][n % 4]).
fn put_row_major(m: u32, n: vec4<u32>, x: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        mm_tile[m * 16u + (n[j] >> 2u)][n[j] & 3u] = x[j];
    }
}

// The same, transposed: element (m, n) at mm_tile[n * 16 + m / 4][m % 4].
fn put_transposed(m: u32, n: vec4<u32>, x: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        mm_tile[n[j] * 16u + (m >> 2u)][m & 3u] = x[j];
    }
}

// The tile of G at rows [r0, r0 + MM_TILE) and vocabulary entries [v0, v0 + MM_TILE) into
// mm_tile, row-major (dH's product walks a row's entries) or transposed (dW's walks an
// entry's rows): recomputed (the logits' tile, then the gradient in registers) or read from
// the chunk. Rows and entries outside the dispatch are 0.
fn g_tile(lid: u32, r0: u32, v0: u32, transposed: bool) {
    let tx = lid % 8u;
    let ty = lid / 8u;
    let row_end = LQ.row_begin + LQ.row_count;
    if (LQ.recompute != 0u) {
        let tile = mm_logits(lid, r0, v0);
        for (var i = 0u; i < 8u; i++) {
            let m = ty + 8u * i;
            var k = RowConsts(0.0, 0.0, 0.0, ROW_IGNORED, 0u);
            if (r0 + m < row_end) {
                k = row_consts(r0 + m);
            }
            for (var h = 0u; h < 2u; h++) {
                let c = block_cols(v0, tx, h == 1u);
                let g = logit_grad(k, r0 + m, c, block_row(tile, i, h == 1u) + bias4(c));
                if (transposed) {
                    put_transposed(m, c - vec4<u32>(v0), g);
                } else {
                    put_row_major(m, c - vec4<u32>(v0), g);
                }
            }
        }
    } else {
        workgroupBarrier();
        // Four consecutive entries of a row per vec4 (row-major), or four consecutive rows
        // of an entry (transposed).
        for (var q = 0u; q < 1024u / MM_INVOCATIONS; q++) {
            let slot = lid + q * MM_INVOCATIONS;
            let major = slot / 16u;
            let minor = (slot % 16u) * 4u;
            var g = vec4<f32>(0.0);
            for (var j = 0u; j < 4u; j++) {
                var m = major;
                var n = minor + j;
                if (transposed) {
                    m = minor + j;
                    n = major;
                }
                if (r0 + m < row_end && v0 + n < LQ.vocab) {
                    g[j] = logits[(r0 + m - LQ.chunk_begin) * LQ.vocab + v0 + n];
                }
            }
            mm_tile[slot] = g;
        }
    }
    workgroupBarrier();
}

// The products below stage their second operand (32 rows of W or H at a time, columns
// d0 + [0, 64)) in mm_ab, packed as the depth loop packs B: element (k, column
// x + 8 (4 h + q)) at mm_ab[k * 16 + 2 x + h][q]. Every invocation calls it (barriers).
fn stage_half(lid: u32, first: u32, rows_end: u32, d0: u32, is_head: bool) {
    workgroupBarrier();
    for (var s8 = 0u; s8 < 512u / MM_INVOCATIONS; s8++) {
        let s = lid + s8 * MM_INVOCATIONS;   // (k, x, h): 32 rows x 16 slots
        let k = s / 16u;
        let xh = s % 16u;
        let row = first + k;
        var v = vec4<f32>(0.0);
        for (var q = 0u; q < 4u; q++) {
            let d = d0 + (xh >> 1u) + 8u * (4u * (xh & 1u) + q);
            if (row < rows_end && d < LQ.dim) {
                if (is_head) {
                    v[q] = head_at((row - LQ.window_begin) * LQ.dim + d);
                } else {
                    v[q] = hidden_at(row * LQ.dim + d);
                }
            }
        }
        mm_ab[k * 16u + xh] = v;
    }
    workgroupBarrier();
}

// The product of one staged half: c[i] += sum_k G[ty + 8 i, 32 half + k] S[k, tx + 8 j] for
// the 32 staged rows k, with G in mm_tile as g_tile left it (row-major for dH, where its
// "rows" are the tile's rows; transposed for dW, where they are its vocabulary entries) and S
// in mm_ab as stage_half left it; k ascending.
fn add_half_product(c: Block, half: u32, tx: u32, ty: u32) -> Block {
    var r = c;
    for (var k4 = 0u; k4 < 8u; k4++) {
        let at = half * 8u + k4;
        let g0 = mm_tile[ty * 16u + at];
        let g1 = mm_tile[(ty + 8u) * 16u + at];
        let g2 = mm_tile[(ty + 16u) * 16u + at];
        let g3 = mm_tile[(ty + 24u) * 16u + at];
        let g4 = mm_tile[(ty + 32u) * 16u + at];
        let g5 = mm_tile[(ty + 40u) * 16u + at];
        let g6 = mm_tile[(ty + 48u) * 16u + at];
        let g7 = mm_tile[(ty + 56u) * 16u + at];
        for (var q = 0u; q < 4u; q++) {
            let x = (k4 * 4u + q) * 16u + 2u * tx;
            r = block_add(r, vec4<f32>(g0[q], g1[q], g2[q], g3[q]), vec4<f32>(g4[q], g5[q], g6[q], g7[q]), mm_ab[x], mm_ab[x + 1u]);
        }
    }
    return r;
}

// A tile's product over its 64 staged rows (W's from `first`, or H's), columns d0 + [0, 64):
// the two halves in order. The passes call it through `tile_product`: this one
// (shaders/matmul_portable.wgsl), or shaders/matmul_subgroups.wgsl's broadcast of G's rows.
fn staged_tile_product(lid: u32, first: u32, rows_end: u32, d0: u32, is_head: bool) -> Block {
    var c = zero_block();
    for (var half = 0u; half < 2u; half++) {
        stage_half(lid, first + half * 32u, rows_end, d0, is_head);
        c = add_half_product(c, half, lid % 8u, lid / 8u);
    }
    return c;
}

// Adds the block `s` to the f32 accumulator (dH, or dW of the window) at rows row0 + ty + 8 i
// and columns d0 + tx + 8 j, or starts it.
fn add_block(s: Block, row0: u32, row_end: u32, d0: u32, tx: u32, ty: u32, start: bool, into_head: bool) {
    for (var i = 0u; i < 8u; i++) {
        let row = row0 + ty + 8u * i;
        if (row < row_end) {
            for (var h = 0u; h < 2u; h++) {
                let d = block_cols(d0, tx, h == 1u);
                let v = block_row(s, i, h == 1u);
                for (var j = 0u; j < 4u; j++) {
                    if (d[j] < LQ.dim) {
                        if (into_head) {
                            let o = (row - LQ.window_begin) * LQ.dim + d[j];
                            d_head[o] = select(d_head[o] + v[j], v[j], start);
                        } else {
                            let o = row * LQ.dim + d[j];
                            d_hidden[o] = select(d_hidden[o] + v[j], v[j], start);
                        }
                    }
                }
            }
        }
    }
}

// The product loops take four terms per iteration: an invocation of a CPU adapter may take a
// bounded number of loop iterations in all (lavapipe's loop limiter stops a loop after 65535
// back edges of one invocation), which the plan keeps each dispatch under by cutting the walks
// into segments (src/linear/plan.rs); fewer back edges per tile, fewer segments.

// The columns [x, y) of dH or dW a product workgroup owns. Recomputing G costs a matmul over
// all of D per tile, so then one workgroup owns every column of its tile; a G read from memory
// (chunked mode, the unfused products) is cheap to read again, so the columns are split into
// 64-wide tiles across the dispatch's z (more owners for a GPU; the plan dispatches
// dim / 64 of them).
fn owned_columns(z: u32) -> vec2<u32> {
    if (LQ.recompute != 0u) {
        return vec2<u32>(0u, LQ.dim);
    }
    return vec2<u32>(z * MM_TILE, min(z * MM_TILE + MM_TILE, LQ.dim));
}

@compute @workgroup_size(MM_INVOCATIONS)
fn linear_grad_hidden(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    load_params();
    load_linear();
    let tx = lid % 8u;
    let ty = lid / 8u;
    let r0 = LQ.row_begin + wid.x * MM_TILE;
    let row_end = LQ.row_begin + LQ.row_count;
    let d_range = owned_columns(wid.z);
    // This dispatch's segment of the vocabulary, in order after the previous ones.
    for (var v0 = LQ.vocab_begin; v0 < LQ.vocab_end; v0 += MM_TILE) {
        g_tile(lid, r0, v0, false);
        let v_end = min(v0 + MM_TILE, LQ.window_end);
        for (var d0 = d_range.x; d0 < d_range.y; d0 += MM_TILE) {
            // dH[r0 + ty + 8 i, d0 + tx + 8 j] += sum_n G[ty + 8 i, n] W[v0 + n, d0 + tx + 8 j]
            let c = tile_product(lid, v0, v_end, d0, true);
            add_block(c, r0, row_end, d0, tx, ty, v0 == 0u, false);
        }
    }
}

@compute @workgroup_size(MM_INVOCATIONS)
fn linear_grad_head(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    load_params();
    load_linear();
    let tx = lid % 8u;
    let ty = lid / 8u;
    let v0 = LQ.window_begin + wid.x * MM_TILE;
    let v_end = min(v0 + MM_TILE, LQ.window_end);
    let row_end = LQ.row_begin + LQ.row_count;
    let d_range = owned_columns(wid.z);
    // The first rows of the problem start dW and db; later segments and chunks add to them.
    let first = LQ.row_begin == 0u;
    var bias_sum = 0.0;
    for (var r0 = LQ.row_begin; r0 < row_end; r0 += MM_TILE) {
        g_tile(lid, r0, v0, true);
        // Column lid of G (one per invocation): rows in order, four at a time.
        for (var m4 = 0u; m4 < 16u; m4++) {
            let g = mm_tile[lid * 16u + m4];
            bias_sum += g.x;
            bias_sum += g.y;
            bias_sum += g.z;
            bias_sum += g.w;
        }
        for (var d0 = d_range.x; d0 < d_range.y; d0 += MM_TILE) {
            // dW[v0 + ty + 8 i, d0 + tx + 8 j] += sum_m G[m, ty + 8 i] H[r0 + m, d0 + tx + 8 j]
            let c = tile_product(lid, r0, row_end, d0, false);
            add_block(c, v0, v_end, d0, tx, ty, first && r0 == LQ.row_begin, true);
        }
        workgroupBarrier();
    }
    if (LQ.bias_grad != 0u && wid.z == 0u && v0 + lid < LQ.vocab) {
        let o = v0 + lid - LQ.window_begin;
        d_bias[o] = select(d_bias[o] + bias_sum, bias_sum, first);
    }
}
