//! A batch on the host: logits, targets, weights and the upstream gradient.

use crate::dtype::Dtype;
use crate::error::{LsceError, Result};
use crate::shape::Shape;
use crate::spec::{LossSpec, Reduction, TargetValues};

/// Logits on the host. Half-precision values are raw bits (see [`crate::half`]).
#[derive(Clone, Copy, Debug)]
pub enum Logits<'a> {
    /// `f32` values.
    F32(&'a [f32]),
    /// IEEE binary16 bits.
    F16(&'a [u16]),
    /// bfloat16 bits.
    Bf16(&'a [u16]),
}

impl<'a> Logits<'a> {
    /// Number of logits.
    pub fn len(&self) -> usize {
        match self {
            Logits::F32(v) => v.len(),
            Logits::F16(v) | Logits::Bf16(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            Logits::F32(_) => Dtype::F32,
            Logits::F16(_) => Dtype::F16,
            Logits::Bf16(_) => Dtype::Bf16,
        }
    }

    /// Logit `i`, exactly, as `f64`.
    pub fn get(&self, i: usize) -> f64 {
        f64::from(match self {
            Logits::F32(v) => v[i],
            Logits::F16(v) => crate::half::f16_to_f32(v[i]),
            Logits::Bf16(v) => crate::half::bf16_to_f32(v[i]),
        })
    }

    /// The raw bytes, as uploaded.
    pub fn bytes(&self) -> &'a [u8] {
        match *self {
            Logits::F32(v) => bytemuck::cast_slice(v),
            Logits::F16(v) | Logits::Bf16(v) => bytemuck::cast_slice(v),
        }
    }
}

impl<'a> From<&'a [f32]> for Logits<'a> {
    fn from(v: &'a [f32]) -> Self {
        Logits::F32(v)
    }
}

impl<'a> From<&'a Vec<f32>> for Logits<'a> {
    fn from(v: &'a Vec<f32>) -> Self {
        Logits::F32(v)
    }
}

impl<'a, const N: usize> From<&'a [f32; N]> for Logits<'a> {
    fn from(v: &'a [f32; N]) -> Self {
        Logits::F32(v)
    }
}

/// What kind of targets a plan reads: the device-side counterpart of [`Targets`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// `rows` i32 class labels.
    #[default]
    Classes,
    /// `rows * classes` f32 probabilities, laid out like the logits.
    Probabilities,
}

/// Targets of a batch, on the host.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// One class label per row (`rows` values), PyTorch's class-index targets.
    Classes(&'a [i32]),
    /// A distribution per row laid out like the logits (`rows * classes` values), PyTorch's
    /// probability targets. Unnormalised rows are accepted.
    Probabilities(&'a [f32]),
}

impl Targets<'_> {
    /// Their kind.
    pub fn kind(&self) -> TargetKind {
        match self {
            Targets::Classes(_) => TargetKind::Classes,
            Targets::Probabilities(_) => TargetKind::Probabilities,
        }
    }
}

/// The upstream gradient `dL_total/dloss` that scales the gradient.
#[derive(Clone, Copy, Debug, Default)]
pub enum UpstreamGrad<'a> {
    /// 1 for every row: the gradient of the reduced loss itself.
    #[default]
    One,
    /// A scalar, for [`Reduction::Sum`] and [`Reduction::Mean`].
    Scalar(f32),
    /// One value per row, for [`Reduction::None`].
    PerRow(&'a [f32]),
}

impl UpstreamGrad<'_> {
    /// Checks the upstream gradient against the reduction and the row count: one value per
    /// row for [`Reduction::None`], a scalar (or none) otherwise.
    pub fn check(&self, reduction: Reduction, rows: usize) -> Result<()> {
        match (self, reduction) {
            (UpstreamGrad::PerRow(g), Reduction::None) => check_len("upstream", rows, g.len()),
            (UpstreamGrad::PerRow(_), _) => Err(LsceError::Unsupported(
                "a per-row upstream gradient needs Reduction::None",
            )),
            (UpstreamGrad::Scalar(_), Reduction::None) => Err(LsceError::Unsupported(
                "Reduction::None needs a per-row upstream gradient (or One)",
            )),
            _ => Ok(()),
        }
    }
}

/// One batch on the host, the input of the staging API and of the [`cpu`](crate::cpu) reference.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// The logits' shape.
    pub shape: Shape,
    /// `shape.elements()` logits.
    pub logits: Logits<'a>,
    /// The targets.
    pub targets: Targets<'a>,
    /// Optional per-class weights (`classes` values, finite, `>= 0`), PyTorch's `weight=`.
    pub weights: Option<&'a [f32]>,
    /// The upstream gradient.
    pub upstream: UpstreamGrad<'a>,
}

impl<'a> Batch<'a> {
    /// A batch of class-label targets with no weights and upstream gradient 1.
    pub fn classes(shape: Shape, logits: impl Into<Logits<'a>>, labels: &'a [i32]) -> Self {
        Self {
            shape,
            logits: logits.into(),
            targets: Targets::Classes(labels),
            weights: None,
            upstream: UpstreamGrad::One,
        }
    }

    /// A batch of probability targets with no weights and upstream gradient 1.
    pub fn probabilities(shape: Shape, logits: impl Into<Logits<'a>>, targets: &'a [f32]) -> Self {
        Self {
            shape,
            logits: logits.into(),
            targets: Targets::Probabilities(targets),
            weights: None,
            upstream: UpstreamGrad::One,
        }
    }

    /// Sets [`Batch::weights`].
    pub fn with_weights(mut self, weights: &'a [f32]) -> Self {
        self.weights = Some(weights);
        self
    }

    /// Sets [`Batch::upstream`].
    pub fn with_upstream(mut self, upstream: UpstreamGrad<'a>) -> Self {
        self.upstream = upstream;
        self
    }

    /// Checks lengths, weights, labels and the upstream gradient against the shape and spec.
    pub fn validate(&self, spec: &LossSpec) -> Result<TargetValues> {
        let values = self.validate_layout(spec)?;
        self.check_labels(spec, self.shape.classes())?;
        Ok(values)
    }

    /// `Err(LabelOutOfRange)` for the first class label outside `[0, classes)` that is not the
    /// ignore index; `classes` is the shape's, or the global class count of a vocabulary shard.
    pub(crate) fn check_labels(&self, spec: &LossSpec, classes: u32) -> Result<()> {
        if let Targets::Classes(labels) = self.targets {
            if let Some((row, &label)) = labels
                .iter()
                .enumerate()
                .find(|(_, &l)| Some(l) != spec.ignore_index && (l < 0 || l as u32 >= classes))
            {
                return Err(LsceError::LabelOutOfRange {
                    row: row as u64,
                    label,
                    classes,
                });
            }
        }
        Ok(())
    }

    /// Everything [`Batch::validate`] checks except the label values, which the GPU checks
    /// itself (and reports through [`Summary`](crate::Summary)).
    pub fn validate_layout(&self, spec: &LossSpec) -> Result<TargetValues> {
        let values = spec.resolve(self.shape.classes())?;
        self.check_inputs(spec.reduction)?;
        Ok(values)
    }

    fn elements(&self) -> Result<usize> {
        usize::try_from(self.shape.elements()).map_err(|_| LsceError::ShapeTooLarge {
            what: "elements exceed usize",
        })
    }

    /// Everything [`Batch::validate_layout`] checks but the logits: the spec against the class
    /// count, the targets, weights and upstream gradient against the shape. The fused linear
    /// head's batch has no logits (it makes them).
    pub(crate) fn validate_targets(&self, spec: &LossSpec) -> Result<TargetValues> {
        let values = spec.resolve(self.shape.classes())?;
        self.check_targets(spec.reduction)?;
        Ok(values)
    }

    /// The checks of [`Batch::validate_layout`] that need no spec but the reduction: lengths
    /// against the shape, the weights' values and the upstream gradient. A vocabulary shard's
    /// batch (whose spec is over the global classes) is checked by this alone.
    pub(crate) fn check_inputs(&self, reduction: Reduction) -> Result<()> {
        check_len("logits", self.elements()?, self.logits.len())?;
        self.check_targets(reduction)
    }

    /// [`Batch::check_inputs`] but the logits.
    pub(crate) fn check_targets(&self, reduction: Reduction) -> Result<()> {
        let rows = self.shape.rows() as usize;
        let elements = self.elements()?;
        match self.targets {
            Targets::Classes(labels) => check_len("targets", rows, labels.len())?,
            Targets::Probabilities(probs) => check_len("targets", elements, probs.len())?,
        }
        if let Some(weights) = self.weights {
            check_len("weights", self.shape.classes() as usize, weights.len())?;
            if let Some((class, &value)) = weights
                .iter()
                .enumerate()
                .find(|(_, w)| !w.is_finite() || **w < 0.0)
            {
                return Err(LsceError::InvalidWeight { class, value });
            }
        }
        self.upstream.check(reduction, rows)
    }
}

/// `Err(LengthMismatch)` naming `what` unless `actual == expected`.
pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected != actual {
        return Err(LsceError::LengthMismatch {
            what,
            expected,
            actual,
        });
    }
    Ok(())
}
