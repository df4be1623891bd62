//! The loss as a node of Burn's autodiff graph: its backward is lsce's gradient, scaled by the
//! upstream gradient. Targets and weights are constants (no gradient flows to them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::{DType, Shape as BurnShape};

use super::ops::{GradientMode, LossOptions, LsceOps};
use crate::{GradDtype, Reduction};

/// The autodiff node of one loss.
#[derive(Debug)]
struct LossBackward;

/// What the backward pass needs (see [`GradientMode`] for what each costs).
#[derive(Clone, Debug)]
enum State<F, I> {
    /// The gradient of the loss itself, from the fused forward pass, in f32; `dtype` is the
    /// logits' (and so the returned gradient's).
    Keep {
        grad: F,
        reduction: Reduction,
        dtype: DType,
    },
    /// Everything to run the fused pass again, now with the upstream gradient.
    Recompute {
        logits: F,
        labels: I,
        probabilities: F,
        weights: F,
        options: LossOptions,
    },
}

impl<B: Backend + LsceOps> Backward<B, 1> for LossBackward {
    type State = State<FloatTensor<B>, IntTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let state = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |upstream| match state {
            State::Keep {
                grad,
                reduction,
                dtype,
            } => scale::<B>(grad, upstream, reduction, dtype),
            State::Recompute {
                logits,
                labels,
                probabilities,
                weights,
                options,
            } => {
                let options = LossOptions {
                    upstream_grad: true,
                    ..options
                };
                let (_, grad, _) =
                    B::lsce_loss_grad(logits, labels, probabilities, weights, upstream, options);
                grad
            }
        });
    }
}

/// `grad * upstream` in f32, rounded once to `dtype` (the logits'): the upstream gradient
/// (`[1]`, or one per row for `Reduction::None`) broadcast over the classes. Burn's own
/// elementwise kernels: one read and one write of the f32 gradient, and for 16-bit logits one
/// cast. Multiplying in the logits' type instead would round the gradient twice and turn an
/// upstream gradient past 65504 (f16's largest value) into `inf`.
fn scale<B: Backend>(
    grad: FloatTensor<B>,
    upstream: FloatTensor<B>,
    reduction: Reduction,
    dtype: DType,
) -> FloatTensor<B> {
    let dims = grad.shape().to_vec();
    let mut broadcast = vec![1; dims.len()];
    if reduction == Reduction::None {
        // Rows are (n, position): the upstream gradient is [N, d..] flattened.
        broadcast[0] = dims[0];
        broadcast[2..].copy_from_slice(&dims[2..]);
    }
    scale_to::<B>(grad, upstream, broadcast, dtype)
}

/// `grad * upstream` in the gradient's type (f32), the upstream gradient reshaped to the
/// broadcast dims `broadcast`, rounded once to `dtype`.
pub(super) fn scale_to<B: Backend>(
    grad: FloatTensor<B>,
    upstream: FloatTensor<B>,
    broadcast: Vec<usize>,
    dtype: DType,
) -> FloatTensor<B> {
    let mut upstream = B::float_reshape(upstream, BurnShape::from(broadcast));
    if upstream.dtype() != grad.dtype() {
        upstream = B::float_cast(upstream, grad.dtype().into());
    }
    round_to::<B>(B::float_mul(grad, upstream), dtype)
}

/// `grad` rounded once to `dtype` (as it is where it has that type).
pub(super) fn round_to<B: Backend>(grad: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    if grad.dtype() == dtype {
        grad
    } else {
        B::float_cast(grad, dtype.into())
    }
}

impl<B: Backend + LsceOps, C: CheckpointStrategy> LsceOps for Autodiff<B, C> {
    fn lsce_loss(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        probabilities: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        options: LossOptions,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let probabilities = probabilities.into_primitive();
        let weights = weights.into_primitive();
        let (logits, guard) = logits.into_parts();
        match LossBackward
            .prepare::<C>([guard])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => match options.mode {
                GradientMode::Keep => {
                    // No upstream gradient yet: the weights (or their placeholder) stand in
                    // for it, unread. The gradient is kept in f32 (see `scale`).
                    let upstream = weights.clone();
                    let dtype = logits.dtype();
                    let options = LossOptions {
                        grad_dtype: GradDtype::F32,
                        ..options
                    };
                    let (loss, grad, summary) = B::lsce_loss_grad(
                        logits,
                        labels,
                        probabilities,
                        weights,
                        upstream,
                        options,
                    );
                    let state = State::Keep {
                        grad,
                        reduction: options.spec.reduction,
                        dtype,
                    };
                    (prep.finish(state, loss), summary)
                }
                GradientMode::Recompute => {
                    let (loss, summary) = B::lsce_loss(
                        logits.clone(),
                        labels.clone(),
                        probabilities.clone(),
                        weights.clone(),
                        options,
                    );
                    let state = State::Recompute {
                        logits,
                        labels,
                        probabilities,
                        weights,
                        options,
                    };
                    (prep.finish(state, loss), summary)
                }
            },
            OpsKind::UnTracked(prep) => {
                let (loss, summary) = B::lsce_loss(logits, labels, probabilities, weights, options);
                (prep.finish(loss), summary)
            }
        }
    }

    fn lsce_loss_grad(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        probabilities: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        options: LossOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>) {
        let (loss, grad, summary) = B::lsce_loss_grad(
            logits.into_primitive(),
            labels,
            probabilities.into_primitive(),
            weights.into_primitive(),
            upstream.into_primitive(),
            options,
        );
        // Not differentiable: the outputs start untracked leaves.
        let leaf = FloatTensor::<Self>::new;
        (leaf(loss), leaf(grad), summary)
    }
}
