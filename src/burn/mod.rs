//! lsce inside Burn: the loss for Burn's wgpu backend, on Burn's own device and tensors, with
//! autodiff (feature `burn`).
//!
//! Burn 0.22's wgpu backend runs on cubecl-wgpu over the same wgpu 30 as lsce, so both record
//! on one `wgpu::Device` and queue. [`LsceLoss`] is called like Burn's `CrossEntropyLoss`; its
//! kernel reads the logits from the tensor's own wgpu buffer and writes into tensors Burn
//! allocated: no byte goes through the host. It works with Burn's default features (fusion and
//! autotune on): with fusion the loss is a custom operation in fusion's stream.
//!
//! ```
//! use burn::tensor::{Distribution, Int, Tensor};
//! use lsce::burn::{init_device, LsceLossConfig};
//!
//! // Once, before any tensor: Burn's wgpu runtime, sharing its device with lsce.
//! let device = init_device()?.autodiff();
//! let logits = Tensor::<2>::random([8, 1000], Distribution::Default, &device).require_grad();
//! let targets = Tensor::<1, Int>::from_ints([1, 2, 3, 4, 5, 6, 7, 8], &device);
//! let loss = LsceLossConfig::new().with_smoothing(Some(0.1)).init(&device)?;
//! let value = loss.try_forward(logits.clone(), targets)?;
//! let grads = value.backward(); // lsce's gradient, scaled by the upstream gradient
//! let dlogits = logits.grad(&grads).expect("tracked");
//! assert_eq!(dlogits.dims(), [8, 1000]);
//! # Ok::<(), lsce::burn::BurnError>(())
//! ```
//!
//! [`LsceLinearLoss`] is the fused linear head (`lsce::linear`) as a Burn module: a drop-in for
//! Burn's `Linear` + `CrossEntropyLoss` that owns the head's weight `[V, D]` and bias and never
//! holds the `N x V` logits; autodiff gets the gradients of the hidden states, weight and bias
//! (example `burn_lm`).
//!
//! The examples of [`LsceLoss`], [`LsceLinearLoss`] and [`init_device`] are this one's parts (marked `ignore`:
//! each doctest links all of Burn).
//!
//! Where lsce differs from Burn's `CrossEntropyLoss`: the loss is always f32 (Burn's has the
//! logits' dtype), labels outside `[0, classes)` are errors (Burn's loss does not check them),
//! zero class weights are allowed, and long rows (256 x 128256, 64 x 262144) are right where
//! Burn's loss, measured by the bench on lavapipe, is not. [`init_device`] sets Burn's
//! allocator to one wgpu buffer per tensor (see [`register_setup`] for why).
//!
//! Logits may be f32, f16 or bf16, as far as Burn's device supports the type: bf16 depends on
//! the device (Burn's `Device::supports_dtype`; most Vulkan and Metal adapters lack it), and a
//! `cast` to it on a device without it fails on cubecl's device thread, beyond any
//! `catch_unwind` of the caller. [`LsceLoss::try_forward`] checks the logits' dtype against the
//! device and returns [`BurnError::DtypeNotOnDevice`] instead. With 16-bit logits the upstream
//! gradient (a loss scale of 65536 included) multiplies the f32 gradient before its one
//! rounding to 16 bits, in either [`GradientMode`].

mod autodiff;
mod cube;
mod error;
mod fusion;
mod head;
mod head_autodiff;
mod head_cube;
mod head_fusion;
mod linear_loss;
mod loss;
mod ops;
mod registry;

pub use error::BurnError;
pub use head::{HeadOptions, LsceHeadOps};
pub use linear_loss::{LsceLinearLoss, LsceLinearLossConfig};
pub use loss::{LsceLoss, LsceLossConfig};
pub use ops::{GradientMode, LossOptions, LsceOps};
pub use registry::{init_device, register_setup, share_setup};
