//! The loss as a Burn backend operation: the extension trait every layer implements (cube kernel
//! launch, fusion registration, autodiff node), and the description they share.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend};
use burn::tensor::DType;

use super::error::BurnError;
use crate::{Dtype, GradDtype, Gradient, LossSpec, Problem, Reduction, Shape, Summary, TargetKind};

/// How the gradient reaches Burn's backward pass.
///
/// Both keep one `rows x classes` tensor between forward and backward; they differ in when it
/// is made and in the work done:
///
/// | mode | forward | kept until backward | backward |
/// |---|---|---|---|
/// | `Keep` | one fused pass: loss and gradient | the gradient, in f32 | multiplies it by the upstream gradient in f32 and rounds the product once to the logits' dtype (Burn's elementwise kernels) |
/// | `Recompute` | loss only (no gradient written) | the logits | the fused pass again, the upstream gradient folded in |
///
/// `Keep` (Liger's choice) holds the logits *and* the gradient during the forward pass, two
/// `rows x classes` buffers, where `Recompute` holds only the logits; in backward both hold two
/// (`Keep`: the gradient and its scaled copy; `Recompute`: the logits and the gradient). When
/// nothing else keeps the logits (the usual case: a linear layer's backward needs its input and
/// weight, not its output), `Keep` frees them after the forward pass, so between the passes each
/// mode keeps exactly one `rows x classes` tensor.
///
/// With f16 or bf16 logits, `Keep` keeps the gradient in f32 (twice the logits' bytes), so that
/// the upstream gradient scales it before its one rounding to 16 bits: a 16-bit copy would be
/// rounded twice, and an upstream of 65536 (a usual initial loss scale of mixed-precision
/// training) cast to f16 is `inf`. `Recompute` folds the upstream gradient into the kernel,
/// which also rounds once, and keeps only the 16-bit logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GradientMode {
    /// Compute the gradient in the forward pass and keep it.
    #[default]
    Keep,
    /// Keep the logits and compute the gradient in the backward pass.
    Recompute,
}

/// What one call of the operation computes, besides its tensors, and which of its tensor
/// arguments are real. Burn's extension methods take tensors, not optional ones, so an absent
/// input is a one-element placeholder that is never bound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossOptions {
    /// The loss.
    pub spec: LossSpec,
    /// Where the gradient comes from in an autodiff graph.
    pub mode: GradientMode,
    /// Whether `labels` or `probabilities` holds the targets.
    pub targets: TargetKind,
    /// Whether `weights` holds class weights.
    pub weighted: bool,
    /// Whether `upstream` holds the upstream gradient ([`LsceOps::lsce_loss_grad`]).
    pub upstream_grad: bool,
    /// The gradient's element type ([`LsceOps::lsce_loss_grad`]): the logits' (`AsLogits`), or
    /// `F32`, which [`GradientMode::Keep`] keeps so that the upstream multiply rounds once.
    pub grad_dtype: GradDtype,
}

/// The loss on a Burn backend: implemented by Burn's cube backend (the kernel), by fusion (a
/// custom operation in its stream) and by autodiff (a graph node whose backward is lsce's
/// gradient). Inputs are validated by [`LsceLoss`](super::LsceLoss) before they get here.
#[backend_extension(Cube, Autodiff)]
pub trait LsceOps: Backend {
    /// The loss (`[rows]` for `Reduction::None`, else `[1]`, f32) and the kernel's
    /// [`Summary`] as 8 i32 words. The targets are `labels` (i32, `[rows]`) or `probabilities`
    /// (f32, like the logits), as `options.targets` says; `weights` are `classes` f32 when
    /// `options.weighted`. The other arguments are placeholders.
    fn lsce_loss(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        probabilities: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        options: LossOptions,
    ) -> (FloatTensor<Self>, IntTensor<Self>);

    /// [`LsceOps::lsce_loss`] and the gradient with respect to the logits (the logits' shape,
    /// of the dtype `options.grad_dtype` names), scaled by `upstream` (`[1]` or `[rows]` f32) when `options.upstream_grad`.
    /// Not differentiable itself.
    fn lsce_loss_grad(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        probabilities: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        options: LossOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>);
}

/// The lsce element type of a Burn float dtype.
pub(crate) fn lsce_dtype(what: &'static str, dtype: DType) -> Result<Dtype, BurnError> {
    match dtype {
        DType::F32 => Ok(Dtype::F32),
        DType::F16 => Ok(Dtype::F16),
        DType::BF16 => Ok(Dtype::Bf16),
        other => Err(BurnError::UnsupportedDtype {
            what,
            dtype: format!("{other:?}"),
        }),
    }
}

/// The plan key of one launch (`gradient`: whether it writes the gradient). The validation in
/// [`LsceLoss`](super::LsceLoss) and the launch both derive it here, so the plan validated
/// first is the plan the launch finds.
pub(crate) fn problem(
    options: &LossOptions,
    dims: &[usize],
    dtype: Dtype,
    gradient: bool,
) -> Result<Problem, BurnError> {
    let shape = Shape::class_dim1(dims)?;
    Ok(Problem::new(options.spec, shape)
        .with_dtype(dtype)
        .with_targets(options.targets)
        .with_weighted(options.weighted)
        .with_upstream_grad(options.upstream_grad)
        .with_grad_dtype(options.grad_dtype)
        .with_gradient(if gradient {
            Gradient::Separate
        } else {
            Gradient::None
        }))
}

/// The Burn dtype of the gradient a launch writes for logits of `logits`.
pub(crate) fn grad_burn_dtype(options: &LossOptions, logits: DType) -> DType {
    match options.grad_dtype {
        GradDtype::F32 => DType::F32,
        GradDtype::AsLogits => logits,
    }
}

/// The loss tensor's dims: one value per row for `Reduction::None`, else one.
pub(crate) fn loss_dims(spec: &LossSpec, shape: &Shape) -> [usize; 1] {
    match spec.reduction {
        Reduction::None => [shape.rows() as usize],
        Reduction::Sum | Reduction::Mean => [1],
    }
}

/// The summary tensor's dims: [`Summary`]'s 32 bytes as i32 words.
pub(crate) const SUMMARY_DIMS: [usize; 1] = [(Summary::SIZE / 4) as usize];
