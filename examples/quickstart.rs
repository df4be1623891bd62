//! The README's main job: loss and gradient of a small batch on the default adapter, checked
//! against the CPU reference.
use lsce::{cpu, Batch, LossKernel, LossSpec, Shape, StagingOptions};

fn main() -> Result<(), lsce::LsceError> {
    let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
    let kernel = LossKernel::new(&device)?;

    // 64 rows of 1000 classes, some rows padded with PyTorch's ignore index.
    let shape = Shape::matrix(64, 1000)?;
    let logits: Vec<f32> = (0..shape.elements())
        .map(|i| ((i * 7919 % 1000) as f32 / 100.0).sin() * 4.0)
        .collect();
    let labels: Vec<i32> = (0..64)
        .map(|r| if r % 9 == 8 { -100 } else { r * 37 % 1000 })
        .collect();
    let batch = Batch::classes(shape, &logits, &labels);
    let spec = LossSpec::pytorch(0.1);

    let gpu = kernel.compute(&queue, &spec, &batch, &StagingOptions::default())?;
    let reference = cpu::compute(&spec, &batch, lsce::Gradient::Separate)?;
    let grad = gpu.grad.as_deref().unwrap_or_default();
    let ref_grad = reference.grad.as_deref().unwrap_or_default();
    let max_grad_err = grad
        .iter()
        .zip(ref_grad)
        .map(|(g, r)| (f64::from(*g) - r).abs())
        .fold(0.0, f64::max);

    println!(
        "adapter:            {} ({:?})",
        device.adapter_info().name,
        device.adapter_info().backend
    );
    println!("loss (GPU):         {:.7}", gpu.loss[0]);
    println!("loss (CPU, f64):    {:.7}", reference.loss[0]);
    println!(
        "max |GPU - CPU|:    loss {:.3e}, gradient {:.3e}",
        (f64::from(gpu.loss[0]) - reference.loss[0]).abs(),
        max_grad_err
    );
    Ok(())
}
