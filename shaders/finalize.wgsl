// Reduces the per-row losses to the scalar loss of Reduction::Sum / Mean, deterministically:
//   finalize_partials: one workgroup per CHUNK_ROWS rows of a window sums loss and
//     z_loss * lse^2 into its partial slot. Reads 8 bytes per row, writes 8 per chunk.
//   finalize_final: one workgroup combines the slots in a fixed order and divides by the
//     denominator for the mean (NaN when it is 0, as PyTorch). Writes the summary words.
// No float atomics anywhere: the same input gives the same bits on every run.
// Mirror: the reduction of cpu::compute.

@compute @workgroup_size(WG_SIZE)
fn finalize_partials(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    let chunk = wid.y * nwg.x + wid.x;
    let first = chunk * CHUNK_ROWS;
    if (first >= Q.row_count) {
        return;
    }
    let lid = team_lid();
    var sums = vec4<f32>(0.0);  // x: loss, y: z-loss part
    for (var i = 0u; i < CHUNK_ROWS / WG_SIZE; i++) {
        let r = first + i * WG_SIZE + lid;
        if (r < Q.row_count) {
            let l = lse[Q.lse_base + r];
            sums.x += row_loss[Q.loss_base + r];
            sums.y += Q.z_loss * l * l;
        }
    }
    sums = team_sum4(sums);
    if (lid == 0u) {
        let slot = CTRL_PARTIALS + (Q.chunk_base + chunk) * PARTIAL_WORDS;
        atomicStore(&control[slot + FINALIZE_PARTIAL_LOSS], bitcast<u32>(sums.x));
        atomicStore(&control[slot + FINALIZE_PARTIAL_Z_LOSS], bitcast<u32>(sums.y));
    }
}

@compute @workgroup_size(WG_SIZE)
fn finalize_final(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    let lid = team_lid();
    var sums = vec4<f32>(0.0);
    for (var i = lid; i < Q.chunk_count; i += WG_SIZE) {
        let slot = CTRL_PARTIALS + i * PARTIAL_WORDS;
        sums.x += bitcast<f32>(atomicLoad(&control[slot + FINALIZE_PARTIAL_LOSS]));
        sums.y += bitcast<f32>(atomicLoad(&control[slot + FINALIZE_PARTIAL_Z_LOSS]));
    }
    sums = team_sum4(sums);
    if (lid == 0u) {
        var loss_v = sums.x;
        var z_v = sums.y;
        if (Q.reduction == REDUCTION_MEAN) {
            let d = bitcast<f32>(atomicLoad(&control[SUMMARY_DENOMINATOR]));
            loss_v = select(loss_v / d, nan(), d == 0.0);
            z_v = select(z_v / d, nan(), d == 0.0);
        }
        atomicStore(&control[SUMMARY_LOSS], bitcast<u32>(loss_v));
        atomicStore(&control[SUMMARY_Z_LOSS], bitcast<u32>(z_v));
    }
}
