// The records of vocabulary shards in `control` (from Q.split_base), shared by the shard
// passes of rows.wgsl (one team per row, [rows, c1 - c0] logits), strided.wgsl (one
// invocation per row, [N, c1 - c0, d..] logits) and the fused linear head (linear.wgsl, whose
// vocabulary blocks are shards of one device): writing a row's ShardRecord (pass 1), reading
// its host-merged ShardMergedRow (pass 2), and the on-device merge of all P shards' records
// (mirror: merge() of src/shards/merge.rs). Record words are read and written atomically: the
// record region shares `control` with the summary's atomics. Split rows (rows.wgsl) keep their
// records with the same two accessors.

fn record_word(at: u32) -> f32 {
    return bitcast<f32>(atomicLoad(&control[at]));
}

fn set_record_word(at: u32, v: f32) {
    atomicStore(&control[at], bitcast<u32>(v));
}

// The first word of row r's ShardRecord (pass 1).
fn record_of(r: u32) -> u32 {
    return Q.split_base + (Q.row_begin + r) * SHARD_RECORD_WORDS;
}

// The record at `at` (record_of(r) for a shard; shard_record(block, row) for a vocabulary
// block of the linear head) of a row that is ignored or has a bad label: nothing but its
// label and kind.
fn write_unusable_record(at: u32, label_i: i32, kind: u32) {
    set_record_word(at + SHARD_RECORD_MAX, NEG_BIG);
    set_record_word(at + SHARD_RECORD_SUM_EXP, 0.0);
    set_record_word(at + SHARD_RECORD_SHIFTED, 0.0);
    set_record_word(at + SHARD_RECORD_MASS, 0.0);
    set_record_word(at + SHARD_RECORD_ARGMAX_VALUE, neg_inf());
    atomicStore(&control[at + SHARD_RECORD_ARGMAX_CLASS], NONE_U32);
    atomicStore(&control[at + SHARD_RECORD_LABEL], bitcast<u32>(label_i));
    atomicStore(&control[at + SHARD_RECORD_FLAGS], kind);
}

// A valid row's record: its statistics, target sums (x: mass, y: shifted; target_sums), the
// argmax (value bits, local class or NONE_U32), its label and local label (NONE_U32 when
// another shard holds it).
fn write_record(at: u32, st: OnlineStats, sums: vec2<f32>, arg: vec2<u32>, label_i: i32, label: u32) {
    set_record_word(at + SHARD_RECORD_MAX, st.m);
    set_record_word(at + SHARD_RECORD_SUM_EXP, st.v.x);
    set_record_word(at + SHARD_RECORD_SHIFTED, sums.y);
    set_record_word(at + SHARD_RECORD_MASS, sums.x);
    atomicStore(&control[at + SHARD_RECORD_ARGMAX_VALUE], arg.x);
    atomicStore(&control[at + SHARD_RECORD_ARGMAX_CLASS], select(arg.y + Q.class_begin, NONE_U32, arg.y == NONE_U32));
    atomicStore(&control[at + SHARD_RECORD_LABEL], bitcast<u32>(label_i));
    atomicStore(&control[at + SHARD_RECORD_FLAGS], ROW_VALID | select(0u, SHARD_HOLDS_LABEL, !SOFT_TARGETS && label != NONE_U32));
}

// Row r's host-merged constants (pass 2): M and the gradient constants (coef, scale times the
// logit scale), as grad_consts gives them.
fn merged_row(r: u32) -> vec3<f32> {
    let at = Q.split_base + (Q.row_begin + r) * SHARD_MERGED_WORDS;
    return vec3<f32>(record_word(at + SHARD_MERGED_MAX), record_word(at + SHARD_MERGED_COEF), record_word(at + SHARD_MERGED_SCALE) * Q.logit_scale);
}

// The first word of shard p's block (Q.split_parts blocks of a ShardHeader and one
// ShardRecord per row of all windows), and of its record of a row.
fn shard_block(p: u32) -> u32 {
    return Q.split_base + p * (SHARD_HEADER_WORDS + Q.total_rows * SHARD_RECORD_WORDS);
}

fn shard_record(p: u32, global_row: u32) -> u32 {
    return shard_block(p) + SHARD_HEADER_WORDS + global_row * SHARD_RECORD_WORDS;
}

// The P shards' records of a row, merged in rank order.
struct MergedRow {
    st: OnlineStats,  // m = M; v.x = S, v.y = sum a (M - z), v.z = A
    arg: vec2<u32>,   // first largest raw logit (bits) and its global class
}

fn merge_shard_records(global_row: u32) -> MergedRow {
    var m = NEG_BIG;
    for (var p = 0u; p < Q.split_parts; p++) {
        m = max(m, record_word(shard_record(p, global_row) + SHARD_RECORD_MAX));
    }
    var v = vec4<f32>(0.0);
    var arg = vec2<u32>(bitcast<u32>(neg_inf()), NONE_U32);
    for (var p = 0u; p < Q.split_parts; p++) {
        let at = shard_record(p, global_row);
        // The shard's sums re-expressed relative to the row's max, added in rank order.
        let part = OnlineStats(record_word(at + SHARD_RECORD_MAX), vec4<f32>(record_word(at + SHARD_RECORD_SUM_EXP), record_word(at + SHARD_RECORD_SHIFTED), record_word(at + SHARD_RECORD_MASS), 0.0));
        v += relative_to(part, m);
        let value = atomicLoad(&control[at + SHARD_RECORD_ARGMAX_VALUE]);
        // Shards are in class order: a later one replaces only when strictly larger.
        if (arg.y == NONE_U32 || bitcast<f32>(value) > bitcast<f32>(arg.x)) {
            arg = vec2<u32>(value, atomicLoad(&control[at + SHARD_RECORD_ARGMAX_CLASS]));
        }
    }
    return MergedRow(OnlineStats(m, v), arg);
}

// The mean's denominator: the shards' parts (header word 7) in rank order; the row count for
// probability targets.
fn merged_denominator() -> f32 {
    if (SOFT_TARGETS) {
        return f32(Q.total_rows);
    }
    var d = 0.0;
    for (var p = 0u; p < Q.split_parts; p++) {
        d += record_word(shard_block(p) + SHARD_HEADER_DENOMINATOR);
    }
    return d;
}

// The merged denominator d for the reduction after this pass (setup_final wrote this shard's
// part alone); called by one invocation, and written in the first window only.
fn publish_denominator(d: f32) {
    if (Q.row_begin == 0u) {
        atomicStore(&control[SUMMARY_DENOMINATOR], bitcast<u32>(d));
    }
}

// Row r of the window merged from all shards' records: writes its loss and lse, counts it when
// its argmax is the label, and returns M and its gradient constants (coef, scale times the
// logit scale), with d the mean's denominator.
fn finish_merged_row(r: u32, d: f32) -> vec3<f32> {
    let merged = merge_shard_records(Q.row_begin + r);
    let st = merged.st;
    let log_s = log(st.v.x);
    let lse_v = st.m + log_s;
    store_row(r, st.v.z * log_s + st.v.y + Q.z_loss * lse_v * lse_v, lse_v);
    if (ACCURACY && !SOFT_TARGETS && merged.arg.y == u32(row_label(r)) && !is_nan(lse_v)) {
        atomicAdd(&control[SUMMARY_CORRECT], 1u);
    }
    return vec3<f32>(st.m, (st.v.z + 2.0 * Q.z_loss * lse_v) / st.v.x, row_scale_over(r, d) * Q.logit_scale);
}
