//! The CPU reference of the shard passes, in `f64`: pass 1 (a shard's partial rows), and pass 2
//! (a shard's gradient from the merged rows). Held against [`cpu::compute`] of the whole
//! `[rows, K]` problem by the tests, and the mirror of the GPU shard passes.
//!
//! ```
//! use lsce::shards::{reference, ShardBatch, ShardLayout, ShardProblem};
//! use lsce::{cpu, Batch, LossSpec, Shape, UpstreamGrad};
//!
//! // [2, 5] logits, split 2 + 3 classes.
//! let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0, 3.0, 0.5, -2.0, 1.0, 0.0];
//! let labels = [2, 0];
//! let spec = LossSpec::pytorch(0.1);
//! let problem = ShardProblem::new(spec, 2, ShardLayout::from_widths(&[2, 3])?);
//! let left: Vec<f32> = vec![0.5, -1.0, 3.0, 0.5];
//! let right: Vec<f32> = vec![2.0, 0.0, 1.0, -2.0, 1.0, 0.0];
//! let part = |p: usize, logits| -> lsce::Result<ShardBatch> {
//!     Ok(ShardBatch::new(p, Batch::classes(problem.shard_shape(p)?, logits, &labels)))
//! };
//! let parts = [
//!     reference::partials(&problem, &part(0, &left)?)?,
//!     reference::partials(&problem, &part(1, &right)?)?,
//! ];
//! let merged = lsce::shards::merge(&problem, &parts, UpstreamGrad::One)?;
//! let whole = cpu::compute(&spec, &Batch::classes(Shape::matrix(2, 5)?, &logits, &labels), lsce::Gradient::Separate)?;
//! assert!((merged.output.loss[0] - whole.loss[0]).abs() < 1e-12);
//! let g1 = reference::gradient(&problem, &part(1, &right)?, &merged)?;
//! assert!((g1[0] - whole.grad.unwrap()[2]).abs() < 1e-12); // row 0, class 2
//! # Ok::<(), lsce::LsceError>(())
//! ```
//!
//! [`cpu::compute`]: crate::cpu::compute

use crate::cpu::{coefficient, row_statistics, shifted_dot, transform, ClassTarget};
use crate::error::{LsceError, Result};
use crate::Targets;

use super::batch::ShardBatch;
use super::layout::ShardProblem;
use super::merge::Merged;
use super::record::{PartialRow, RowKind, ShardPartials};

/// The row's kind from its label, as every shard classifies it (`classify_label`).
fn row_kind(problem: &ShardProblem, batch: &ShardBatch<'_>, row: usize) -> (RowKind, i32) {
    match batch.batch.targets {
        Targets::Classes(labels) => {
            let y = labels[row];
            if Some(y) == problem.spec.ignore_index {
                (RowKind::Ignored, y)
            } else if y < 0 || y as u32 >= problem.layout.classes() {
                (RowKind::BadLabel, y)
            } else {
                (RowKind::Valid, y)
            }
        }
        Targets::Probabilities(_) => (RowKind::Valid, 0),
    }
}

/// A shard's transformed logits `z`, slopes `dz/dx` and coefficients `a` of one row.
struct ShardRow {
    x: Vec<f64>,
    z: Vec<f64>,
    dz: Vec<f64>,
    a: Vec<f64>,
}

fn shard_row(problem: &ShardProblem, batch: &ShardBatch<'_>, row: usize, y: i32) -> ShardRow {
    let spec = &problem.spec;
    let values = spec
        .resolve(problem.layout.classes())
        .expect("validated by the caller");
    let c0 = problem.layout.range(batch.shard).start;
    let width = problem.layout.width(batch.shard) as usize;
    let b = &batch.batch;
    // `[N, width, d..]`: element (row, c) where the shard's shape puts it.
    let at = |c: usize| b.shape.index(row as u32, c as u32) as usize;
    let mut r = ShardRow {
        x: Vec::with_capacity(width),
        z: Vec::with_capacity(width),
        dz: Vec::with_capacity(width),
        a: Vec::with_capacity(width),
    };
    for c in 0..width {
        let x = b.logits.get(at(c));
        let (z, dz) = transform(x, spec);
        let w = b.weights.map_or(1.0, |w| f64::from(w[c]));
        let target = match b.targets {
            Targets::Classes(_) => ClassTarget::Label(y),
            Targets::Probabilities(t) => ClassTarget::Probability(f64::from(t[at(c)])),
        };
        r.x.push(x);
        r.z.push(z);
        r.dz.push(dz);
        r.a.push(coefficient(spec, values, w, c0 + c as u32, target));
    }
    r
}

/// Pass 1 of one shard: every row's partial statistics over the shard's classes (see
/// [`record`](super::record) for what each field is).
pub fn partials(problem: &ShardProblem, batch: &ShardBatch<'_>) -> Result<ShardPartials> {
    let values = batch.validate(problem)?;
    let range = problem.layout.range(batch.shard);
    let soft = matches!(batch.batch.targets, Targets::Probabilities(_));
    let weight = |c: usize| batch.batch.weights.map_or(1.0, |w| f64::from(w[c]));
    let rows: Vec<PartialRow> = (0..problem.rows as usize)
        .map(|row| {
            let (kind, y) = row_kind(problem, batch, row);
            if kind != RowKind::Valid {
                return PartialRow::unusable(kind, y);
            }
            let r = shard_row(problem, batch, row, y);
            let stats = row_statistics(&r.z);
            let holds_label = !soft && range.contains(&(y as u32));
            let label = (!soft).then_some(holds_label.then_some(y as u32));
            let local_argmax = crate::cpu::argmax(&r.x);
            PartialRow {
                kind,
                max: stats.max,
                sum_exp: stats.sum_exp,
                shifted: shifted_dot(
                    &problem.spec,
                    values,
                    range.start,
                    weight,
                    label,
                    &r.a,
                    &r.z,
                    stats.max,
                ),
                mass: r.a.iter().sum(),
                argmax_value: r.x[local_argmax as usize],
                argmax_class: range.start + local_argmax,
                holds_label,
                label: y,
            }
        })
        .collect();
    let denominator = rows
        .iter()
        .filter(|r| r.holds_label)
        .map(|r| weight((r.label as u32 - range.start) as usize))
        .sum();
    Ok(ShardPartials { rows, denominator })
}

/// Pass 2 of one shard: its gradient in the shard's shape (`[N, c1 - c0, d..]`) from the merged
/// rows, `(exp(z_c - M) coef - a_c) scale dz_c/dx_c`.
pub fn gradient(
    problem: &ShardProblem,
    batch: &ShardBatch<'_>,
    merged: &Merged,
) -> Result<Vec<f64>> {
    batch.validate(problem)?;
    if merged.rows.len() != problem.rows as usize {
        return Err(LsceError::LengthMismatch {
            what: "merged rows",
            expected: problem.rows as usize,
            actual: merged.rows.len(),
        });
    }
    let shape = batch.batch.shape;
    let width = shape.classes();
    let mut grad = vec![0.0; shape.elements() as usize];
    for (row, m) in merged.rows.iter().enumerate() {
        let at = |c: u32| shape.index(row as u32, c) as usize;
        match m.kind {
            RowKind::Ignored => continue,
            RowKind::BadLabel => (0..width).for_each(|c| grad[at(c)] = f64::NAN),
            RowKind::Valid => {
                let (_, y) = row_kind(problem, batch, row);
                let r = shard_row(problem, batch, row, y);
                for c in 0..width as usize {
                    grad[at(c as u32)] =
                        ((r.z[c] - m.max).exp() * m.coef - r.a[c]) * m.scale * r.dz[c];
                }
            }
        }
    }
    Ok(grad)
}
