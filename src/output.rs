//! What a loss computation returns, from the GPU (`f32`) or the CPU reference (`f64`).

/// The results of one loss computation.
///
/// `T` is `f32` for the GPU and `f64` for the [`cpu`](crate::cpu) reference.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput<T> {
    /// `rows` per-row losses for [`Reduction::None`](crate::Reduction::None), otherwise one value.
    /// Includes the z-loss term.
    pub loss: Vec<T>,
    /// The z-loss part of [`LossOutput::loss`], reduced the same way (zeros when `z_loss = 0`).
    pub z_loss: Vec<T>,
    /// Per-row log-sum-exp of the (scaled, soft-capped) logits; 0 for ignored rows, which are
    /// not read.
    pub lse: Vec<T>,
    /// `dL/dlogits`, laid out like the logits, when it was asked for.
    pub grad: Option<Vec<T>>,
    /// The mean's denominator: the sum of target-class weights over non-ignored rows (their
    /// count without weights), or the row count with probability targets.
    pub denominator: T,
    /// Non-ignored rows whose argmax (first maximum) is the label; class-label targets only.
    pub correct: Option<u64>,
}
