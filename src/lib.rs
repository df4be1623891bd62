//! lsce: fused label-smoothed cross-entropy.
#![warn(missing_docs)]

pub mod cpu;
mod device;
mod error;
pub mod half;
mod kernel;
mod output;
mod plan;
mod shader;
mod spec;
mod staging;

pub use device::{adapters, device_for_adapter, request_device, DeviceOptions, OPTIONAL_FEATURES};
pub use error::{LsceError, Result};
pub use kernel::{KernelConfig, LossKernel};
pub use output::LossOutput;
pub use plan::{Gradient, LossBuffers, LossPlan, Problem, Summary, TargetKind};
pub use spec::{
    Batch, Dtype, Logits, LossSpec, Reduction, Shape, Smoothing, TargetValues, Targets,
    UpstreamGrad,
};
pub use staging::StagingOptions;
