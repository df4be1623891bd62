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

// Row r of the window: its class 0's element (window-relative) and index in `logits` (o),
// its label (0 for probability targets) and the label's kind (ROW_*).
struct StridedRow {
    o: vec2<u32>,
    label_i: i32,
    kind: u32,
}

fn strided_at(r: u32) -> StridedRow {
    let stride = Q.spatial;
    let e0 = (r / stride) * Q.classes * stride + r % stride;
    let label_i = row_label(r);
    return StridedRow(vec2<u32>(e0, Q.logits_base + e0), label_i, classify_label(label_i));
}

// The row this invocation handles (one per row; the host launches enough).
fn strided_row(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG_SIZE + lid;
}

// The statistics sweep of the row at `o` (strided_at): its online statistics over the
// classes, and the first largest raw logit (value bits, class; NONE_U32 without ACCURACY).
struct StridedSweep {
    st: OnlineStats,
    arg: vec2<u32>,
}

fn strided_sweep(o: vec2<u32>) -> StridedSweep {
    let neg = vec4<f32>(neg_inf());
    var m4 = vec4<f32>(NEG_BIG);
    var s4 = vec4<f32>(0.0);
    var shifted4 = vec4<f32>(0.0);  // per-lane target sums relative to m4 (see add_target)
    var mass4 = vec4<f32>(0.0);
    var best = argmax_none();
    for (var c = 0u; c < Q.classes; c += 4u) {
        let q = quad_of(c, o.x, o.y);
        let x = load_quad(q);
        let z = select(neg, transform_logit(x), q.valid);
        push_unit(&m4, &s4, &shifted4, &mass4, q.c, q.e, z, q.valid);
        argmax_push(&best, x, q.c, q.valid);
    }
    return StridedSweep(merge_lanes(m4, s4, shifted4, mass4), argmax_lanes(best));
}

// The gradient sweep of the row at `o`: reads the logits again, m the row's max, k its
// constants (grad_consts), `label` the local label (NONE_U32 when not among the classes).
fn strided_grad(o: vec2<u32>, m: f32, label: u32, k: vec2<f32>) {
    for (var c = 0u; c < Q.classes; c += 4u) {
        let q = quad_of(c, o.x, o.y);
        let z = transform_logit(load_quad(q));
        let v = grad_value(q.c, q.e, exp(z - m), z, label, k);
        for (var i = 0u; i < 4u; i++) {
            if (q.valid[i]) {
                store_elem(q.g[i], v[i]);
            }
        }
    }
}

// Writes `value` as the gradient of the row at `o`.
fn strided_fill(o: vec2<u32>, value: f32) {
    if (WRITE_GRAD) {
        for (var c = 0u; c < Q.classes; c++) {
            store_elem(o.y + c * Q.spatial, value);
        }
    }
}

// The transformed logit of the row's (local) label; 0 for probability targets or a label
// another shard holds.
fn strided_label_logit(o: vec2<u32>, label: u32) -> f32 {
    if (SOFT_TARGETS || label == NONE_U32) {
        return 0.0;
    }
    return transform_logit(vec4<f32>(load_elem(o.y + label * Q.spatial))).x;
}

// The label's extra coefficient w_y (on - off_y); 0 when another shard holds it.
fn strided_label_extra(label: u32) -> f32 {
    if (label == NONE_U32) {
        return 0.0;
    }
    return label_extra(label);
}

// Writes `value` as the gradient, loss and lse of an unusable row (ignored: 0, bad label: NaN).
fn strided_unusable(r: u32, o: vec2<u32>, kind: u32) {
    let value = unusable_value(kind);
    strided_fill(o, value);
    store_row(r, value, value);
}

@compute @workgroup_size(WG_SIZE)
fn strided_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    let r = strided_row(lid, wid, nwg);
    if (r < Q.row_count) {
        main_row(r, strided_at(r));
    }
}

// Everything about row r of the window.
fn main_row(r: u32, at: StridedRow) {
    let o = at.o;
    if (at.kind != ROW_VALID) {
        strided_unusable(r, o, at.kind);
        return;
    }
    let label = u32(at.label_i);
    let sweep = strided_sweep(o);
    let st = sweep.st;
    let row = finish_row(st.m, st.v, label_extra(label), strided_label_logit(o, label));
    store_row(r, row.loss, row.lse);
    if (ACCURACY && !SOFT_TARGETS && sweep.arg.y == label && !is_nan(row.lse)) {
        atomicAdd(&control[SUMMARY_CORRECT], 1u);
    }
    if (WRITE_GRAD) {
        strided_grad(o, st.m, label, grad_consts(row, row_scale(r)));
    }
}

// ---- Vocabulary shards of [N, C, d..] logits ----------------------------------------------
// The shard passes of rows.wgsl (see there) over a shard's [N, c1 - c0, d..] logits, one
// invocation per row, reading the shard's classes with stride S in place (no transposed copy):
// Q.class_begin = c0, Q.label_classes = K, the records as shard_records.wgsl keeps them.
// Traffic as there: pass 1 reads the shard's logits once and writes 32 bytes per row; pass 2
// reads them again (and 16 bytes, or P * 32 bytes with the device merge, per row) and writes
// the shard's gradient.

@compute @workgroup_size(WG_SIZE)
fn strided_shard_stats(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    let r = strided_row(lid, wid, nwg);
    if (r < Q.row_count) {
        shard_stats_row(r, strided_at(r));
    }
}

// Pass 1 of row r: its record.
fn shard_stats_row(r: u32, at: StridedRow) {
    if (at.kind != ROW_VALID) {
        write_unusable_record(record_of(r), at.label_i, at.kind);
        return;
    }
    let label = local_label(at.label_i);
    let sweep = strided_sweep(at.o);
    let sums = target_sums(sweep.st.m, sweep.st.v, strided_label_extra(label), strided_label_logit(at.o, label));
    write_record(record_of(r), sweep.st, sums, sweep.arg, at.label_i, label);
}

@compute @workgroup_size(WG_SIZE)
fn strided_shard_grad(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    let r = strided_row(lid, wid, nwg);
    if (r < Q.row_count) {
        shard_grad_row(r, strided_at(r));
    }
}

// Pass 2 of row r from its host-merged constants.
fn shard_grad_row(r: u32, at: StridedRow) {
    if (at.kind != ROW_VALID) {
        strided_fill(at.o, unusable_value(at.kind));
        return;
    }
    let merged = merged_row(r);
    strided_grad(at.o, merged.x, local_label(at.label_i), merged.yz);
}

@compute @workgroup_size(WG_SIZE)
fn strided_shard_merge_grad(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    load_params();
    let r = strided_row(lid, wid, nwg);
    let d = merged_denominator();
    if (r == 0u) {
        publish_denominator(d);
    }
    if (r < Q.row_count) {
        shard_merge_grad_row(r, strided_at(r), d);
    }
}

// Pass 2 of row r merging all shards' records itself, d the mean's denominator.
fn shard_merge_grad_row(r: u32, at: StridedRow, d: f32) {
    if (at.kind != ROW_VALID) {
        strided_unusable(r, at.o, at.kind);
        return;
    }
    let merged = finish_merged_row(r, d);
    if (WRITE_GRAD) {
        strided_grad(at.o, merged.x, local_label(at.label_i), merged.yz);
    }
}
