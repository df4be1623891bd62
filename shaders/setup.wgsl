// Runs before the row kernel: the mean's denominator, the weighted off-mass, and the label
// check. Two dispatches so that the result does not depend on scheduling:
//   setup_partials: one workgroup per CHUNK_ROWS rows of a window writes (weight sum, count,
//     first bad row, its label) into its partial slot. Reads 4 bytes per row (the label) and the
//     label's weight; writes 16 bytes per chunk.
//   setup_final: one workgroup combines the slots in a fixed order, computes the weighted
//     off-mass off * sum_{c != excluded} w_c (reads 4K bytes), and initialises the summary words.
// Mirror: the denominator and label check of cpu::compute / Batch::validate.

@compute @workgroup_size(WG_SIZE)
fn setup_partials(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    let chunk = wid.y * nwg.x + wid.x;
    let first = chunk * CHUNK_ROWS;
    if (first >= Q.row_count) {
        return;
    }
    let lid = team_lid();
    var sums = vec4<f32>(0.0);  // x: sum of label weights, y: counted rows
    var bad = NONE_U32;
    for (var i = 0u; i < CHUNK_ROWS / WG_SIZE; i++) {
        let r = first + i * WG_SIZE + lid;
        if (r < Q.row_count) {
            let label = row_label(r);
            let kind = classify_label(label);
            if (kind == ROW_VALID) {
                // A vocabulary shard counts only the weights of the labels it holds.
                let c = local_label(label);
                if (c != NONE_U32) {
                    sums.x += weight(vec4<u32>(c)).x;
                }
                sums.y += 1.0;
            } else if (kind == ROW_BAD_LABEL) {
                bad = min(bad, r);
            }
        }
    }
    sums = team_sum4(sums);
    let first_bad = team_min_u32(bad);
    if (lid == 0u) {
        let slot = CTRL_PARTIALS + (Q.chunk_base + chunk) * PARTIAL_WORDS;
        atomicStore(&control[slot + SETUP_PARTIAL_DENOMINATOR], bitcast<u32>(sums.x));
        atomicStore(&control[slot + SETUP_PARTIAL_COUNTED_ROWS], u32(sums.y));
        if (first_bad == NONE_U32) {
            atomicStore(&control[slot + SETUP_PARTIAL_FIRST_BAD_ROW], NONE_U32);
            atomicStore(&control[slot + SETUP_PARTIAL_BAD_LABEL], 0u);
        } else {
            atomicStore(&control[slot + SETUP_PARTIAL_FIRST_BAD_ROW], Q.row_begin + first_bad);
            atomicStore(&control[slot + SETUP_PARTIAL_BAD_LABEL], bitcast<u32>(row_label(first_bad)));
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn setup_final(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    let lid = team_lid();
    var sums = vec4<f32>(0.0);  // x: denominator, y: counted rows (exact below 2^24 per invocation)
    var bad = NONE_U32;
    var bad_label = 0u;
    // Probability targets have no labels: setup_partials did not run.
    let chunks = select(Q.chunk_count, 0u, SOFT_TARGETS);
    for (var i = lid; i < chunks; i += WG_SIZE) {
        let slot = CTRL_PARTIALS + i * PARTIAL_WORDS;
        sums.x += bitcast<f32>(atomicLoad(&control[slot + SETUP_PARTIAL_DENOMINATOR]));
        sums.y += f32(atomicLoad(&control[slot + SETUP_PARTIAL_COUNTED_ROWS]));
        let b = atomicLoad(&control[slot + SETUP_PARTIAL_FIRST_BAD_ROW]);
        if (b < bad) {
            bad = b;
            bad_label = atomicLoad(&control[slot + SETUP_PARTIAL_BAD_LABEL]);
        }
    }
    var weight_sum = 0.0;
    if (HAS_WEIGHTS) {
        for (var c = lid; c < Q.classes; c += WG_SIZE) {
            if (c != Q.excluded) {
                weight_sum += weights[Q.weights_base + c];
            }
        }
    }
    sums.z = weight_sum;
    sums = team_sum4(sums);
    let first_bad = team_min_u32(bad);
    if (bad == first_bad && first_bad != NONE_U32) {
        atomicStore(&control[SUMMARY_BAD_LABEL], bad_label);
    }
    if (lid == 0u) {
        var denominator = sums.x;
        var counted = u32(sums.y);
        if (SOFT_TARGETS) {
            denominator = f32(Q.total_rows);
            counted = Q.total_rows;
        }
        atomicStore(&control[SUMMARY_LOSS], 0u);
        atomicStore(&control[SUMMARY_Z_LOSS], 0u);
        atomicStore(&control[SUMMARY_DENOMINATOR], bitcast<u32>(denominator));
        atomicStore(&control[SUMMARY_CORRECT], 0u);
        atomicStore(&control[SUMMARY_FIRST_BAD_ROW], first_bad);
        if (first_bad == NONE_U32) {
            atomicStore(&control[SUMMARY_BAD_LABEL], 0u);
        }
        atomicStore(&control[SUMMARY_COUNTED_ROWS], counted);
        atomicStore(&control[SUMMARY_RESERVED], 0u);
        atomicStore(&control[CTRL_OFF_MASS], bitcast<u32>(Q.off * sums.z));
    }
}
