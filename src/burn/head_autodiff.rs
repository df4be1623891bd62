//! The fused linear head as a node of Burn's autodiff graph, with three float parents: the
//! hidden states, the weight and the bias (a placeholder without one, never tracked). Labels
//! and class weights are constants.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::DType;

use super::autodiff::{round_to, scale_to};
use super::head::{HeadGradOutput, HeadOptions, LsceHeadOps};
use super::ops::GradientMode;
use crate::linear::HeadGradients;
use crate::Reduction;

/// The autodiff node of one fused head.
#[derive(Debug)]
struct HeadBackward;

/// What the backward pass needs.
#[derive(Clone, Debug)]
enum State<F, I> {
    /// `dH`, `dW`, `db` of the loss itself (upstream 1), in f32, from the forward pass;
    /// `dtypes` are the parents' (and so the returned gradients').
    Keep { grads: [F; 3], dtypes: [DType; 3] },
    /// Everything to run the fused pass again, now with the upstream gradient.
    Recompute {
        hidden: F,
        weight: F,
        bias: F,
        labels: I,
        weights: F,
        options: HeadOptions,
        dtypes: [DType; 3],
    },
}

impl<B: Backend + LsceHeadOps> Backward<B, 3> for HeadBackward {
    type State = State<FloatTensor<B>, IntTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = grads.consume::<B>(&ops.node);
        let parents = ops.parents;
        if parents.iter().all(Option::is_none) {
            return;
        }
        let computed = match ops.state {
            // The upstream gradient `[1]` broadcast: one rounding of the f32 product.
            State::Keep {
                grads: kept,
                dtypes,
            } => {
                let mut dtypes = dtypes.into_iter();
                kept.map(|g| {
                    let broadcast = vec![1; g.shape().num_dims()];
                    let dtype = dtypes.next().expect("three dtypes");
                    scale_to::<B>(g, upstream.clone(), broadcast, dtype)
                })
            }
            State::Recompute {
                hidden,
                weight,
                bias,
                labels,
                weights,
                options,
                dtypes,
            } => {
                let options = HeadOptions {
                    upstream_grad: true,
                    ..options
                };
                let (_, dh, dw, db, _) =
                    B::lsce_head_grad(hidden, weight, bias, labels, weights, upstream, options);
                let mut dtypes = dtypes.into_iter();
                [dh, dw, db].map(|g| round_to::<B>(g, dtypes.next().expect("three dtypes")))
            }
        };
        for (parent, grad) in parents.into_iter().zip(computed) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: Backend + LsceHeadOps, C: CheckpointStrategy> LsceHeadOps for Autodiff<B, C> {
    fn lsce_head(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        labels: IntTensor<Self>,
        weights: FloatTensor<Self>,
        options: HeadOptions,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        // Only the gradients autodiff needs: dW and db when the head is tracked, dH alone
        // for a frozen head.
        let gradients = if weight.is_tracked() || (options.bias && bias.is_tracked()) {
            HeadGradients::All
        } else {
            HeadGradients::Hidden
        };
        let weights = weights.into_primitive();
        let (hidden, hidden_node) = hidden.into_parts();
        let (weight, weight_node) = weight.into_parts();
        let (bias, bias_node) = bias.into_parts();
        let dtypes = [hidden.dtype(), weight.dtype(), bias.dtype()];
        match HeadBackward
            .prepare::<C>([hidden_node, weight_node, bias_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let options = HeadOptions {
                    gradients,
                    ..options
                };
                // A per-row upstream gradient cannot scale dW and db after the fact (each row
                // of G has its own factor): Reduction::None recomputes.
                let keep =
                    options.mode == GradientMode::Keep && options.spec.reduction != Reduction::None;
                if keep {
                    // No upstream gradient yet: the weights (or their placeholder) stand in
                    // for it, unread.
                    let upstream = weights.clone();
                    let options = HeadOptions {
                        upstream_grad: false,
                        ..options
                    };
                    let (loss, dh, dw, db, summary) =
                        B::lsce_head_grad(hidden, weight, bias, labels, weights, upstream, options);
                    let state = State::Keep {
                        grads: [dh, dw, db],
                        dtypes,
                    };
                    (prep.finish(state, loss), summary)
                } else {
                    let (loss, summary) = B::lsce_head(
                        hidden.clone(),
                        weight.clone(),
                        bias.clone(),
                        labels.clone(),
                        weights.clone(),
                        options,
                    );
                    let state = State::Recompute {
                        hidden,
                        weight,
                        bias,
                        labels,
                        weights,
                        options,
                        dtypes,
                    };
                    (prep.finish(state, loss), summary)
                }
            }
            OpsKind::UnTracked(prep) => {
                let (loss, summary) = B::lsce_head(hidden, weight, bias, labels, weights, options);
                (prep.finish(loss), summary)
            }
        }
    }

    fn lsce_head_grad(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        labels: IntTensor<Self>,
        weights: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        options: HeadOptions,
    ) -> HeadGradOutput<Self> {
        let (loss, dh, dw, db, summary) = B::lsce_head_grad(
            hidden.into_primitive(),
            weight.into_primitive(),
            bias.into_primitive(),
            labels,
            weights.into_primitive(),
            upstream.into_primitive(),
            options,
        );
        // Not differentiable: the outputs start untracked leaves.
        let leaf = FloatTensor::<Self>::new;
        (leaf(loss), leaf(dh), leaf(dw), leaf(db), summary)
    }
}
