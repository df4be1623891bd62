// The fused row kernel for [rows, classes] logits (spatial == 1): one workgroup per row.
//
// Per row of K classes it computes max and log-sum-exp, the target dot product and mass, the
// loss, and the gradient (softmax * mass - a) * scale * dz/dx, in one dispatch:
//   K <= WG_SIZE * CACHE_N ("cached"): the row is read once into registers; max first, then one
//     exp per element whose result the gradient reuses. Traffic: 4K bytes read, 4K written.
//   larger K ("streaming"): an online max/sum-exp sweep, then a gradient sweep that reads the row
//     again and recomputes exp. Traffic: 8K bytes read (the second read mostly from cache), 4K
//     written, two exp per element.
// Probability targets add 4K bytes read per sweep; weights are K floats shared by all rows.
// Each row also writes its loss and lse (8 bytes). Ignored rows write only zeros.
//
// Mirror: cpu::compute.

var<workgroup> wg_label: i32;

// The row's gradient when its label is ignored (zeros) or invalid (NaN, reported by setup).
fn fill_row(r: u32, e0: u32, value: f32) {
    let lid = team_lid();
    if (WRITE_GRAD) {
        for (var c = lid; c < P.classes; c += WG_SIZE) {
            store_grad(e0 + c, value);
        }
    }
    if (lid == 0u) {
        store_row(r, value, value);
    }
}

@compute @workgroup_size(WG_SIZE)
fn rows_main(ids: TeamIds, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    team_begin(ids);
    let r = wid.y * nwg.x + wid.x;
    if (r >= P.row_count) {
        return;
    }
    let lid = team_lid();
    let k = P.classes;
    let e0 = r * k;
    if (lid == 0u) {
        wg_label = row_label(r);
    }
    let label_i = workgroupUniformLoad(&wg_label);
    let kind = classify_label(label_i);
    if (kind == ROW_IGNORED) {
        fill_row(r, e0, 0.0);
        return;
    }
    if (kind == ROW_BAD_LABEL) {
        fill_row(r, e0, nan());
        return;
    }
    let label = u32(label_i);
    let extra = label_extra(label);
    // Loaded before any barrier: with an in-place gradient the row is overwritten afterwards.
    var z_label = 0.0;
    if (!SOFT_TARGETS) {
        z_label = transform_logit(load_logit(e0 + label));
    }
    // Class labels: sum_{c != excluded} w_c z_c is only needed when the off-value is nonzero
    // (skipping it keeps plain cross-entropy finite when a non-target logit is -inf).
    let need_off_sum = !SOFT_TARGETS && P.off != 0.0;

    var m = NEG_BIG;
    var sums = vec4<f32>(0.0);   // x: sum exp(z - m), y: dot sum a_c z_c, z: mass sum a_c
    var arg = NONE_U32;
    let cached = k <= WG_SIZE * CACHE_N;
    var cache: array<f32, CACHE_N>;
    var lse_v: f32;

    if (cached) {
        // Read once; max without exp.
        for (var j = 0u; j < CACHE_N; j++) {
            let c = lid + j * WG_SIZE;
            var z = neg_inf();
            if (c < k) {
                z = transform_logit(load_logit(e0 + c));
                if (SOFT_TARGETS) {
                    let a = soft_coef(c, prob(e0 + c));
                    sums.y += a * z;
                    sums.z += a;
                } else if (need_off_sum && c != P.excluded) {
                    sums.y += weight(c) * z;
                }
                if (z > m) {
                    m = z;
                    arg = c;
                }
            }
            cache[j] = z;
        }
        let row_max = team_max(m);
        if (ACCURACY) {
            arg = team_min_u32(select(NONE_U32, arg, m == row_max));
        }
        m = row_max;
        for (var j = 0u; j < CACHE_N; j++) {
            let e = exp(cache[j] - m);
            sums.x += e;
            if (!HAS_SOFTCAP) {
                cache[j] = e;  // the gradient needs only exp(z - max); the slope is constant
            }
        }
        sums = team_sum4(sums);
        lse_v = m + log(sums.x);
    } else {
        var sum_exp = 0.0;
        for (var c = lid; c < k; c += WG_SIZE) {
            let z = transform_logit(load_logit(e0 + c));
            if (SOFT_TARGETS) {
                let a = soft_coef(c, prob(e0 + c));
                sums.y += a * z;
                sums.z += a;
            } else if (need_off_sum && c != P.excluded) {
                sums.y += weight(c) * z;
            }
            if (online_push(&m, &sum_exp, z)) {
                arg = c;
            }
        }
        sums.x = sum_exp;
        let st = team_merge(m, sums);
        if (ACCURACY) {
            arg = team_min_u32(select(NONE_U32, arg, m == st.m));
        }
        m = st.m;
        sums = st.v;
        lse_v = m + log(sums.x);
    }

    // Row totals: for class labels the dot is off * sum + the label's own term, the mass the
    // spec's off-mass plus the label's extra.
    var dot = sums.y;
    var mass = sums.z;
    if (!SOFT_TARGETS) {
        dot = select(0.0, P.off * sums.y, need_off_sum) + extra * z_label;
        mass = off_mass() + extra;
    }
    if (lid == 0u) {
        store_row(r, row_loss_value(lse_v, mass, dot), lse_v);
        if (ACCURACY && !SOFT_TARGETS && arg == label && !is_nan(lse_v)) {
            atomicAdd(&control[CTRL_CORRECT], 1u);
        }
    }

    if (!WRITE_GRAD) {
        return;
    }
    let scale = row_scale(r);
    let p_coef = mass + 2.0 * P.z_loss * lse_v;
    if (cached) {
        let inv_sum = 1.0 / sums.x;
        for (var j = 0u; j < CACHE_N; j++) {
            let c = lid + j * WG_SIZE;
            if (c < k) {
                var p: f32;
                var slope = P.logit_scale;
                if (HAS_SOFTCAP) {
                    p = exp(cache[j] - lse_v);
                    slope = transform_slope(cache[j]);
                } else {
                    p = cache[j] * inv_sum;
                }
                var a: f32;
                if (SOFT_TARGETS) {
                    a = soft_coef(c, prob(e0 + c));
                } else {
                    a = class_coef(c, label, extra);
                }
                store_grad(e0 + c, (p * p_coef - a) * scale * slope);
            }
        }
    } else {
        for (var c = lid; c < k; c += WG_SIZE) {
            let z = transform_logit(load_logit(e0 + c));
            let p = exp(z - lse_v);
            var a: f32;
            if (SOFT_TARGETS) {
                a = soft_coef(c, prob(e0 + c));
            } else {
                a = class_coef(c, label, extra);
            }
            store_grad(e0 + c, (p * p_coef - a) * scale * transform_slope(z));
        }
    }
}
