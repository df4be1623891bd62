//! lsce inside Burn (feature `burn`): the loss and its autodiff gradient on Burn's wgpu device,
//! held against the f64 CPU reference with the bounds of `tests/common` (plus one rounding
//! where the `Keep` mode scales the kept gradient by the upstream gradient), against Burn's own
//! `CrossEntropyLoss` where Burn is right, at 256 x 128256, on errors, and in a training run.
#![cfg(feature = "burn")]

mod common;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{DType, Device, DeviceKind, FloatDType, Int, IntDType, Tensor, TensorData};
use common::{assert_close, burn_device as device, Rng, E, SAFETY};
use lsce::burn::{BurnError, GradientMode, LsceLossConfig};
use lsce::{Batch, KernelConfig, LossSpec, Reduction, Shape, Smoothing, UpstreamGrad};

/// The most conservative reduction depth of the bounds (a 4-lane subgroup per row): the
/// kernel Burn's device runs is no deeper.
fn bound_config() -> KernelConfig {
    KernelConfig {
        use_subgroups: true,
        subgroup_rows_max_classes: u32::MAX,
        ..KernelConfig::for_device(&common::gpu().device)
    }
}

/// How the test drives the loss's backward pass.
#[derive(Clone, Copy, Debug)]
enum Upstream {
    /// `(loss * s).backward()` for `Sum`/`Mean`.
    Scalar(f32),
    /// `(loss * r).sum().backward()` for `None`.
    PerRow,
}

/// One run through Burn: the loss values and the logits' gradient, as f32.
struct BurnRun {
    loss: Vec<f32>,
    grad: Vec<f32>,
}

fn f32s<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(FloatDType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

/// Runs lsce on `[N, C, d..]` logits (`dims`) with labels `[N, d..]` (or probability targets
/// like the logits) and returns the loss and gradient.
#[allow(clippy::too_many_arguments)]
fn run_lsce<const D: usize, const T: usize>(
    dims: [usize; D],
    logits: &[f32],
    labels: Option<&[i32]>,
    probabilities: Option<&[f32]>,
    config: &LsceLossConfig,
    upstream: Upstream,
    row_upstream: &[f32],
    half: bool,
) -> BurnRun {
    let device = device().autodiff();
    let mut x = Tensor::<D>::from_data(TensorData::new(logits.to_vec(), dims), &device);
    if half {
        x = x.cast(FloatDType::F16);
    }
    let x = x.require_grad();
    let loss = config.init(&device).expect("init");
    let value = match (labels, probabilities) {
        (Some(labels), None) => {
            let mut target_dims = [0; T];
            for (i, d) in dims.iter().enumerate().filter(|&(i, _)| i != 1) {
                target_dims[if i == 0 { 0 } else { i - 1 }] = *d;
            }
            let y =
                Tensor::<T, Int>::from_data(TensorData::new(labels.to_vec(), target_dims), &device);
            loss.try_forward(x.clone(), y).expect("try_forward")
        }
        (None, Some(p)) => {
            let p = Tensor::<D>::from_data(TensorData::new(p.to_vec(), dims), &device);
            loss.try_forward_probabilities(x.clone(), p)
                .expect("try_forward_probabilities")
        }
        _ => unreachable!("labels or probabilities"),
    };
    let total = match upstream {
        Upstream::Scalar(s) => value.clone() * s,
        Upstream::PerRow => {
            let r = Tensor::<1>::from_data(
                TensorData::new(row_upstream.to_vec(), [row_upstream.len()]),
                &device,
            );
            (value.clone() * r).sum()
        }
    };
    let grads = total.backward();
    let grad = x.grad(&grads).expect("the logits are tracked");
    BurnRun {
        loss: f32s(value),
        grad: f32s(grad),
    }
}

/// Checks a Burn run against the reference: the bounds of `tests/common`, plus for `Keep` the
/// rounding of the product `grad * upstream` (one ulp of the result), plus for f16 the
/// rounding of the gradient to f16 (2^-11 relative, 2^-25 absolute below its normal range).
fn check_against_reference(
    what: &str,
    spec: &LossSpec,
    batch: &Batch<'_>,
    run: &BurnRun,
    mode: GradientMode,
    half: bool,
) -> (f64, f64) {
    let mut r = common::reference(spec, batch, lsce::Gradient::Separate, bound_config());
    let want = r.out.grad.as_ref().expect("reference gradient");
    let tol = r.grad_tol.as_mut().expect("gradient bounds");
    for (t, w) in tol.iter_mut().zip(want) {
        if mode == GradientMode::Keep {
            *t += SAFETY * E * w.abs();
        }
        if half {
            *t += 2f64.powi(-11) * w.abs() + 2f64.powi(-25);
        }
    }
    let (loss_err, loss_ratio) = assert_close(
        &format!("{what}: loss"),
        &run.loss,
        &r.out.loss,
        &r.loss_tol,
    );
    let (grad_err, grad_ratio) = assert_close(&format!("{what}: grad"), &run.grad, want, tol);
    eprintln!(
        "[burn vs cpu] {what:<48} loss {loss_err:.3e} grad {grad_err:.3e} worst err/bound {:.3}",
        loss_ratio.max(grad_ratio)
    );
    (loss_err, grad_err)
}

#[test]
fn gradient_through_autodiff_matches_cpu_reference() {
    let (rows, classes) = (37usize, 53usize);
    let logits = common::logits((rows * classes) as u64, 2.0, 11);
    let labels = common::labels(rows as u32, classes as u32, 5, 12);
    let mut rng = Rng::new(13);
    let weights: Vec<f32> = (0..classes).map(|_| rng.range(0.25, 2.0) as f32).collect();
    let row_upstream: Vec<f32> = (0..rows).map(|_| rng.range(-1.5, 1.5) as f32).collect();
    let shape = Shape::matrix(rows as u32, classes as u32).unwrap();
    for mode in [GradientMode::Keep, GradientMode::Recompute] {
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            for weighted in [false, true] {
                let spec = LossSpec::pytorch(0.1).with_reduction(reduction);
                let (upstream, batch_upstream) = match reduction {
                    Reduction::None => (Upstream::PerRow, UpstreamGrad::PerRow(&row_upstream)),
                    _ => (Upstream::Scalar(2.5), UpstreamGrad::Scalar(2.5)),
                };
                let mut config = LsceLossConfig::new().with_spec(spec).with_gradient(mode);
                let mut batch =
                    Batch::classes(shape, &logits, &labels).with_upstream(batch_upstream);
                if weighted {
                    config = config.with_weights(Some(weights.clone()));
                    batch = batch.with_weights(&weights);
                }
                let run = run_lsce::<2, 1>(
                    [rows, classes],
                    &logits,
                    Some(&labels),
                    None,
                    &config,
                    upstream,
                    &row_upstream,
                    false,
                );
                check_against_reference(
                    &format!("{mode:?} {reduction:?} weighted={weighted}"),
                    &spec,
                    &batch,
                    &run,
                    mode,
                    false,
                );
            }
        }
    }
}

#[test]
fn every_convention_and_spec_field_on_class_dim1_logits() {
    // [N, C, d1, d2] = [3, 7, 4, 5]: 60 rows strided by 20 in the buffer.
    let dims = [3usize, 7, 4, 5];
    let (rows, classes) = (3 * 4 * 5, 7u32);
    let elements = rows * classes as usize;
    let logits = common::logits(elements as u64, 3.0, 21);
    let labels = common::labels(rows as u32, classes, 7, 22);
    let mut rng = Rng::new(23);
    let row_upstream: Vec<f32> = (0..rows).map(|_| rng.range(0.5, 1.5) as f32).collect();
    let shape = Shape::class_dim1(&dims).unwrap();
    let mut specs = common::conventions(0.2, classes);
    specs.push((
        "z_loss+softcap+scale",
        LossSpec::pytorch(0.1)
            .with_z_loss(1e-3)
            .with_softcap(Some(2.0))
            .with_logit_scale(0.7),
    ));
    for (name, spec) in specs {
        for reduction in [Reduction::Mean, Reduction::None] {
            let spec = spec.with_reduction(reduction);
            let (upstream, batch_upstream) = match reduction {
                Reduction::None => (Upstream::PerRow, UpstreamGrad::PerRow(&row_upstream)),
                _ => (Upstream::Scalar(1.0), UpstreamGrad::Scalar(1.0)),
            };
            let config = LsceLossConfig::new().with_spec(spec);
            let run = run_lsce::<4, 3>(
                dims,
                &logits,
                Some(&labels),
                None,
                &config,
                upstream,
                &row_upstream,
                false,
            );
            let batch = Batch::classes(shape, &logits, &labels).with_upstream(batch_upstream);
            check_against_reference(
                &format!("{name} {reduction:?} [3,7,4,5]"),
                &spec,
                &batch,
                &run,
                GradientMode::Keep,
                false,
            );
        }
    }
    // Probability targets (unnormalised rows are accepted), both gradient modes.
    let probabilities: Vec<f32> = (0..elements).map(|_| rng.uniform() as f32).collect();
    for mode in [GradientMode::Keep, GradientMode::Recompute] {
        let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::Sum);
        let config = LsceLossConfig::new().with_spec(spec).with_gradient(mode);
        let run = run_lsce::<4, 3>(
            dims,
            &logits,
            None,
            Some(&probabilities),
            &config,
            Upstream::Scalar(0.5),
            &row_upstream,
            false,
        );
        let batch = Batch::probabilities(shape, &logits, &probabilities)
            .with_upstream(UpstreamGrad::Scalar(0.5));
        check_against_reference(
            &format!("probabilities {mode:?} [3,7,4,5]"),
            &spec,
            &batch,
            &run,
            mode,
            false,
        );
    }
}

#[test]
fn f16_logits_give_an_f16_gradient_matching_the_reference() {
    let (rows, classes) = (16usize, 33usize);
    let logits = common::logits((rows * classes) as u64, 2.0, 31);
    // The reference reads the f16 values the kernel reads.
    let bits: Vec<u16> = logits.iter().map(|&v| lsce::half::f32_to_f16(v)).collect();
    let labels = common::labels(rows as u32, classes as u32, 0, 32);
    let shape = Shape::matrix(rows as u32, classes as u32).unwrap();
    for mode in [GradientMode::Keep, GradientMode::Recompute] {
        let spec = LossSpec::pytorch(0.1);
        let config = LsceLossConfig::new().with_spec(spec).with_gradient(mode);
        let run = run_lsce::<2, 1>(
            [rows, classes],
            &logits,
            Some(&labels),
            None,
            &config,
            Upstream::Scalar(1.0),
            &[],
            true,
        );
        let batch = Batch::classes(shape, lsce::Logits::F16(&bits), &labels);
        check_against_reference(&format!("f16 {mode:?}"), &spec, &batch, &run, mode, true);
    }
}

/// Issue 14, item 1: large upstream gradients (1, 1024, 65536: the usual initial loss scale of
/// mixed-precision training, past f16's largest value 65504) and a per-row one, for f32 and
/// f16 logits, in both modes, against the CPU reference. The upstream gradient multiplies the
/// gradient in f32 and the product is rounded once to the logits' type, so the bound is
/// `check_against_reference`'s (one f32 rounding of the product for `Keep`, one rounding to
/// f16). `Mean` over 16 rows keeps every gradient below 65536 / 16 (each `|p - a| <= 1`), so
/// all are finite in f16; the per-row upstream is below 1536 with `Reduction::None`.
#[test]
fn large_upstream_gradients_scale_in_f32_and_round_once() {
    let (rows, classes) = (16usize, 33usize);
    let logits = common::logits((rows * classes) as u64, 2.0, 37);
    let bits: Vec<u16> = logits.iter().map(|&v| lsce::half::f32_to_f16(v)).collect();
    let labels = common::labels(rows as u32, classes as u32, 0, 38);
    let mut rng = Rng::new(39);
    let row_upstream: Vec<f32> = (0..rows)
        .map(|_| (rng.range(0.5, 1.5) * 1024.0) as f32)
        .collect();
    let shape = Shape::matrix(rows as u32, classes as u32).unwrap();
    for half in [false, true] {
        let batch_logits = if half {
            lsce::Logits::F16(&bits)
        } else {
            lsce::Logits::F32(&logits)
        };
        for mode in [GradientMode::Keep, GradientMode::Recompute] {
            for upstream in [Some(1.0f32), Some(1024.0), Some(65536.0), None] {
                let (spec, upstream, batch_upstream) = match upstream {
                    Some(g) => (
                        LossSpec::pytorch(0.1),
                        Upstream::Scalar(g),
                        UpstreamGrad::Scalar(g),
                    ),
                    None => (
                        LossSpec::pytorch(0.1).with_reduction(Reduction::None),
                        Upstream::PerRow,
                        UpstreamGrad::PerRow(&row_upstream),
                    ),
                };
                let config = LsceLossConfig::new().with_spec(spec).with_gradient(mode);
                let run = run_lsce::<2, 1>(
                    [rows, classes],
                    &logits,
                    Some(&labels),
                    None,
                    &config,
                    upstream,
                    &row_upstream,
                    half,
                );
                let batch =
                    Batch::classes(shape, batch_logits, &labels).with_upstream(batch_upstream);
                let dtype = if half { "f16" } else { "f32" };
                check_against_reference(
                    &format!("{dtype} {mode:?} upstream {upstream:?}"),
                    &spec,
                    &batch,
                    &run,
                    mode,
                    half,
                );
            }
        }
    }
}

/// Issue 14: bf16 logits on a device without bf16 (`Device::supports_dtype`) are an `Err` from
/// `try_forward`, not a panic on cubecl's device thread. The logits are uploaded as bf16 bytes
/// (no kernel runs on them); lsce refuses them before recording anything. On a device with bf16
/// the same call must succeed.
#[test]
fn bf16_logits_are_an_err_where_the_device_lacks_bf16() {
    let device = device();
    let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let logits = Tensor::<2>::from_data(TensorData::new(values, [3, 4]), (&device, DType::BF16));
    let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![0i32, 3, 1], [3]), &device);
    let loss = LsceLossConfig::new().init(&device).expect("init");
    let result = loss.try_forward(logits, targets);
    if device.supports_dtype(DType::BF16) {
        eprintln!("[burn bf16] the device supports bf16: the loss runs");
        assert!(result.is_ok(), "{result:?}");
    } else {
        match result {
            Err(BurnError::DtypeNotOnDevice { what, dtype, .. }) => {
                assert_eq!((what, dtype.as_str()), ("the logits", "BF16"));
            }
            other => panic!("bf16 logits on a device without bf16: {other:?}"),
        }
    }
}

/// Burn's `CrossEntropyLoss` in f32, bounded like the kernels' arithmetic in `tests/common`:
/// per row, its log-softmax sums `K` exponentials (`(K + 8) E` relative, with the exp and log
/// errors of `3 + 2|x|` ulp and 3 ulp), the smoothed sum adds `K` more terms, and the mean
/// divides; each bound doubled (`SAFETY`). Returns (loss bound, gradient bound per element).
fn burn_bounds(batch: &Batch<'_>, reference: &lsce::LossOutput<f64>) -> (f64, Vec<f64>) {
    let (rows, k) = (batch.shape.rows() as usize, batch.shape.classes() as usize);
    let kf = k as f64;
    let mut loss_bound = 0.0;
    let mut grad_bound = vec![0.0; rows * k];
    let denominator = reference.denominator;
    for row in 0..rows {
        let x: Vec<f64> = (0..k).map(|c| batch.logits.get(row * k + c)).collect();
        let max_abs = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let lse = reference.lse[row];
        let per_log_p = (kf + 8.0 + 2.0 * max_abs + 3.0 + lse.abs()) * E;
        let w = |c: usize| batch.weights.map_or(1.0, |w| f64::from(w[c]));
        let a: f64 = (0..k).map(&w).sum::<f64>().max(1.0) * 2.0;
        let row_loss = a * (lse.abs() + max_abs);
        loss_bound += a * per_log_p + kf * E * row_loss;
        for c in 0..k {
            let p = (x[c] - lse).exp();
            grad_bound[row * k + c] =
                SAFETY * (a * p * (per_log_p + kf * E) + 4.0 * E * w(c)) / denominator;
        }
    }
    let loss = reference.loss[0].abs();
    (
        SAFETY * (loss_bound / denominator + rows as f64 * E * loss),
        grad_bound,
    )
}

#[test]
fn equals_burn_cross_entropy_where_burn_is_right() {
    let device = device().autodiff();
    for (rows, classes) in [(8usize, 5usize), (33, 17)] {
        let logits = common::logits((rows * classes) as u64, 2.0, 41);
        let labels = common::labels(rows as u32, classes as u32, 0, 42);
        let mut rng = Rng::new(43);
        let weights: Vec<f32> = (0..classes).map(|_| rng.range(0.5, 2.0) as f32).collect();
        let shape = Shape::matrix(rows as u32, classes as u32).unwrap();
        for eps in [None, Some(0.1f32)] {
            for weighted in [false, true] {
                let w = weighted.then(|| weights.clone());
                let x = || {
                    Tensor::<2>::from_data(
                        TensorData::new(logits.clone(), [rows, classes]),
                        &device,
                    )
                    .require_grad()
                };
                let y = || {
                    Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [rows]), &device)
                };

                let burn_x = x();
                let burn_loss = CrossEntropyLossConfig::new()
                    .with_smoothing(eps)
                    .with_weights(w.clone())
                    .init(&device)
                    .forward(burn_x.clone(), y());
                let burn_grad = burn_x.grad(&burn_loss.clone().backward()).unwrap();
                let (burn_loss, burn_grad) = (f32s(burn_loss), f32s(burn_grad));

                let lsce_x = x();
                let lsce_loss = LsceLossConfig::new()
                    .with_smoothing(eps)
                    .with_weights(w.clone())
                    .init(&device)
                    .unwrap()
                    // Burn's signature: the one-line swap.
                    .forward(lsce_x.clone(), y());
                let lsce_grad = lsce_x.grad(&lsce_loss.clone().backward()).unwrap();
                let run = BurnRun {
                    loss: f32s(lsce_loss),
                    grad: f32s(lsce_grad),
                };

                let spec = LossSpec::pytorch(eps.unwrap_or(0.0));
                let mut batch = Batch::classes(shape, &logits, &labels);
                if let Some(w) = &w {
                    batch = batch.with_weights(w);
                }
                let what = format!("{rows}x{classes} eps={eps:?} weighted={weighted}");
                check_against_reference(&what, &spec, &batch, &run, GradientMode::Keep, false);
                let reference =
                    lsce::cpu::compute(&spec, &batch, lsce::Gradient::Separate).unwrap();
                let (burn_loss_bound, burn_grad_bound) = burn_bounds(&batch, &reference);
                assert_close(
                    &format!("Burn's loss {what}"),
                    &burn_loss,
                    &reference.loss,
                    &[burn_loss_bound],
                );
                assert_close(
                    &format!("Burn's grad {what}"),
                    &burn_grad,
                    reference.grad.as_ref().unwrap(),
                    &burn_grad_bound,
                );
                let diff = (f64::from(run.loss[0]) - f64::from(burn_loss[0])).abs();
                let grad_diff = run
                    .grad
                    .iter()
                    .zip(&burn_grad)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                eprintln!("[lsce vs Burn] {what:<32} |loss diff| {diff:.3e} max |grad diff| {grad_diff:.3e}");
            }
        }
    }
}

#[test]
fn correct_at_256_x_128256() {
    let (rows, classes) = (256usize, 128_256usize);
    let logits = common::logits((rows * classes) as u64, 2.0, 51);
    let labels = common::labels(rows as u32, classes as u32, 0, 52);
    let spec = LossSpec::pytorch(0.1);
    let config = LsceLossConfig::new().with_spec(spec);
    let run = run_lsce::<2, 1>(
        [rows, classes],
        &logits,
        Some(&labels),
        None,
        &config,
        Upstream::Scalar(1.0),
        &[],
        false,
    );
    let shape = Shape::matrix(rows as u32, classes as u32).unwrap();
    let batch = Batch::classes(shape, &logits, &labels);
    check_against_reference(
        "256x128256 eps=0.1",
        &spec,
        &batch,
        &run,
        GradientMode::Keep,
        false,
    );
}

#[test]
fn bad_input_gives_clear_errors() {
    let device = device();
    let x = Tensor::<2>::from_data(
        TensorData::new(common::logits(15, 1.0, 61), [3, 5]),
        &device,
    );
    let loss = LsceLossConfig::new().init(&device).unwrap();
    let labels = |v: Vec<i32>| Tensor::<1, Int>::from_data(TensorData::new(v, [3]), &device);

    // A label out of range: the row and value, from the kernel's summary.
    let err = loss
        .try_forward(x.clone(), labels(vec![1, 9, -3]))
        .unwrap_err();
    assert_eq!(
        err,
        BurnError::Lsce(lsce::LsceError::LabelOutOfRange {
            row: 1,
            label: 9,
            classes: 5
        }),
        "{err}"
    );
    assert!(err.to_string().contains("row 1 has label 9"), "{err}");
    // Without the check: NaN for that row's loss, never a number.
    let unchecked = LsceLossConfig::new()
        .with_spec(LossSpec::default().with_reduction(Reduction::None))
        .with_label_check(false)
        .init(&device)
        .unwrap();
    let values = f32s(
        unchecked
            .try_forward(x.clone(), labels(vec![1, 9, 2]))
            .unwrap(),
    );
    assert!(
        values[0].is_finite() && values[1].is_nan() && values[2].is_finite(),
        "{values:?}"
    );
    // i64 labels are read; one beyond i32 stays out of range instead of wrapping onto a class.
    let wide = Tensor::<1, Int>::from_data(
        TensorData::new(vec![1i64, (1i64 << 32) + 2, 0], [3]),
        (&device, burn::tensor::DType::I64),
    );
    assert_eq!(wide.dtype(), burn::tensor::DType::I64);
    let err = loss.try_forward(x.clone(), wide).unwrap_err();
    assert!(
        matches!(
            err,
            BurnError::Lsce(lsce::LsceError::LabelOutOfRange { row: 1, .. })
        ),
        "{err}"
    );

    // Shapes.
    let err = loss
        .try_forward(
            x.clone(),
            Tensor::<1, Int>::from_data(TensorData::new(vec![0i32; 4], [4]), &device),
        )
        .unwrap_err();
    assert_eq!(
        err,
        BurnError::ShapeMismatch {
            what: "the targets",
            expected: vec![3],
            actual: vec![4]
        },
        "{err}"
    );
    let weighted = LsceLossConfig::new()
        .with_weights(Some(vec![1.0; 4]))
        .init(&device)
        .unwrap();
    let err = weighted
        .try_forward(x.clone(), labels(vec![0, 1, 2]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            BurnError::ShapeMismatch {
                what: "the weights",
                ..
            }
        ),
        "{err}"
    );
    // Bad weights and specs.
    let err = LsceLossConfig::new()
        .with_weights(Some(vec![1.0, -1.0]))
        .init(&device)
        .unwrap_err();
    assert!(
        matches!(
            err,
            BurnError::Lsce(lsce::LsceError::InvalidWeight { class: 1, .. })
        ),
        "{err}"
    );
    let err = LsceLossConfig::new()
        .with_smoothing(Some(1.5))
        .init(&device)
        .unwrap_err();
    assert!(
        matches!(err, BurnError::Lsce(lsce::LsceError::InvalidSmoothing(_))),
        "{err}"
    );
    let err = LsceLossConfig::new()
        .with_spec(LossSpec::default().with_excluded_class(Some(7)))
        .init(&device)
        .unwrap()
        .try_forward(x.clone(), labels(vec![0, 1, 2]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            BurnError::Lsce(lsce::LsceError::InvalidExcludedClass { .. })
        ),
        "{err}"
    );

    // A wgpu device lsce was not given.
    let other = Device::wgpu(DeviceKind::VirtualGpu(7));
    let err = LsceLossConfig::new().init(&other).unwrap_err();
    assert!(matches!(err, BurnError::DeviceNotShared { .. }), "{err}");
    assert!(err.to_string().contains("init_device"), "{err}");
    let _ = Smoothing::Uniform(0.0);
}

/// A two-layer MLP from Burn's own layers, trained with Burn's Adam on four Gaussian clusters.
#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    relu: Relu,
    out: Linear,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.relu.forward(self.hidden.forward(x)))
    }
}

#[test]
fn a_burn_model_trains_end_to_end() {
    let device = device().autodiff();
    let (features, classes, batch) = (8usize, 4usize, 64usize);
    let mut rng = Rng::new(71);
    let centres: Vec<Vec<f64>> = (0..classes)
        .map(|_| (0..features).map(|_| rng.range(-2.0, 2.0)).collect())
        .collect();
    let sample = |rng: &mut Rng| {
        let mut x = Vec::with_capacity(batch * features);
        let mut y = Vec::with_capacity(batch);
        for _ in 0..batch {
            let c = (rng.uniform() * classes as f64) as usize % classes;
            x.extend(centres[c].iter().map(|m| (m + 0.5 * rng.normal()) as f32));
            y.push(c as i32);
        }
        (
            Tensor::<2>::from_data(TensorData::new(x, [batch, features]), &device),
            Tensor::<1, Int>::from_data(TensorData::new(y, [batch]), &device),
        )
    };
    let mut model = Mlp {
        hidden: LinearConfig::new(features, 32).init(&device),
        relu: Relu::new(),
        out: LinearConfig::new(32, classes).init(&device),
    };
    let mut optim = AdamConfig::new().init();
    let loss = LsceLossConfig::new()
        .with_smoothing(Some(0.1))
        .init(&device)
        .unwrap();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..80 {
        let (x, y) = sample(&mut rng);
        let value = loss.try_forward(model.forward(x), y).unwrap();
        last = f32s(value.clone())[0];
        first.get_or_insert(last);
        let grads = GradientsParams::from_grads(value.backward(), &model);
        model = optim.step(0.02, model, grads);
    }
    let (x, y) = sample(&mut rng);
    let predicted = model
        .forward(x)
        .argmax(1)
        .reshape([batch])
        .cast(IntDType::I32)
        .into_data()
        .try_into_vec::<i32>()
        .unwrap();
    let truth = y
        .cast(IntDType::I32)
        .into_data()
        .try_into_vec::<i32>()
        .unwrap();
    let accuracy =
        predicted.iter().zip(&truth).filter(|(p, t)| p == t).count() as f64 / batch as f64;
    let first = first.unwrap();
    eprintln!("[train] loss {first:.4} -> {last:.4}, held-out accuracy {accuracy:.3}");
    assert!(
        last < 0.5 * first,
        "the loss fell from {first} to {last} only"
    );
    assert!(accuracy >= 0.9, "accuracy {accuracy}");
}
