// The fused row kernel for [rows, classes] logits (spatial == 1): one team per row, where a
// team is a workgroup or a single subgroup (the composed team file decides).
//
// A row is walked in units of UNIT consecutive logits (4 f32 as a vec4 where the caller's
// buffers allow, else 1; 4 16-bit logits, two whole u32 words, so that no two invocations
// write halves of one word of the same row), each unit's logits in the lanes of a vec4. Per row of K classes it computes
// max and log-sum-exp, the shifted target sum and its mass, the loss, and the gradient
// (softmax * mass - a) * scale * dz/dx, in one dispatch:
//   K <= team size * CACHE_N * UNIT ("cached"): the row is read once into registers; max
//     first, then one exp per element whose result the gradient reuses.
//     Traffic: K logits read once, K gradient values written.
//   larger K ("streaming"): an online max/sum-exp sweep, then a gradient sweep that reads the
//     row again (mostly from cache) and recomputes exp.
//     Traffic: K logits read twice, K gradient values written, two exp per element.
// Probability targets add 4K bytes read per sweep; class weights are K floats shared by all
// rows (cache-resident). Each row also writes its loss and lse (8 bytes). An ignored row reads
// nothing and writes zeros; a row with an invalid label writes NaN (setup reports it).
//
// Mirror: cpu::compute (row_statistics, row_loss, the gradient).

// The row in registers (the "cached" path). Module-scope, so that it is zero-initialised once
// per invocation rather than once per row.
var<private> cache: array<vec4<f32>, CACHE_N>;

// Where a row lies in the logits binding, and its label.
struct Row {
    r: u32,       // row within the window
    e0: u32,      // its first element, relative to the window (probabilities, gradient)
    g0: u32,      // the same, as an index into `logits`
    u0: u32,      // its first unit (which may start before g0)
    units: u32,   // units touching the row
    label: u32,
    extra: f32,   // w_y (on - off_y)
}

// Unit u of the row (u = 0 is u0): its classes and which lanes hold the row's logits.
struct Unit {
    c: vec4<u32>,
    e: vec4<u32>,
    valid: vec4<bool>,
}

fn unit_of(row: Row, u: u32) -> Unit {
    let g = vec4<u32>((row.u0 + u) * UNIT) + LANES;
    let c = g - vec4<u32>(row.g0);  // wraps for lanes before the row: masked
    let valid = (LANES < vec4<u32>(UNIT)) & (g >= vec4<u32>(row.g0)) & (c < vec4<u32>(Q.classes));
    return Unit(c, vec4<u32>(row.e0) + c, valid);
}

// Row r of the window: where it lies (label and extra still unset).
fn row_at(r: u32) -> Row {
    let e0 = r * Q.classes;
    let g0 = Q.logits_base + e0;
    let u0 = g0 / UNIT;
    return Row(r, e0, g0, u0, (g0 + Q.classes + UNIT - 1u) / UNIT - u0, 0u, 0.0);
}

// Writes `value` as the gradient of units [u_begin, u_end) of the row.
fn fill_units(row: Row, u_begin: u32, u_end: u32, value: f32) {
    if (WRITE_GRAD) {
        for (var u = u_begin + team_lid(); u < u_end; u += team_size()) {
            store_unit(row.u0 + u, vec4<f32>(value), row.g0, row.g0 + Q.classes);
        }
    }
}

// Writes `value` as the gradient of the row, and as its loss and lse.
fn fill_row(row: Row, value: f32) {
    fill_units(row, 0u, row.units, value);
    if (team_lid() == 0u) {
        store_row(row.r, value, value);
    }
}

// Reads the row's label and classifies it (ROW_*); sets the label and its extra coefficient
// when the row is valid.
fn label_row(row: ptr<function, Row>) -> u32 {
    let label_i = team_row_label((*row).r);
    let kind = classify_label(label_i);
    if (kind == ROW_VALID) {
        // Unsharded, the label itself; a vocabulary shard not holding it gets NONE_U32.
        (*row).label = local_label(label_i);
        if ((*row).label != NONE_U32) {
            (*row).extra = label_extra((*row).label);
        }
    }
    return kind;
}

// The transformed logit of the row's label (0 for probability targets).
fn label_logit(row: Row) -> f32 {
    if (SOFT_TARGETS || row.label == NONE_U32) {
        return 0.0;
    }
    return transform_logit(vec4<f32>(load_elem(row.g0 + row.label))).x;
}

// The team's statistics over units [u_begin, u_end) of the row, one read and one exp per
// logit (online): merged across the team, with this invocation's argmax candidates.
struct Sweep {
    st: OnlineStats,
    best: Argmax,
}

fn sweep_stats(row: Row, u_begin: u32, u_end: u32) -> Sweep {
    let neg = vec4<f32>(neg_inf());
    var m4 = vec4<f32>(NEG_BIG);  // per-lane running max
    var s4 = vec4<f32>(0.0);      // per-lane sum of exp(z - m4)
    var shifted4 = vec4<f32>(0.0);  // per-lane target sums relative to m4 (see add_target)
    var mass4 = vec4<f32>(0.0);
    var best = argmax_none();
    for (var u = u_begin + team_lid(); u < u_end; u += team_size()) {
        let x = load_unit(row.u0 + u);
        let unit = unit_of(row, u);
        let z = select(neg, transform_logit(x), unit.valid);
        push_unit(&m4, &s4, &shifted4, &mass4, unit.c, unit.e, z, unit.valid);
        argmax_push(&best, x, unit.c, unit.valid);
    }
    return Sweep(team_merge(merge_lanes(m4, s4, shifted4, mass4)), best);
}

// The team's argmax (value bits, class) from every invocation's candidates.
fn team_argmax(best: Argmax) -> vec2<u32> {
    let mine = argmax_lanes(best);
    let top = team_max(bitcast<f32>(mine.x));
    return vec2<u32>(bitcast<u32>(top), team_min_u32(select(NONE_U32, mine.y, bitcast<f32>(mine.x) == top)));
}

// The gradient of units [u_begin, u_end) of the row, reading the logits again.
fn sweep_grad(row: Row, u_begin: u32, u_end: u32, m: f32, consts: vec2<f32>) {
    for (var u = u_begin + team_lid(); u < u_end; u += team_size()) {
        let z = transform_logit(load_unit(row.u0 + u));
        write_grad_unit(row, u, exp(z - m), z, consts);
    }
}

// Writes a row's results, and counts it when its argmax is the label.
fn store_results(row: Row, result: RowResult, arg: u32) {
    if (team_lid() == 0u) {
        store_row(row.r, result.loss, result.lse);
        if (ACCURACY && !SOFT_TARGETS && arg == row.label && !is_nan(result.lse)) {
            atomicAdd(&control[SUMMARY_CORRECT], 1u);
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn rows_main(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    // Each team strides over the window's rows: the host may launch fewer teams than rows
    // where starting a workgroup is expensive (CPU adapters).
    for (var r = team_first_row(); r < Q.row_count; r += team_row_stride()) {
        process_row(r);
    }
}

// Everything about row r of the window, computed by one team.
fn process_row(r: u32) {
    let lid = team_lid();
    var row = row_at(r);
    let kind = label_row(&row);
    if (kind != ROW_VALID) {
        fill_row(row, unusable_value(kind));
        return;
    }
    // Loaded before any barrier: with an in-place gradient the row is overwritten afterwards.
    let z_label = label_logit(row);
    let u0 = row.u0;
    let neg = vec4<f32>(neg_inf());
    var sums: vec4<f32>;  // x: sum exp(z - m), y: shifted target sum, z: its mass
    var best = argmax_none();
    let cached = row.units <= team_size() * CACHE_N;
    // Cache slots in use: the loops below run to the constant CACHE_N (so that the cache can
    // live in registers) but stop after the row, uniformly across the team.
    let slots = (row.units + team_size() - 1u) / team_size();
    var m: f32;

    if (cached) {
        // Read once; max without exp. Then, relative to the row's max, the sum of exp and the
        // target sums.
        var m4 = vec4<f32>(NEG_BIG);
        var s4 = vec4<f32>(0.0);
        var shifted4 = vec4<f32>(0.0);
        var mass4 = vec4<f32>(0.0);
        for (var j = 0u; j < CACHE_N; j++) {
            if (j >= slots) {
                break;
            }
            let u = lid + j * team_size();
            var z = neg;
            if (u < row.units) {
                let x = load_unit(u0 + u);
                let unit = unit_of(row, u);
                z = select(neg, transform_logit(x), unit.valid);
                argmax_push(&best, x, unit.c, unit.valid);
                m4 = max(m4, z);
            }
            cache[j] = z;
        }
        m = team_max(max(max(m4.x, m4.y), max(m4.z, m4.w)));
        for (var j = 0u; j < CACHE_N; j++) {
            if (j >= slots) {
                break;
            }
            let u = lid + j * team_size();
            let z = cache[j];
            if (u < row.units) {
                let unit = unit_of(row, u);
                add_target(&shifted4, &mass4, unit.c, unit.e, z, unit.valid, vec4<f32>(m));
            }
            let e = exp(z - m);
            s4 += e;
            if (!HAS_SOFTCAP) {
                cache[j] = e;  // the gradient needs only exp(z - max): the slope is constant
            }
        }
        sums = team_sum4(vec4<f32>(lane_sum(s4), lane_sum(shifted4), lane_sum(mass4), 0.0));
    } else {
        let sweep = sweep_stats(row, 0u, row.units);
        m = sweep.st.m;
        sums = sweep.st.v;
        best = sweep.best;
    }

    let result = finish_row(m, sums, row.extra, z_label);
    var arg = NONE_U32;
    if (ACCURACY) {
        arg = team_argmax(best).y;
    }
    store_results(row, result, arg);

    if (!WRITE_GRAD) {
        return;
    }
    // softmax = exp(z - m) / s: from the exact max, not from the rounded lse, so that rows of
    // huge logits keep an exact gradient.
    let consts = grad_consts(result, row_scale(r));
    if (cached) {
        for (var j = 0u; j < CACHE_N; j++) {
            if (j >= slots) {
                break;
            }
            let u = lid + j * team_size();
            if (u < row.units) {
                let z = cache[j];
                var ez = z;  // without soft-cap the cache holds exp(z - m), and z is unused
                if (HAS_SOFTCAP) {
                    ez = exp(z - m);
                }
                write_grad_unit(row, u, ez, z, consts);
            }
        }
    } else {
        sweep_grad(row, 0u, row.units, m, consts);
    }
}

// The gradient of unit u of the row from exp(z - max) and the transformed logits z.
fn write_grad_unit(row: Row, u: u32, ez: vec4<f32>, z: vec4<f32>, k: vec2<f32>) {
    // Lanes outside the row compute garbage that store_unit does not write.
    let c = vec4<u32>((row.u0 + u) * UNIT - row.g0) + LANES;
    let v = grad_value(c, vec4<u32>(row.e0) + c, ez, z, row.label, k);
    store_unit(row.u0 + u, v, row.g0, row.g0 + Q.classes);
}

// ---- Split rows --------------------------------------------------------------------------
// When rows are few and long, each is cut into Q.split_parts parts, one team per part, in
// three dispatches (the plan picks this; rows_main is not used then):
//   split_stats:  every part's statistics over its units (one read, one exp per logit) into
//                 the part's record (`SplitRecord` in src/layout.rs: SPLIT_WORDS words of
//                 `control` from Q.split_base).
//   split_finish: per row, the parts' records merged in order: lse, loss, accuracy, and the
//                 gradient constants written back into part 0's record.
//   split_grad:   every part's gradient (a second read, one exp per logit).
// Traffic as the streaming path: K logits read twice, K gradient values written, plus
// 32 bytes per part.


fn split_record(r: u32, part: u32) -> u32 {
    return Q.split_base + ((Q.row_begin + r) * Q.split_parts + part) * SPLIT_WORDS;
}

// Units [begin, end) of part `part` of the row.
fn part_units(row: Row, part: u32) -> vec2<u32> {
    return vec2<u32>(row.units * part / Q.split_parts, row.units * (part + 1u) / Q.split_parts);
}

@compute @workgroup_size(WG_SIZE)
fn split_stats(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    for (var t = team_first_row(); t < Q.row_count * Q.split_parts; t += team_row_stride()) {
        let part = t % Q.split_parts;
        var row = row_at(t / Q.split_parts);
        if (label_row(&row) != ROW_VALID) {
            continue;  // split_finish and split_grad write the row
        }
        let range = part_units(row, part);
        let sweep = sweep_stats(row, range.x, range.y);
        var arg = vec2<u32>(bitcast<u32>(neg_inf()), NONE_U32);
        if (ACCURACY) {
            arg = team_argmax(sweep.best);
        }
        if (team_lid() == 0u) {
            let at = split_record(row.r, part);
            set_record_word(at + SPLIT_MAX, sweep.st.m);
            set_record_word(at + SPLIT_SUM_EXP, sweep.st.v.x);
            set_record_word(at + SPLIT_SHIFTED, sweep.st.v.y);
            set_record_word(at + SPLIT_MASS, sweep.st.v.z);
            atomicStore(&control[at + SPLIT_ARGMAX_VALUE], arg.x);
            atomicStore(&control[at + SPLIT_ARGMAX_CLASS], arg.y);
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn split_finish(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    for (var r = team_first_row(); r < Q.row_count; r += team_row_stride()) {
        var row = row_at(r);
        let kind = label_row(&row);
        if (kind != ROW_VALID) {
            if (team_lid() == 0u) {
                store_row(r, unusable_value(kind), unusable_value(kind));
            }
            continue;
        }
        let z_label = label_logit(row);
        if (team_lid() == 0u) {
            // The parts in order: the same result on every run.
            let first = split_record(r, 0u);
            var st = OnlineStats(record_word(first + SPLIT_MAX), vec4<f32>(record_word(first + SPLIT_SUM_EXP), record_word(first + SPLIT_SHIFTED), record_word(first + SPLIT_MASS), 0.0));
            var best = vec2<u32>(atomicLoad(&control[first + SPLIT_ARGMAX_VALUE]), atomicLoad(&control[first + SPLIT_ARGMAX_CLASS]));
            for (var part = 1u; part < Q.split_parts; part++) {
                let at = split_record(r, part);
                st = merge_stats(st, OnlineStats(record_word(at + SPLIT_MAX), vec4<f32>(record_word(at + SPLIT_SUM_EXP), record_word(at + SPLIT_SHIFTED), record_word(at + SPLIT_MASS), 0.0)));
                // Later parts hold later classes: only a strictly larger value replaces.
                if (bitcast<f32>(atomicLoad(&control[at + SPLIT_ARGMAX_VALUE])) > bitcast<f32>(best.x) || best.y == NONE_U32) {
                    best = vec2<u32>(atomicLoad(&control[at + SPLIT_ARGMAX_VALUE]), atomicLoad(&control[at + SPLIT_ARGMAX_CLASS]));
                }
            }
            let result = finish_row(st.m, st.v, row.extra, z_label);
            store_row(r, result.loss, result.lse);
            if (ACCURACY && !SOFT_TARGETS && best.y == row.label && !is_nan(result.lse)) {
                atomicAdd(&control[SUMMARY_CORRECT], 1u);
            }
            if (WRITE_GRAD) {
                let consts = grad_consts(result, row_scale(r));
                set_record_word(first + SPLIT_MAX, st.m);
                set_record_word(first + SPLIT_GRAD_EZ_COEF, consts.x);
                set_record_word(first + SPLIT_GRAD_SCALE, consts.y);
            }
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn split_grad(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    for (var t = team_first_row(); t < Q.row_count * Q.split_parts; t += team_row_stride()) {
        let part = t % Q.split_parts;
        var row = row_at(t / Q.split_parts);
        let range = part_units(row, part);
        let kind = label_row(&row);
        if (kind != ROW_VALID) {
            fill_units(row, range.x, range.y, unusable_value(kind));
            continue;
        }
        let first = split_record(row.r, 0u);
        let consts = vec2<f32>(record_word(first + SPLIT_GRAD_EZ_COEF), record_word(first + SPLIT_GRAD_SCALE));
        sweep_grad(row, range.x, range.y, record_word(first + SPLIT_MAX), consts);
    }
}

// ---- Vocabulary shards --------------------------------------------------------------------
// A shard plan (src/shards/gpu.rs) runs over one shard's [rows, c1 - c0] logits, with
// Q.class_begin = c0 and Q.label_classes = K; a label another shard holds is NONE_U32 here
// (label_row). Its records live where split rows keep theirs (Q.split_base in `control`),
// one `ShardRecord` (src/layout.rs) per row; the host copies them out (pass 1) or in (pass 2).
// The record words and the on-device merge are in shard_records.wgsl (shared with the strided
// shard passes of strided.wgsl).
//   shard_stats: pass 1: per row, one sweep (one read, one exp per logit) into the row's
//                ShardRecord: m, s, sum a (m - z), sum a, argmax, label, kind and flags.
//   shard_grad:  pass 2: per row, the gradient from the host-merged ShardMergedRow
//                (M, coef, scale, kind; RowGrad in src/shards/merge.rs): a second read, one exp
//                per logit.
//   shard_merge_grad: pass 2 for shards on one device: the P record blocks (Q.split_parts of
//                them, in rank order) are merged per row by the team's first invocation
//                (mirror: merge() of src/shards/merge.rs), which writes the row's loss and lse
//                and hands M and the gradient constants to the team; then the gradient as
//                shard_grad. Reads P * 32 bytes per row more.
// Traffic: pass 1 reads the shard's logits once and writes 32 bytes per row; pass 2 reads
// them again and 16 bytes per row, and writes the shard's gradient.

@compute @workgroup_size(WG_SIZE)
fn shard_stats(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    for (var r = team_first_row(); r < Q.row_count; r += team_row_stride()) {
        var row = row_at(r);
        let label_i = row_label(r);
        let kind = label_row(&row);
        if (kind != ROW_VALID) {
            if (team_lid() == 0u) {
                write_unusable_record(record_of(r), label_i, kind);
            }
            continue;
        }
        let z_label = label_logit(row);
        let sweep = sweep_stats(row, 0u, row.units);
        var arg = vec2<u32>(bitcast<u32>(neg_inf()), NONE_U32);
        if (ACCURACY) {
            arg = team_argmax(sweep.best);
        }
        let sums = target_sums(sweep.st.m, sweep.st.v, row.extra, z_label);
        if (team_lid() == 0u) {
            write_record(record_of(r), sweep.st, sums, arg, label_i, row.label);
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn shard_grad(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    for (var r = team_first_row(); r < Q.row_count; r += team_row_stride()) {
        var row = row_at(r);
        // The kind from this shard's own labels, the same as the merged one, and uniform.
        let kind = label_row(&row);
        if (kind != ROW_VALID) {
            fill_units(row, 0u, row.units, unusable_value(kind));
            continue;
        }
        let merged = merged_row(r);
        sweep_grad(row, 0u, row.units, merged.x, merged.yz);
    }
}

@compute @workgroup_size(WG_SIZE)
fn shard_merge_grad(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    let d = merged_denominator();
    if (team_first_row() == 0u && team_lid() == 0u) {
        publish_denominator(d);
    }
    for (var r = team_first_row(); r < Q.row_count; r += team_row_stride()) {
        var row = row_at(r);
        let kind = label_row(&row);
        if (kind != ROW_VALID) {
            fill_row(row, unusable_value(kind));
            continue;
        }
        // One invocation merges the row; the team reads its result through one reduction in
        // which the others add zeros (exact), rather than each repeating the P loads.
        var mine = vec4<f32>(0.0);
        if (team_lid() == 0u) {
            mine = vec4<f32>(finish_merged_row(r, d), 0.0);
        }
        if (WRITE_GRAD) {
            let k = team_sum4(mine);
            sweep_grad(row, 0u, row.units, k.x, k.yz);
        }
    }
}
