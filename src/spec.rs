//! The loss specification: what is computed, independent of where.

use crate::error::{LsceError, Result};

/// How the target distribution `q` of a row with class label `y` is built.
///
/// The `M` classes that *receive* smoothing mass are all `K` classes, or `K - 1` when
/// [`LossSpec::excluded_class`] names a padding class (which then gets `q = 0` unless it is the
/// label itself).
///
/// | variant | on-value `q_y` | off-value `q_k`, `k != y` | used by |
/// |---|---|---|---|
/// | `Uniform(eps)` | `1 - eps + eps/M` | `eps/M` | PyTorch `label_smoothing`, HF `LabelSmoother`, NVIDIA examples |
/// | `OffTarget(eps)` | `1 - eps` | `eps/(M-1)` | Megatron, "eps/(K-1)" codes |
/// | `Explicit { on, off }` | `on` | `off` | anything else (mass need not be 1) |
///
/// With `OffTarget` and `M = 1` no other class can receive the mass and the off-value is 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Smoothing {
    /// Mass `eps` spread uniformly over all receiving classes, the label included (PyTorch).
    Uniform(f32),
    /// Mass `eps` spread over the receiving classes other than the label.
    OffTarget(f32),
    /// Explicit on- and off-values; both must be finite and `>= 0`.
    Explicit {
        /// Target value at the label.
        on: f32,
        /// Target value at every other receiving class.
        off: f32,
    },
}

impl Default for Smoothing {
    /// No smoothing: plain cross-entropy.
    fn default() -> Self {
        Smoothing::Uniform(0.0)
    }
}

/// The resolved on/off values of a [`Smoothing`] for a given class count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetValues {
    /// `q_y`.
    pub on: f64,
    /// `q_k` for receiving classes `k != y`.
    pub off: f64,
}

impl Smoothing {
    /// Checks the smoothing parameters alone.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Smoothing::Uniform(eps) | Smoothing::OffTarget(eps) => {
                if !(0.0..=1.0).contains(&eps) {
                    return Err(LsceError::InvalidSmoothing(eps));
                }
            }
            Smoothing::Explicit { on, off } => {
                for (which, value) in [("on", on), ("off", off)] {
                    if !value.is_finite() || value < 0.0 {
                        return Err(LsceError::InvalidTargetValue { which, value });
                    }
                }
            }
        }
        Ok(())
    }

    /// Resolves the on/off values for `receiving` classes (`K`, or `K - 1` with an excluded
    /// class). `receiving` must be at least 1.
    ///
    /// ```
    /// use lsce::Smoothing;
    /// let q = Smoothing::Uniform(0.1).target_values(5);
    /// assert!((q.on - 0.92).abs() < 1e-7 && (q.off - 0.02).abs() < 1e-7); // eps is an f32
    /// let q = Smoothing::OffTarget(0.3).target_values(6);
    /// assert!((q.on - 0.7).abs() < 1e-7 && (q.off - 0.06).abs() < 1e-7);
    /// ```
    pub fn target_values(&self, receiving: u32) -> TargetValues {
        let m = f64::from(receiving.max(1));
        match *self {
            Smoothing::Uniform(eps) => {
                let eps = f64::from(eps);
                TargetValues {
                    on: 1.0 - eps + eps / m,
                    off: eps / m,
                }
            }
            Smoothing::OffTarget(eps) => {
                let eps = f64::from(eps);
                TargetValues {
                    on: 1.0 - eps,
                    off: if receiving > 1 { eps / (m - 1.0) } else { 0.0 },
                }
            }
            Smoothing::Explicit { on, off } => TargetValues {
                on: f64::from(on),
                off: f64::from(off),
            },
        }
    }
}

/// How per-row losses are combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// One loss per row; ignored rows give 0.
    None,
    /// The sum over rows.
    Sum,
    /// The sum divided by the sum of target-class weights over non-ignored rows (the count of
    /// non-ignored rows without weights; the row count with probability targets), as PyTorch.
    #[default]
    Mean,
}

/// The shape of the logits: `[batch, classes, spatial]`, class dimension 1, row-major.
///
/// A plain `[rows, classes]` matrix has `spatial = 1`. PyTorch's `[N, C, d1, .., dk]` has
/// `batch = N`, `spatial = d1 * .. * dk`; element `(n, c, s)` is at `(n * C + c) * spatial + s`.
/// A *row* is one `(n, s)` position, flattened as `n * spatial + s`; targets, per-row losses and
/// the log-sum-exp are indexed by row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    batch: u32,
    classes: u32,
    spatial: u32,
}

impl Shape {
    /// A `[rows, classes]` matrix.
    ///
    /// ```
    /// let s = lsce::Shape::matrix(3, 5).unwrap();
    /// assert_eq!((s.rows(), s.classes(), s.elements()), (3, 5, 15));
    /// ```
    pub fn matrix(rows: u32, classes: u32) -> Result<Self> {
        Self::new(rows, classes, 1)
    }

    /// PyTorch's `[N, C, d1, .., dk]` layout with the classes in dimension 1.
    ///
    /// ```
    /// let s = lsce::Shape::class_dim1(&[2, 21, 4, 4]).unwrap();
    /// assert_eq!((s.rows(), s.classes(), s.spatial()), (32, 21, 16));
    /// ```
    pub fn class_dim1(dims: &[usize]) -> Result<Self> {
        if dims.len() < 2 {
            return Err(LsceError::Unsupported(
                "a logits shape needs at least two dimensions [N, C, ..]",
            ));
        }
        let to_u32 =
            |v: usize, what| u32::try_from(v).map_err(|_| LsceError::ShapeTooLarge { what });
        let mut spatial: u64 = 1;
        for &d in &dims[2..] {
            spatial = spatial.saturating_mul(d as u64);
        }
        let spatial = u32::try_from(spatial).map_err(|_| LsceError::ShapeTooLarge {
            what: "product of the extra dimensions exceeds u32",
        })?;
        Self::new(
            to_u32(dims[0], "batch exceeds u32")?,
            to_u32(dims[1], "classes exceed u32")?,
            spatial,
        )
    }

    /// `[batch, classes, spatial]` directly.
    pub fn new(batch: u32, classes: u32, spatial: u32) -> Result<Self> {
        if batch == 0 || classes == 0 || spatial == 0 {
            return Err(LsceError::EmptyShape);
        }
        let rows = u64::from(batch) * u64::from(spatial);
        if rows > u64::from(u32::MAX) {
            return Err(LsceError::ShapeTooLarge {
                what: "rows (batch * spatial) exceed u32",
            });
        }
        Ok(Self {
            batch,
            classes,
            spatial,
        })
    }

    /// `N`.
    pub fn batch(&self) -> u32 {
        self.batch
    }

    /// `C`, also called `K`.
    pub fn classes(&self) -> u32 {
        self.classes
    }

    /// `d1 * .. * dk`, 1 for a matrix.
    pub fn spatial(&self) -> u32 {
        self.spatial
    }

    /// `batch * spatial`: the number of (sample, position) rows.
    pub fn rows(&self) -> u32 {
        self.batch * self.spatial
    }

    /// `rows * classes`.
    pub fn elements(&self) -> u64 {
        u64::from(self.rows()) * u64::from(self.classes)
    }

    /// Index of logit `(row, class)` in the flat buffer.
    pub fn index(&self, row: u32, class: u32) -> u64 {
        let (n, s) = (row / self.spatial, row % self.spatial);
        (u64::from(n) * u64::from(self.classes) + u64::from(class)) * u64::from(self.spatial)
            + u64::from(s)
    }
}

/// The definition of the loss. Defaults reproduce `torch.nn.functional.cross_entropy`.
///
/// ```
/// use lsce::{LossSpec, Reduction, Smoothing};
/// let spec = LossSpec::default()
///     .with_smoothing(Smoothing::Uniform(0.1))
///     .with_reduction(Reduction::Sum);
/// assert!(spec.validate().is_ok());
/// assert!(LossSpec::default().with_smoothing(Smoothing::Uniform(1.5)).validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSpec {
    /// How the target distribution is smoothed.
    pub smoothing: Smoothing,
    /// Rows with this label give loss 0 and gradient 0 (PyTorch: -100). `None` ignores nothing.
    /// Class labels only: probability targets have no ignore index.
    pub ignore_index: Option<i32>,
    /// How per-row losses are combined.
    pub reduction: Reduction,
    /// A padding class that receives no smoothing mass (`q = 0` unless it is the label).
    pub excluded_class: Option<u32>,
    /// z-loss coefficient: adds `z_loss * lse^2` to every non-ignored row (PaLM). 0 disables it.
    pub z_loss: f32,
    /// Soft-capping: logits become `cap * tanh(x / cap)` (Gemma 2); `-inf` stays `-inf`.
    pub softcap: Option<f32>,
    /// Multiplies the logits before anything else (temperature `1/T`). Must be finite and > 0.
    pub logit_scale: f32,
}

impl Default for LossSpec {
    fn default() -> Self {
        Self {
            smoothing: Smoothing::default(),
            ignore_index: Some(-100),
            reduction: Reduction::Mean,
            excluded_class: None,
            z_loss: 0.0,
            softcap: None,
            logit_scale: 1.0,
        }
    }
}

impl LossSpec {
    /// PyTorch's `cross_entropy(..., label_smoothing=eps)` with its defaults otherwise.
    pub fn pytorch(label_smoothing: f32) -> Self {
        Self::default().with_smoothing(Smoothing::Uniform(label_smoothing))
    }

    /// Sets [`LossSpec::smoothing`].
    pub fn with_smoothing(mut self, smoothing: Smoothing) -> Self {
        self.smoothing = smoothing;
        self
    }

    /// Sets [`LossSpec::ignore_index`].
    pub fn with_ignore_index(mut self, ignore_index: Option<i32>) -> Self {
        self.ignore_index = ignore_index;
        self
    }

    /// Sets [`LossSpec::reduction`].
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets [`LossSpec::excluded_class`].
    pub fn with_excluded_class(mut self, class: Option<u32>) -> Self {
        self.excluded_class = class;
        self
    }

    /// Sets [`LossSpec::z_loss`].
    pub fn with_z_loss(mut self, z_loss: f32) -> Self {
        self.z_loss = z_loss;
        self
    }

    /// Sets [`LossSpec::softcap`].
    pub fn with_softcap(mut self, softcap: Option<f32>) -> Self {
        self.softcap = softcap;
        self
    }

    /// Sets [`LossSpec::logit_scale`].
    pub fn with_logit_scale(mut self, scale: f32) -> Self {
        self.logit_scale = scale;
        self
    }

    /// Checks every parameter that does not depend on the shape.
    pub fn validate(&self) -> Result<()> {
        self.smoothing.validate()?;
        if !self.z_loss.is_finite() || self.z_loss < 0.0 {
            return Err(LsceError::InvalidParameter {
                name: "z_loss",
                value: self.z_loss,
                expected: "finite and >= 0",
            });
        }
        if let Some(cap) = self.softcap {
            if !cap.is_finite() || cap <= 0.0 {
                return Err(LsceError::InvalidParameter {
                    name: "softcap",
                    value: cap,
                    expected: "finite and > 0",
                });
            }
        }
        if !self.logit_scale.is_finite() || self.logit_scale <= 0.0 {
            return Err(LsceError::InvalidParameter {
                name: "logit_scale",
                value: self.logit_scale,
                expected: "finite and > 0",
            });
        }
        Ok(())
    }

    /// Checks the spec against a class count and resolves the target values.
    pub fn resolve(&self, classes: u32) -> Result<TargetValues> {
        self.validate()?;
        let receiving = match self.excluded_class {
            Some(class) if classes < 2 || class >= classes => {
                return Err(LsceError::InvalidExcludedClass { class, classes })
            }
            Some(_) => classes - 1,
            None => classes,
        };
        Ok(self.smoothing.target_values(receiving))
    }
}

/// Element type of logits and gradients in GPU buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// `f32`.
    #[default]
    F32,
    /// IEEE binary16, two per `u32` (element `2i` in the low half), widened with
    /// `unpack2x16float`: works on every adapter, `Features::SHADER_F16` or not.
    F16,
    /// bfloat16, two per `u32` (element `2i` in the low half); works on every adapter.
    Bf16,
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Dtype {
    type Err = LsceError;

    /// `f32`, `f16` or `bf16`.
    ///
    /// ```
    /// assert_eq!("bf16".parse::<lsce::Dtype>().unwrap(), lsce::Dtype::Bf16);
    /// assert!("f64".parse::<lsce::Dtype>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::Bf16),
            _ => Err(LsceError::Unsupported("dtypes are f32, f16 and bf16")),
        }
    }
}

impl Dtype {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

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

/// Targets of a batch, on the host.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// One class label per row (`rows` values), PyTorch's class-index targets.
    Classes(&'a [i32]),
    /// A distribution per row laid out like the logits (`rows * classes` values), PyTorch's
    /// probability targets. Unnormalised rows are accepted.
    Probabilities(&'a [f32]),
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
        if let Targets::Classes(labels) = self.targets {
            let classes = self.shape.classes();
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
        Ok(values)
    }

    /// Everything [`Batch::validate`] checks except the label values, which the GPU checks
    /// itself (and reports through [`Summary`](crate::Summary)).
    pub fn validate_layout(&self, spec: &LossSpec) -> Result<TargetValues> {
        let values = spec.resolve(self.shape.classes())?;
        let rows = self.shape.rows() as usize;
        let elements =
            usize::try_from(self.shape.elements()).map_err(|_| LsceError::ShapeTooLarge {
                what: "elements exceed usize",
            })?;
        check_len("logits", elements, self.logits.len())?;
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
        match (self.upstream, spec.reduction) {
            (UpstreamGrad::PerRow(g), Reduction::None) => check_len("upstream", rows, g.len())?,
            (UpstreamGrad::PerRow(_), _) => {
                return Err(LsceError::Unsupported(
                    "a per-row upstream gradient needs Reduction::None",
                ))
            }
            (UpstreamGrad::Scalar(_), Reduction::None) => {
                return Err(LsceError::Unsupported(
                    "Reduction::None needs a per-row upstream gradient (or One)",
                ))
            }
            _ => {}
        }
        Ok(values)
    }
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected != actual {
        return Err(LsceError::LengthMismatch {
            what,
            expected,
            actual,
        });
    }
    Ok(())
}
