//! The errors of the Burn integration.

use std::fmt;

use crate::LsceError;

/// What can go wrong when lsce's loss is called on Burn tensors.
///
/// Every check runs before anything is recorded, except the label values, which the kernel checks
/// itself; [`LsceLoss::try_forward`](super::LsceLoss::try_forward) reads its 32-byte verdict back
/// and returns [`BurnError::Lsce`] with [`LsceError::LabelOutOfRange`] (row and value).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BurnError {
    /// The loss itself refused the input: the spec, the shape, a label (found by the kernel), a
    /// weight, or a device limit.
    Lsce(LsceError),
    /// The tensor is not on a wgpu device of Burn's cubecl backend (for example on the CPU).
    NotWgpu {
        /// Which argument.
        what: &'static str,
        /// Its device, as Burn prints it.
        device: String,
    },
    /// The wgpu device was not set up through lsce, so lsce does not hold its `wgpu::Device`
    /// and queue (Burn does not hand them out after the fact).
    DeviceNotShared {
        /// The device, as Burn prints it.
        device: String,
    },
    /// Two arguments live on different devices.
    DeviceMismatch {
        /// The argument that differs from the logits.
        what: &'static str,
        /// The logits' device.
        logits: String,
        /// The argument's device.
        other: String,
    },
    /// Shapes that do not fit together (targets against logits, weights against classes, hidden
    /// states against the linear head).
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// The shape the other inputs imply.
        expected: Vec<usize>,
        /// The shape given.
        actual: Vec<usize>,
    },
    /// An element type lsce does not read (logits must be f32, f16 or bf16).
    UnsupportedDtype {
        /// Which argument.
        what: &'static str,
        /// Its dtype, as Burn prints it.
        dtype: String,
    },
    /// Two float inputs of the linear head with different element types (the hidden states,
    /// the weight and the bias share one: f32, f16 or bf16).
    DtypeMismatch {
        /// Which argument.
        what: &'static str,
        /// The hidden states' dtype, as Burn prints it.
        expected: String,
        /// The argument's dtype.
        actual: String,
    },
    /// An element type lsce reads but Burn's device does not support (bf16 on most Vulkan and
    /// Metal adapters: see Burn's `Device::supports_dtype`). Checked before anything runs,
    /// because a tensor of that type fails on cubecl's device thread, out of the caller's reach.
    DtypeNotOnDevice {
        /// Which argument.
        what: &'static str,
        /// Its dtype, as Burn prints it.
        dtype: String,
        /// The device, as Burn prints it.
        device: String,
    },
    /// Burn's wgpu runtime could not be initialised or the setup registered.
    Init(String),
    /// Burn reported an error while running the work or reading the kernel's summary back.
    Execution(String),
}

impl fmt::Display for BurnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lsce(err) => write!(f, "lsce: {err}"),
            Self::NotWgpu { what, device } => write!(
                f,
                "lsce: {what} is on {device}, not on a wgpu device of Burn's cubecl backend"
            ),
            Self::DeviceNotShared { device } => write!(
                f,
                "lsce: the wgpu device {device} was not set up through lsce; create it with \
                 lsce::burn::init_device() (or register its WgpuSetup with \
                 lsce::burn::register_setup) before using the loss"
            ),
            Self::DeviceMismatch {
                what,
                logits,
                other,
            } => write!(
                f,
                "lsce: {what} is on {other} but the logits are on {logits}"
            ),
            Self::ShapeMismatch {
                what,
                expected,
                actual,
            } => write!(
                f,
                "lsce: {what} has shape {actual:?} but the inputs need {expected:?}"
            ),
            Self::DtypeMismatch {
                what,
                expected,
                actual,
            } => write!(
                f,
                "lsce: {what} has dtype {actual} but the hidden states have {expected}; the \
                 linear head reads one dtype"
            ),
            Self::UnsupportedDtype { what, dtype } => write!(
                f,
                "lsce: {what} has dtype {dtype}; logits must be f32, f16 or bf16"
            ),
            Self::DtypeNotOnDevice {
                what,
                dtype,
                device,
            } => write!(
                f,
                "lsce: {what} has dtype {dtype}, which Burn's device {device} does not support \
                 (Device::supports_dtype); use f32 or f16 logits there"
            ),
            Self::Init(msg) => write!(f, "lsce: initialising Burn's wgpu runtime failed: {msg}"),
            Self::Execution(msg) => write!(f, "lsce: Burn reported an execution error: {msg}"),
        }
    }
}

impl std::error::Error for BurnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Lsce(err) => Some(err),
            _ => None,
        }
    }
}

impl From<LsceError> for BurnError {
    fn from(err: LsceError) -> Self {
        Self::Lsce(err)
    }
}
