//! Element types of logits and gradients.

use crate::error::{LsceError, Result};

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

/// Element type of the gradient, relative to the logits'.
///
/// The gradient is written in the logits' type or in `f32`; no other combination exists, so
/// none can be asked for.
///
/// ```
/// use lsce::{Dtype, GradDtype};
/// assert_eq!(GradDtype::AsLogits.resolve(Dtype::Bf16), Dtype::Bf16);
/// assert_eq!(GradDtype::F32.resolve(Dtype::Bf16), Dtype::F32);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GradDtype {
    /// The logits' type (the default): a 16-bit gradient for 16-bit logits.
    #[default]
    AsLogits,
    /// `f32`, whatever the logits' type: full precision for small components of large rows.
    F32,
}

impl GradDtype {
    /// The gradient's element type for logits of type `logits`.
    pub fn resolve(self, logits: Dtype) -> Dtype {
        match self {
            GradDtype::AsLogits => logits,
            GradDtype::F32 => Dtype::F32,
        }
    }
}
