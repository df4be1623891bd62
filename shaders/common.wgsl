// Shared by every kernel: the switches, the logit transform, the target coefficients, the
// online statistics and the gradient scale. Ahead of this file src/compose.rs puts the generated
// prelude (WG_SIZE, CACHE_N, `struct Params` and the word constants of src/layout.rs, the
// bindings, the uniform P and its private copy Q that each entry point makes first with
// load_params) and the element accessors (load_unit, load_elem, store_unit, store_elem from
// the load_*/store_* fragments).
//
// Mirrors: src/cpu.rs (transform, coefficients, row_loss, the gradient formula).

override HAS_WEIGHTS: bool = false;
override SOFT_TARGETS: bool = false;
override HAS_SOFTCAP: bool = false;
override WRITE_GRAD: bool = true;
override ACCURACY: bool = false;

const NONE_U32: u32 = 0xffffffffu;
// The most negative finite f32. Online statistics start here rather than at -inf so that
// exp(-inf - m) is 0, not exp(NaN), for rows that begin with masked (-inf) logits.
const NEG_BIG: f32 = -3.40282346638528859812e38;
fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// By bits, so that no finite-math assumption of a shader compiler can fold it away.
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// The per-logit math works on units of up to four logits at once (a vec4 "lane" each): the row
// kernels load a unit, and lanes outside the row (or past UNIT) are masked by `valid`. Lanes
// are independent accumulators, combined at the end of a sweep in a fixed order.
const LANES = vec4<u32>(0u, 1u, 2u, 3u);

// tanh, accurate to a few ulp everywhere and saturating cleanly. Some backends lower tanh(u) to
// (e^2u - 1)/(e^2u + 1), which is NaN once e^2u overflows; 1 - 2/(e^2|u| + 1) saturates but
// cancels for small |u|, where the Taylor series (next term 1382/155925 u^11 < 2e-9 |u| at
// |u| < 0.25) takes over.
fn stable_tanh(u: vec4<f32>) -> vec4<f32> {
    let a = abs(u);
    let u2 = u * u;
    let series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))));
    let t = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    return select(select(-t, t, u >= vec4<f32>(0.0)), series, a < vec4<f32>(0.25));
}

// z = softcap(scale * x). A -inf logit (a masked entry) stays -inf. Mirror: cpu::transform.
fn transform_logit(x: vec4<f32>) -> vec4<f32> {
    let u = x * Q.logit_scale;
    if (HAS_SOFTCAP) {
        return select(Q.softcap * stable_tanh(u / Q.softcap), u, x == vec4<f32>(neg_inf()));
    }
    return u;
}

// dz/dx divided by the logit scale: the soft-cap's 1 - (z/cap)^2 (0 at -inf), else 1.
// Expressed through z so that the cached path needs no second tanh.
fn softcap_slope(z: vec4<f32>) -> vec4<f32> {
    if (HAS_SOFTCAP) {
        let t = z / Q.softcap;
        return select(1.0 - t * t, vec4<f32>(0.0), z == vec4<f32>(neg_inf()));
    }
    return vec4<f32>(1.0);
}

fn weight(c: vec4<u32>) -> vec4<f32> {
    if (HAS_WEIGHTS) {
        let b = Q.weights_base;
        return vec4<f32>(weights[b + c.x], weights[b + c.y], weights[b + c.z], weights[b + c.w]);
    }
    return vec4<f32>(1.0);
}

// off_c: the off-value, 0 for the excluded class.
fn off_value(c: vec4<u32>) -> vec4<f32> {
    return select(vec4<f32>(Q.off), vec4<f32>(0.0), c == vec4<u32>(Q.excluded));
}

// The probability targets of four elements e (window-relative; laid out like the logits).
fn prob(e: vec4<u32>) -> vec4<f32> {
    let b = vec4<u32>(Q.targets_base) + e;
    return bitcast<vec4<f32>>(vec4<u32>(targets[b.x], targets[b.y], targets[b.z], targets[b.w]));
}

// a_c: for a class-label row w_c q_c with q the on-value at the label and off_c elsewhere (the
// label's taken as on itself, not as off + (on - off), which would lose on's digits when
// on << off); for a probability row (t at elements e) w_c (off_c + (on - off_c) t_c).
fn target_coef(c: vec4<u32>, e: vec4<u32>, label: u32) -> vec4<f32> {
    let off = off_value(c);
    if (SOFT_TARGETS) {
        return weight(c) * (off + (Q.on - off) * prob(e));
    }
    return weight(c) * select(off, vec4<f32>(Q.on), c == vec4<u32>(label));
}

// The label's own extra coefficient w_y (on - off_y).
fn label_extra(label: u32) -> f32 {
    let c = vec4<u32>(label);
    return (weight(c) * (Q.on - off_value(c))).x;
}

// The off-mass sum_c w_c off_c of a class-label row: a constant of the spec, computed on the
// host without weights and by shaders/setup.wgsl with them.
fn off_mass() -> f32 {
    if (HAS_WEIGHTS) {
        return bitcast<f32>(atomicLoad(&control[CTRL_OFF_MASS]));
    }
    return Q.off_mass;
}


// The factor that multiplies (softmax * coef - a) for row r of the window: the upstream
// gradient, divided by the denominator for the mean (NaN when every row is ignored or weighs 0).
fn row_scale(r: u32) -> f32 {
    return row_scale_over(r, bitcast<f32>(atomicLoad(&control[SUMMARY_DENOMINATOR])));
}

// row_scale with the mean's denominator d given.
fn row_scale_over(r: u32, d: f32) -> f32 {
    var g = 1.0;
    if (Q.upstream_mode == UPSTREAM_SCALAR) {
        g = upstream[Q.upstream_base];
    } else if (Q.upstream_mode == UPSTREAM_PER_ROW) {
        g = upstream[Q.upstream_base + r];
    }
    if (Q.reduction == REDUCTION_MEAN) {
        return select(g / d, nan(), d == 0.0);
    }
    return g;
}

// Row r's label, or 0 for probability targets.
fn row_label(r: u32) -> i32 {
    if (SOFT_TARGETS) {
        return 0;
    }
    return bitcast<i32>(targets[Q.targets_base + r]);
}

// ROW_VALID, ROW_IGNORED, ROW_BAD_LABEL: RowKind in src/layout.rs.

fn classify_label(label: i32) -> u32 {
    if (SOFT_TARGETS) {
        return ROW_VALID;
    }
    if (Q.has_ignore != 0u && label == Q.ignore_index) {
        return ROW_IGNORED;
    }
    if (label < 0 || u32(label) >= Q.label_classes) {
        return ROW_BAD_LABEL;
    }
    return ROW_VALID;
}

// What an unusable row's loss, lse and gradient hold: 0 when ignored, NaN when its label is
// invalid (the setup pass reports it).
fn unusable_value(kind: u32) -> f32 {
    return select(nan(), 0.0, kind == ROW_IGNORED);
}

fn lane_sum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// The target sums of a row are kept relative to a shift: `shifted` = sum_c b_c (m - z_c) and
// `mass` = sum_c b_c, with m the max of the logits summed so far (the row's max in the cached
// path, a lane's running max in the online sweeps: push_unit, relative_to) and b_c = a_c for
// probability targets, w_c at the receiving classes of a class label (finish_row applies the
// off-value and adds the label's own term). Every term is then a difference of nearby logits, never of the size of the
// logits themselves: adding a constant to a row changes no term, and with b_c >= 0 no term
// cancels another. Class labels sum nothing when the off-value is 0: plain cross-entropy stays
// finite when a non-target logit is -inf.

// Adds a unit's transformed logits z (classes c, elements e, lanes `valid`) to the per-lane
// target sums, relative to the lanes' max m (which must be at least z). A zero coefficient adds
// nothing at a logit above NEG_BIG, so that the sum of a row that holds a +inf logit does not
// depend on where it comes; at -inf or NaN it adds 0 * inf = NaN, as in PyTorch.
fn add_target(shifted: ptr<function, vec4<f32>>, mass: ptr<function, vec4<f32>>, c: vec4<u32>, e: vec4<u32>, z: vec4<f32>, valid: vec4<bool>, m: vec4<f32>) {
    let zero = vec4<f32>(0.0);
    var b: vec4<f32>;
    var take: vec4<bool>;
    if (SOFT_TARGETS) {
        b = target_coef(c, e, 0u);
        take = valid;
    } else if (Q.off != 0.0) {
        b = weight(c);
        take = valid & (c != vec4<u32>(Q.excluded));
    } else {
        return;
    }
    if (HAS_WEIGHTS || SOFT_TARGETS) {
        take = take & ((b != zero) | !(z >= vec4<f32>(NEG_BIG)));
    }
    *shifted += select(zero, b * (m - z), take);
    *mass += select(zero, b, take);
}

// One unit of an online sweep, per lane: the running max m; the sum s of exp(z - m), with a
// single exp per logit (whichever of the old max and the new value is smaller is scaled by
// exp(-|z - m|)); and the target sums, re-expressed relative to the new max before the unit's
// terms are added (sum_c b_c (z - z_c) = shifted + mass (z - m) where z is the new max).
// Nothing to lift where nothing is summed yet: the max may rise from NEG_BIG by d = inf, and
// 0 * inf is NaN. Masked lanes carry z = -inf, which changes nothing. NaN propagates through
// the sum.
fn push_unit(m: ptr<function, vec4<f32>>, s: ptr<function, vec4<f32>>, shifted: ptr<function, vec4<f32>>, mass: ptr<function, vec4<f32>>, c: vec4<u32>, e: vec4<u32>, z: vec4<f32>, valid: vec4<bool>) {
    let zero = vec4<f32>(0.0);
    let d = z - *m;
    let scaled = exp(-abs(d));
    let up = d > zero;
    *s = select(*s + scaled, *s * scaled + 1.0, up);
    *m = select(*m, z, up);
    if (SOFT_TARGETS || Q.off != 0.0) {
        *shifted += select(zero, *mass * d, up & (*mass != zero));
        add_target(shifted, mass, c, e, z, valid, *m);
    }
}

// The local class of a valid row's global label: NONE_U32 when another vocabulary shard
// holds it (then no class of this shard matches it and its extra coefficient is 0).
fn local_label(label: i32) -> u32 {
    let c = u32(label) - Q.class_begin;
    return select(NONE_U32, c, c < Q.classes);
}

// A row's results from its statistics: lse, loss, the target mass A, and 1/s.
struct RowResult {
    lse: f32,
    loss: f32,
    mass: f32,
    inv_sum: f32,
}

// Finishes a row from its max m, swept sums relative to m (x: s = sum exp(z - m), y: shifted,
// z: mass; see add_target), the label's extra coefficient and transformed logit. The loss
// A lse - sum a_c z_c + z lse^2 is formed as A log s + sum a_c (m - z_c) + z lse^2: A lse and
// sum a_c z_c are both of the size of the logits and cancel, while log s and every m - z_c are
// differences of logits: the loss does not change when a constant is added to the row (z_loss
// aside, which depends on lse itself). Mirror: cpu::row_loss, cpu::shifted_dot.
fn finish_row(m: f32, sums: vec4<f32>, extra: f32, z_label: f32) -> RowResult {
    let log_s = log(sums.x);
    let lse_v = m + log_s;
    let t = target_sums(m, sums, extra, z_label);
    return RowResult(lse_v, t.x * log_s + t.y + Q.z_loss * lse_v * lse_v, t.x, 1.0 / sums.x);
}

// The target mass A = sum a_c and sum_c a_c (m - z_c) of a row (or of a vocabulary shard's
// part of it) from its max m and swept sums, as finish_row uses them.
fn target_sums(m: f32, sums: vec4<f32>, extra: f32, z_label: f32) -> vec2<f32> {
    if (SOFT_TARGETS) {
        return vec2<f32>(sums.z, sums.y);
    }
    // sums.y is 0 when the off-value is (nothing is summed).
    return vec2<f32>(off_mass() + extra, Q.off * sums.y + extra * (m - z_label));
}

// The row's gradient constants (p_coef / s, scale * logit_scale), p_coef = A + 2 z_loss lse.
fn grad_consts(result: RowResult, scale: f32) -> vec2<f32> {
    return vec2<f32>((result.mass + 2.0 * Q.z_loss * result.lse) * result.inv_sum, scale * Q.logit_scale);
}

// The gradient of a unit's classes c (elements e): (softmax p_coef - a_c) * scale * dz/dx with
// softmax = ez / s, ez = exp(z - max); computed as (ez k.x - a_c) * k.y * softcap_slope(z) with
// k = grad_consts(..). The upstream scale comes last, so a row's gradient scales exactly with it.
fn grad_value(c: vec4<u32>, e: vec4<u32>, ez: vec4<f32>, z: vec4<f32>, label: u32, k: vec2<f32>) -> vec4<f32> {
    return (ez * k.x - target_coef(c, e, label)) * (k.y * softcap_slope(z));
}

// Writes the per-row outputs of row r of the window.
fn store_row(r: u32, loss_v: f32, lse_v: f32) {
    row_loss[Q.loss_base + r] = loss_v;
    lse[Q.lse_base + r] = lse_v;
}

// Online softmax statistics: `m` a running max, `v.x` the sum of exp(z - m), `v.y` the target
// sum shifted by m and `v.z` its mass (see add_target); `v.w` unused.
struct OnlineStats {
    m: f32,
    v: vec4<f32>,
}

// The statistics' sums relative to a max m >= st.m, for merging a part into the whole: the
// sum of exp scaled by exp(st.m - m), the shifted target sum lifted by mass (m - st.m). Both
// unchanged when the maxima are equal, so that a row whose max is +inf keeps lse = +inf
// (exp(inf - inf) would be NaN).
fn relative_to(st: OnlineStats, m: f32) -> vec4<f32> {
    let same = st.m == m;
    let s = select(st.v.x * exp(st.m - m), st.v.x, same);
    // As in push_unit, nothing to lift without mass (st.m may be NEG_BIG).
    let shifted = st.v.y + select(st.v.z * (m - st.m), 0.0, same || st.v.z == 0.0);
    return vec4<f32>(s, shifted, st.v.zw);
}

fn merge_stats(a: OnlineStats, b: OnlineStats) -> OnlineStats {
    let m = max(a.m, b.m);
    return OnlineStats(m, relative_to(a, m) + relative_to(b, m));
}

// The four lanes' statistics as one, lane by lane in a fixed order; each lane's shifted
// target sum and mass travel along (as .y and .z), lifted to the merged max.
fn merge_lanes(m: vec4<f32>, s: vec4<f32>, shifted: vec4<f32>, mass: vec4<f32>) -> OnlineStats {
    var acc = OnlineStats(m.x, vec4<f32>(s.x, shifted.x, mass.x, 0.0));
    acc = merge_stats(acc, OnlineStats(m.y, vec4<f32>(s.y, shifted.y, mass.y, 0.0)));
    acc = merge_stats(acc, OnlineStats(m.z, vec4<f32>(s.z, shifted.z, mass.z, 0.0)));
    return merge_stats(acc, OnlineStats(m.w, vec4<f32>(s.w, shifted.w, mass.w, 0.0)));
}

// Token accuracy compares the label with the first argmax of the raw logits, as
// `logits.argmax(-1) == labels` does: before the scale and soft-cap, which preserve the order
// but can turn neighbours into ties by saturating in f32. Per lane, the first class seen stands
// in until a larger one comes, so a row of -inf has argmax 0, like torch.argmax.
struct Argmax {
    x: vec4<f32>,
    c: vec4<u32>,
}

fn argmax_none() -> Argmax {
    return Argmax(vec4<f32>(neg_inf()), vec4<u32>(NONE_U32));
}

fn argmax_push(a: ptr<function, Argmax>, x: vec4<f32>, c: vec4<u32>, valid: vec4<bool>) {
    if (ACCURACY) {
        let take = valid & ((x > (*a).x) | ((*a).c == vec4<u32>(NONE_U32)));
        *a = Argmax(select((*a).x, x, take), select((*a).c, c, take));
    }
}

// The lanes' best as one: the largest value, the smallest class among equals.
fn argmax_lanes(a: Argmax) -> vec2<u32> {
    let best = max(max(a.x.x, a.x.y), max(a.x.z, a.x.w));
    let c = select(vec4<u32>(NONE_U32), a.c, a.x == vec4<f32>(best));
    return vec2<u32>(bitcast<u32>(best), min(min(c.x, c.y), min(c.z, c.w)));
}
