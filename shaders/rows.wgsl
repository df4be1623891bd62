// The fused row kernel for [rows, classes] logits (spatial == 1): one team per row, where a
// team is a workgroup or a single subgroup (the composed team file decides).
//
// A row is walked in units of UNIT consecutive logits (4 f32 as a vec4 where the caller's
// buffers allow, else 1; 4 16-bit logits, two whole u32 words, so that no two invocations
// write halves of one word of the same row), each unit's logits in the lanes of a vec4. Per row of K classes it computes
// max and log-sum-exp, the target dot product and mass, the loss, and the gradient
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

// Writes `value` as the gradient of the row, and as its loss and lse.
fn fill_row(row: Row, value: f32) {
    let lid = team_lid();
    if (WRITE_GRAD) {
        for (var u = lid; u < row.units; u += team_size()) {
            store_unit(row.u0 + u, vec4<f32>(value), row.g0, row.g0 + Q.classes);
        }
    }
    if (lid == 0u) {
        store_row(row.r, value, value);
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
    let k = Q.classes;
    let e0 = r * k;
    let g0 = Q.logits_base + e0;
    let u0 = g0 / UNIT;
    var row = Row(r, e0, g0, u0, (g0 + k + UNIT - 1u) / UNIT - u0, 0u, 0.0);
    let label_i = team_row_label(r);
    let kind = classify_label(label_i);
    if (kind == ROW_IGNORED) {
        fill_row(row, 0.0);
        return;
    }
    if (kind == ROW_BAD_LABEL) {
        fill_row(row, nan());
        return;
    }
    row.label = u32(label_i);
    row.extra = label_extra(row.label);
    // Loaded before any barrier: with an in-place gradient the row is overwritten afterwards.
    var z_label = 0.0;
    if (!SOFT_TARGETS) {
        z_label = transform_logit(vec4<f32>(load_elem(g0 + row.label))).x;
    }

    let neg = vec4<f32>(neg_inf());
    var m4 = vec4<f32>(NEG_BIG);  // per-lane running max
    var s4 = vec4<f32>(0.0);      // per-lane sum of exp(z - m4)
    var dot4 = vec4<f32>(0.0);    // per-lane target sums (see add_target)
    var mass4 = vec4<f32>(0.0);
    var sums: vec4<f32>;          // x: sum exp(z - m), y: dot, z: mass, for the whole row
    var best = argmax_none();
    let cached = row.units <= team_size() * CACHE_N;
    // Cache slots in use: the loops below run to the constant CACHE_N (so that the cache can
    // live in registers) but stop after the row, uniformly across the team.
    let slots = (row.units + team_size() - 1u) / team_size();
    var m: f32;

    if (cached) {
        // Read once; max without exp.
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
                add_target(&dot4, &mass4, unit.c, unit.e, z, unit.valid);
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
            let e = exp(cache[j] - m);
            s4 += e;
            if (!HAS_SOFTCAP) {
                cache[j] = e;  // the gradient needs only exp(z - max): the slope is constant
            }
        }
        sums = team_sum4(vec4<f32>(lane_sum(s4), lane_sum(dot4), lane_sum(mass4), 0.0));
    } else {
        for (var u = lid; u < row.units; u += team_size()) {
            let x = load_unit(u0 + u);
            let unit = unit_of(row, u);
            let z = select(neg, transform_logit(x), unit.valid);
            add_target(&dot4, &mass4, unit.c, unit.e, z, unit.valid);
            online_push(&m4, &s4, z);
            argmax_push(&best, x, unit.c, unit.valid);
        }
        let st = team_merge(merge_lanes(m4, s4, dot4, mass4));
        m = st.m;
        sums = st.v;
    }

    let result = finish_row(m, sums, row.extra, z_label);
    var arg = NONE_U32;
    if (ACCURACY) {
        let mine = argmax_lanes(best);
        let top = team_max(bitcast<f32>(mine.x));
        arg = team_min_u32(select(NONE_U32, mine.y, bitcast<f32>(mine.x) == top));
    }
    if (lid == 0u) {
        store_row(r, result.loss, result.lse);
        if (ACCURACY && !SOFT_TARGETS && arg == row.label && !is_nan(result.lse)) {
            atomicAdd(&control[CTRL_CORRECT], 1u);
        }
    }

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
        for (var u = lid; u < row.units; u += team_size()) {
            let z = transform_logit(load_unit(u0 + u));
            write_grad_unit(row, u, exp(z - m), z, consts);
        }
    }
}

// The gradient of unit u of the row from exp(z - max) and the transformed logits z.
fn write_grad_unit(row: Row, u: u32, ez: vec4<f32>, z: vec4<f32>, k: vec2<f32>) {
    // Lanes outside the row compute garbage that store_unit does not write.
    let c = vec4<u32>((row.u0 + u) * UNIT - row.g0) + LANES;
    let v = grad_value(c, vec4<u32>(row.e0) + c, ez, z, row.label, k);
    store_unit(row.u0 + u, v, row.g0, row.g0 + Q.classes);
}
