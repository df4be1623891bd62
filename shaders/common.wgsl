// Shared by every kernel: the per-dispatch parameters (read through the private copy Q of the
// uniform P, which each entry point makes first with load_params), the logit transform, the target
// coefficients and the gradient scale. The bindings and element accessors (load_logit,
// store_grad, ...) are generated in Rust (src/shader.rs) ahead of this file, together with the
// constants WG_SIZE and CACHE_N.
//
// Mirrors: src/cpu.rs (transform, coefficients, row_loss, the gradient formula).

// Must match `Params` in src/shader.rs field for field.
struct Params {
    classes: u32,
    spatial: u32,
    row_count: u32,      // rows in this window
    row_begin: u32,      // global index of the window's first row
    logits_base: u32,    // element offset of the window's first logit in `logits`
    targets_base: u32,   // word offset of the window's first target in `targets`
    upstream_base: u32,  // word offset of the window's first upstream value (per-row mode)
    loss_base: u32,      // word offset of the window's first row in `row_loss`
    lse_base: u32,       // word offset of the window's first row in `lse`
    grad_base: u32,      // element offset of the window's first gradient value in `grad`
    weights_base: u32,   // word offset of class 0 in `weights`
    chunk_base: u32,     // first partial-sum slot of this window
    chunk_count: u32,    // partial-sum slots of all windows together
    excluded: u32,       // the class that receives no smoothing mass, or NONE_U32
    ignore_index: i32,
    has_ignore: u32,
    reduction: u32,      // REDUCTION_*
    upstream_mode: u32,  // UPSTREAM_*
    total_rows: u32,     // rows of all windows together
    on: f32,             // target value at the label
    off: f32,            // target value at every other receiving class
    off_mass: f32,       // off * (receiving classes), the off-mass of an unweighted row
    logit_scale: f32,
    softcap: f32,        // 0 when soft-capping is off
    z_loss: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override HAS_WEIGHTS: bool = false;
override SOFT_TARGETS: bool = false;
override HAS_SOFTCAP: bool = false;
override WRITE_GRAD: bool = true;
override ACCURACY: bool = false;

const NONE_U32: u32 = 0xffffffffu;
// The most negative finite f32. Online statistics start here rather than at -inf so that
// exp(-inf - m) is 0, not exp(NaN), for rows that begin with masked (-inf) logits.
const NEG_BIG: f32 = -3.40282346638528859812e38;
const REDUCTION_NONE: u32 = 0u;
const REDUCTION_SUM: u32 = 1u;
const REDUCTION_MEAN: u32 = 2u;
const UPSTREAM_ONE: u32 = 0u;
const UPSTREAM_SCALAR: u32 = 1u;
const UPSTREAM_PER_ROW: u32 = 2u;

// Layout of the `control` scratch words. Words 0..8 are the `Summary` copied to the caller.
const CTRL_LOSS: u32 = 0u;
const CTRL_Z_LOSS: u32 = 1u;
const CTRL_DENOMINATOR: u32 = 2u;
const CTRL_CORRECT: u32 = 3u;
const CTRL_BAD_ROW: u32 = 4u;
const CTRL_BAD_LABEL: u32 = 5u;
const CTRL_COUNTED_ROWS: u32 = 6u;
const CTRL_OFF_MASS: u32 = 8u;
const CTRL_PARTIALS: u32 = 16u;
const PARTIAL_WORDS: u32 = 4u;

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

// tanh, accurate to a few ulp everywhere and saturating cleanly. Some backends lower tanh(u) to
// (e^2u - 1)/(e^2u + 1), which is NaN once e^2u overflows; 1 - 2/(e^2|u| + 1) saturates but
// cancels for small |u|, where the Taylor series (next term 1382/155925 u^11 < 2e-9 |u| at
// |u| < 0.25) takes over.
fn stable_tanh(u: f32) -> f32 {
    let a = abs(u);
    if (a < 0.25) {
        let u2 = u * u;
        return u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))));
    }
    let t = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    return select(-t, t, u >= 0.0);
}

// z = softcap(scale * x). A -inf logit (a masked entry) stays -inf. Mirror: cpu::transform.
fn transform_logit(x: f32) -> f32 {
    let u = x * Q.logit_scale;
    if (HAS_SOFTCAP) {
        return select(Q.softcap * stable_tanh(u / Q.softcap), u, x == neg_inf());
    }
    return u;
}

// dz/dx, expressed through z so that the cached path needs no second tanh.
fn transform_slope(z: f32) -> f32 {
    if (HAS_SOFTCAP) {
        let t = z / Q.softcap;
        return select(Q.logit_scale * (1.0 - t * t), 0.0, z == neg_inf());
    }
    return Q.logit_scale;
}

fn weight(c: u32) -> f32 {
    if (HAS_WEIGHTS) {
        return weights[Q.weights_base + c];
    }
    return 1.0;
}

// off_c: the off-value, 0 for the excluded class.
fn off_value(c: u32) -> f32 {
    return select(Q.off, 0.0, c == Q.excluded);
}

// a_c of a class-label row: w_c off_c + [c == y] w_y (on - off_y). `label_extra` is
// w_y (on - off_y), computed once per row.
fn class_coef(c: u32, label: u32, label_extra: f32) -> f32 {
    return weight(c) * off_value(c) + select(0.0, label_extra, c == label);
}

// a_c of a probability row: w_c (off_c + (on - off_c) t_c).
fn soft_coef(c: u32, t: f32) -> f32 {
    let off = off_value(c);
    return weight(c) * (off + (Q.on - off) * t);
}

// The label's own extra coefficient w_y (on - off_y).
fn label_extra(label: u32) -> f32 {
    return weight(label) * (Q.on - off_value(label));
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
    var g = 1.0;
    if (Q.upstream_mode == UPSTREAM_SCALAR) {
        g = upstream[Q.upstream_base];
    } else if (Q.upstream_mode == UPSTREAM_PER_ROW) {
        g = upstream[Q.upstream_base + r];
    }
    if (Q.reduction == REDUCTION_MEAN) {
        let d = bitcast<f32>(atomicLoad(&control[CTRL_DENOMINATOR]));
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

const ROW_VALID: u32 = 0u;
const ROW_IGNORED: u32 = 1u;
const ROW_BAD_LABEL: u32 = 2u;

fn classify_label(label: i32) -> u32 {
    if (SOFT_TARGETS) {
        return ROW_VALID;
    }
    if (Q.has_ignore != 0u && label == Q.ignore_index) {
        return ROW_IGNORED;
    }
    if (label < 0 || u32(label) >= Q.classes) {
        return ROW_BAD_LABEL;
    }
    return ROW_VALID;
}

// The probability target of element e of the window.
fn prob(e: u32) -> f32 {
    return bitcast<f32>(targets[Q.targets_base + e]);
}

// Adds the logit z of class c (element e of the window) to a row's target sums: `.y` the dot
// product sum a_c z_c, `.z` the mass sum a_c. Class labels sum only w_c z_c over receiving
// classes, and only when the off-value is nonzero: skipping it keeps plain cross-entropy
// finite when a non-target logit is -inf. finish_row() completes both.
fn add_target(sums: ptr<function, vec4<f32>>, c: u32, e: u32, z: f32) {
    if (SOFT_TARGETS) {
        let a = soft_coef(c, prob(e));
        (*sums).y += a * z;
        (*sums).z += a;
    } else if (Q.off != 0.0 && c != Q.excluded) {
        (*sums).y += weight(c) * z;
    }
}

// A row's results from its statistics: lse, loss, the target mass A, and 1/s.
struct RowResult {
    lse: f32,
    loss: f32,
    mass: f32,
    inv_sum: f32,
}

// Finishes a row from its max m, swept sums (x: s = sum exp(z - m), y: dot, z: mass; see
// add_target), the label's extra coefficient and transformed logit. The loss
// A lse - sum a_c z_c + z lse^2 is formed as A log s + sum a_c (m - z_c) + z lse^2: A lse and
// sum a_c z_c are both of the size of the logits and cancel when the row is confident, while
// log s and m - z_y are small and exact. Mirror: cpu::row_loss.
fn finish_row(m: f32, sums: vec4<f32>, extra: f32, z_label: f32) -> RowResult {
    let log_s = log(sums.x);
    let lse_v = m + log_s;
    var mass: f32;
    var shifted: f32;  // sum_c a_c (m - z_c)
    if (SOFT_TARGETS) {
        mass = sums.z;
        shifted = mass * m - sums.y;
    } else {
        mass = off_mass() + extra;
        shifted = select(0.0, off_mass() * m - Q.off * sums.y, Q.off != 0.0) + extra * (m - z_label);
    }
    return RowResult(lse_v, mass * log_s + shifted + Q.z_loss * lse_v * lse_v, mass, 1.0 / sums.x);
}

// The gradient of class c (element e): (p * p_coef - a_c) * scale * dz/dx.
fn grad_value(c: u32, e: u32, p: f32, z: f32, label: u32, extra: f32, p_coef: f32, scale: f32) -> f32 {
    var a: f32;
    if (SOFT_TARGETS) {
        a = soft_coef(c, prob(e));
    } else {
        a = class_coef(c, label, extra);
    }
    return (p * p_coef - a) * scale * transform_slope(z);
}

// Writes the per-row outputs of row r of the window.
fn store_row(r: u32, loss_v: f32, lse_v: f32) {
    row_loss[Q.loss_base + r] = loss_v;
    lse[Q.lse_base + r] = lse_v;
}

// Online softmax statistics: `m` a running max, `v.x` the sum of exp(z - m), v.yzw plain sums
// that travel with it (the target dot product, the target mass).
struct OnlineStats {
    m: f32,
    v: vec4<f32>,
}

fn merge_stats(a: OnlineStats, b: OnlineStats) -> OnlineStats {
    let m = max(a.m, b.m);
    return OnlineStats(m, vec4<f32>(a.v.x * rescale(a.m, m) + b.v.x * rescale(b.m, m), a.v.yzw + b.v.yzw));
}

// exp(m_part - m) for merging a part's sum into the whole's, 1 when the maxima are equal, so
// that a row whose max is +inf keeps lse = +inf (exp(inf - inf) would be NaN).
fn rescale(m_part: f32, m: f32) -> f32 {
    return select(exp(m_part - m), 1.0, m_part == m);
}

// One logit into a running (max, sum-exp) with a single exp: whichever of the old max and the
// new value is smaller gets scaled by exp(-|z - m|). NaN propagates through the sum.
fn online_push(m: ptr<function, f32>, s: ptr<function, f32>, z: f32) {
    let d = z - *m;
    let e = exp(-abs(d));
    let up = d > 0.0;
    *s = select(*s + e, *s * e + 1.0, up);
    *m = select(*m, z, up);
}

// Token accuracy compares the label with the first argmax of the raw logits, as
// `logits.argmax(-1) == labels` does: before the scale and soft-cap, which preserve the order
// but can turn neighbours into ties by saturating in f32. The first class seen stands in until a
// larger one comes, so a row of -inf has argmax 0, like torch.argmax.
struct Argmax {
    x: f32,
    c: u32,
}

fn argmax_none() -> Argmax {
    return Argmax(neg_inf(), NONE_U32);
}

fn argmax_push(a: ptr<function, Argmax>, x: f32, c: u32) {
    if (ACCURACY && (x > (*a).x || (*a).c == NONE_U32)) {
        *a = Argmax(x, c);
    }
}
