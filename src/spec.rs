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
