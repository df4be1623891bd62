//! # lsce: fused label-smoothed cross-entropy on wgpu
//!
//! lsce computes the label-smoothed cross-entropy loss of a `[rows, classes]` (or PyTorch
//! `[N, C, d1..dk]`) matrix of logits **and** its gradient with respect to the logits in one
//! fused WGSL kernel, on any adapter wgpu offers (Vulkan, Metal, DX12, GL). By default it
//! matches `torch.nn.functional.cross_entropy(logits, target, weight, ignore_index=-100,
//! reduction="mean", label_smoothing=eps)` and its autograd gradient exactly; the other
//! smoothing conventions real code uses are first-class too. Where lsce deliberately differs:
//! an ignored row's logits are never read, so NaN or infinite logits there change neither the
//! loss nor the mean's denominator, and the row's gradient is exactly 0 (PyTorch's is NaN,
//! its log-softmax backward multiplying the NaN by 0), which is what padding wants.
//!
//! Three ways in:
//! 1. the **encode API** ([`LossKernel::plan`], [`LossPlan::encode`]) records into *your*
//!    `wgpu::CommandEncoder`, reading and writing *your* buffers, with no submission, readback
//!    or wait;
//! 2. the **staging API** ([`LossKernel::compute`]) takes slices and returns `Vec`s;
//! 3. the **CPU reference** ([`cpu::compute`]) computes the same thing in `f64` to validate any
//!    backend.
//!
//! For a language model's head, [`linear`] computes the same loss from hidden states and the
//! head's weight, `z = H W^T + b`, with the gradients `dH`, `dW`, `db`, without ever holding the
//! `rows x vocabulary` logits (PyTorch's `F.linear_cross_entropy`), deterministically.
//!
//! When a row's classes are split across buffers, devices or processes, [`shards`] computes the
//! same loss over the global class count in one exchange per step (a status word per rank, then
//! a 32-byte record per row and shard, merged in rank order; a rank that fails fails every rank
//! with an `Err` naming it), with the backward pass needing only the merged rows.
//!
//! ```
//! use lsce::{cpu, Batch, LossKernel, LossSpec, Shape, StagingOptions};
//!
//! let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
//! let kernel = LossKernel::new(&device)?; // pipelines are compiled once and cached
//! let logits = [1.2215, -0.9342, -0.1349, -0.5035, 0.4492,
//!               -0.1989, 0.2589, 2.1556, -0.5734, 0.8668,
//!               0.1215, 0.5060, 0.5376, -1.7609, -0.6566];
//! let batch = Batch::classes(Shape::matrix(3, 5)?, &logits, &[2, 3, 2]);
//! let spec = LossSpec::pytorch(0.1); // label_smoothing = 0.1, mean, ignore_index = -100
//! let gpu = kernel.compute(&queue, &spec, &batch, &StagingOptions::default())?;
//! let reference = cpu::compute(&spec, &batch, lsce::Gradient::Separate)?;
//! assert!((f64::from(gpu.loss[0]) - 2.1038).abs() < 1e-4); // PyTorch prints 2.1038 for this batch
//! assert!((f64::from(gpu.loss[0]) - reference.loss[0]).abs() < 1e-6);
//! # Ok::<(), lsce::LsceError>(())
//! ```
//!
//! ## The loss
//!
//! For a row with logits `x`, the kernel first applies the optional logit scale and soft-cap,
//! `z = cap * tanh(scale * x / cap)` (a `-inf` logit stays `-inf`), then with target
//! coefficients `a_c` and their mass `A = sum_c a_c`:
//!
//! ```text
//! lse      = log sum_c exp(z_c)
//! loss_row = A * lse - sum_c a_c z_c  +  z_loss * lse^2
//! dL/dx_c  = (softmax(z)_c * (A + 2 z_loss lse) - a_c) * scale_row * dz_c/dx_c
//! ```
//!
//! A class label `y` gives `a_c = w_c * q_c` with the smoothed target `q` (on-value at `y`,
//! off-value elsewhere, 0 at an excluded class) and class weights `w` (1 without); a
//! probability target `t` gives `a_c = w_c * (off_c + (on - off_c) * t_c)`, which for PyTorch's
//! convention is `w_c * ((1 - eps) t_c + eps/K)`. `scale_row` is the upstream gradient, divided
//! by the denominator `D` for the mean. Reductions: `None` (per row; ignored rows give 0), `Sum`,
//! `Mean = sum / D` with `D = sum of w_y over non-ignored rows` (their count without weights;
//! the row count for probability targets), exactly PyTorch's normalisation, `NaN` when `D = 0`.
//!
//! ## Conventions
//!
//! | code | what it does | `LossSpec` |
//! |---|---|---|
//! | PyTorch `F.cross_entropy(.., label_smoothing=eps)` | `q_y = 1-eps+eps/K`, `q_k = eps/K` | `LossSpec::pytorch(eps)` (= `Smoothing::Uniform(eps)`) |
//! | HF `LabelSmoother(epsilon)` | `(1-eps) nll + eps * mean_k(-log p_k)`: the same | `LossSpec::pytorch(eps)` |
//! | NVIDIA DeepLearningExamples `LabelSmoothing` | `confidence * nll + smoothing * mean(-log p)` | `LossSpec::pytorch(eps)` |
//! | Megatron `vocab_parallel_cross_entropy(.., label_smoothing)` | `q_y = 1-eps`, `q_k = eps/(K-1)` | `Smoothing::OffTarget(eps)` |
//! | PyTorch issue #7455's `LabelSmoothLoss`, `smooth_one_hot` and `LabelSmoothingLoss` recipes | `eps/(K-1)` on non-targets | `Smoothing::OffTarget(eps)` |
//! | CoinCheung `LabelSmoothSoftmaxCEV1/V2` | `lb_pos = 1-eps`, `lb_neg = eps/K` (mass not 1) | `Smoothing::Explicit { on: 1-eps, off: eps/K }` |
//! | NJUNMT `NMTCriterion` (fairseq-style padding) | padding class gets 0, `eps/(K-2)` elsewhere, pad rows ignored | `Smoothing::OffTarget(eps)` + `excluded_class: Some(pad)` + `ignore_index: Some(pad)` |
//! | `LabelSmoothingCrossEntropy` modules (`eps/K * sum(-log p) + (1-eps) nll`) | PyTorch's, spelled out | `LossSpec::pytorch(eps)` |
//!
//! Class weights combine with every convention the same way, `a_c = w_c q_c`: this is
//! PyTorch's formula `(1-eps) w_y nll + eps/K sum_c w_c (-log p_c)` for `Uniform`, and the
//! natural extension elsewhere; the mean always divides by `sum_n w_{y_n}`.
//!
//! ## The encode API
//!
//! ```
//! use lsce::{Gradient, LossBuffers, LossSpec, Problem, Shape, Summary};
//! use wgpu::util::DeviceExt;
//!
//! let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
//! let kernel = lsce::LossKernel::new(&device)?;
//! let shape = Shape::matrix(4, 3)?;
//! // Build once per shape: validates, compiles (or reuses) pipelines, allocates O(rows) scratch.
//! let plan = kernel.plan(&Problem::new(LossSpec::pytorch(0.1), shape))?;
//!
//! let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
//! let logits: Vec<f32> = (0..12).map(|v| v as f32).collect();
//! let logits = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
//!     label: None, contents: bytemuck::cast_slice(&logits), usage: storage });
//! let labels = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
//!     label: None, contents: bytemuck::cast_slice(&[0i32, 2, 1, 2]), usage: storage });
//! let grad = device.create_buffer(&wgpu::BufferDescriptor {
//!     label: None, size: 48, usage: storage, mapped_at_creation: false });
//! let summary = device.create_buffer(&wgpu::BufferDescriptor {
//!     label: None, size: Summary::SIZE,
//!     usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC, mapped_at_creation: false });
//!
//! let mut encoder = device.create_command_encoder(&Default::default());
//! // ... the engine's forward pass writes `logits` here ...
//! let buffers = LossBuffers::new(logits.slice(..), labels.slice(..), summary.slice(..))
//!     .with_grad(grad.slice(..));
//! // Bind once while the buffers stay the same; encoding a binding allocates nothing.
//! let binding = plan.bind(&buffers)?;
//! binding.encode(&mut encoder);
//! // ... the engine's backward pass reads `grad`, its optimiser runs, and so on ...
//! queue.submit([encoder.finish()]);
//! # Ok::<(), lsce::LsceError>(())
//! ```
//!
//! The contract:
//! - Every buffer is a `buffer.slice(offset..)` with `offset % 4 == 0`; sizes and usages are in
//!   the table on [`LossBuffers`]. Bad usages, sizes, offsets, a missing or extra buffer, or a
//!   buffer bound both read-only and writable give an `Err` before anything is recorded.
//! - [`LossPlan::bind`] validates the buffers, uploads the per-window parameters and creates the
//!   bind groups; [`LossBinding::encode`] then records one compute pass (a few dispatches per
//!   row window) and a copy of the 32-byte [`Summary`] (and of the reduced loss, if `loss` is
//!   given for `Sum`/`Mean`), allocating nothing. [`LossPlan::encode`] does both in one call.
//!   Nothing ever submits, maps or polls.
//! - Results, the gradient and the summary are valid when the command buffer has executed.
//!   Check [`Summary::check`]: a label outside `[0, classes)` that is not the ignore index is
//!   reported there (first row and value), and its row's loss and gradient are NaN.
//! - With [`Gradient::InPlace`] the logits are consumed: the gradient overwrites them.
//! - A plan's scratch is reused by every encode; command buffers execute in submission order,
//!   so encoding one plan many times (from several threads too) is safe.
//! - Inputs larger than one storage binding (`max_storage_buffer_binding_size`, 128 MiB on some
//!   adapters) are processed in row windows, transparently.
//!
//! ## Passes and bytes moved (f32, `rows x K`)
//!
//! | pass | reads | writes |
//! |---|---|---|
//! | `setup_partials` + `setup_final` (class labels) | `4 * rows` (labels) | `16` per 1024 rows |
//! | `rows_main` (one subgroup or workgroup per row) | `4 * rows * K` once if the row fits the invocations' registers, else twice (the second mostly from cache) | `4 * rows * K` gradient, `8 * rows` loss and lse |
//! | `split_stats`, `split_finish`, `split_grad` (few long rows: each split into parts, one team per part; GPUs) | `4 * rows * K` twice, `32` per part | as above |
//! | `strided_main` (`[N, C, d..]`, one invocation per position) | `4 * rows * K` twice, coalesced across positions | as above |
//! | `finalize_partials` + `finalize_final` (`Sum`/`Mean`) | `8 * rows` | the summary |
//!
//! No temporary of size `rows x K` is ever allocated. The reduction to a scalar is a fixed-order
//! tree without float atomics: the same input gives bitwise-identical results on every run.
//!
//! ## Glossary
//!
//! The words the kernels, their comments and this documentation use, one per concept:
//!
//! | word | meaning |
//! |---|---|
//! | row | one `(n, s)` position: the `K` logits of one prediction (a matrix row, or a pixel of `[N, C, d..]`) |
//! | receiving classes | the classes that get smoothing mass: all `K`, or `K - 1` with an excluded class |
//! | on-value, off-value | the smoothed target at the label and at every other receiving class ([`TargetValues`]) |
//! | off-mass | `sum_c w_c off_c` over the receiving classes: `off * receiving` without weights |
//! | target coefficients `a_c`, mass `A` | the weighted smoothed target of each class and their sum (see *The loss*) |
//! | shifted target sum, lift | `sum_c a_c (m - z_c)`, kept relative to a max `m` so that no term is of the size of the logits (see *Precision*); where `m` is a running max, a partial sum is lifted by its mass times the rise of `m` |
//! | unit | up to four consecutive logits one invocation handles at once, as the lanes of a `vec4` |
//! | wide, narrow | f32 rows read as `vec4` units (4 logits) where the caller's buffers allow, or one logit per unit; 16-bit units are always 4 logits |
//! | team | the invocations that reduce one row together: one subgroup, or a whole workgroup |
//! | cached, streaming | a row that fits the team's registers is read once; a longer one twice (an online max/sum sweep, then the gradient) |
//! | split row, part | a long row cut into parts, one team each, when rows are too few to fill the device |
//! | window | consecutive batch items bound together, so that every binding fits `max_storage_buffer_binding_size` |
//! | chunk, partial slot | `CHUNK_ROWS` rows, whose sum the setup and finalize passes keep in one slot of the control words |
//! | control words | a plan's scratch: the [`Summary`], the off-mass, the partial slots and the split-row records |
//! | family | a kernel file: rows, strided, setup, finalize, linear |
//! | block | the linear head's unit of vocabulary (512 entries; fewer on a CPU adapter for a deep head): one `ShardRecord` per row, a vocabulary shard inside one device |
//! | logits chunk | the linear head's chunked mode: the rows whose logits are kept at once (not a partial slot's chunk) |
//! | segment | part of a linear head's gradient walk dispatched alone, under a CPU adapter's loop limiter |
//! | vocabulary window | the part of a linear head bound at once, when the whole head exceeds one storage binding |
//! | switch | a WGSL `override` constant a pipeline is specialised by (weights, probability targets, soft-cap, gradient, accuracy) |
//!
//! ## Precision
//!
//! Accumulation is `f32` on the GPU (the CPU reference uses `f64`). Half-precision logits
//! ([`Dtype::F16`], [`Dtype::Bf16`], two per 32-bit word) are read and widened to `f32`; on
//! every adapter, since the packing needs no shader feature. The gradient is written in the
//! logits' type by default or in `f32` ([`Problem::with_grad_dtype`]): a bf16 gradient keeps
//! 8 significant bits, so small components of large rows lose relative precision
//! (TransformerEngine PR #3193); ask for an `f32` gradient where that matters.
//!
//! Every term of the loss is a difference of logits: it is formed as
//! `A ln s + sum_c a_c (max - z_c)` with `s = sum_c exp(z_c - max)`, and the gradient from
//! `exp(z_c - max)`, so adding a constant to a row's logits changes neither beyond the
//! rounding of those differences, for constants up to `1e30` (z-loss aside, which depends on
//! `lse` itself). `A lse - sum_c a_c z_c` would cancel and lose `|lse| * 2^-23` of the loss.
//!
//! Non-finite logits behave as in PyTorch: a NaN poisons its own row only; with `eps > 0` a
//! `-inf` on a non-target class gives loss `+inf` and a finite gradient.
#![warn(missing_docs)]

mod batch;
mod buffers;
#[cfg(feature = "burn")]
pub mod burn;
mod compose;
pub mod cpu;
mod device;
mod dtype;
mod encode;
mod error;
pub mod half;
mod kernel;
mod layout;
pub mod linear;
mod output;
mod plan;
mod problem;
mod row_kernel;
mod shape;
pub mod shards;
mod spec;
mod staging;
mod windows;

pub use batch::{Batch, Logits, TargetKind, Targets, UpstreamGrad};
pub use buffers::LossBuffers;
pub use device::{adapters, device_for_adapter, request_device, DeviceOptions, OPTIONAL_FEATURES};
pub use dtype::{Dtype, GradDtype};
pub use encode::LossBinding;
pub use error::{LsceError, Result};
pub use kernel::{KernelConfig, LossKernel};
pub use layout::Summary;
pub use output::LossOutput;
pub use plan::LossPlan;
pub use problem::{Gradient, Problem};
pub use shape::Shape;
pub use spec::{LossSpec, Reduction, Smoothing, TargetValues};
pub use staging::StagingOptions;
