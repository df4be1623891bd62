//! One shard's inputs on the host: a [`Batch`] of the shard's part of the logits, and the shard
//! it is. The input of the shard CPU reference and of the staging-style GPU calls.

use crate::error::{LsceError, Result};
use crate::{Batch, Shape, TargetValues};

use super::layout::ShardProblem;

/// Shard `shard`'s part of a step: a [`Batch`] whose shape is the shard's
/// ([`ShardProblem::shard_shape`]: `[N, c1 - c0, d..]`, `[rows, c1 - c0]` for a matrix).
///
/// - `batch.logits`: the columns `c0..c1` of the global logits, in the shard's shape;
/// - `batch.targets`: class labels, **all** `rows` of them, global class indices (every rank
///   holds them); or probabilities in the shard's shape, the same columns of the global ones;
/// - `batch.weights`: the shard's `c1 - c0` class weights (`weights[c0..c1]` of the global ones);
/// - `batch.upstream`: the upstream gradient, the same on every rank.
///
/// ```
/// use lsce::shards::{ShardBatch, ShardLayout, ShardProblem};
/// use lsce::{Batch, LossSpec};
/// let problem = ShardProblem::new(LossSpec::pytorch(0.1), 2, ShardLayout::from_widths(&[2, 3])?);
/// let (right, labels) = ([2.0f32, 0.0, 1.0, -2.0, 1.0, 0.0], [2, 0]);
/// let batch = ShardBatch::new(1, Batch::classes(problem.shard_shape(1)?, &right, &labels));
/// batch.validate(&problem)?;
/// # Ok::<(), lsce::LsceError>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ShardBatch<'a> {
    /// The shard's index (rank) `p`.
    pub shard: usize,
    /// The shard's part of the batch, in the shard's shape.
    pub batch: Batch<'a>,
}

impl<'a> ShardBatch<'a> {
    /// Shard `shard`'s part `batch`.
    pub fn new(shard: usize, batch: Batch<'a>) -> Self {
        Self { shard, batch }
    }

    /// Checks the part against the problem: shard index, shape, lengths, weights, target kind
    /// and the upstream gradient. Label values are not read: the kernel (and the reference)
    /// classify them as the unsharded loss does, and the merge reports the first bad one.
    pub fn validate(&self, problem: &ShardProblem) -> Result<TargetValues> {
        let values = problem.validate()?;
        let expected = problem.shard_shape(self.shard)?;
        let actual = self.batch.shape;
        if actual != expected {
            return Err(LsceError::ShardShape {
                shard: self.shard,
                expected: dims(expected),
                actual: dims(actual),
            });
        }
        problem.check_kinds(&self.batch.targets, self.batch.weights.is_some())?;
        let c0 = problem.layout.range(self.shard).start as usize;
        self.batch
            .check_inputs(problem.spec.reduction)
            .map_err(|err| match err {
                // The global class, as the unsharded loss names it.
                LsceError::InvalidWeight { class, value } => LsceError::InvalidWeight {
                    class: c0 + class,
                    value,
                },
                other => other,
            })?;
        Ok(values)
    }

    /// [`ShardBatch::validate`], and the label values against the global class count: a bad
    /// label is an `Err` here, on the host, before any device work or exchange.
    pub fn validate_labels(&self, problem: &ShardProblem) -> Result<TargetValues> {
        let values = self.validate(problem)?;
        self.batch
            .check_labels(&problem.spec, problem.layout.classes())?;
        Ok(values)
    }
}

/// `[N, classes, spatial]` of a shape, as [`LsceError::ShardShape`] reports it.
fn dims(shape: Shape) -> [u32; 3] {
    [shape.batch(), shape.classes(), shape.spatial()]
}
