// The fused row kernel for [rows, classes] logits (spatial == 1): one team per row, where a
// team is a workgroup or a single subgroup (the composed team file decides).
//
// A row is walked in units of UNIT consecutive logits (at most 4; 2 for 16-bit logits, one u32
// word, so that no two invocations write halves of the same word), held in a vec4. Per row of K classes
// it computes max and log-sum-exp, the target dot product and mass, the loss, and the gradient
// (softmax * mass - a) * scale * dz/dx, in one dispatch:
//   K <= team size * CACHE_N * UNIT ("cached"): the row is read once into registers; max first,
//     then one exp per element whose result the gradient reuses.
//     Traffic: K logits read once, K gradient values written.
//   larger K ("streaming"): an online max/sum-exp sweep, then a gradient sweep that reads the
//     row again (mostly from cache) and recomputes exp.
//     Traffic: K logits read twice, K gradient values written, two exp per element.
// Probability targets add 4K bytes read per sweep; class weights are K floats shared by all
// rows (cache-resident). Each row also writes its loss and lse (8 bytes). An ignored row reads
// nothing and writes zeros; a row with an invalid label writes NaN (setup reports it).
//
// Mirror: cpu::compute (row_statistics, row_loss, the gradient).

// Writes `value` as the gradient of units [u0, u0 + units) restricted to elements [g0, g0 + K).
fn fill_row(r: u32, g0: u32, u0: u32, units: u32, value: f32) {
    let lid = team_lid();
    if (WRITE_GRAD) {
        for (var u = lid; u < units; u += team_size()) {
            store_unit(u0 + u, vec4<f32>(value), g0, g0 + Q.classes);
        }
    }
    if (lid == 0u) {
        store_row(r, value, value);
    }
}

@compute @workgroup_size(WG_SIZE)
fn rows_main(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    team_begin(ids, wid, nwg);
    // Each team (a workgroup or a subgroup, per the composed team file) strides over the
    // window's rows: the host may launch fewer teams than rows where starting a workgroup is
    // expensive (CPU adapters).
    for (var r = team_first_row(); r < Q.row_count; r += team_row_stride()) {
        process_row(r);
    }
}

// Everything about row r of the window, computed by one team.
fn process_row(r: u32) {
    let lid = team_lid();
    let k = Q.classes;
    let e0 = r * k;                // the row's first element, relative to the window
    let g0 = Q.logits_base + e0;   // the same, as an index into `logits`
    let u0 = g0 / UNIT;            // the row's first unit (may start before g0)
    let units = (g0 + k + UNIT - 1u) / UNIT - u0;
    let label_i = team_row_label(r);
    let kind = classify_label(label_i);
    if (kind == ROW_IGNORED) {
        fill_row(r, g0, u0, units, 0.0);
        return;
    }
    if (kind == ROW_BAD_LABEL) {
        fill_row(r, g0, u0, units, nan());
        return;
    }
    let label = u32(label_i);
    let extra = label_extra(label);
    // Loaded before any barrier: with an in-place gradient the row is overwritten afterwards.
    var z_label = 0.0;
    if (!SOFT_TARGETS) {
        z_label = transform_logit(load_elem(g0 + label));
    }

    var m = NEG_BIG;
    var sums = vec4<f32>(0.0);  // x: sum exp(z - m), y: dot, z: mass (see add_target)
    var best = argmax_none();
    let cached = units <= team_size() * CACHE_N;
    // Cache slots in use: the loops below run to the constant CACHE_N (so that the cache can
    // live in registers) but skip the slots past the row, uniformly across the workgroup.
    let slots = (units + team_size() - 1u) / team_size();
    var cache: array<f32, CACHE_N * UNIT>;

    if (cached) {
        // Read once; max without exp.
        for (var j = 0u; j < CACHE_N; j++) {
            if (j >= slots) {
                break;
            }
            let u = lid + j * team_size();
            var x = vec4<f32>(0.0);
            if (u < units) {
                x = load_unit(u0 + u);
            }
            for (var i = 0u; i < UNIT; i++) {
                let g = (u0 + u) * UNIT + i;
                var z = neg_inf();
                if (u < units && g >= g0 && g - g0 < k) {
                    let c = g - g0;
                    z = transform_logit(x[i]);
                    add_target(&sums, c, e0 + c, z);
                    argmax_push(&best, x[i], c);
                    m = max(m, z);
                }
                cache[j * UNIT + i] = z;
            }
        }
        m = team_max(m);
        for (var j = 0u; j < CACHE_N * UNIT; j++) {
            if (j >= slots * UNIT) {
                break;
            }
            let e = exp(cache[j] - m);
            sums.x += e;
            if (!HAS_SOFTCAP) {
                cache[j] = e;  // the gradient needs only exp(z - max): the slope is constant
            }
        }
        sums = team_sum4(sums);
    } else {
        var sum_exp = 0.0;
        for (var u = lid; u < units; u += team_size()) {
            let x = load_unit(u0 + u);
            for (var i = 0u; i < UNIT; i++) {
                let g = (u0 + u) * UNIT + i;
                if (g >= g0 && g - g0 < k) {
                    let c = g - g0;
                    let z = transform_logit(x[i]);
                    add_target(&sums, c, e0 + c, z);
                    online_push(&m, &sum_exp, z);
                    argmax_push(&best, x[i], c);
                }
            }
        }
        sums.x = sum_exp;
        let st = team_merge(m, sums);
        m = st.m;
        sums = st.v;
    }

    let row = finish_row(m, sums, extra, z_label);
    var arg = NONE_U32;
    if (ACCURACY) {
        arg = team_min_u32(select(NONE_U32, best.c, best.x == team_max(best.x)));
    }
    if (lid == 0u) {
        store_row(r, row.loss, row.lse);
        if (ACCURACY && !SOFT_TARGETS && arg == label && !is_nan(row.lse)) {
            atomicAdd(&control[CTRL_CORRECT], 1u);
        }
    }

    if (!WRITE_GRAD) {
        return;
    }
    let scale = row_scale(r);
    // softmax = exp(z - m) / s: from the exact max, not from the rounded lse, so that rows of
    // huge logits keep an exact gradient.
    let p_coef = row.mass + 2.0 * Q.z_loss * row.lse;
    let inv_sum = row.inv_sum;
    if (cached) {
        for (var j = 0u; j < CACHE_N; j++) {
            if (j >= slots) {
                break;
            }
            let u = lid + j * team_size();
            if (u < units) {
                var z = vec4<f32>(0.0);
                var p = vec4<f32>(0.0);
                for (var i = 0u; i < UNIT; i++) {
                    if (HAS_SOFTCAP) {
                        z[i] = cache[j * UNIT + i];
                        p[i] = exp(z[i] - m) * inv_sum;
                    } else {
                        // Without soft-cap the slope is the constant scale and z is unused.
                        p[i] = cache[j * UNIT + i] * inv_sum;
                    }
                }
                write_grad_unit(u0 + u, g0, e0, p, z, label, extra, p_coef, scale);
            }
        }
    } else {
        for (var u = lid; u < units; u += team_size()) {
            let x = load_unit(u0 + u);
            let z = vec4<f32>(transform_logit(x.x), transform_logit(x.y), transform_logit(x.z), transform_logit(x.w));
            write_grad_unit(u0 + u, g0, e0, exp(z - m) * inv_sum, z, label, extra, p_coef, scale);
        }
    }
}

// The gradient of the logits of unit u that belong to the row [g0, g0 + K), from their
// probabilities p and transformed logits z.
fn write_grad_unit(u: u32, g0: u32, e0: u32, p: vec4<f32>, z: vec4<f32>, label: u32, extra: f32, p_coef: f32, scale: f32) {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < UNIT; i++) {
        let g = u * UNIT + i;
        if (g >= g0 && g - g0 < Q.classes) {
            let c = g - g0;
            v[i] = grad_value(c, e0 + c, p[i], z[i], label, extra, p_coef, scale);
        }
    }
    store_unit(u, v, g0, g0 + Q.classes);
}
