//! A fused linear head's batch on the host (the input of its staging call and CPU reference),
//! the options of a staging call, and what both return.

use crate::batch::{check_len, Batch, Logits, Targets, UpstreamGrad};
use crate::dtype::Dtype;
use crate::error::{LsceError, Result};
use crate::output::LossOutput;
use crate::shape::Shape;
use crate::spec::{LossSpec, TargetValues};

use super::problem::{HeadGradients, Memory};

/// Hidden states, the head and its bias on the host, with the loss's targets.
///
/// `loss` holds the targets, class weights and upstream gradient of the logits
/// `z = H W^T + b` as a [`Batch`] of shape `[rows, vocab]` whose logits are empty: the head
/// makes them. Build it with [`LinearBatch::classes`] or [`LinearBatch::probabilities`].
///
/// ```
/// use lsce::linear::LinearBatch;
/// let (hidden, head) = (vec![0.5f32; 2 * 3], vec![0.25f32; 4 * 3]);
/// let batch = LinearBatch::classes(3, &hidden, &head, &[1, 3]).unwrap();
/// assert_eq!((batch.rows(), batch.vocab()), (2, 4));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct LinearBatch<'a> {
    /// `D`.
    pub dim: u32,
    /// `H [rows, dim]`.
    pub hidden: Logits<'a>,
    /// `W [vocab, dim]`.
    pub head: Logits<'a>,
    /// `b [vocab]`.
    pub bias: Option<Logits<'a>>,
    /// The targets, weights and upstream gradient (no logits).
    pub loss: Batch<'a>,
}

impl<'a> LinearBatch<'a> {
    fn new(
        dim: u32,
        hidden: impl Into<Logits<'a>>,
        head: impl Into<Logits<'a>>,
        targets: Targets<'a>,
    ) -> Result<Self> {
        let (hidden, head) = (hidden.into(), head.into());
        if dim == 0 || hidden.is_empty() || head.is_empty() {
            return Err(LsceError::EmptyShape);
        }
        let rows =
            u32::try_from(hidden.len() / dim as usize).map_err(|_| LsceError::ShapeTooLarge {
                what: "rows exceed u32",
            })?;
        let vocab =
            u32::try_from(head.len() / dim as usize).map_err(|_| LsceError::ShapeTooLarge {
                what: "vocabulary exceeds u32",
            })?;
        Ok(Self {
            dim,
            hidden,
            head,
            bias: None,
            loss: Batch {
                shape: Shape::matrix(rows, vocab)?,
                logits: Logits::F32(&[]),
                targets,
                weights: None,
                upstream: UpstreamGrad::One,
            },
        })
    }

    /// `hidden [rows, dim]`, `head [vocab, dim]` (rows and vocab from their lengths) and one
    /// class label per row.
    pub fn classes(
        dim: u32,
        hidden: impl Into<Logits<'a>>,
        head: impl Into<Logits<'a>>,
        labels: &'a [i32],
    ) -> Result<Self> {
        Self::new(dim, hidden, head, Targets::Classes(labels))
    }

    /// As [`LinearBatch::classes`], with `[rows, vocab]` probability targets.
    pub fn probabilities(
        dim: u32,
        hidden: impl Into<Logits<'a>>,
        head: impl Into<Logits<'a>>,
        targets: &'a [f32],
    ) -> Result<Self> {
        Self::new(dim, hidden, head, Targets::Probabilities(targets))
    }

    /// Sets [`LinearBatch::bias`].
    pub fn with_bias(mut self, bias: impl Into<Logits<'a>>) -> Self {
        self.bias = Some(bias.into());
        self
    }

    /// Sets the class weights ([`Batch::with_weights`]).
    pub fn with_weights(mut self, weights: &'a [f32]) -> Self {
        self.loss = self.loss.with_weights(weights);
        self
    }

    /// Sets the upstream gradient ([`Batch::with_upstream`]).
    pub fn with_upstream(mut self, upstream: UpstreamGrad<'a>) -> Self {
        self.loss = self.loss.with_upstream(upstream);
        self
    }

    /// `N`.
    pub fn rows(&self) -> u32 {
        self.loss.shape.rows()
    }

    /// `V`.
    pub fn vocab(&self) -> u32 {
        self.loss.shape.classes()
    }

    /// The inputs' element type.
    pub fn dtype(&self) -> Dtype {
        self.hidden.dtype()
    }

    /// Checks the sizes and element types of `H`, `W` and `b`, then the targets, weights and
    /// upstream gradient against the spec (labels are checked by the GPU, or by
    /// [`Batch::check_labels`] on the CPU).
    pub(crate) fn validate_layout(&self, spec: &LossSpec) -> Result<TargetValues> {
        let (rows, dim, vocab) = (
            self.rows() as usize,
            self.dim as usize,
            self.vocab() as usize,
        );
        check_len("hidden (rows x dim)", rows * dim, self.hidden.len())?;
        check_len("head (vocab x dim)", vocab * dim, self.head.len())?;
        if let Some(bias) = self.bias {
            check_len("bias (vocab)", vocab, bias.len())?;
        }
        let same = self.head.dtype() == self.dtype()
            && self.bias.is_none_or(|b| b.dtype() == self.dtype());
        if !same {
            return Err(LsceError::Unsupported(
                "hidden, head and bias must have one element type",
            ));
        }
        self.loss.validate_targets(spec)
    }
}

/// What a fused linear head's staging call computes besides the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearOptions {
    /// Which gradients.
    pub gradients: HeadGradients,
    /// Count the rows whose argmax is the label.
    pub accuracy: bool,
    /// Recompute or chunked.
    pub memory: Memory,
    /// Caps the bytes of one storage binding, as [`Problem::max_binding_bytes`](crate::Problem):
    /// a larger head is bound in vocabulary windows.
    pub max_binding_bytes: Option<u64>,
}

/// The results of a fused linear head: the loss as [`LossOutput`] (whose `grad`, the logits'
/// gradient, is `None`: there are no logits) and the gradients asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearOutput<T> {
    /// Loss, z-loss, lse, denominator, accuracy.
    pub loss: LossOutput<T>,
    /// `dH [rows, dim]`.
    pub d_hidden: Option<Vec<T>>,
    /// `dW [vocab, dim]`.
    pub d_head: Option<Vec<T>>,
    /// `db [vocab]`.
    pub d_bias: Option<Vec<T>>,
}
