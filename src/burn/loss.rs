//! The loss as Burn users call it: a config, `init`, and `forward` on Burn tensors.

use burn::backend::Dispatch;
use burn::tensor::{DType, Device, FloatDType, Int, IntDType, Tensor, TensorData};

use super::error::BurnError;
use super::ops::{self, GradientMode, LossOptions, LsceOps};
use super::registry::{self, Shared};
use crate::{GradDtype, LossSpec, Summary, TargetKind};

/// Configuration of an [`LsceLoss`], in the style of Burn's `CrossEntropyLossConfig`.
///
/// Defaults are PyTorch's `cross_entropy` (mean, ignore index -100, no smoothing), the gradient
/// kept from the forward pass, and labels checked.
#[derive(Clone, Debug)]
pub struct LsceLossConfig {
    /// The loss: smoothing convention, reduction, ignore index, z-loss, soft-cap, scale.
    pub spec: LossSpec,
    /// Per-class weights (`classes` values, finite, `>= 0`), PyTorch's `weight=`.
    pub weights: Option<Vec<f32>>,
    /// Where the backward pass gets the gradient from.
    pub gradient: GradientMode,
    /// Whether [`LsceLoss::try_forward`] reads back the kernel's 32-byte summary to report an
    /// invalid label as an error. This waits for the device once per call; without it a row
    /// with an invalid label gets a NaN loss and gradient instead (never a wrong number).
    pub check_labels: bool,
}

impl Default for LsceLossConfig {
    fn default() -> Self {
        Self {
            spec: LossSpec::default(),
            weights: None,
            gradient: GradientMode::default(),
            check_labels: true,
        }
    }
}

/// The loss options' builder methods, on [`LsceLossConfig`] and on each config that holds one
/// (`$loss`: its method giving the [`LsceLossConfig`] mutably), so that every config sets the
/// loss the same way: `with_smoothing`, `with_spec`, `with_weights`, `with_gradient`,
/// `with_label_check`.
macro_rules! loss_config_builders {
    ($config:ty, $loss:ident) => {
        impl $config {
            /// Burn's `with_smoothing`: `Some(eps)` is PyTorch's `label_smoothing = eps`
            /// ([`Smoothing::Uniform`](crate::Smoothing::Uniform)), which is what Burn's
            /// `CrossEntropyLoss` computes.
            pub fn with_smoothing(mut self, smoothing: Option<f32>) -> Self {
                self.$loss().spec.smoothing = crate::Smoothing::Uniform(smoothing.unwrap_or(0.0));
                self
            }

            /// Sets the whole [`LossSpec`](crate::LossSpec) (any convention, reduction or
            /// option).
            pub fn with_spec(mut self, spec: crate::LossSpec) -> Self {
                self.$loss().spec = spec;
                self
            }

            /// Sets [`LsceLossConfig::weights`](super::LsceLossConfig::weights).
            pub fn with_weights(mut self, weights: Option<Vec<f32>>) -> Self {
                self.$loss().weights = weights;
                self
            }

            /// Sets [`LsceLossConfig::gradient`](super::LsceLossConfig::gradient).
            pub fn with_gradient(mut self, gradient: super::GradientMode) -> Self {
                self.$loss().gradient = gradient;
                self
            }

            /// Sets [`LsceLossConfig::check_labels`](super::LsceLossConfig::check_labels).
            pub fn with_label_check(mut self, check: bool) -> Self {
                self.$loss().check_labels = check;
                self
            }
        }
    };
}
pub(super) use loss_config_builders;

loss_config_builders!(LsceLossConfig, loss_mut);

impl LsceLossConfig {
    /// PyTorch's defaults (see [`LsceLossConfig`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Itself, for [`loss_config_builders`].
    fn loss_mut(&mut self) -> &mut Self {
        self
    }

    /// Checks the loss, the class weights' values and the device.
    pub(super) fn validate(&self, device: &Device) -> Result<(), BurnError> {
        self.spec.validate()?;
        registry::shared("the device", device)?;
        if let Some((class, &value)) = self
            .weights
            .iter()
            .flatten()
            .enumerate()
            .find(|(_, w)| !w.is_finite() || **w < 0.0)
        {
            return Err(crate::LsceError::InvalidWeight { class, value }.into());
        }
        Ok(())
    }

    /// Checks the configuration and the device, and puts the weights on it.
    pub fn init(&self, device: &Device) -> Result<LsceLoss, BurnError> {
        self.validate(device)?;
        let weights = self.weights.as_ref().map(|weights| {
            let data = TensorData::new(weights.clone(), [weights.len()]);
            Tensor::<1>::from_data(data, device).cast(FloatDType::F32)
        });
        Ok(LsceLoss {
            spec: self.spec,
            weights,
            gradient: self.gradient,
            check_labels: self.check_labels,
            placeholders: (
                Tensor::<1>::zeros([1], device).cast(FloatDType::F32),
                Tensor::<1, Int>::zeros([1], device).cast(IntDType::I32),
            ),
        })
    }
}

/// lsce's fused label-smoothed cross-entropy on Burn tensors, on Burn's wgpu device, with
/// Burn's autodiff.
///
/// Swap it in for Burn's `CrossEntropyLoss`:
///
/// ```ignore
/// use burn::tensor::{Int, Tensor};
/// use lsce::burn::LsceLossConfig;
///
/// let device = lsce::burn::init_device()?.autodiff();
/// let logits = Tensor::<2>::zeros([4, 10], &device).require_grad();
/// let targets = Tensor::<1, Int>::from_ints([1, 2, 3, 4], &device);
/// // was: CrossEntropyLossConfig::new().with_smoothing(Some(0.1)).init(&device)
/// let loss = LsceLossConfig::new().with_smoothing(Some(0.1)).init(&device)?;
/// let value = loss.try_forward(logits.clone(), targets)?;
/// let grads = value.backward();
/// # Ok::<(), lsce::burn::BurnError>(())
/// ```
///
/// The loss is `[1]` f32 for `Sum`/`Mean` and `[rows]` f32 for `Reduction::None`, rows in the
/// targets' row-major order (`n * spatial + s` for `[N, C, d..]` logits).
#[derive(Clone, Debug)]
pub struct LsceLoss {
    spec: LossSpec,
    weights: Option<Tensor<1>>,
    gradient: GradientMode,
    check_labels: bool,
    /// What the operation gets for the inputs a call does not have (float, int): Burn's
    /// extension methods take tensors, not optional ones. Never bound or read.
    placeholders: (Tensor<1>, Tensor<1, Int>),
}

impl LsceLoss {
    /// Burn's `CrossEntropyLoss::forward`: `[batch, classes]` logits and `[batch]` labels.
    ///
    /// # Panics
    /// On any error of [`LsceLoss::try_forward`], with its message (Burn's own losses panic on
    /// bad input too); call `try_forward` to handle it.
    pub fn forward(&self, logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        self.try_forward(logits, targets)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// The loss of `[N, C, d..]` (or `[N, C]`) logits against class labels `[N, d..]`.
    pub fn try_forward<const D: usize, const T: usize>(
        &self,
        logits: Tensor<D>,
        targets: Tensor<T, Int>,
    ) -> Result<Tensor<1>, BurnError> {
        let dims = logits.dims();
        let expected: Vec<usize> = dims
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != 1)
            .map(|(_, &d)| d)
            .collect();
        check_shape("the targets", &expected, &targets.dims())?;
        let targets = labels_i32(targets);
        let device = targets.device();
        self.run(logits, Target::Labels(targets.into_dispatch()), device)
    }

    /// The loss of logits against probability targets of the same shape (PyTorch's
    /// probability targets; rows need not be normalised). No gradient flows to the targets.
    pub fn try_forward_probabilities<const D: usize>(
        &self,
        logits: Tensor<D>,
        targets: Tensor<D>,
    ) -> Result<Tensor<1>, BurnError> {
        check_shape("the targets", &logits.dims(), &targets.dims())?;
        let targets = match targets.dtype() {
            DType::F32 => targets,
            _ => targets.cast(FloatDType::F32),
        };
        let device = targets.device();
        self.run(
            logits,
            Target::Probabilities(targets.into_dispatch()),
            device,
        )
    }

    fn run<const D: usize>(
        &self,
        logits: Tensor<D>,
        targets: Target,
        target_device: Device,
    ) -> Result<Tensor<1>, BurnError> {
        let device = logits.device();
        let shared = registry::shared("the logits", &device)?;
        let dims = logits.dims();
        if D < 2 {
            return Err(crate::LsceError::Unsupported(
                "logits need at least two dimensions [N, C, ..]",
            )
            .into());
        }
        let dtype = device_dtype("the logits", &device, logits.dtype())?;
        same_device("the targets", &device, &target_device)?;
        let weights = match &self.weights {
            Some(weights) => {
                same_device("the weights", &device, &weights.device())?;
                check_shape("the weights", &[dims[1]], &weights.dims())?;
                Some(weights.clone().into_dispatch())
            }
            None => None,
        };
        let options = LossOptions {
            spec: self.spec,
            mode: self.gradient,
            targets: match targets {
                Target::Labels(_) => TargetKind::Classes,
                Target::Probabilities(_) => TargetKind::Probabilities,
            },
            weighted: weights.is_some(),
            upstream_grad: false,
            grad_dtype: GradDtype::AsLogits,
        };
        self.plan_all(&shared, &dims, dtype, options, device.is_autodiff())?;

        let (float, int) = &self.placeholders;
        let (labels, probabilities) = match targets {
            Target::Labels(t) => (t, float.clone().into_dispatch()),
            Target::Probabilities(t) => (int.clone().into_dispatch(), t),
        };
        let weights = weights.unwrap_or_else(|| float.clone().into_dispatch());
        let (loss, summary) = Dispatch::lsce_loss(
            logits.into_dispatch(),
            labels,
            probabilities,
            weights,
            options,
        );
        let loss = Tensor::<1>::from_dispatch(loss);
        if self.check_labels && options.targets == TargetKind::Classes {
            check_summary(summary, dims[1])?;
        }
        Ok(loss)
    }

    /// Validates every launch this call can make against the device now, while an error can
    /// still be returned (fusion runs the launch later): the forward pass, and the backward
    /// pass on an autodiff device.
    fn plan_all(
        &self,
        shared: &Shared,
        dims: &[usize],
        dtype: crate::Dtype,
        options: LossOptions,
        autodiff: bool,
    ) -> Result<(), BurnError> {
        shared.plan(&ops::problem(&options, dims, dtype, false)?)?;
        if autodiff {
            // As the autodiff node launches it: `Keep` writes an f32 gradient in the forward
            // pass, `Recompute` one of the logits' dtype with the upstream gradient.
            let backward = match self.gradient {
                GradientMode::Keep => LossOptions {
                    grad_dtype: GradDtype::F32,
                    ..options
                },
                GradientMode::Recompute => LossOptions {
                    upstream_grad: true,
                    ..options
                },
            };
            shared.plan(&ops::problem(&backward, dims, dtype, true)?)?;
        }
        Ok(())
    }
}

/// The targets, as dispatch tensors.
enum Target {
    Labels(burn::backend::DispatchTensor),
    Probabilities(burn::backend::DispatchTensor),
}

/// Class labels as i32, clamped first, so that a label outside i32 stays invalid instead of
/// wrapping onto a class.
pub(super) fn labels_i32<const T: usize>(labels: Tensor<T, Int>) -> Tensor<T, Int> {
    match labels.dtype() {
        DType::I32 => labels,
        _ => labels
            .clamp(i64::from(i32::MIN), i64::from(i32::MAX))
            .cast(IntDType::I32),
    }
}

/// The lsce element type of `what`'s `dtype`, which `device` must support: a dtype the device
/// lacks (bf16 on most wgpu adapters) fails on cubecl's device thread, where no caller can
/// catch it, so it is refused here.
pub(super) fn device_dtype(
    what: &'static str,
    device: &Device,
    dtype: DType,
) -> Result<crate::Dtype, BurnError> {
    let lsce = ops::lsce_dtype(what, dtype)?;
    if !device.supports_dtype(dtype) {
        return Err(BurnError::DtypeNotOnDevice {
            what,
            dtype: format!("{dtype:?}"),
            device: format!("{device:?}"),
        });
    }
    Ok(lsce)
}

/// Reads back the kernel's summary (one wait for the device) and reports an invalid label
/// among `classes` as an error.
pub(super) fn check_summary(
    summary: burn::backend::DispatchTensor,
    classes: usize,
) -> Result<(), BurnError> {
    let summary = Tensor::<1, Int>::from_dispatch(summary)
        .try_into_data()
        .map_err(|e| BurnError::Execution(e.to_string()))?;
    let words = summary
        .try_into_vec::<i32>()
        .map_err(|e| BurnError::Execution(format!("{e:?}")))?;
    Summary::from_bytes(bytemuck::cast_slice(&words)).check(classes as u32)?;
    Ok(())
}

pub(super) fn check_shape(
    what: &'static str,
    expected: &[usize],
    actual: &[usize],
) -> Result<(), BurnError> {
    if expected != actual {
        return Err(BurnError::ShapeMismatch {
            what,
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

pub(super) fn same_device(
    what: &'static str,
    logits: &Device,
    other: &Device,
) -> Result<(), BurnError> {
    if logits != other {
        return Err(BurnError::DeviceMismatch {
            what,
            logits: format!("{logits:?}"),
            other: format!("{other:?}"),
        });
    }
    Ok(())
}
