//! Both reduction paths on the backends CI has: Vulkan (lavapipe, with Features::SUBGROUP, so
//! the subgroup reductions run) and GL (llvmpipe through EGL, no subgroups: the
//! workgroup-memory fallback is the only path). A missing adapter fails the test with what to
//! install; nothing here passes without running.

mod common;

use common::{check, gl, vulkan, Errors, Gpu, Rng};
use lsce::{
    Batch, Gradient, KernelConfig, LossKernel, LossSpec, LsceError, Reduction, Shape,
    StagingOptions, UpstreamGrad,
};

/// The subgroup path must really run somewhere in CI: lavapipe has Features::SUBGROUP.
#[test]
fn vulkan_runs_the_subgroup_path() {
    let g = vulkan();
    assert!(
        g.device.features().contains(wgpu::Features::SUBGROUP),
        "the Vulkan adapter {} lacks Features::SUBGROUP, so the subgroup reductions are untested",
        g.name
    );
    assert!(g.kernel.uses_subgroups(), "{}", g.name);
    assert!(!g.fallback.uses_subgroups());
    let mut rng = Rng::new(41);
    let (rows, k) = (33u32, 1000u32);
    let shape = Shape::matrix(rows, k).unwrap();
    let logits = rng.logits((rows * k) as usize, 3.0);
    let labels = rng.labels(rows as usize, k, -100, 0.1);
    let mut errors = Errors::default();
    for (path, kernel) in g.kernels() {
        errors.merge(check(
            &format!("vulkan {path}"),
            g,
            kernel,
            &LossSpec::pytorch(0.1),
            &Batch::classes(shape, &logits, &labels),
            &StagingOptions::default(),
        ));
    }
    errors.report("vulkan subgroup + workgroup");
}

/// GL has no subgroups: the kernel must pick the workgroup-memory reductions by itself.
#[test]
fn gl_runs_the_workgroup_fallback() {
    let g = gl();
    assert!(!g.device.features().contains(wgpu::Features::SUBGROUP));
    assert!(!g.kernel.uses_subgroups(), "{}", g.name);
    // Asking for subgroups where there are none is not an error: the fallback is used.
    let k = LossKernel::with_config(
        &g.device,
        KernelConfig {
            use_subgroups: true,
            ..KernelConfig::for_device(&g.device)
        },
    )
    .unwrap();
    assert!(!k.uses_subgroups());
}

#[test]
fn gl_conventions_reductions_and_shapes() {
    let g = gl();
    let streaming = LossKernel::with_config(
        &g.device,
        KernelConfig {
            row_cache: 1,
            ..KernelConfig::for_device(&g.device)
        },
    )
    .unwrap();
    let kernels = [("gl", &g.kernel), ("gl streaming", &streaming)];
    let mut rng = Rng::new(42);
    let mut errors = Errors::default();
    for (rows, k) in [(1u32, 1u32), (7, 2), (40, 33), (12, 1000), (3, 32000)] {
        let shape = Shape::matrix(rows, k).unwrap();
        let logits = rng.logits((rows * k) as usize, 3.0);
        let labels = rng.labels(rows as usize, k, -100, if rows > 1 { 0.15 } else { 0.0 });
        let weights = rng.weights(k as usize);
        let per_row: Vec<f32> = (0..rows).map(|_| rng.range(-2.0, 2.0) as f32).collect();
        for eps in [0.0f32, 0.1, 0.9, 1.0] {
            for (name, spec) in common::conventions(eps, k.max(2)) {
                if k < 2 && spec.excluded_class.is_some() {
                    continue;
                }
                for (reduction, upstream, weighted) in [
                    (Reduction::Mean, UpstreamGrad::One, true),
                    (Reduction::Sum, UpstreamGrad::Scalar(-0.5), false),
                    (Reduction::None, UpstreamGrad::PerRow(&per_row), false),
                ] {
                    let spec = spec
                        .with_reduction(reduction)
                        .with_z_loss(1e-3)
                        .with_softcap(weighted.then_some(15.0));
                    let mut batch = Batch::classes(shape, &logits, &labels).with_upstream(upstream);
                    if weighted {
                        batch = batch.with_weights(&weights);
                    }
                    let options = StagingOptions {
                        accuracy: true,
                        ..StagingOptions::default()
                    };
                    for (path, kernel) in kernels {
                        let what = format!("{name} eps={eps} {reduction:?} {rows}x{k} {path}");
                        errors.merge(check(&what, g, kernel, &spec, &batch, &options));
                    }
                }
            }
        }
    }
    errors.report("GL conventions/reductions/shapes");
}

#[test]
fn gl_ignored_rows_extremes_windows_probabilities() {
    let g = gl();
    let mut rng = Rng::new(43);
    let mut errors = Errors::default();
    let k = 64u32;
    // Every row ignored.
    let shape = Shape::matrix(5, k).unwrap();
    let logits = rng.logits(5 * k as usize, 2.0);
    let ignored = [-100; 5];
    let batch = Batch::classes(shape, &logits, &ignored);
    let out = g
        .kernel
        .compute(
            &g.queue,
            &LossSpec::pytorch(0.1),
            &batch,
            &StagingOptions::default(),
        )
        .unwrap();
    assert!(out.loss[0].is_nan());
    assert!(out.grad.unwrap().iter().all(|&v| v == 0.0));
    errors.merge(check(
        "all ignored",
        g,
        &g.kernel,
        &LossSpec::pytorch(0.1),
        &batch,
        &StagingOptions::default(),
    ));

    // Extreme logits, per row.
    let mut logits = rng.logits(6 * k as usize, 2.0);
    let ku = k as usize;
    for (c, x) in logits[..ku].iter_mut().enumerate() {
        *x = if c % 2 == 0 { 1e4 } else { -1e4 };
    }
    logits[ku + 5] = f32::NEG_INFINITY;
    logits[2 * ku + 7] = f32::NAN;
    logits[3 * ku..4 * ku].fill(2.5);
    logits[4 * ku] = f32::NEG_INFINITY;
    let labels = [0, 1, 2, 3, 4, 5];
    let shape = Shape::matrix(6, k).unwrap();
    for eps in [0.0, 0.1] {
        let spec = LossSpec::pytorch(eps).with_reduction(Reduction::None);
        let batch = Batch::classes(shape, &logits, &labels);
        errors.merge(check(
            &format!("extremes eps={eps}"),
            g,
            &g.kernel,
            &spec,
            &batch,
            &StagingOptions::default(),
        ));
        let out = g
            .kernel
            .compute(&g.queue, &spec, &batch, &StagingOptions::default())
            .unwrap();
        assert!(out.loss[2].is_nan() && out.loss[5].is_finite());
        assert_eq!(out.loss[1].is_finite(), eps == 0.0);
    }

    // Small windows, in place, probability targets.
    let (rows, k) = (300u32, 257u32);
    let shape = Shape::matrix(rows, k).unwrap();
    let logits = rng.logits((rows * k) as usize, 3.0);
    let labels = rng.labels(rows as usize, k, -100, 0.1);
    let probs = rng.probabilities(rows as usize, k as usize, false);
    let spec = LossSpec::pytorch(0.1).with_z_loss(1e-3);
    for gradient in [Gradient::Separate, Gradient::InPlace] {
        let options = StagingOptions {
            gradient,
            max_binding_bytes: Some(20_000),
            ..StagingOptions::default()
        };
        for batch in [
            Batch::classes(shape, &logits, &labels),
            Batch::probabilities(shape, &logits, &probs),
        ] {
            errors.merge(check(
                &format!("windows {gradient:?}"),
                g,
                &g.kernel,
                &spec,
                &batch,
                &options,
            ));
        }
    }
    // A bad label in a later window.
    let mut bad = labels.clone();
    bad[250] = 999;
    bad[280] = -3;
    let err = g
        .kernel
        .compute(
            &g.queue,
            &spec,
            &Batch::classes(shape, &logits, &bad),
            &StagingOptions {
                max_binding_bytes: Some(20_000),
                ..StagingOptions::default()
            },
        )
        .unwrap_err();
    assert_eq!(
        err,
        LsceError::LabelOutOfRange {
            row: 250,
            label: 999,
            classes: k
        }
    );
    errors.report("GL ignore/extremes/windows/probabilities");
}

/// The same input on both backends (and both paths of Vulkan) within the sum of their bounds,
/// and bitwise repeatable on each.
#[test]
fn backends_agree_and_repeat() {
    let (vk, gl) = (vulkan(), gl());
    let mut rng = Rng::new(44);
    let (rows, k) = (200u32, 500u32);
    let shape = Shape::matrix(rows, k).unwrap();
    let logits = rng.logits((rows * k) as usize, 3.0);
    let labels = rng.labels(rows as usize, k, -100, 0.1);
    let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::None);
    let batch = Batch::classes(shape, &logits, &labels);
    let options = StagingOptions::default();
    let run =
        |g: &Gpu, kernel: &LossKernel| kernel.compute(&g.queue, &spec, &batch, &options).unwrap();
    let outs = [
        run(vk, &vk.kernel),
        run(vk, &vk.fallback),
        run(gl, &gl.kernel),
    ];
    for (i, g, kernel) in [
        (0, vk, &vk.kernel),
        (1, vk, &vk.fallback),
        (2, gl, &gl.kernel),
    ] {
        let again = run(g, kernel);
        assert_eq!(
            common::bits(&again.loss),
            common::bits(&outs[i].loss),
            "run {i}"
        );
        assert_eq!(
            common::bits(again.grad.as_ref().unwrap()),
            common::bits(outs[i].grad.as_ref().unwrap()),
            "run {i}"
        );
    }
    let r = common::reference(&spec, &batch, lsce::Gradient::Separate, vk.kernel.config());
    for (i, out) in outs.iter().enumerate() {
        common::compare_outputs(&format!("backend run {i}"), out, &r);
    }
}
