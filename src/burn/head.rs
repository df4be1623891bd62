//! The fused linear head + loss as a Burn backend operation: the extension trait every layer
//! implements (cube kernel launch, fusion registration, autodiff node), and the description
//! they share.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend};

use super::error::BurnError;
use super::ops::GradientMode;
use crate::linear::{HeadGradients, LinearProblem, Memory};
use crate::{Dtype, LossSpec, Problem, Reduction, TargetKind};

/// What one call of the fused head computes, besides its tensors, and which of its tensor
/// arguments are real (an absent input is a one-element placeholder that is never bound).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadOptions {
    /// The loss of the logits `H W^T + b`.
    pub spec: LossSpec,
    /// Where the gradients come from in an autodiff graph.
    pub mode: GradientMode,
    /// Whether `weights` holds class weights.
    pub weighted: bool,
    /// Whether `bias` holds a bias `[vocab]`.
    pub bias: bool,
    /// Whether `upstream` holds the upstream gradient ([`LsceHeadOps::lsce_head_grad`]).
    pub upstream_grad: bool,
    /// Which gradients [`LsceHeadOps::lsce_head_grad`] writes (`Hidden`: `dH` only, for a
    /// head that is not tracked). Ignored by [`LsceHeadOps::lsce_head`].
    pub gradients: HeadGradients,
    /// Recompute the logits' tiles, or keep a chunk of them.
    pub memory: Memory,
}

/// lsce's fused linear head and loss on a Burn backend: implemented by Burn's cube backend (the
/// kernels), by fusion (a custom operation in its stream) and by autodiff (a graph node with
/// up to three float parents: the hidden states, the weight and the bias). Inputs are
/// validated by [`LsceLinearLoss`](super::LsceLinearLoss) before they get here.
#[backend_extension(Cube, Autodiff)]
pub trait LsceHeadOps: Backend {
    /// The loss of the logits `hidden [N, D] x weight [V, D]^T + bias [V]` against `labels`
    /// (`[N]` i32), with `weights` (`V` f32) when `options.weighted`: the loss (`[N]` f32 for
    /// `Reduction::None`, else `[1]`) and the kernel's summary as 8 i32 words. `bias` is a
    /// placeholder unless `options.bias`. No logits are materialised.
    fn lsce_head(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        labels: IntTensor<Self>,
        weights: FloatTensor<Self>,
        options: HeadOptions,
    ) -> (FloatTensor<Self>, IntTensor<Self>);

    /// [`LsceHeadOps::lsce_head`] and the gradients `dH [N, D]`, `dW [V, D]`, `db [V]`, all
    /// f32, scaled by `upstream` (`[1]` or `[N]` f32) when `options.upstream_grad`. `dW` and
    /// `db` are `[1]` placeholders where `options.gradients` (or the absent bias) leaves them
    /// unwritten. Not differentiable itself.
    #[allow(clippy::type_complexity)]
    fn lsce_head_grad(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        labels: IntTensor<Self>,
        weights: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        options: HeadOptions,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
    );
}

/// What [`LsceHeadOps::lsce_head_grad`] returns: the loss, `dH`, `dW`, `db` and the summary.
/// The trait spells the tuple out, since `backend_extension` reads it there and cannot
/// resolve an alias; the implementations name it.
pub(crate) type HeadGradOutput<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    IntTensor<B>,
);

/// The plan key of one launch (`gradients`: what it writes). The validation in
/// [`LsceLinearLoss`](super::LsceLinearLoss) and the launch both derive it here, so the plan
/// validated first is the plan the launch finds.
pub(crate) fn problem(
    options: &HeadOptions,
    [rows, dim, vocab]: [usize; 3],
    dtype: Dtype,
    gradients: HeadGradients,
) -> Result<LinearProblem, BurnError> {
    let narrow = |n: usize| {
        u32::try_from(n).map_err(|_| {
            BurnError::from(crate::LsceError::Unsupported(
                "the linear head's sizes must fit u32",
            ))
        })
    };
    let head = LinearProblem::new(options.spec, narrow(rows)?, narrow(dim)?, narrow(vocab)?)?;
    let loss = Problem::new(options.spec, head.loss.shape)
        .with_dtype(dtype)
        .with_targets(TargetKind::Classes)
        .with_weighted(options.weighted)
        .with_upstream_grad(options.upstream_grad);
    Ok(head
        .with_loss(loss)
        .with_bias(options.bias)
        .with_gradients(gradients)
        .with_memory(options.memory))
}

/// The loss tensor's dims: one value per row for `Reduction::None`, else one.
pub(crate) fn loss_dims(spec: &LossSpec, rows: usize) -> [usize; 1] {
    match spec.reduction {
        Reduction::None => [rows],
        Reduction::Sum | Reduction::Mean => [1],
    }
}

/// The dims of the gradients a launch writes (`[1]` placeholders for those it does not):
/// `dH`, `dW`, `db`.
pub(crate) fn grad_dims(options: &HeadOptions, [rows, dim, vocab]: [usize; 3]) -> [Vec<usize>; 3] {
    let all = options.gradients == HeadGradients::All;
    [
        vec![rows, dim],
        if all { vec![vocab, dim] } else { vec![1] },
        if all && options.bias {
            vec![vocab]
        } else {
            vec![1]
        },
    ]
}
