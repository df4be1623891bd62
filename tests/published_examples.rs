//! Two worked examples published with PyTorch's printed results, as golden values for the CPU
//! reference: a 3x5 batch under `F.cross_entropy` with and without `label_smoothing=0.1`, and a
//! 4x3 batch under a `LabelSmoothingCrossEntropy` module with every reduction. They print 4
//! decimals, so 1e-4 is their own rounding.

use approx::assert_abs_diff_eq;
use lsce::{cpu, Batch, LossSpec, Reduction, Shape};

const F_CROSS_ENTROPY_LOGITS: [f32; 15] = [
    1.2215, -0.9342, -0.1349, -0.5035, 0.4492, -0.1989, 0.2589, 2.1556, -0.5734, 0.8668, 0.1215,
    0.5060, 0.5376, -1.7609, -0.6566,
];

#[test]
fn f_cross_entropy_3x5() {
    let shape = Shape::matrix(3, 5).unwrap();
    let batch = Batch::classes(shape, &F_CROSS_ENTROPY_LOGITS, &[2, 3, 2]);
    let ce = cpu::compute(&LossSpec::default(), &batch, lsce::Gradient::None).unwrap();
    assert_abs_diff_eq!(ce.loss[0], 2.1185, epsilon = 1e-4);
    let ls = cpu::compute(&LossSpec::pytorch(0.1), &batch, lsce::Gradient::None).unwrap();
    assert_abs_diff_eq!(ls.loss[0], 2.1038, epsilon = 1e-4);
}

#[test]
fn label_smoothing_module_4x3() {
    let logits: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let shape = Shape::matrix(4, 3).unwrap();
    let batch = Batch::classes(shape, &logits, &[0, 2, 1, 2]);
    let ce = cpu::compute(&LossSpec::default(), &batch, lsce::Gradient::None).unwrap();
    assert_abs_diff_eq!(ce.loss[0], 1.1576, epsilon = 1e-4);
    let spec = LossSpec::pytorch(0.1);
    let mean = cpu::compute(&spec, &batch, lsce::Gradient::None).unwrap();
    assert_abs_diff_eq!(mean.loss[0], 1.1826, epsilon = 1e-4);
    let sum = cpu::compute(
        &spec.with_reduction(Reduction::Sum),
        &batch,
        lsce::Gradient::None,
    )
    .unwrap();
    assert_abs_diff_eq!(sum.loss[0], 4.7304, epsilon = 1e-4);
    let none = cpu::compute(
        &spec.with_reduction(Reduction::None),
        &batch,
        lsce::Gradient::None,
    )
    .unwrap();
    for (got, want) in none.loss.iter().zip([2.3076, 0.5076, 1.4076, 0.5076]) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-4);
    }
}
