// The fused kernel for PyTorch's [N, C, d1..dk] logits (class dimension 1, spatial S > 1):
// one invocation per row, i.e. per (n, s) position, walking the classes with stride S, four at
// a time in the lanes of a vec4. No transposed copy: neighbouring invocations read neighbouring
// positions, so every load of the workgroup is coalesced, and no workgroup reduction is needed.
//
// Traffic per row of K classes: K logits read twice (statistics sweep, gradient sweep; two exp
// per element), K gradient values written, 8 bytes of loss and lse; probability targets add K
// floats per sweep. An ignored row reads nothing and writes zeros; an invalid label writes NaN.
//
// Mirror: cpu::compute, whose Shape::index walks the same layout.

// Classes c..c+3 of the row whose class 0 is element e0 (g0 in `logits`): elements, the
// valid lanes, and the logits (0 where invalid).
struct Quad {
    c: vec4<u32>,
    e: vec4<u32>,
    g: vec4<u32>,
    valid: vec4<bool>,
}

fn quad_of(c: u32, e0: u32, g0: u32) -> Quad {
    let cs = vec4<u32>(c) + LANES;
    let step = cs * Q.spatial;
    return Quad(cs, vec4<u32>(e0) + step, vec4<u32>(g0) + step, cs < vec4<u32>(Q.classes));
}

fn load_quad(q: Quad) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (q.valid[i]) {
            x[i] = load_elem(q.g[i]);
        }
    }
    return x;
}

@compute @workgroup_size(WG_SIZE)
fn strided_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    let r = (wid.y * nwg.x + wid.x) * WG_SIZE + lid;
    if (r >= Q.row_count) {
        return;
    }
    let k = Q.classes;
    let stride = Q.spatial;
    let e0 = (r / stride) * k * stride + r % stride;  // class 0 of the row, relative to the window
    let g0 = Q.logits_base + e0;
    let label_i = row_label(r);
    let kind = classify_label(label_i);
    if (kind != ROW_VALID) {
        let value = unusable_value(kind);
        if (WRITE_GRAD) {
            for (var c = 0u; c < k; c++) {
                store_elem(g0 + c * stride, value);
            }
        }
        store_row(r, value, value);
        return;
    }
    let label = u32(label_i);
    let extra = label_extra(label);
    var z_label = 0.0;
    if (!SOFT_TARGETS) {
        z_label = transform_logit(vec4<f32>(load_elem(g0 + label * stride))).x;
    }

    let neg = vec4<f32>(neg_inf());
    var m4 = vec4<f32>(NEG_BIG);
    var s4 = vec4<f32>(0.0);
    var shifted4 = vec4<f32>(0.0);  // per-lane target sums relative to m4 (see add_target)
    var mass4 = vec4<f32>(0.0);
    var best = argmax_none();
    for (var c = 0u; c < k; c += 4u) {
        let q = quad_of(c, e0, g0);
        let x = load_quad(q);
        let z = select(neg, transform_logit(x), q.valid);
        push_unit(&m4, &s4, &shifted4, &mass4, q.c, q.e, z, q.valid);
        argmax_push(&best, x, q.c, q.valid);
    }
    let st = merge_lanes(m4, s4, shifted4, mass4);
    let m = st.m;
    let row = finish_row(m, st.v, extra, z_label);
    store_row(r, row.loss, row.lse);
    if (ACCURACY && !SOFT_TARGETS && argmax_lanes(best).y == label && !is_nan(row.lse)) {
        atomicAdd(&control[SUMMARY_CORRECT], 1u);
    }

    if (!WRITE_GRAD) {
        return;
    }
    let consts = grad_consts(row, row_scale(r));
    for (var c = 0u; c < k; c += 4u) {
        let q = quad_of(c, e0, g0);
        let z = transform_logit(load_quad(q));
        let v = grad_value(q.c, q.e, exp(z - m), z, label, consts);
        for (var i = 0u; i < 4u; i++) {
            if (q.valid[i]) {
                store_elem(q.g[i], v[i]);
            }
        }
    }
}
