//! The merge: P shards' records of each row, combined in rank order into the row's loss, its
//! log-sum-exp and the two constants the gradient pass needs. A pure function over values (or
//! bytes, [`merge_records`]): any transport can feed it, and every rank that feeds it the same
//! bytes gets bitwise the same result.
//!
//! For a row, with shard `p`'s record `(m_p, s_p, shifted_p, mass_p)` and `M = max_p m_p`:
//!
//! ```text
//! S       = sum_p s_p exp(m_p - M)                 (exp(0) = 1 when m_p = M, so M = +inf survives)
//! lse     = M + ln S
//! A       = sum_p mass_p
//! shifted = sum_p shifted_p + mass_p (M - m_p)     (every term >= 0 for a_c >= 0: no cancellation;
//!                                                    skipped when mass_p = 0, so -inf shards add 0)
//! loss    = A ln S + shifted + z_loss lse^2        (cpu::row_loss of the unsharded row)
//! grad_c  = (exp(z_c - M) coef - a_c) scale dz_c/dx_c,  coef = (A + 2 z_loss lse) / S
//! ```
//!
//! The argmax is the first largest raw logit by global class: shards are in class order, so a
//! later shard's candidate replaces only when strictly larger.

use crate::error::{LsceError, Result};
use crate::output::LossOutput;
use crate::{Reduction, TargetKind, UpstreamGrad};

use super::layout::ShardProblem;
use super::record::{decode, max_f32, PartialRow, RowKind, ShardPartials};
use crate::layout::ShardMergedRow;

/// What the gradient pass of every shard needs of a row: nothing else crosses shards.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowGrad {
    /// The row kind: an ignored row's gradient is 0, a bad-label row's NaN.
    pub kind: RowKind,
    /// `M`, the row's global max of the transformed logits.
    pub max: f64,
    /// `(A + 2 z_loss lse) / S`: the softmax's factor, `exp(z_c - M) * coef`.
    pub coef: f64,
    /// The upstream gradient of the row, divided by the denominator for the mean.
    pub scale: f64,
}

/// The merged statistics of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Merged {
    /// The loss, z-loss, lse, denominator and correct count (with
    /// [`ShardProblem::accuracy`]) as the unsharded [`cpu::compute`](crate::cpu::compute)
    /// returns them (`grad` is `None`: each shard's pass 2 writes its own).
    pub output: LossOutput<f64>,
    /// Per row, what pass 2 needs.
    pub rows: Vec<RowGrad>,
    /// Per row, the global class of the first largest raw logit (`u32::MAX` for ignored rows).
    pub argmax: Vec<u32>,
}

impl Merged {
    /// The merged rows as pass 2 reads them on a device: per row `M`, `coef`, `scale` (f32)
    /// and the [`RowKind`] (u32), 16 bytes (`shard_grad` in `shaders/rows.wgsl`).
    pub fn grad_words(&self) -> Vec<u8> {
        let rows: Vec<ShardMergedRow> = self
            .rows
            .iter()
            .map(|r| ShardMergedRow {
                max: max_f32(r.max),
                coef: r.coef as f32,
                scale: r.scale as f32,
                kind: r.kind as u32,
            })
            .collect();
        bytemuck::cast_slice(&rows).to_vec()
    }
}

/// Decodes and merges the record blocks of all `P` shards, given in rank order.
///
/// Errors: a block count other than `P` ([`LsceError::RankCount`]); a block of another problem,
/// shard or row count, or shards that disagree about a row ([`LsceError::ForeignRecords`]); a
/// label outside `[0, K)` that is not the ignore index ([`LsceError::LabelOutOfRange`], the
/// first such row, as the unsharded loss reports it); a bad upstream gradient.
pub fn merge_records(
    problem: &ShardProblem,
    blocks: &[&[u8]],
    upstream: UpstreamGrad<'_>,
) -> Result<Merged> {
    check_count(problem, blocks.len())?;
    let partials = blocks
        .iter()
        .enumerate()
        .map(|(shard, bytes)| decode(problem, shard, bytes))
        .collect::<Result<Vec<_>>>()?;
    merge(problem, &partials, upstream)
}

fn check_count(problem: &ShardProblem, actual: usize) -> Result<()> {
    if actual != problem.layout.shards() {
        return Err(LsceError::RankCount {
            expected: problem.layout.shards(),
            actual,
        });
    }
    Ok(())
}

/// `exp(m_part - m)`, 1 when equal so that `M = +inf` or `-inf` gives no NaN (`relative_to` in
/// `shaders/common.wgsl`).
fn rescale(m_part: f64, m: f64) -> f64 {
    if m_part == m {
        1.0
    } else {
        (m_part - m).exp()
    }
}

/// One valid row's partial statistics over consecutive parts of its classes (shards in rank
/// order, or the vocabulary blocks of one shard in block order) as the statistics of their
/// union: `M = max m_p`, `S = sum s_p exp(m_p - M)`, `A = sum mass_p`, `shifted = sum shifted_p
/// + mass_p (M - m_p)` and the first largest raw logit (a later part replaces only when
/// strictly larger), added in the given order; whether a part holds the label, and the label
/// and kind of the first. The one record merge of [`merge`] and of the linear head's slices.
pub(crate) fn fold_rows<'a>(parts: impl Iterator<Item = &'a PartialRow> + Clone) -> PartialRow {
    let max = parts.clone().map(|r| r.max).fold(f64::MIN, f64::max);
    let mut all = PartialRow {
        max,
        sum_exp: 0.0,
        shifted: 0.0,
        mass: 0.0,
        holds_label: false,
        ..PartialRow::unusable(RowKind::Valid, 0)
    };
    let mut best: Option<(f64, u32)> = None;
    for (i, r) in parts.enumerate() {
        if i == 0 {
            (all.kind, all.label) = (r.kind, r.label);
        }
        all.sum_exp += r.sum_exp * rescale(r.max, max);
        all.mass += r.mass;
        all.shifted += r.shifted;
        if r.mass != 0.0 && r.max != max {
            all.shifted += r.mass * (max - r.max);
        }
        if best.is_none_or(|(v, _)| r.argmax_value > v) {
            best = Some((r.argmax_value, r.argmax_class));
        }
        all.holds_label |= r.holds_label;
    }
    (all.argmax_value, all.argmax_class) = best.expect("at least one part");
    all
}

/// Merges the partial rows of all `P` shards (`partials[p]` is shard `p`'s, one per row).
///
/// Errors as [`merge_records`]: a bad label is [`LsceError::LabelOutOfRange`] here, the same
/// error the unsharded loss returns, so that no caller gets a loss with a NaN row unawares.
pub fn merge(
    problem: &ShardProblem,
    shards: &[ShardPartials],
    upstream: UpstreamGrad<'_>,
) -> Result<Merged> {
    problem.validate()?;
    check_count(problem, shards.len())?;
    let partials: Vec<&[_]> = shards.iter().map(|s| s.rows.as_slice()).collect();
    let rows = problem.rows as usize;
    if let Some(shard) = partials.iter().position(|p| p.len() != rows) {
        return Err(LsceError::ForeignRecords {
            shard,
            reason: "another row count",
        });
    }
    let spec = &problem.spec;
    let classes = problem.targets == TargetKind::Classes;
    upstream.check(spec.reduction, rows)?;
    let z_coef = f64::from(spec.z_loss);

    let mut loss = vec![0.0; rows];
    let mut z_loss = vec![0.0; rows];
    let mut lse = vec![0.0; rows];
    let mut argmax = vec![u32::MAX; rows];
    let mut grads = Vec::with_capacity(rows);
    let mut coefs = Vec::with_capacity(rows);
    let mut correct = (classes && problem.accuracy).then_some(0u64);
    for row in 0..rows {
        let first = &partials[0][row];
        if let Some(shard) = partials.iter().position(|p| p[row].kind != first.kind) {
            // Name the shard whose label is out of range where the others' is not.
            let odd = partials
                .iter()
                .position(|p| p[row].kind == RowKind::BadLabel)
                .unwrap_or(shard);
            return Err(LsceError::ForeignRecords {
                shard: odd,
                reason: "shards disagree about a row's kind (different labels?)",
            });
        }
        match first.kind {
            RowKind::Valid => {}
            RowKind::BadLabel => {
                return Err(LsceError::LabelOutOfRange {
                    row: row as u64,
                    label: first.label,
                    classes: problem.layout.classes(),
                })
            }
            RowKind::Ignored => {
                (loss[row], z_loss[row], lse[row]) = (0.0, 0.0, 0.0);
                coefs.push((RowKind::Ignored, 0.0, 0.0));
                continue;
            }
        }
        let holder = partials.iter().position(|p| p[row].holds_label);
        if classes && partials.iter().filter(|p| p[row].holds_label).count() != 1 {
            return Err(LsceError::ForeignRecords {
                shard: holder.unwrap_or(0),
                reason: "a class-label row needs exactly one shard holding its label",
            });
        }
        let all = fold_rows(partials.iter().map(|p| &p[row]));
        let (max, sum_exp, mass, shifted) = (all.max, all.sum_exp, all.mass, all.shifted);
        let row_lse = max + sum_exp.ln();
        lse[row] = row_lse;
        z_loss[row] = z_coef * row_lse * row_lse;
        loss[row] = mass * sum_exp.ln() + shifted + z_loss[row];
        let class = all.argmax_class;
        argmax[row] = class;
        if let Some(n) = correct.as_mut() {
            *n += u64::from(!row_lse.is_nan() && class == first.label as u32);
        }
        coefs.push((
            RowKind::Valid,
            max,
            (mass + 2.0 * z_coef * row_lse) / sum_exp,
        ));
    }
    // The shards' parts in rank order; the row count for probability targets.
    let denominator = if classes {
        shards.iter().map(|s| s.denominator).sum()
    } else {
        rows as f64
    };

    let reduced_scale = match upstream {
        UpstreamGrad::Scalar(g) => f64::from(g),
        _ => 1.0,
    };
    for (row, &(kind, max, coef)) in coefs.iter().enumerate() {
        let scale = match (spec.reduction, upstream) {
            (Reduction::None, UpstreamGrad::PerRow(g)) => f64::from(g[row]),
            (Reduction::Mean, _) if denominator == 0.0 => f64::NAN,
            (Reduction::Mean, _) => reduced_scale / denominator,
            _ => reduced_scale,
        };
        grads.push(RowGrad {
            kind,
            max,
            coef,
            scale,
        });
    }
    let reduce = |v: Vec<f64>| match spec.reduction {
        Reduction::None => v,
        Reduction::Sum => vec![v.iter().sum()],
        Reduction::Mean if denominator == 0.0 => vec![f64::NAN],
        Reduction::Mean => vec![v.iter().sum::<f64>() / denominator],
    };
    Ok(Merged {
        output: LossOutput {
            loss: reduce(loss),
            z_loss: reduce(z_loss),
            lse,
            grad: None,
            denominator,
            correct,
        },
        rows: grads,
        argmax,
    })
}
