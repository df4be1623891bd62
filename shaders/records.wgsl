// Records in `control`, shared by the row kernel (split rows, vocabulary shards) and the fused
// linear head (src/linear), whose vocabulary blocks are shards of one device: their
// `ShardRecord`s (src/layout.rs) are laid out and merged the same way.

fn record_word(at: u32) -> f32 {
    return bitcast<f32>(atomicLoad(&control[at]));
}

fn set_record_word(at: u32, v: f32) {
    atomicStore(&control[at], bitcast<u32>(v));
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
