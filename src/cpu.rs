//! The CPU reference: the same loss, accumulated in `f64`, for validating any backend.
//!
//! Each function here mirrors one piece of the WGSL kernels so that a test can hold the GPU
//! against it term by term:
//!
//! | here | shader |
//! |---|---|
//! | [`transform`] | `transform_logit` in `shaders/common.wgsl` |
//! | [`row_statistics`] | the online max / sum-exp sweep of `shaders/rows.wgsl` and `shaders/strided.wgsl` |
//! | [`argmax`] | `argmax_push` in `shaders/common.wgsl` (token accuracy) |
//! | [`row_loss`] | `finish_row` in `shaders/common.wgsl` |
//! | the `shifted` sum of [`row_loss`] (in [`compute`]) | `add_target`, `push_unit`, `relative_to` and `finish_row` in `shaders/common.wgsl` |
//! | [`compute`] (gradient) | the gradient sweep of the row kernels |
//! | [`compute`] (reduction) | `shaders/finalize.wgsl` and the denominator of `shaders/setup.wgsl` |
//!
//! The formulas, for a row with transformed logits `z`, target coefficients `a_c` and
//! `A = sum_c a_c`:
//!
//! ```text
//! lse      = log sum_c exp(z_c)
//! loss_row = A * lse - sum_c a_c z_c + z_loss * lse^2
//! grad_c   = (softmax(z)_c * (A + 2 z_loss lse) - a_c) * scale_row * dz_c/dx_c
//! ```
//!
//! with `a_c = w_c * (off_c + (on - off_c) * t_c)`, where `t` is the one-hot label or the
//! probability target, `off_c` the off-value (0 for the excluded class) and `w` the class weights
//! (1 without). `scale_row` is the upstream gradient, divided by the denominator for the mean.
//!
//! ```
//! use lsce::{cpu, Batch, LossSpec, Shape};
//! let logits = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
//! let out = cpu::compute(&LossSpec::default(), &Batch::classes(Shape::matrix(2, 3).unwrap(), &logits, &[2, 0]), lsce::Gradient::Separate).unwrap();
//! // mean of -log softmax: (0.4076 + 2.4076) / 2
//! assert!((out.loss[0] - 1.40760596).abs() < 1e-6);
//! ```

use crate::batch::{Batch, Targets, UpstreamGrad};
use crate::error::Result;
use crate::output::LossOutput;
use crate::problem::Gradient;
use crate::spec::{LossSpec, Reduction, TargetValues};

/// Applies the logit scale and soft-cap to one logit; returns `(z, dz/dx)`.
///
/// `z = cap * tanh(scale * x / cap)` with a cap, `scale * x` without; `-inf` stays `-inf` (a
/// masked vocabulary entry must keep zero probability) with derivative 0.
pub fn transform(x: f64, spec: &LossSpec) -> (f64, f64) {
    let scale = f64::from(spec.logit_scale);
    match spec.softcap {
        None => (scale * x, scale),
        Some(_) if x == f64::NEG_INFINITY => (f64::NEG_INFINITY, 0.0),
        Some(cap) => {
            let cap = f64::from(cap);
            let t = (scale * x / cap).tanh();
            (cap * t, scale * (1.0 - t * t))
        }
    }
}

/// Max, sum of `exp(z - max)` and log-sum-exp of one row of transformed logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowStatistics {
    /// `max_c z_c`.
    pub max: f64,
    /// `sum_c exp(z_c - max)`.
    pub sum_exp: f64,
    /// `max + ln(sum_exp)`.
    pub lse: f64,
}

/// The statistics sweep over one row, as the kernels do it (in one pass, online).
pub fn row_statistics(z: &[f64]) -> RowStatistics {
    // Online: (m, s) with s = sum exp(z - m); starting from the most negative finite value
    // keeps exp(-inf - m) = 0 instead of NaN for rows that begin with -inf.
    let (mut m, mut s) = (f64::MIN, 0.0f64);
    for &v in z {
        if v > m {
            s = s * (m - v).exp() + 1.0;
            m = v;
        } else {
            s += (v - m).exp();
        }
    }
    RowStatistics {
        max: m,
        sum_exp: s,
        lse: m + s.ln(),
    }
}

/// The first index of the largest raw logit, as `logits.argmax(-1)`: token accuracy compares it
/// with the label (`argmax_push` in `shaders/common.wgsl`). A NaN never replaces an earlier
/// entry, and no entry replaces a NaN at index 0 (no comparison with NaN is true); either way
/// the row's loss is NaN and accuracy does not count it. A row of `-inf` gives 0.
pub fn argmax(x: &[f64]) -> u32 {
    let mut best = 0;
    for (c, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = c;
        }
    }
    best as u32
}

/// The loss `A lse - sum_c a_c z_c + z_loss lse^2` of a row with statistics `stats`, target
/// mass `A = sum a_c` and `shifted = sum_c a_c (max - z_c)`, grouped as
/// `A ln(sum_exp) + shifted + z_loss lse^2` so that large logits do not cancel.
pub fn row_loss(stats: &RowStatistics, mass: f64, shifted: f64, z_loss: f64) -> f64 {
    mass * stats.sum_exp.ln() + shifted + z_loss * stats.lse * stats.lse
}

/// The row's target coefficients `a_c`.
fn coefficients(
    spec: &LossSpec,
    values: TargetValues,
    weights: Option<&[f32]>,
    target: RowTarget<'_>,
    a: &mut [f64],
) {
    for (c, ac) in a.iter_mut().enumerate() {
        let w = weights.map_or(1.0, |w| f64::from(w[c]));
        let target = match target {
            RowTarget::Class(y) => ClassTarget::Label(y),
            RowTarget::Probabilities(t) => ClassTarget::Probability(t[c]),
        };
        *ac = coefficient(spec, values, w, c as u32, target);
    }
}

/// What a row's target says about one class.
#[derive(Clone, Copy)]
pub(crate) enum ClassTarget {
    /// The row's class label.
    Label(i32),
    /// The class's probability target.
    Probability(f64),
}

/// `a_c` of one class `class` with weight `w`: `w q_c` for a label (the on-value at the label,
/// the off-value elsewhere, 0 off-value at the excluded class), `w (off_c + (on - off_c) t_c)`
/// for a probability. Mirror: `target_coef` in `shaders/common.wgsl`.
pub(crate) fn coefficient(
    spec: &LossSpec,
    values: TargetValues,
    w: f64,
    class: u32,
    target: ClassTarget,
) -> f64 {
    let off = if spec.excluded_class == Some(class) {
        0.0
    } else {
        values.off
    };
    // At the label the on-value itself (target_coef in shaders/common.wgsl).
    w * match target {
        ClassTarget::Label(y) if y as u32 == class => values.on,
        ClassTarget::Label(_) => off,
        ClassTarget::Probability(t) => off + (values.on - off) * t,
    }
}

#[derive(Clone, Copy)]
enum RowTarget<'a> {
    Class(i32),
    Probabilities(&'a [f64]),
}

/// Computes the loss (and the gradient unless `gradient` is [`Gradient::None`]) of a batch on
/// the CPU in `f64`. The gradient is returned alike for [`Gradient::Separate`] and
/// [`Gradient::InPlace`] (the host has no buffer to overwrite).
///
/// Validates the batch exactly as the GPU path does, so a bad input gives the same `Err`.
pub fn compute(spec: &LossSpec, batch: &Batch<'_>, gradient: Gradient) -> Result<LossOutput<f64>> {
    let values = batch.validate(spec)?;
    let logits = batch.logits;
    Ok(compute_from(
        spec,
        values,
        batch,
        &|i| logits.get(i),
        gradient,
    ))
}

/// [`compute`] of a validated batch whose logit `i` (row-major index into `batch.shape`) is
/// `logit(i)` in `f64`; `batch.logits` is not read. The fused linear head's reference feeds it
/// the `f64` logits of its matmul.
pub(crate) fn compute_from(
    spec: &LossSpec,
    values: TargetValues,
    batch: &Batch<'_>,
    logit: &dyn Fn(usize) -> f64,
    gradient: Gradient,
) -> LossOutput<f64> {
    let shape = batch.shape;
    let (rows, k) = (shape.rows() as usize, shape.classes() as usize);
    let z_coef = f64::from(spec.z_loss);
    let index = |row: usize, c: usize| shape.index(row as u32, c as u32) as usize;

    // Denominator of the mean, as shaders/setup.wgsl computes it before the row kernel.
    let denominator = match batch.targets {
        Targets::Classes(labels) => labels
            .iter()
            .filter(|&&y| Some(y) != spec.ignore_index)
            .map(|&y| batch.weights.map_or(1.0, |w| f64::from(w[y as usize])))
            .sum(),
        Targets::Probabilities(_) => rows as f64,
    };
    let reduced_scale = match batch.upstream {
        UpstreamGrad::Scalar(g) => f64::from(g),
        _ => 1.0,
    };

    let mut row_losses = vec![0.0; rows];
    let mut row_z = vec![0.0; rows];
    let mut lse = vec![0.0; rows];
    let mut grad = gradient
        .is_some()
        .then(|| vec![0.0; shape.elements() as usize]);
    let mut correct = matches!(batch.targets, Targets::Classes(_)).then_some(0u64);
    let (mut x, mut z, mut dz, mut a, mut t) = (
        vec![0.0; k],
        vec![0.0; k],
        vec![0.0; k],
        vec![0.0; k],
        vec![0.0; k],
    );

    for row in 0..rows {
        let target = match batch.targets {
            Targets::Classes(labels) => {
                if Some(labels[row]) == spec.ignore_index {
                    continue;
                }
                RowTarget::Class(labels[row])
            }
            Targets::Probabilities(p) => {
                for (c, tc) in t.iter_mut().enumerate() {
                    *tc = f64::from(p[index(row, c)]);
                }
                RowTarget::Probabilities(&t)
            }
        };
        for (c, xc) in x.iter_mut().enumerate() {
            *xc = logit(index(row, c));
        }
        for c in 0..k {
            (z[c], dz[c]) = transform(x[c], spec);
        }
        let stats = row_statistics(&z);
        coefficients(spec, values, batch.weights, target, &mut a);
        let mass: f64 = a.iter().sum();
        let label = match target {
            RowTarget::Class(y) => Some(Some(y as u32)),
            RowTarget::Probabilities(_) => None,
        };
        let weight = |c: usize| batch.weights.map_or(1.0, |w| f64::from(w[c]));
        let shifted = shifted_dot(spec, values, 0, weight, label, &a, &z, stats.max);
        lse[row] = stats.lse;
        row_z[row] = z_coef * stats.lse * stats.lse;
        row_losses[row] = row_loss(&stats, mass, shifted, z_coef);
        if let (Some(n), RowTarget::Class(y)) = (correct.as_mut(), target) {
            *n += u64::from(!stats.lse.is_nan() && argmax(&x) == y as u32);
        }
        if let Some(grad) = grad.as_mut() {
            let scale = match (spec.reduction, batch.upstream) {
                (Reduction::None, UpstreamGrad::PerRow(g)) => f64::from(g[row]),
                (Reduction::Mean, _) if denominator == 0.0 => f64::NAN,
                (Reduction::Mean, _) => reduced_scale / denominator,
                _ => reduced_scale,
            };
            let p_coef = mass + 2.0 * z_coef * stats.lse;
            for c in 0..k {
                // From the max, not the rounded lse: exact for huge logits too.
                let p = (z[c] - stats.max).exp() / stats.sum_exp;
                grad[shape.index(row as u32, c as u32) as usize] =
                    (p * p_coef - a[c]) * scale * dz[c];
            }
        }
    }

    let reduce = |v: Vec<f64>| match spec.reduction {
        Reduction::None => v,
        Reduction::Sum => vec![v.iter().sum()],
        // PyTorch divides by the weight sum even when it is 0: NaN (its nll part is 0/0).
        Reduction::Mean if denominator == 0.0 => vec![f64::NAN],
        Reduction::Mean => vec![v.iter().sum::<f64>() / denominator],
    };
    LossOutput {
        loss: reduce(row_losses),
        z_loss: reduce(row_z),
        lse,
        grad,
        denominator,
        correct,
    }
}

/// `sum_c a_c (max - z_c)` over the classes `class0..class0 + z.len()` (the whole row, or one
/// vocabulary shard), with the terms the kernels include; `weight` and `a`, `z` are indexed
/// from `class0`.
///
/// `label` is `None` for probability targets, `Some(Some(y))` for a class label `y` in the
/// range and `Some(None)` for a class label outside it (another shard holds it).
///
/// Every term is a difference of logits, so that adding a constant to a row changes nothing
/// (`add_target` in `shaders/common.wgsl`). The kernels sum the same terms relative to a
/// running max where the row's max is not known yet, lifting a partial sum by its mass times
/// the rise of the max (`push_unit`, `relative_to`): in exact arithmetic the same sum.
///
/// Class labels: the off-value part `off * sum_{c != excluded} w_c (max - z_c)` is skipped
/// when the off-value is 0, so that plain cross-entropy stays finite when a non-target logit is
/// `-inf` (PyTorch computes no smoothing term at `eps = 0`); then the label's own term is added.
/// A zero coefficient adds nothing at a logit above `f32::MIN` (whatever the max), and
/// `0 * inf = NaN` at `-inf` or NaN, as in PyTorch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn shifted_dot(
    spec: &LossSpec,
    values: TargetValues,
    class0: u32,
    weight: impl Fn(usize) -> f64,
    label: Option<Option<u32>>,
    a: &[f64],
    z: &[f64],
    max: f64,
) -> f64 {
    // b (max - z) unless b is 0 and z above f32::MIN, where the kernels skip it.
    let term = |b: f64, z: f64| {
        if b == 0.0 && z >= f64::from(f32::MIN) {
            0.0
        } else {
            b * (max - z)
        }
    };
    let Some(label) = label else {
        return a.iter().zip(z).map(|(&a, &z)| term(a, z)).sum();
    };
    let receiving = |c: usize| spec.excluded_class != Some(class0 + c as u32);
    let off_sum = if values.off == 0.0 {
        0.0
    } else {
        values.off
            * (0..z.len())
                .filter(|&c| receiving(c))
                .map(|c| term(weight(c), z[c]))
                .sum::<f64>()
    };
    let Some(y) = label else {
        return off_sum;
    };
    let y = (y - class0) as usize;
    let off_y = if receiving(y) { values.off } else { 0.0 };
    off_sum + weight(y) * (values.on - off_y) * (max - z[y])
}
