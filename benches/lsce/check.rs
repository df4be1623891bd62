//! The start-up check: before anything is timed, the copy, the unfused baseline and the fused
//! plan must agree with `lsce::cpu` on a small case cut into several windows, in every dtype
//! the crate plans on the adapter.

use lsce::{cpu, Batch, Dtype, Gradient, LossSpec, Summary};

use crate::cases::{elements_bytes, labels, problem, Case, HostData, Workload};
use crate::cli::shape;
use crate::gpu::Gpu;
use crate::unfused::{Kernel, DTYPES};

impl Gpu {
    /// Start-up check, in every dtype the crate plans on this adapter: on a small case cut into
    /// several windows, the copy must copy, and the unfused baseline and the fused plan must
    /// agree with the CPU reference on the same (decoded) logits.
    pub fn check(&self) -> Result<(), String> {
        let shape = shape(37, 301)?;
        let labels = labels(shape, true);
        // Small bindings force many windows, so the window arithmetic is checked too; 301
        // classes make 16-bit rows start in the middle of a word, and share words.
        let cap = 4096;
        let spec = LossSpec::pytorch(0.1);
        for dtype in DTYPES {
            let plan = match self
                .kernel
                .plan(&problem(shape, dtype, Gradient::Separate).with_max_binding_bytes(Some(cap)))
            {
                Ok(plan) => plan,
                Err(e) => {
                    eprintln!("start-up check: {dtype} skipped, the crate cannot plan it: {e}");
                    continue;
                }
            };
            let case = Case::new(self, shape, dtype, &labels, Some(cap))?;
            let bytes = elements_bytes(shape, dtype);
            case.run(Workload::Kernels(&[Kernel::Fill]))?;
            let logits = self.read(&case.logits, 0, bytes)?;
            case.run(Workload::Kernels(&[Kernel::Copy]))?;
            if self.read(&case.grad, 0, bytes)? != logits {
                return Err(format!(
                    "start-up check: the {dtype} copy kernel's output differs from its input"
                ));
            }
            let logits = HostData::new(dtype, &logits, shape.elements() as usize);
            let reference = cpu::compute(
                &spec,
                &Batch::classes(shape, logits.logits(), &labels),
                lsce::Gradient::Separate,
            )
            .map_err(|e| e.to_string())?;
            let reference = (
                reference.loss[0],
                reference.grad.as_deref().unwrap_or_default(),
            );

            case.run(Workload::Kernels(Kernel::UNFUSED))?;
            let unfused_loss: f32 = bytemuck::pod_read_unaligned(&self.read(&case.out, 0, 4)?);
            let what = format!("{dtype} unfused");
            compare(&what, dtype, unfused_loss, &case.read_grad()?, reference)?;

            // Overwrite the unfused gradient first, so that a plan writing nothing cannot pass.
            case.run(Workload::Kernels(&[Kernel::Copy]))?;
            case.run(Workload::Plan(&plan))?;
            let summary: Summary =
                bytemuck::pod_read_unaligned(&self.read(&case.summary, 0, Summary::SIZE)?);
            let what = format!("{dtype} fused");
            compare(&what, dtype, summary.loss, &case.read_grad()?, reference)?;
            eprintln!(
                "start-up check passed for {dtype}: loss {:.6} (cpu {:.6}), {} windows",
                unfused_loss,
                reference.0,
                case.unfused.windows()
            );
        }
        Ok(())
    }
}

/// Relative spacing of `dtype`'s values (one unit in the last place): the most a conversion
/// to it may change a value, since WGSL lets `pack2x16float` round either way.
fn ulp(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 2f64.powi(-23),
        Dtype::F16 => 2f64.powi(-10),
        Dtype::Bf16 => 2f64.powi(-7),
    }
}

/// Compares a loss and a gradient (stored in `dtype`) with the reference's `(loss, grad)`.
fn compare(
    what: &str,
    dtype: Dtype,
    loss: f32,
    grad: &[f32],
    (ref_loss, ref_grad): (f64, &[f64]),
) -> Result<(), String> {
    let loss_err = (f64::from(loss) - ref_loss).abs() / ref_loss.abs().max(1e-30);
    let scale = ref_grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let grad_err = grad
        .iter()
        .zip(ref_grad)
        .map(|(g, r)| (f64::from(*g) - r).abs())
        .fold(0.0f64, f64::max);
    // The f32 arithmetic's error, plus the rounding of every gradient element to `dtype`.
    let grad_tolerance = (1e-4 + ulp(dtype)) * scale;
    if !(loss_err < 1e-4 && grad_err <= grad_tolerance && grad.len() == ref_grad.len()) {
        return Err(format!(
            "START-UP CHECK FAILED: the {what} loss disagrees with lsce::cpu: loss {loss} vs \
             {ref_loss} (relative error {loss_err:.2e}), gradient max error {grad_err:.2e} \
             (largest gradient {scale:.2e}, tolerance {grad_tolerance:.2e}); the measurements \
             would be meaningless"
        ));
    }
    Ok(())
}
