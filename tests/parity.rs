//! PyTorch parity beyond the core: class weights, probability targets, [N, C, d..] layouts,
//! half precision, z-loss, soft-cap, logit scale, in-place gradient, label checks, accuracy,
//! and their combinations. Every case runs on the GPU and is held against `lsce::cpu`.

mod common;

use lsce::half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use lsce::{
    cpu, Batch, Dtype, Gradient, Logits, LossSpec, LsceError, Reduction, Shape, Smoothing,
    StagingOptions, UpstreamGrad,
};

use common::*;

#[test]
fn class_weights_with_smoothing_and_ignore() {
    let shape = Shape::matrix(37, 301).unwrap();
    let x = logits(shape.elements(), 3.0, 1);
    let y = labels(37, 301, 5, 2);
    let mut rng = Rng::new(3);
    let w: Vec<f32> = (0..301)
        .map(|c| {
            if c % 7 == 0 {
                0.0
            } else {
                (rng.uniform() as f32) * 2.0
            }
        })
        .collect();
    for smoothing in [
        Smoothing::Uniform(0.0),
        Smoothing::Uniform(0.1),
        Smoothing::OffTarget(0.2),
        Smoothing::Explicit { on: 0.8, off: 0.01 },
    ] {
        for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            let spec = LossSpec::default()
                .with_smoothing(smoothing)
                .with_reduction(reduction);
            let batch = Batch::classes(shape, &x, &y).with_weights(&w);
            check_every_path(
                &format!("weights {smoothing:?} {reduction:?}"),
                &spec,
                &batch,
                StagingOptions::default(),
            );
        }
    }
}

#[test]
fn all_target_weights_zero_gives_nan_mean() {
    let shape = Shape::matrix(4, 5).unwrap();
    let x = logits(20, 1.0, 4);
    let y = [0, 0, 0, 0];
    let w = [0.0, 1.0, 1.0, 1.0, 1.0];
    let out = check_every_path(
        "zero weights",
        &LossSpec::pytorch(0.1),
        &Batch::classes(shape, &x, &y).with_weights(&w),
        StagingOptions::default(),
    );
    assert!(out.loss[0].is_nan());
    assert!(out.grad.unwrap().iter().all(|g| g.is_nan()));
}

#[test]
fn probability_targets() {
    let shape = Shape::matrix(19, 257).unwrap();
    let x = logits(shape.elements(), 2.0, 5);
    let mut rng = Rng::new(6);
    // Unnormalised rows, as PyTorch accepts them.
    let t: Vec<f32> = (0..shape.elements())
        .map(|_| rng.uniform() as f32)
        .collect();
    let w: Vec<f32> = (0..257).map(|_| (rng.uniform() as f32) + 0.5).collect();
    for eps in [0.0, 0.1, 1.0] {
        for reduction in [Reduction::None, Reduction::Mean] {
            let spec = LossSpec::pytorch(eps).with_reduction(reduction);
            check_every_path(
                &format!("soft eps {eps} {reduction:?}"),
                &spec,
                &Batch::probabilities(shape, &x, &t),
                StagingOptions::default(),
            );
            check_every_path(
                &format!("soft weighted eps {eps} {reduction:?}"),
                &spec,
                &Batch::probabilities(shape, &x, &t).with_weights(&w),
                StagingOptions::default(),
            );
        }
    }
}

#[test]
fn smoothed_labels_as_probabilities() {
    // The published 3x5 example: F.cross_entropy(logits, labels_smoothed) with the smoothed one-hot targets
    // [0.02 .. 0.92 ..] equals label_smoothing=0.1 on the class labels: 2.1038.
    let x = [
        1.2215, -0.9342, -0.1349, -0.5035, 0.4492, -0.1989, 0.2589, 2.1556, -0.5734, 0.8668,
        0.1215, 0.5060, 0.5376, -1.7609, -0.6566,
    ];
    let labels = [2usize, 3, 2];
    let mut t = vec![0.02f32; 15];
    for (r, &y) in labels.iter().enumerate() {
        t[r * 5 + y] = 0.92;
    }
    let shape = Shape::matrix(3, 5).unwrap();
    let out = check_every_path(
        "3x5 smoothed labels as probabilities",
        &LossSpec::default(),
        &Batch::probabilities(shape, &x, &t),
        StagingOptions::default(),
    );
    approx::assert_abs_diff_eq!(out.loss[0], 2.1038, epsilon = 1e-4);
}

#[test]
fn class_dim1_layouts() {
    // Segmentation-like [N, C, H, W] and a sequence [N, C, L], with ignored positions and
    // weights, every reduction, and probability targets.
    for dims in [vec![2usize, 21, 5, 7], vec![3, 4, 130], vec![1, 300, 3]] {
        let shape = Shape::class_dim1(&dims).unwrap();
        let x = logits(shape.elements(), 4.0, 7);
        let y = labels(shape.rows(), shape.classes(), 6, 8);
        let mut rng = Rng::new(9);
        let w: Vec<f32> = (0..shape.classes())
            .map(|_| (rng.uniform() as f32) + 0.1)
            .collect();
        for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            let spec = LossSpec::pytorch(0.1).with_reduction(reduction);
            check_every_path(
                &format!("{dims:?} {reduction:?}"),
                &spec,
                &Batch::classes(shape, &x, &y),
                StagingOptions::default(),
            );
            check_every_path(
                &format!("{dims:?} weighted {reduction:?}"),
                &spec,
                &Batch::classes(shape, &x, &y).with_weights(&w),
                StagingOptions {
                    accuracy: true,
                    ..Default::default()
                },
            );
        }
        let t: Vec<f32> = (0..shape.elements())
            .map(|_| rng.uniform() as f32)
            .collect();
        check_every_path(
            &format!("{dims:?} soft"),
            &LossSpec::pytorch(0.2),
            &Batch::probabilities(shape, &x, &t),
            StagingOptions::default(),
        );
    }
}

#[test]
fn class_dim1_windows() {
    // Windows over whole batch items: 7 items of 5 x 33 positions, 3 items per window.
    let shape = Shape::class_dim1(&[7, 5, 33]).unwrap();
    let x = logits(shape.elements(), 2.0, 10);
    let y = labels(shape.rows(), 5, 4, 11);
    let item = 5 * 33 * 4;
    let options = StagingOptions {
        max_binding_bytes: Some(3 * item + 256),
        ..Default::default()
    };
    check_every_path(
        "strided windows",
        &LossSpec::pytorch(0.1),
        &Batch::classes(shape, &x, &y),
        options,
    );
}

fn encode(dtype: Dtype, x: &[f32]) -> Vec<u16> {
    x.iter()
        .map(|&v| {
            if dtype == Dtype::F16 {
                f32_to_f16(v)
            } else {
                f32_to_bf16(v)
            }
        })
        .collect()
}

#[test]
fn half_precision_logits() {
    // Odd class counts put row boundaries inside 32-bit words; the kernel must not clobber the
    // neighbouring row's half. The reference decodes the same rounded inputs.
    for dtype in [Dtype::F16, Dtype::Bf16] {
        for (rows, classes) in [(5u32, 7u32), (9, 1000), (3, 32001), (2, 50257)] {
            let shape = Shape::matrix(rows, classes).unwrap();
            let bits = encode(dtype, &logits(shape.elements(), 3.0, 12));
            let logits = if dtype == Dtype::F16 {
                Logits::F16(&bits)
            } else {
                Logits::Bf16(&bits)
            };
            let y = labels(rows, classes, 4, 13);
            let batch = Batch::classes(shape, logits, &y);
            let spec = LossSpec::pytorch(0.1);
            for options in [
                StagingOptions::default(),
                StagingOptions {
                    grad_dtype: lsce::GradDtype::F32,
                    ..Default::default()
                },
                StagingOptions {
                    gradient: Gradient::InPlace,
                    ..Default::default()
                },
            ] {
                check_every_path(
                    &format!("{dtype:?} {rows}x{classes} {options:?}"),
                    &spec,
                    &batch,
                    options,
                );
            }
        }
    }
}

#[test]
fn half_precision_class_dim1() {
    for dtype in [Dtype::F16, Dtype::Bf16] {
        let shape = Shape::class_dim1(&[3, 11, 9]).unwrap();
        let bits = encode(dtype, &logits(shape.elements(), 3.0, 14));
        let logits = if dtype == Dtype::F16 {
            Logits::F16(&bits)
        } else {
            Logits::Bf16(&bits)
        };
        let y = labels(shape.rows(), 11, 5, 15);
        for gradient in [Gradient::Separate, Gradient::InPlace] {
            check_every_path(
                &format!("{dtype:?} strided {gradient:?}"),
                &LossSpec::pytorch(0.1),
                &Batch::classes(shape, logits, &y),
                StagingOptions {
                    gradient,
                    ..Default::default()
                },
            );
        }
    }
}

#[test]
fn f16_at_32000_classes_stays_finite() {
    // PyTorch's own float16 computation overflows to inf here; lsce accumulates in f32.
    let shape = Shape::matrix(4, 32000).unwrap();
    let bits = encode(Dtype::F16, &logits(shape.elements(), 8.0, 16));
    let y = labels(4, 32000, 0, 17);
    let out = check_every_path(
        "f16 32000",
        &LossSpec::pytorch(0.1),
        &Batch::classes(shape, Logits::F16(&bits), &y),
        StagingOptions::default(),
    );
    assert!(out.loss[0].is_finite());
    let decoded: Vec<f32> = bits.iter().map(|&b| f16_to_f32(b)).collect();
    let reference = cpu::compute(
        &LossSpec::pytorch(0.1),
        &Batch::classes(shape, &decoded, &y),
        lsce::Gradient::None,
    )
    .unwrap();
    approx::assert_relative_eq!(
        f64::from(out.loss[0]),
        reference.loss[0],
        max_relative = 1e-5
    );
    assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
}

#[test]
fn z_loss_softcap_and_scale() {
    let shape = Shape::matrix(23, 515).unwrap();
    let mut x = logits(shape.elements(), 20.0, 18);
    // Masked vocabulary entries: -inf must keep zero probability under the soft-cap.
    for i in (0..x.len()).step_by(13) {
        x[i] = f32::NEG_INFINITY;
    }
    let y = labels(23, 515, 7, 19);
    let y: Vec<i32> = y
        .iter()
        .zip(0..)
        .map(|(&l, r)| {
            if l >= 0 && x[r * 515 + l as usize] == f32::NEG_INFINITY {
                (l + 1) % 515
            } else {
                l
            }
        })
        .collect();
    for (z, cap, scale) in [
        (1e-4, None, 1.0),
        (0.0, Some(30.0), 1.0),
        (1e-3, Some(15.0), 0.5),
        (0.0, None, 2.5),
    ] {
        for eps in [0.0, 0.1] {
            for reduction in [Reduction::None, Reduction::Mean] {
                let spec = LossSpec::pytorch(eps)
                    .with_z_loss(z)
                    .with_softcap(cap)
                    .with_logit_scale(scale)
                    .with_reduction(reduction);
                check_every_path(
                    &format!("z {z} cap {cap:?} scale {scale} eps {eps} {reduction:?}"),
                    &spec,
                    &Batch::classes(shape, &x, &y),
                    StagingOptions::default(),
                );
            }
        }
    }
}

#[test]
fn z_loss_and_softcap_streaming_rows() {
    // Rows longer than the register cache take the two-sweep path.
    let shape = Shape::matrix(3, 40000).unwrap();
    let x = logits(shape.elements(), 10.0, 20);
    let y = labels(3, 40000, 0, 21);
    let spec = LossSpec::pytorch(0.1)
        .with_z_loss(1e-4)
        .with_softcap(Some(30.0))
        .with_logit_scale(0.8);
    check_every_path(
        "streaming z/cap",
        &spec,
        &Batch::classes(shape, &x, &y),
        StagingOptions {
            accuracy: true,
            ..Default::default()
        },
    );
}

#[test]
fn in_place_gradient_matches_separate() {
    let shape = Shape::matrix(11, 2000).unwrap();
    let x = logits(shape.elements(), 3.0, 22);
    let y = labels(11, 2000, 3, 23);
    let g: Vec<f32> = (0..11).map(|r| r as f32 * 0.5 - 2.0).collect();
    let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::None);
    let batch = Batch::classes(shape, &x, &y).with_upstream(UpstreamGrad::PerRow(&g));
    let separate = check_every_path("separate", &spec, &batch, StagingOptions::default());
    let in_place = check_every_path(
        "in place",
        &spec,
        &batch,
        StagingOptions {
            gradient: Gradient::InPlace,
            ..Default::default()
        },
    );
    assert_eq!(separate.grad, in_place.grad);
}

#[test]
fn accuracy_counts_argmax_hits() {
    let shape = Shape::matrix(50, 40).unwrap();
    let x = logits(shape.elements(), 1.0, 24);
    // Half the labels are the argmax, some rows ignored.
    let y: Vec<i32> = (0..50)
        .map(|r| {
            let row = &x[r * 40..(r + 1) * 40];
            let arg = (0..40).fold(0, |b, c| if row[c] > row[b] { c } else { b });
            if r % 10 == 9 {
                -100
            } else if r % 2 == 0 {
                arg as i32
            } else {
                ((arg + 1) % 40) as i32
            }
        })
        .collect();
    let out = check_every_path(
        "accuracy",
        &LossSpec::default(),
        &Batch::classes(shape, &x, &y),
        StagingOptions {
            accuracy: true,
            ..Default::default()
        },
    );
    assert_eq!(out.correct, Some(25));
}

#[test]
fn gpu_reports_the_first_bad_label() {
    let shape = Shape::matrix(3000, 10).unwrap();
    let x = logits(shape.elements(), 1.0, 25);
    let mut y = labels(3000, 10, 0, 26);
    y[1500] = 10;
    y[2900] = -7;
    y[2000] = 12;
    let g = gpu();
    let err = g
        .kernel
        .compute(
            &g.queue,
            &LossSpec::default(),
            &Batch::classes(shape, &x, &y),
            &StagingOptions::default(),
        )
        .unwrap_err();
    assert_eq!(
        err,
        LsceError::LabelOutOfRange {
            row: 1500,
            label: 10,
            classes: 10
        }
    );
    // Found in a later window too.
    let err = g
        .kernel
        .compute(
            &g.queue,
            &LossSpec::default(),
            &Batch::classes(shape, &x, &y[..]),
            &StagingOptions {
                max_binding_bytes: Some(40 * 600),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(
        err,
        LsceError::LabelOutOfRange {
            row: 1500,
            label: 10,
            classes: 10
        }
    );
}

#[test]
fn everything_together() {
    let shape = Shape::class_dim1(&[4, 33, 6]).unwrap();
    let x = logits(shape.elements(), 6.0, 27);
    let y = labels(shape.rows(), 33, 5, 28);
    let mut rng = Rng::new(29);
    let w: Vec<f32> = (0..33).map(|_| (rng.uniform() as f32) + 0.2).collect();
    let spec = LossSpec::default()
        .with_smoothing(Smoothing::OffTarget(0.15))
        .with_excluded_class(Some(0))
        .with_ignore_index(Some(-100))
        .with_z_loss(1e-3)
        .with_softcap(Some(10.0))
        .with_logit_scale(1.3);
    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        let spec = spec.with_reduction(reduction);
        let upstream = [0.7f32];
        let per_row: Vec<f32> = (0..shape.rows()).map(|r| 1.0 + r as f32 * 0.01).collect();
        let g = if reduction == Reduction::None {
            UpstreamGrad::PerRow(&per_row)
        } else {
            UpstreamGrad::Scalar(upstream[0])
        };
        let batch = Batch::classes(shape, &x, &y)
            .with_weights(&w)
            .with_upstream(g);
        check_every_path(
            &format!("together {reduction:?}"),
            &spec,
            &batch,
            StagingOptions {
                accuracy: true,
                ..Default::default()
            },
        );
    }
}
