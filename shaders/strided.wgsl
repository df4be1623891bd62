// The fused kernel for PyTorch's [N, C, d1..dk] logits (class dimension 1, spatial S > 1):
// one invocation per row, i.e. per (n, s) position, walking the classes with stride S. No
// transposed copy: neighbouring invocations read neighbouring positions, so every load of the
// workgroup is coalesced, and no workgroup reduction is needed.
//
// Traffic per row of K classes: K logits read twice (statistics sweep, gradient sweep; two exp
// per element), K gradient values written, 8 bytes of loss and lse; probability targets add K
// floats per sweep. An ignored row reads nothing and writes zeros; an invalid label writes NaN.
//
// Mirror: cpu::compute, whose Shape::index walks the same layout.

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
        let value = select(nan(), 0.0, kind == ROW_IGNORED);
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
        z_label = transform_logit(load_elem(g0 + label * stride));
    }

    var m = NEG_BIG;
    var sum_exp = 0.0;
    var sums = vec4<f32>(0.0);
    var best = argmax_none();
    for (var c = 0u; c < k; c++) {
        let x = load_elem(g0 + c * stride);
        let z = transform_logit(x);
        add_target(&sums, c, e0 + c * stride, z);
        online_push(&m, &sum_exp, z);
        argmax_push(&best, x, c);
    }
    sums.x = sum_exp;
    let row = finish_row(m, sums, extra, z_label);
    store_row(r, row.loss, row.lse);
    if (ACCURACY && !SOFT_TARGETS && best.c == label && !is_nan(row.lse)) {
        atomicAdd(&control[CTRL_CORRECT], 1u);
    }

    if (!WRITE_GRAD) {
        return;
    }
    let scale = row_scale(r);
    let p_coef = row.mass + 2.0 * Q.z_loss * row.lse;
    for (var c = 0u; c < k; c++) {
        let g = g0 + c * stride;
        let z = transform_logit(load_elem(g));
        store_elem(g, grad_value(c, e0 + c * stride, exp(z - m) * row.inv_sum, z, label, extra, p_coef, scale));
    }
}
