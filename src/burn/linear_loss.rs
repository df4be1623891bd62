//! The fused linear head + loss as a Burn module: a config, `init`, and `forward` on hidden
//! states.

use burn::backend::Dispatch;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear};
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};

use super::error::BurnError;
use super::head::{self, HeadOptions, LsceHeadOps};
use super::loss::{
    check_shape, check_summary, device_dtype, labels_i32, loss_config_builders, same_device,
    LsceLossConfig,
};
use super::ops::GradientMode;
use super::registry::{self, Shared};
use crate::linear::{HeadGradients, Memory};
use crate::Reduction;

/// Configuration of an [`LsceLinearLoss`]: the loss (an [`LsceLossConfig`], whose builder
/// methods this config has too), the head's bias and initializer (as Burn's `LinearConfig`),
/// and the fused head's memory mode.
///
/// Defaults: [`LsceLossConfig`]'s (PyTorch's `cross_entropy`: mean, ignore index -100, no
/// smoothing; no class weights, [`GradientMode::Keep`], labels checked), [`Memory::Recompute`],
/// a bias, and Burn's `Linear` initializer (Kaiming uniform with gain `1/sqrt(3)`: `U(-k, k)`,
/// `k = 1/sqrt(D)`).
///
/// ```ignore
/// let config = LsceLinearLossConfig::new()
///     .with_smoothing(Some(0.1)) // the loss's options, as on an LsceLossConfig
///     .with_memory(Memory::Recompute)
///     .with_bias(false);
/// ```
#[derive(Clone, Debug)]
pub struct LsceLinearLossConfig {
    /// The loss of the logits: its [`LossSpec`](crate::LossSpec), class weights (`vocab`
    /// values), [`GradientMode`] (see [`LsceLinearLoss`]) and label check (without it a row
    /// with an invalid label gets a NaN loss and NaN gradients).
    pub loss: LsceLossConfig,
    /// Recompute the logits' tiles in the gradient passes, or keep a chunk of rows' logits.
    pub memory: Memory,
    /// Whether the head has a bias `[vocab]`.
    pub bias: bool,
    /// How [`LsceLinearLossConfig::init`] fills the weight and bias.
    pub initializer: Initializer,
}

impl Default for LsceLinearLossConfig {
    fn default() -> Self {
        Self {
            loss: LsceLossConfig::default(),
            memory: Memory::default(),
            bias: true,
            // Burn's `LinearConfig` default.
            initializer: Initializer::KaimingUniform {
                gain: 1.0 / 3.0f64.sqrt(),
                fan_out_only: false,
            },
        }
    }
}

loss_config_builders!(LsceLinearLossConfig, loss_mut);

impl LsceLinearLossConfig {
    /// The defaults (see [`LsceLinearLossConfig`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The loss's config, for [`loss_config_builders`].
    fn loss_mut(&mut self) -> &mut LsceLossConfig {
        &mut self.loss
    }

    /// Sets [`LsceLinearLossConfig::loss`] as a whole.
    pub fn with_loss(mut self, loss: LsceLossConfig) -> Self {
        self.loss = loss;
        self
    }

    /// Sets [`LsceLinearLossConfig::memory`].
    pub fn with_memory(mut self, memory: Memory) -> Self {
        self.memory = memory;
        self
    }

    /// Sets [`LsceLinearLossConfig::bias`].
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Sets [`LsceLinearLossConfig::initializer`].
    pub fn with_initializer(mut self, initializer: Initializer) -> Self {
        self.initializer = initializer;
        self
    }

    /// A new head of `vocab` outputs over `d_model` inputs on `device`: the weight `[vocab,
    /// d_model]` (nn.Linear's layout) and the bias `[vocab]` drawn like Burn's `Linear`
    /// (fan-in `d_model`, fan-out `vocab`).
    pub fn init(
        &self,
        d_model: usize,
        vocab: usize,
        device: &Device,
    ) -> Result<LsceLinearLoss, BurnError> {
        if d_model == 0 || vocab == 0 {
            return Err(crate::LsceError::EmptyShape.into());
        }
        let weight =
            self.initializer
                .init_with([vocab, d_model], Some(d_model), Some(vocab), device);
        let bias = self.bias.then(|| {
            self.initializer
                .init_with([vocab], Some(d_model), Some(vocab), device)
        });
        self.build(weight, bias, device)
    }

    /// The head of an existing Burn `Linear` (`d_input = D`, `d_output = V`), its weight and
    /// bias values taken over as new parameters (new `ParamId`s).
    ///
    /// Burn's `Linear` stores its weight as `[d_input, d_output]` (`[D, V]`, so that
    /// `forward` is `x W + b`), the transpose of nn.Linear's `[V, D]` that lsce's kernels
    /// read. The weight is transposed once here, into a row-major `[V, D]` parameter; its
    /// gradient is `[V, D]` too, and a record of this module stores `[V, D]`. The bias (if
    /// any) is kept whatever [`LsceLinearLossConfig::bias`] says, as is the `Linear`'s
    /// device. Waits for the device once (the transpose goes through host memory).
    pub fn init_from_linear(&self, linear: Linear) -> Result<LsceLinearLoss, BurnError> {
        let weight = linear.weight.val();
        let device = weight.device();
        let read = |t: Tensor<2>| {
            t.try_into_data()
                .map_err(|e| BurnError::Execution(e.to_string()))
        };
        // `[D, V]` read back in `[V, D]` order, then a fresh contiguous parameter.
        let data = read(weight.detach().transpose())?;
        let weight = Param::from_data(data, &device);
        let bias = match linear.bias {
            Some(bias) => {
                let data = bias
                    .val()
                    .detach()
                    .try_into_data()
                    .map_err(|e| BurnError::Execution(e.to_string()))?;
                Some(Param::from_data(data, &device))
            }
            None => None,
        };
        self.build(weight, bias, &device)
    }

    fn build(
        &self,
        weight: Param<Tensor<2>>,
        bias: Option<Param<Tensor<1>>>,
        device: &Device,
    ) -> Result<LsceLinearLoss, BurnError> {
        self.loss.validate(device)?;
        Ok(LsceLinearLoss {
            weight,
            bias,
            settings: Settings {
                loss: self.loss.clone(),
                memory: self.memory,
            },
        })
    }
}

/// The head's non-parameter settings: the validated loss config and the memory mode.
#[derive(Clone, Debug)]
struct Settings {
    loss: LsceLossConfig,
    memory: Memory,
}

/// A linear head and its label-smoothed cross-entropy fused: the loss of the logits `z = H W^T
/// + b` without ever holding them, on Burn's wgpu device and buffers (fusion on or off), with
/// Burn's autodiff giving the gradients of the hidden states `H`, the weight `W` and the bias.
///
/// A drop-in for Burn's `Linear` + `CrossEntropyLoss` at the end of a model:
///
/// ```ignore
/// use burn::tensor::{Distribution, Int, Tensor};
/// use lsce::burn::LsceLinearLossConfig;
///
/// let device = lsce::burn::init_device()?.autodiff();
/// let (d_model, vocab) = (64, 5000);
/// // was: LinearConfig::new(d_model, vocab).init(&device) and
/// //      CrossEntropyLossConfig::new().with_smoothing(Some(0.1)).init(&device)
/// let head = LsceLinearLossConfig::new()
///     .with_smoothing(Some(0.1))
///     .init(d_model, vocab, &device)?;
/// let hidden = Tensor::<3>::random([2, 16, d_model], Distribution::Default, &device).require_grad();
/// let targets = Tensor::<2, Int>::zeros([2, 16], &device);
/// let loss = head.try_forward(hidden.clone(), targets)?; // [1]
/// let grads = loss.backward(); // dH, dW, db
/// assert_eq!(head.weight.grad(&grads).unwrap().dims(), [vocab, d_model]);
/// # Ok::<(), lsce::burn::BurnError>(())
/// ```
///
/// The weight is `[vocab, d_model]`, nn.Linear's layout (Burn's `Linear` stores the transpose:
/// see [`LsceLinearLossConfig::init_from_linear`]). The hidden states, weight and bias share
/// one dtype (f32, f16, or bf16 where the device supports it); the loss is always f32, the
/// gradients come back in their parameters' dtypes, computed in f32 and rounded once.
///
/// Autodiff asks the kernels only for what it needs: `dH`, `dW` and `db` when the head is
/// tracked, `dH` alone for a frozen head (its weight not requiring a gradient: one matmul
/// less), the loss alone when nothing is tracked. [`GradientMode::Keep`] computes the
/// gradients in the forward pass (upstream gradient 1) and keeps them in f32 (`dH` and `dW`:
/// `4 (N + V) D` bytes) until backward multiplies them by the upstream gradient and rounds
/// once; with `Reduction::None` (one upstream gradient per row, which cannot scale `dW` after
/// the fact) it recomputes, as [`GradientMode::Recompute`] always does: the forward pass
/// writes the loss only and keeps the inputs, backward runs the fused pass with the upstream
/// gradient folded in. Neither mode holds a `N x V` buffer except the chunk
/// [`Memory::Chunked`] asks for.
#[derive(Module, Debug)]
pub struct LsceLinearLoss {
    /// `W [vocab, d_model]`.
    pub weight: Param<Tensor<2>>,
    /// `b [vocab]`.
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    settings: Settings,
}

impl LsceLinearLoss {
    /// `D`, the hidden size.
    pub fn d_model(&self) -> usize {
        self.weight.shape().dims::<2>()[1]
    }

    /// `V`, the vocabulary.
    pub fn vocab(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    /// The logits `H W^T + b` themselves (`[.., vocab]`, Burn's own matmul), for sampling or
    /// evaluation code that wants them: what Burn's `Linear::forward` returns.
    pub fn logits<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        burn::tensor::module::linear(
            hidden,
            self.weight.val().transpose(),
            self.bias.as_ref().map(Param::val),
        )
    }

    /// [`LsceLinearLoss::try_forward`], panicking on error with its message (as Burn's own
    /// losses do on bad input).
    pub fn forward<const D: usize, const T: usize>(
        &self,
        hidden: Tensor<D>,
        targets: Tensor<T, Int>,
    ) -> Tensor<1> {
        self.try_forward(hidden, targets)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// The loss of hidden states `[batch, seq, D]` (or `[N, D]`, any rank `T + 1`) against
    /// class labels `[batch, seq]` (or `[N]`): `[1]` f32 for `Sum`/`Mean`, one value per
    /// label in row-major order for `Reduction::None`.
    pub fn try_forward<const D: usize, const T: usize>(
        &self,
        hidden: Tensor<D>,
        targets: Tensor<T, Int>,
    ) -> Result<Tensor<1>, BurnError> {
        let dims = hidden.dims();
        let (d_model, vocab) = (self.d_model(), self.vocab());
        if D < 2 || T + 1 != D {
            return Err(crate::LsceError::Unsupported(
                "the hidden states are [.., D] and the labels [..], one dimension fewer",
            )
            .into());
        }
        let mut expected = dims.to_vec();
        expected[D - 1] = d_model;
        check_shape("the hidden states", &expected, &dims)?;
        check_shape("the targets", &dims[..D - 1], &targets.dims())?;
        let rows: usize = dims[..D - 1].iter().product();

        let device = hidden.device();
        let shared = registry::shared("the hidden states", &device)?;
        let dtype = device_dtype("the hidden states", &device, hidden.dtype())?;
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(Param::val);
        same_device("the weight", &device, &weight.device())?;
        same_dtype("the weight", hidden.dtype(), weight.dtype())?;
        if let Some(b) = &bias {
            same_device("the bias", &device, &b.device())?;
            same_dtype("the bias", hidden.dtype(), b.dtype())?;
            check_shape("the bias", &[vocab], &b.dims())?;
        }
        same_device("the targets", &device, &targets.device())?;
        if let Some(w) = &self.settings.loss.weights {
            check_shape("the class weights", &[vocab], &[w.len()])?;
        }
        let tracked = hidden.is_tracked()
            || weight.is_tracked()
            || bias.as_ref().is_some_and(Tensor::is_tracked);
        let gradients = if weight.is_tracked() || bias.as_ref().is_some_and(Tensor::is_tracked) {
            HeadGradients::All
        } else {
            HeadGradients::Hidden
        };
        let options = HeadOptions {
            spec: self.settings.loss.spec,
            mode: self.settings.loss.gradient,
            weighted: self.settings.loss.weights.is_some(),
            bias: bias.is_some(),
            upstream_grad: false,
            gradients: HeadGradients::None,
            memory: self.settings.memory,
        };
        let sizes = [rows, d_model, vocab];
        plan_all(&shared, sizes, dtype, options, tracked.then_some(gradients))?;

        let labels = labels_i32(targets.reshape([rows]));
        let placeholder = || Tensor::<1>::zeros([1], &device).cast(FloatDType::F32);
        let weights = match &self.settings.loss.weights {
            Some(w) => Tensor::<1>::from_data(TensorData::new(w.clone(), [vocab]), &device)
                .cast(FloatDType::F32),
            None => placeholder(),
        };
        let bias = bias.unwrap_or_else(|| placeholder().cast(hidden.dtype()));
        let (loss, summary) = Dispatch::lsce_head(
            hidden.reshape([rows, d_model]).into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            labels.into_dispatch(),
            weights.into_dispatch(),
            options,
        );
        let loss = Tensor::<1>::from_dispatch(loss);
        if self.settings.loss.check_labels {
            check_summary(summary, vocab)?;
        }
        Ok(loss)
    }
}

/// Validates every launch a call can make now, while an error can still be returned (fusion
/// runs the launch later): the forward pass, and with `backward` (the gradients autodiff will
/// ask for) the backward pass as the autodiff node launches it.
fn plan_all(
    shared: &Shared,
    sizes: [usize; 3],
    dtype: crate::Dtype,
    options: HeadOptions,
    backward: Option<HeadGradients>,
) -> Result<(), BurnError> {
    shared.linear_plan(&head::problem(&options, sizes, dtype, HeadGradients::None)?)?;
    if let Some(gradients) = backward {
        let keep = options.mode == GradientMode::Keep && options.spec.reduction != Reduction::None;
        let backward = HeadOptions {
            upstream_grad: !keep,
            ..options
        };
        shared.linear_plan(&head::problem(&backward, sizes, dtype, gradients)?)?;
    }
    Ok(())
}

fn same_dtype(what: &'static str, hidden: DType, other: DType) -> Result<(), BurnError> {
    if hidden != other {
        return Err(BurnError::DtypeMismatch {
            what,
            expected: format!("{hidden:?}"),
            actual: format!("{other:?}"),
        });
    }
    Ok(())
}
