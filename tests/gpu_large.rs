//! Inputs larger than one storage binding (row windows), one real 4096 x 32000 f32 matrix
//! (524 MB, four windows on lavapipe's 128 MiB bindings) and 70000 rows (more than 65535
//! workgroups in one dimension).

mod common;

use common::{assert_close, check, gpu, reference_for, Errors, Rng};
use lsce::{
    cpu, Batch, Gradient, KernelConfig, LossKernel, LossSpec, LsceError, Problem, Reduction, Shape,
    Smoothing, StagingOptions, TargetKind, UpstreamGrad,
};

/// 1000 rows of 257 classes in windows of at most 40 kB: 38 rows per window, 27 windows, whose
/// starts are not aligned to the binding offset alignment (each row is 1028 bytes).
#[test]
fn forced_small_windows() {
    let g = gpu();
    let mut rng = Rng::new(21);
    let (rows, k) = (1000usize, 257u32);
    let shape = Shape::matrix(rows as u32, k).unwrap();
    let logits = rng.logits(rows * k as usize, 3.0);
    let labels = rng.labels(rows, k, -100, 0.1);
    let weights = rng.weights(k as usize);
    let probs = rng.probabilities(rows, k as usize, false);
    let per_row: Vec<f32> = (0..rows).map(|_| rng.range(-2.0, 2.0) as f32).collect();
    let max_binding_bytes = Some(40_000);
    let mut errors = Errors::default();
    let spec = LossSpec::pytorch(0.1)
        .with_z_loss(1e-3)
        .with_softcap(Some(12.0));
    for (name, spec, weighted, upstream) in [
        ("mean weighted", spec, true, UpstreamGrad::Scalar(0.5)),
        (
            "sum",
            spec.with_reduction(Reduction::Sum),
            false,
            UpstreamGrad::One,
        ),
        (
            "none per-row",
            spec.with_reduction(Reduction::None),
            true,
            UpstreamGrad::PerRow(&per_row),
        ),
    ] {
        for soft in [false, true] {
            let problem = Problem::new(spec, shape)
                .with_targets(if soft {
                    TargetKind::Probabilities
                } else {
                    TargetKind::Classes
                })
                .with_max_binding_bytes(max_binding_bytes);
            let windows = g.kernel.plan(&problem).unwrap().windows();
            // Probability targets bind rows * classes targets too; same window count.
            assert_eq!(windows, rows.div_ceil(38), "{name}");
            let mut batch = if soft {
                Batch::probabilities(shape, &logits, &probs)
            } else {
                Batch::classes(shape, &logits, &labels)
            }
            .with_upstream(upstream);
            if weighted {
                batch = batch.with_weights(&weights);
            }
            for gradient in [Gradient::Separate, Gradient::InPlace, Gradient::None] {
                let options = StagingOptions {
                    gradient,
                    accuracy: !soft,
                    max_binding_bytes,
                    ..StagingOptions::default()
                };
                for (path, kernel) in g.kernels() {
                    let what = format!("{windows} windows {name} soft={soft} {gradient:?} {path}");
                    errors.merge(check(&what, g, kernel, &spec, &batch, &options));
                }
            }
        }
    }
    errors.report("forced windows");

    // A bad label in a later window is reported with its global row, the first one.
    let mut bad = labels.clone();
    bad[977] = k as i32;
    bad[501] = -7;
    let options = StagingOptions {
        max_binding_bytes,
        ..StagingOptions::default()
    };
    for (path, kernel) in g.kernels() {
        let err = kernel
            .compute(
                &g.queue,
                &spec,
                &Batch::classes(shape, &logits, &bad),
                &options,
            )
            .unwrap_err();
        assert_eq!(
            err,
            LsceError::LabelOutOfRange {
                row: 501,
                label: -7,
                classes: k
            },
            "{path}"
        );
    }
}

/// A real 4096 x 32000 f32 matrix (524 MB): larger than lavapipe's 128 MiB binding limit, so
/// the crate windows it itself. The reference runs without gradient on every row (loss and
/// lse of all 4096 rows) and with gradient on 48 sampled rows, whose sub-batch gradient is
/// scaled by the full batch's denominator.
#[test]
fn real_4096_by_32000() {
    let g = gpu();
    let mut rng = Rng::new(22);
    let (rows, k) = (4096usize, 32000u32);
    let shape = Shape::matrix(rows as u32, k).unwrap();
    let logits = rng.logits(rows * k as usize, 2.0);
    let labels = rng.labels(rows, k, -100, 0.05);
    let spec = LossSpec::pytorch(0.1).with_z_loss(1e-4);
    let windows = g.kernel.plan(&Problem::new(spec, shape)).unwrap().windows();
    let binding = g.device.limits().max_storage_buffer_binding_size;
    if (rows * k as usize * 4) as u64 > binding {
        assert!(windows > 1, "{windows} windows for {binding}-byte bindings");
    }
    let batch = Batch::classes(shape, &logits, &labels);
    let out = g
        .kernel
        .compute(&g.queue, &spec, &batch, &StagingOptions::default())
        .expect("4096 x 32000 on the GPU");

    // Loss and lse of every row, without gradient.
    let full = cpu::compute(
        &spec.with_reduction(Reduction::None),
        &batch,
        lsce::Gradient::None,
    )
    .unwrap();
    let per_row = reference_for(
        &spec.with_reduction(Reduction::None),
        &batch,
        full.clone(),
        g.kernel.config(),
        None,
    );
    let (lse_err, lse_ratio) =
        assert_close("4096x32000 lse", &out.lse, &full.lse, &per_row.lse_tol);
    let denominator = full.denominator;
    assert_eq!(f64::from(out.denominator), denominator);
    let mean: f64 = full.loss.iter().sum::<f64>() / denominator;
    // The mean's bound: per-row bounds summed, the chunked reduction's error, the division.
    let chunks = (rows as f64 / 1024.0).ceil();
    let abs: f64 = full.loss.iter().map(|v| v.abs()).sum();
    let tol = common::SAFETY
        * ((per_row.loss_tol.iter().sum::<f64>() + (20.0 + chunks / 256.0) * common::E * abs)
            / denominator
            + 2.0 * common::E * mean.abs());
    let (loss_err, loss_ratio) = assert_close("4096x32000 mean loss", &out.loss, &[mean], &[tol]);

    // Gradient on sampled rows (first, last, window edges, random).
    let grad = out.grad.as_ref().unwrap();
    let mut sample: Vec<usize> = vec![0, 1, rows - 1, rows / 4, rows / 4 - 1, rows / 2];
    sample.extend((0..42).map(|_| rng.below(rows as u32) as usize));
    sample.sort_unstable();
    sample.dedup();
    let ku = k as usize;
    let sub_logits: Vec<f32> = sample
        .iter()
        .flat_map(|&r| logits[r * ku..(r + 1) * ku].iter().copied())
        .collect();
    let sub_labels: Vec<i32> = sample.iter().map(|&r| labels[r]).collect();
    let sub_shape = Shape::matrix(sample.len() as u32, k).unwrap();
    let sub = Batch::classes(sub_shape, &sub_logits, &sub_labels);
    // The sub-batch's Sum gradient divided by the full denominator is the full Mean gradient.
    let sum_spec = spec.with_reduction(Reduction::Sum);
    let mut sub_out = cpu::compute(&sum_spec, &sub, lsce::Gradient::Separate).unwrap();
    for v in sub_out.grad.as_mut().unwrap() {
        *v /= denominator;
    }
    let sub_ref = reference_for(&spec, &sub, sub_out, g.kernel.config(), Some(denominator));
    let gpu_sub: Vec<f32> = sample
        .iter()
        .flat_map(|&r| grad[r * ku..(r + 1) * ku].iter().copied())
        .collect();
    let (grad_err, grad_ratio) = assert_close(
        "4096x32000 sampled gradient",
        &gpu_sub,
        sub_ref.out.grad.as_ref().unwrap(),
        sub_ref.grad_tol.as_ref().unwrap(),
    );
    Errors {
        loss: loss_err,
        lse: lse_err,
        grad: grad_err,
        ratio: lse_ratio.max(loss_ratio).max(grad_ratio),
        compared: rows + 1 + gpu_sub.len(),
    }
    .report(&format!("4096x32000 ({windows} windows)"));
}

/// 70000 rows: more than 65535 workgroups, so the kernels' 2D dispatch is exercised, and
/// 69 reduction chunks. Lavapipe runs a 256-invocation workgroup per row slowly (~5 s for
/// 70000 rows), so the default configuration runs once and the other cases use 32-invocation
/// workgroups (the same dispatch and reduction code, 8 times fewer invocations).
#[test]
fn rows_70000() {
    let g = gpu();
    let mut rng = Rng::new(23);
    let rows = 70000usize;
    let small = |use_subgroups| {
        LossKernel::with_config(
            &g.device,
            KernelConfig {
                row_workgroup: 32,
                row_cache: 4,
                use_subgroups,
                // A workgroup per row, one launched per row: 70000 of them, past the 65535
                // of one dispatch dimension.
                subgroup_rows_max_classes: 0,
                max_row_workgroups: None,
                min_row_teams: 1,
            },
        )
        .unwrap()
    };
    let (small_sg, small_wg) = (small(true), small(false));
    let mut errors = Errors::default();
    for k in [2u32, 31] {
        let shape = Shape::matrix(rows as u32, k).unwrap();
        let logits = rng.logits(rows * k as usize, 2.0);
        let labels = rng.labels(rows, k, -100, 0.1);
        let per_row: Vec<f32> = (0..rows).map(|_| rng.range(-1.0, 1.0) as f32).collect();
        for (reduction, upstream) in [
            (Reduction::Mean, UpstreamGrad::One),
            (Reduction::None, UpstreamGrad::PerRow(&per_row)),
        ] {
            let spec = LossSpec::default()
                .with_smoothing(Smoothing::OffTarget(0.1))
                .with_reduction(reduction);
            let batch = Batch::classes(shape, &logits, &labels).with_upstream(upstream);
            let options = StagingOptions {
                accuracy: true,
                ..StagingOptions::default()
            };
            let mut kernels = vec![("32 subgroup", &small_sg), ("32 workgroup", &small_wg)];
            if k == 2 && reduction == Reduction::Mean {
                kernels.push(("default", &g.kernel));
            }
            for (path, kernel) in kernels {
                let what = format!("70000x{k} {reduction:?} {path}");
                errors.merge(check(&what, g, kernel, &spec, &batch, &options));
            }
        }
        // The last row's bad label is found past the first 65535 rows.
        let mut bad = labels.clone();
        bad[rows - 1] = k as i32 + 3;
        let err = small_sg
            .compute(
                &g.queue,
                &LossSpec::default(),
                &Batch::classes(shape, &logits, &bad),
                &StagingOptions::default(),
            )
            .unwrap_err();
        assert_eq!(
            err,
            LsceError::LabelOutOfRange {
                row: rows as u64 - 1,
                label: k as i32 + 3,
                classes: k
            }
        );
    }
    errors.report("70000 rows");
}
