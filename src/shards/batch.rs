//! One shard's inputs on the host: the input of the shard CPU reference and of the staging-style
//! GPU calls.

use crate::error::{LsceError, Result};
use crate::{Logits, TargetKind, TargetValues, Targets, UpstreamGrad};

use super::layout::ShardProblem;

/// Shard `shard`'s slice of a batch.
///
/// - `logits`: `[rows, c1 - c0]`, row-major: columns `c0..c1` of the global `[rows, K]` logits;
/// - `targets`: class labels, **all** `rows` of them, global class indices (every rank holds
///   them); or probabilities `[rows, c1 - c0]`, the same columns of the global targets;
/// - `weights`: the shard's `c1 - c0` class weights (`weights[c0..c1]` of the global ones);
/// - `upstream`: the upstream gradient, the same on every rank.
#[derive(Clone, Copy, Debug)]
pub struct ShardBatch<'a> {
    /// The shard's index (rank) `p`.
    pub shard: usize,
    /// `[rows, c1 - c0]` logits.
    pub logits: Logits<'a>,
    /// Global labels or the shard's probability columns.
    pub targets: Targets<'a>,
    /// The shard's class weights.
    pub weights: Option<&'a [f32]>,
    /// The upstream gradient.
    pub upstream: UpstreamGrad<'a>,
}

impl<'a> ShardBatch<'a> {
    /// Shard `shard` with class labels, no weights, upstream gradient 1.
    pub fn classes(shard: usize, logits: impl Into<Logits<'a>>, labels: &'a [i32]) -> Self {
        Self {
            shard,
            logits: logits.into(),
            targets: Targets::Classes(labels),
            weights: None,
            upstream: UpstreamGrad::One,
        }
    }

    /// Shard `shard` with probability targets (its columns), no weights, upstream gradient 1.
    pub fn probabilities(shard: usize, logits: impl Into<Logits<'a>>, targets: &'a [f32]) -> Self {
        Self {
            shard,
            logits: logits.into(),
            targets: Targets::Probabilities(targets),
            weights: None,
            upstream: UpstreamGrad::One,
        }
    }

    /// Sets [`ShardBatch::weights`].
    pub fn with_weights(mut self, weights: &'a [f32]) -> Self {
        self.weights = Some(weights);
        self
    }

    /// Sets [`ShardBatch::upstream`].
    pub fn with_upstream(mut self, upstream: UpstreamGrad<'a>) -> Self {
        self.upstream = upstream;
        self
    }

    /// Checks the slice against the problem: shard index, lengths, weights, target kind and
    /// the upstream gradient (labels are checked by the merge, which reports the first bad one).
    pub fn validate(&self, problem: &ShardProblem) -> Result<TargetValues> {
        let values = problem.validate()?;
        problem.layout.check_shard(self.shard)?;
        let rows = problem.rows as usize;
        let width = problem.layout.width(self.shard) as usize;
        let check = |what, expected: usize, actual: usize| {
            if expected == actual {
                Ok(())
            } else {
                Err(LsceError::LengthMismatch {
                    what,
                    expected,
                    actual,
                })
            }
        };
        check("shard logits", rows * width, self.logits.len())?;
        match (self.targets, problem.targets) {
            (Targets::Classes(l), TargetKind::Classes) => check("labels", rows, l.len())?,
            (Targets::Probabilities(t), TargetKind::Probabilities) => {
                check("shard targets", rows * width, t.len())?
            }
            _ => {
                return Err(LsceError::Unsupported(
                    "the shard's targets are not of the problem's target kind",
                ))
            }
        }
        match (self.weights, problem.weighted) {
            (Some(w), true) => {
                check("shard weights", width, w.len())?;
                if let Some((i, &value)) = w
                    .iter()
                    .enumerate()
                    .find(|(_, w)| !w.is_finite() || **w < 0.0)
                {
                    return Err(LsceError::InvalidWeight {
                        class: problem.layout.range(self.shard).start as usize + i,
                        value,
                    });
                }
            }
            (None, false) => {}
            _ => {
                return Err(LsceError::Unsupported(
                    "shard weights must be given exactly when the problem is weighted",
                ))
            }
        }
        self.upstream.check(problem.spec.reduction, rows)?;
        Ok(values)
    }
}
