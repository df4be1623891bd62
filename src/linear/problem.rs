//! What a fused linear head plan is specialised for: the loss problem of its logits, the
//! hidden size, the bias, which gradients, and how much memory it may use.

use crate::dtype::Dtype;
use crate::error::{LsceError, Result};
use crate::problem::{Gradient, Problem};
use crate::shape::Shape;
use crate::spec::LossSpec;

/// Which gradients a fused linear head writes (always `f32`, accumulated in `f32`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HeadGradients {
    /// None: the loss alone (evaluation).
    None,
    /// `dH` only: a frozen head (the logits are recomputed once, not twice).
    Hidden,
    /// `dH`, `dW` and, with a bias, `db`.
    #[default]
    All,
}

/// How a fused linear head trades memory for matmuls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Memory {
    /// No logits are kept: the gradient passes recompute each tile of logits from `H` and `W`.
    /// Scratch is `O(rows + vocab)` words plus one 32-byte record per row and vocabulary block
    /// (about 1/64 of the logits' bytes). Five matmul-equivalents with every gradient.
    #[default]
    Recompute,
    /// The logits of a chunk of rows are kept (in `f32`, at most `budget_bytes`, a multiple of
    /// 64 rows) and turned into their gradient in place: three matmul-equivalents.
    Chunked {
        /// The most bytes the chunk may take; at least `64 * vocab * 4`.
        budget_bytes: u64,
    },
}

/// Everything a [`LinearPlan`](super::LinearPlan) is specialised for.
///
/// `loss` is the problem of the logits `z = H W^T + b` (`[rows, vocab]`): the spec, targets,
/// weights, upstream gradient and accuracy, with `loss.dtype` the element type of `H`, `W` and
/// `b`. Its `gradient` follows [`LinearProblem::gradients`] (set by
/// [`LinearProblem::with_gradients`]); there is no logits buffer to write one into.
///
/// ```
/// use lsce::linear::{HeadGradients, LinearProblem, Memory};
/// use lsce::LossSpec;
/// let problem = LinearProblem::new(LossSpec::pytorch(0.1), 4096, 512, 32000)
///     .unwrap()
///     .with_bias(true)
///     .with_memory(Memory::Chunked { budget_bytes: 64 << 20 });
/// assert_eq!(problem.gradients, HeadGradients::All);
/// assert_eq!((problem.rows(), problem.vocab()), (4096, 32000));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearProblem {
    /// The loss of the logits.
    pub loss: Problem,
    /// `D`: the hidden size.
    pub dim: u32,
    /// Whether a bias `b [vocab]` is added to the logits.
    pub bias: bool,
    /// Which gradients are written.
    pub gradients: HeadGradients,
    /// Recompute or chunked.
    pub memory: Memory,
}

impl LinearProblem {
    /// `rows` hidden states of `dim` values, a `[vocab, dim]` head without bias, class labels,
    /// f32, every gradient, recompute mode. `Err(EmptyShape)` when a size is 0.
    pub fn new(spec: LossSpec, rows: u32, dim: u32, vocab: u32) -> Result<Self> {
        if dim == 0 {
            return Err(LsceError::EmptyShape);
        }
        Ok(Self {
            loss: Problem::new(spec, Shape::matrix(rows, vocab)?),
            dim,
            bias: false,
            gradients: HeadGradients::All,
            memory: Memory::Recompute,
        })
    }

    /// `N`.
    pub fn rows(&self) -> u32 {
        self.loss.shape.rows()
    }

    /// `V`.
    pub fn vocab(&self) -> u32 {
        self.loss.shape.classes()
    }

    /// The element type of `H`, `W` and `b`.
    pub fn dtype(&self) -> Dtype {
        self.loss.dtype
    }

    /// Sets [`LinearProblem::loss`] (its shape must stay `[rows, vocab]`, class dim last).
    pub fn with_loss(mut self, loss: Problem) -> Self {
        self.loss = loss.with_gradient(self.loss.gradient);
        self
    }

    /// Sets [`LinearProblem::bias`].
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Sets [`LinearProblem::gradients`] (and the loss problem's gradient with it).
    pub fn with_gradients(mut self, gradients: HeadGradients) -> Self {
        self.gradients = gradients;
        self.loss.gradient = match gradients {
            HeadGradients::None => Gradient::None,
            _ => Gradient::Separate,
        };
        self
    }

    /// Sets [`LinearProblem::memory`].
    pub fn with_memory(mut self, memory: Memory) -> Self {
        self.memory = memory;
        self
    }

    /// Sets the element type of `H`, `W` and `b`.
    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.loss.dtype = dtype;
        self
    }

    /// Checks what a plan cannot serve: a strided shape, an in-place gradient, accuracy with
    /// probability targets.
    pub(crate) fn check(&self) -> Result<()> {
        if self.loss.shape.spatial() != 1 {
            return Err(LsceError::Unsupported(
                "the linear head's logits are [rows, vocab]",
            ));
        }
        if self.loss.gradient == Gradient::InPlace {
            return Err(LsceError::Unsupported(
                "the linear head has no logits buffer to write a gradient over",
            ));
        }
        if (self.gradients == HeadGradients::None) != (self.loss.gradient == Gradient::None) {
            return Err(LsceError::Unsupported(
                "loss.gradient disagrees with gradients: set them with with_gradients",
            ));
        }
        Ok(())
    }
}
