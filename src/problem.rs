//! What a plan is specialised for: the loss, the shape, and which inputs and outputs exist.

use crate::batch::{Batch, TargetKind, UpstreamGrad};
use crate::dtype::{Dtype, GradDtype};
use crate::shape::Shape;
use crate::spec::LossSpec;

/// Whether and where the gradient `dL/dlogits` is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Gradient {
    /// Forward only: loss and lse, no gradient (evaluation).
    None,
    /// Into a separate buffer laid out like the logits.
    #[default]
    Separate,
    /// Over the logits buffer, which is consumed: no second `rows * classes` buffer is needed.
    /// The CPU reference returns it like a separate one.
    InPlace,
}

impl Gradient {
    /// Whether a gradient is computed at all.
    pub fn is_some(self) -> bool {
        self != Gradient::None
    }
}

/// Everything a plan is specialised for: the loss, the shape and which inputs and outputs exist.
///
/// Build one for the encode API with [`Problem::new`] and the `with_*` methods, or derive it
/// from a host [`Batch`] with [`Problem::for_batch`].
///
/// ```
/// use lsce::{Gradient, LossSpec, Problem, Shape};
/// let problem = Problem::new(LossSpec::pytorch(0.1), Shape::matrix(8, 1000).unwrap())
///     .with_gradient(Gradient::InPlace)
///     .with_accuracy(true);
/// assert_eq!(problem.gradient, Gradient::InPlace);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Problem {
    /// The loss.
    pub spec: LossSpec,
    /// The logits' shape.
    pub shape: Shape,
    /// Class labels or probabilities.
    pub targets: TargetKind,
    /// Whether a class-weight buffer is bound.
    pub weighted: bool,
    /// Whether an upstream-gradient buffer is bound (one value for `Sum`/`Mean`, one per row for
    /// `None`); without it the upstream gradient is 1.
    pub upstream_grad: bool,
    /// Whether and where the gradient is written.
    pub gradient: Gradient,
    /// Whether to count the rows whose argmax is the label (class labels only).
    pub accuracy: bool,
    /// Element type of the logits.
    pub dtype: Dtype,
    /// Element type of the gradient. An in-place gradient has the logits' type.
    pub grad_dtype: GradDtype,
    /// Caps the bytes of any one storage binding below the device's
    /// `max_storage_buffer_binding_size`; larger inputs are processed in row windows.
    pub max_binding_bytes: Option<u64>,
}

impl Problem {
    /// Class labels, f32 logits, no weights, upstream gradient 1, gradient into a separate
    /// buffer.
    pub fn new(spec: LossSpec, shape: Shape) -> Self {
        Self {
            spec,
            shape,
            targets: TargetKind::Classes,
            weighted: false,
            upstream_grad: false,
            gradient: Gradient::Separate,
            accuracy: false,
            dtype: Dtype::F32,
            grad_dtype: GradDtype::AsLogits,
            max_binding_bytes: None,
        }
    }

    /// The problem of a host batch: its shape, logits' type, target kind, and whether it has
    /// weights and an upstream gradient. The rest is [`Problem::new`]'s.
    ///
    /// ```
    /// use lsce::{Batch, LossSpec, Problem, Shape, TargetKind};
    /// let logits = [0.0f32; 6];
    /// let batch = Batch::probabilities(Shape::matrix(2, 3).unwrap(), &logits, &logits);
    /// let problem = Problem::for_batch(LossSpec::pytorch(0.1), &batch);
    /// assert_eq!(problem.targets, TargetKind::Probabilities);
    /// ```
    pub fn for_batch(spec: LossSpec, batch: &Batch<'_>) -> Self {
        Self {
            targets: batch.targets.kind(),
            weighted: batch.weights.is_some(),
            upstream_grad: !matches!(batch.upstream, UpstreamGrad::One),
            dtype: batch.logits.dtype(),
            ..Self::new(spec, batch.shape)
        }
    }

    /// The gradient's element type.
    pub fn grad_dtype(&self) -> Dtype {
        match self.gradient {
            Gradient::InPlace => self.dtype,
            _ => self.grad_dtype.resolve(self.dtype),
        }
    }

    /// Sets [`Problem::dtype`].
    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Sets [`Problem::grad_dtype`].
    pub fn with_grad_dtype(mut self, grad_dtype: GradDtype) -> Self {
        self.grad_dtype = grad_dtype;
        self
    }

    /// Sets [`Problem::targets`].
    pub fn with_targets(mut self, targets: TargetKind) -> Self {
        self.targets = targets;
        self
    }

    /// Sets [`Problem::weighted`].
    pub fn with_weighted(mut self, weighted: bool) -> Self {
        self.weighted = weighted;
        self
    }

    /// Sets [`Problem::upstream_grad`].
    pub fn with_upstream_grad(mut self, upstream_grad: bool) -> Self {
        self.upstream_grad = upstream_grad;
        self
    }

    /// Sets [`Problem::gradient`].
    pub fn with_gradient(mut self, gradient: Gradient) -> Self {
        self.gradient = gradient;
        self
    }

    /// Sets [`Problem::accuracy`].
    pub fn with_accuracy(mut self, accuracy: bool) -> Self {
        self.accuracy = accuracy;
        self
    }

    /// Sets [`Problem::max_binding_bytes`].
    pub fn with_max_binding_bytes(mut self, bytes: Option<u64>) -> Self {
        self.max_binding_bytes = bytes;
        self
    }
}
