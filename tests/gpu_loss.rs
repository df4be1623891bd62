//! GPU loss, lse and gradient against the CPU reference: every smoothing convention and eps,
//! every reduction, ignore_index variants, upstream gradients, weights / soft-cap / z-loss /
//! logit scale / probability targets, the class and row counts of the issue, extreme logits,
//! determinism, accuracy, and kernel configurations on both sides of the cached/streaming and
//! subgroup/workgroup switches. Bounds: see tests/common/mod.rs.

mod common;

use common::{bits, check, gpu, Errors, Gpu, Rng};
use lsce::{
    Batch, KernelConfig, LossKernel, LossSpec, Reduction, Shape, Smoothing, StagingOptions,
    UpstreamGrad,
};

/// A kernel whose rows of more than one logit per invocation take the streaming (two-sweep) path.
fn streaming_kernel(g: &Gpu) -> LossKernel {
    LossKernel::with_config(
        &g.device,
        KernelConfig {
            row_cache: 1,
            ..KernelConfig::for_device(&g.device)
        },
    )
    .unwrap()
}

fn opts() -> StagingOptions {
    StagingOptions {
        accuracy: true,
        ..StagingOptions::default()
    }
}

#[test]
fn every_smoothing_convention_and_eps() {
    let g = gpu();
    let streaming = streaming_kernel(g);
    let mut kernels = g.kernels();
    kernels.push(("streaming", &streaming));
    let mut rng = Rng::new(1);
    let mut errors = Errors::default();
    for (rows, k) in [(64usize, 33u32), (16, 1000)] {
        let shape = Shape::matrix(rows as u32, k).unwrap();
        let logits = rng.logits(rows * k as usize, 3.0);
        let mut labels = rng.labels(rows, k, -100, 0.15);
        // The excluded classes as labels too (defined: q = on there).
        labels[1] = 0;
        labels[2] = k as i32 - 1;
        labels[3] = k as i32 / 2;
        for eps in [0.0f32, 0.1, 0.9, 1.0] {
            for (name, spec) in common::conventions(eps, k) {
                for reduction in [Reduction::Mean, Reduction::None] {
                    let spec = spec.with_reduction(reduction);
                    let batch = Batch::classes(shape, &logits, &labels);
                    for (path, kernel) in &kernels {
                        let what = format!("{name} eps={eps} {reduction:?} K={k} {path}");
                        errors.merge(check(&what, g, kernel, &spec, &batch, &opts()));
                    }
                }
            }
        }
    }
    errors.report("conventions x eps");
}

#[test]
fn reductions_ignore_index_and_upstream() {
    let g = gpu();
    let mut rng = Rng::new(2);
    let (rows, k) = (2500usize, 257u32); // 3 reduction chunks of 1024 rows
    let shape = Shape::matrix(rows as u32, k).unwrap();
    let logits = rng.logits(rows * k as usize, 2.0);
    let per_row: Vec<f32> = (0..rows).map(|_| rng.range(-2.0, 2.0) as f32).collect();
    let mut errors = Errors::default();
    for (ignore_name, ignore, ignore_frac) in [
        ("default -100", Some(-100), 0.2),
        ("custom -1", Some(-1), 0.3),
        ("custom 5 (a class)", Some(5), 0.0),
        ("none", None, 0.0),
    ] {
        let mut labels = rng.labels(rows, k, ignore.unwrap_or(0), ignore_frac);
        if ignore == Some(5) {
            for l in labels.iter_mut().step_by(4) {
                *l = 5;
            }
        }
        for (reduction, upstream) in [
            (Reduction::None, UpstreamGrad::One),
            (Reduction::None, UpstreamGrad::PerRow(&per_row)),
            (Reduction::Sum, UpstreamGrad::One),
            (Reduction::Sum, UpstreamGrad::Scalar(-1.75)),
            (Reduction::Mean, UpstreamGrad::One),
            (Reduction::Mean, UpstreamGrad::Scalar(0.37)),
        ] {
            let spec = LossSpec::pytorch(0.1)
                .with_ignore_index(ignore)
                .with_reduction(reduction);
            let batch = Batch::classes(shape, &logits, &labels).with_upstream(upstream);
            for (path, kernel) in g.kernels() {
                let what = format!(
                    "ignore {ignore_name} {reduction:?} {} {path}",
                    match upstream {
                        UpstreamGrad::One => "upstream 1",
                        UpstreamGrad::Scalar(_) => "upstream scalar",
                        UpstreamGrad::PerRow(_) => "upstream per row",
                    }
                );
                errors.merge(check(&what, g, kernel, &spec, &batch, &opts()));
            }
        }
    }
    errors.report("reductions x ignore x upstream");
}

/// Every row ignored: the mean is 0/0 = NaN (as PyTorch), the sum 0, the gradient all zeros.
#[test]
fn all_rows_ignored() {
    let g = gpu();
    let mut rng = Rng::new(3);
    for (rows, k) in [(7usize, 31u32), (1000, 300)] {
        let shape = Shape::matrix(rows as u32, k).unwrap();
        let logits = rng.logits(rows * k as usize, 2.0);
        let weights = rng.weights(k as usize);
        for (ignore, label) in [(Some(-100), -100), (Some(3), 3)] {
            let labels = vec![label; rows];
            for weighted in [false, true] {
                for (path, kernel) in g.kernels() {
                    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                        let spec = LossSpec::pytorch(0.1)
                            .with_ignore_index(ignore)
                            .with_z_loss(1e-3)
                            .with_reduction(reduction);
                        let mut batch = Batch::classes(shape, &logits, &labels);
                        if weighted {
                            batch = batch.with_weights(&weights);
                        }
                        let what = format!("all ignored {rows}x{k} {reduction:?} {path}");
                        check(&what, g, kernel, &spec, &batch, &opts());
                        let out = kernel.compute(&g.queue, &spec, &batch, &opts()).unwrap();
                        let grad = out.grad.unwrap();
                        assert!(grad.iter().all(|&v| v == 0.0), "{what}: gradient not all 0");
                        assert!(out.lse.iter().all(|&v| v == 0.0), "{what}: lse not all 0");
                        assert_eq!(out.denominator, 0.0, "{what}");
                        assert_eq!(out.correct, Some(0), "{what}");
                        match reduction {
                            Reduction::Mean => {
                                assert!(out.loss[0].is_nan(), "{what}: mean {}", out.loss[0]);
                                assert!(out.z_loss[0].is_nan(), "{what}: z-loss {}", out.z_loss[0]);
                            }
                            Reduction::Sum => assert_eq!(out.loss, vec![0.0], "{what}"),
                            Reduction::None => assert_eq!(out.loss, vec![0.0; rows], "{what}"),
                        }
                    }
                }
            }
        }
    }
}

/// A per-row upstream gradient must scale each row by its own value. Liger-Kernel once read it
/// as a scalar (`grad_output[0]`): here row 0's value is 0, so such a kernel would zero every
/// row; the other values all differ, and the rows run in several windows so a wrong window
/// offset shows too.
#[test]
fn per_row_upstream_is_applied_per_row() {
    let g = gpu();
    let mut rng = Rng::new(4);
    let (rows, k) = (1000usize, 64u32);
    let shape = Shape::matrix(rows as u32, k).unwrap();
    let logits = rng.logits(rows * k as usize, 2.0);
    let labels = rng.labels(rows, k, -100, 0.1);
    let mut upstream: Vec<f32> = (0..rows).map(|r| (r % 13) as f32 * 0.37 - 2.0).collect();
    upstream[0] = 0.0;
    upstream[1] = 3.0;
    let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::None);
    let mut errors = Errors::default();
    for max_binding_bytes in [None, Some(64 * 1024)] {
        let options = StagingOptions {
            max_binding_bytes,
            ..opts()
        };
        let windows = g
            .kernel
            .plan(
                &lsce::Problem::new(spec, shape)
                    .with_upstream_grad(true)
                    .with_max_binding_bytes(max_binding_bytes),
            )
            .unwrap()
            .windows();
        assert_eq!(
            windows > 1,
            max_binding_bytes.is_some(),
            "windows: {windows}"
        );
        for (path, kernel) in g.kernels() {
            let batch = Batch::classes(shape, &logits, &labels);
            let scaled = batch.with_upstream(UpstreamGrad::PerRow(&upstream));
            let what = format!("per-row upstream, {windows} windows, {path}");
            errors.merge(check(&what, g, kernel, &spec, &scaled, &options));
            // Against the same kernel's unscaled gradient: row r must be upstream[r] times it
            // (two roundings apart: (x u) s vs (x s) u, so within 2 ulp, 4 E relative).
            let one = kernel.compute(&g.queue, &spec, &batch, &options).unwrap();
            let out = kernel.compute(&g.queue, &spec, &scaled, &options).unwrap();
            assert_eq!(
                bits(&one.loss),
                bits(&out.loss),
                "{what}: upstream changed the loss"
            );
            let (g1, gu) = (one.grad.unwrap(), out.grad.unwrap());
            for (r, &u) in upstream.iter().enumerate() {
                for c in 0..k as usize {
                    let i = r * k as usize + c;
                    let want = f64::from(g1[i]) * f64::from(u);
                    let got = f64::from(gu[i]);
                    assert!(
                        (got - want).abs() <= 4.0 * common::E * want.abs() + 1e-30,
                        "{what}: row {r} class {c}: {got} vs upstream {u} x {}",
                        g1[i]
                    );
                }
            }
        }
    }
    errors.report("per-row upstream");
}

#[test]
fn weights_softcap_z_loss_logit_scale() {
    let g = gpu();
    let streaming = streaming_kernel(g);
    let mut kernels = g.kernels();
    kernels.push(("streaming", &streaming));
    let mut rng = Rng::new(5);
    let per_row: Vec<f32> = (0..300).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let mut errors = Errors::default();
    for (rows, k) in [(300usize, 257u32), (5, 32000)] {
        let shape = Shape::matrix(rows as u32, k).unwrap();
        let logits = rng.logits(rows * k as usize, 4.0);
        let labels = rng.labels(rows, k, -100, 0.1);
        let weights = rng.weights(k as usize);
        let base = LossSpec::pytorch(0.1);
        let features: [(&str, LossSpec, bool); 6] = [
            ("weights", base, true),
            ("softcap 5", base.with_softcap(Some(5.0)), false),
            ("softcap 30", base.with_softcap(Some(30.0)), false),
            ("z_loss 1e-3", base.with_z_loss(1e-3), false),
            ("logit_scale 0.5", base.with_logit_scale(0.5), false),
            (
                "all + off_target + excluded",
                base.with_smoothing(Smoothing::OffTarget(0.2))
                    .with_excluded_class(Some(1))
                    .with_softcap(Some(8.0))
                    .with_z_loss(0.01)
                    .with_logit_scale(2.0),
                true,
            ),
        ];
        for (name, spec, weighted) in features {
            for (reduction, upstream) in [
                (Reduction::Mean, UpstreamGrad::Scalar(0.5)),
                (Reduction::Sum, UpstreamGrad::One),
                (Reduction::None, UpstreamGrad::PerRow(&per_row[..rows])),
            ] {
                let spec = spec.with_reduction(reduction);
                let mut batch = Batch::classes(shape, &logits, &labels).with_upstream(upstream);
                if weighted {
                    batch = batch.with_weights(&weights);
                }
                for (path, kernel) in &kernels {
                    let what = format!("{name} {reduction:?} {rows}x{k} {path}");
                    errors.merge(check(&what, g, kernel, &spec, &batch, &opts()));
                }
            }
        }
    }
    errors.report("weights/softcap/z_loss/scale");
}

#[test]
fn probability_targets() {
    let g = gpu();
    let streaming = streaming_kernel(g);
    let mut kernels = g.kernels();
    kernels.push(("streaming", &streaming));
    let mut rng = Rng::new(6);
    let mut errors = Errors::default();
    for (rows, k) in [(40usize, 33u32), (20, 1000), (3, 32000)] {
        let shape = Shape::matrix(rows as u32, k).unwrap();
        let logits = rng.logits(rows * k as usize, 3.0);
        let weights = rng.weights(k as usize);
        let per_row: Vec<f32> = (0..rows).map(|_| rng.range(-1.0, 1.0) as f32).collect();
        for normalised in [true, false] {
            let probs = rng.probabilities(rows, k as usize, normalised);
            for (name, spec) in common::conventions(0.1, k) {
                for (reduction, upstream, weighted) in [
                    (Reduction::Mean, UpstreamGrad::One, false),
                    (Reduction::Mean, UpstreamGrad::Scalar(2.0), true),
                    (Reduction::Sum, UpstreamGrad::One, true),
                    (Reduction::None, UpstreamGrad::PerRow(&per_row), false),
                ] {
                    let spec = spec
                        .with_reduction(reduction)
                        .with_softcap(weighted.then_some(10.0));
                    let mut batch =
                        Batch::probabilities(shape, &logits, &probs).with_upstream(upstream);
                    if weighted {
                        batch = batch.with_weights(&weights);
                    }
                    for (path, kernel) in &kernels {
                        let what = format!(
                            "probabilities {name} normalised={normalised} {reduction:?} \
                             weighted={weighted} {rows}x{k} {path}"
                        );
                        let options = StagingOptions::default();
                        errors.merge(check(&what, g, kernel, &spec, &batch, &options));
                    }
                }
            }
        }
    }
    errors.report("probability targets");
}

/// The class counts, each with 1 and 7 rows (and 1000 rows for the counts around the
/// workgroup size); the 70000-row case is in tests/gpu_large.rs.
#[test]
fn class_and_row_counts() {
    let g = gpu();
    let mut rng = Rng::new(7);
    let mut errors = Errors::default();
    let classes = [1u32, 2, 3, 31, 32, 33, 255, 256, 257, 1000, 32000, 128256];
    let mut cases: Vec<(u32, u32)> = classes.iter().flat_map(|&k| [(1, k), (7, k)]).collect();
    cases.extend([(1000, 255), (1000, 256), (1000, 1000)]);
    for (i, (rows, k)) in cases.into_iter().enumerate() {
        let shape = Shape::matrix(rows, k).unwrap();
        let logits = rng.logits((rows * k) as usize, 2.5);
        let labels = rng.labels(rows as usize, k, -100, if rows > 1 { 0.1 } else { 0.0 });
        let reduction = [Reduction::Mean, Reduction::None, Reduction::Sum][i % 3];
        let spec = LossSpec::pytorch(0.1).with_reduction(reduction);
        let batch = Batch::classes(shape, &logits, &labels);
        for (path, kernel) in g.kernels() {
            let what = format!("{rows}x{k} {reduction:?} {path}");
            let e = check(&what, g, kernel, &spec, &batch, &opts());
            errors.merge(e);
        }
    }
    errors.report("class x row counts");
}

/// Per-row behaviour of extreme logits (Reduction::None so every row is visible): +-1e4,
/// all-equal rows, -inf entries, NaN entries. NaN and infinity positions must match the
/// reference exactly (see common::assert_close), and the rows without them stay finite.
#[test]
fn extreme_logits() {
    let g = gpu();
    let streaming = streaming_kernel(g);
    let mut kernels = g.kernels();
    kernels.push(("streaming", &streaming));
    let mut rng = Rng::new(8);
    let ninf = f32::NEG_INFINITY;
    let mut errors = Errors::default();
    for k in [33usize, 1000] {
        let mut rows: Vec<(Vec<f32>, i32)> = Vec::new();
        let row = |rng: &mut Rng| rng.logits(k, 2.0);
        // 0, 1: +-1e4 with the label at +1e4 / at -1e4.
        let big: Vec<f32> = (0..k)
            .map(|c| if c % 3 == 0 { 1e4 } else { -1e4 })
            .collect();
        rows.push((big.clone(), 0));
        rows.push((big.clone(), 1));
        // 2, 3: all equal.
        rows.push((vec![3.0; k], 5));
        rows.push((vec![-1e4; k], 0));
        // 4: -inf on a non-target class; 5: on the target; 6: everywhere but the target.
        let mut r = row(&mut rng);
        r[7] = ninf;
        rows.push((r, 2));
        let mut r = row(&mut rng);
        r[4] = ninf;
        rows.push((r, 4));
        let mut r = vec![ninf; k];
        r[9] = 1.5;
        rows.push((r, 9));
        // 7: NaN on a non-target class; 8: NaN on the target.
        let mut r = row(&mut rng);
        r[k - 1] = f32::NAN;
        rows.push((r, 0));
        let mut r = row(&mut rng);
        r[3] = f32::NAN;
        rows.push((r, 3));
        // 9: plain; 10: ignored with NaN and -inf (not read); 11: -inf first (online max start).
        rows.push((row(&mut rng), 6));
        let mut r = row(&mut rng);
        r[0] = f32::NAN;
        r[1] = ninf;
        rows.push((r, -100));
        let mut r = row(&mut rng);
        r[0] = ninf;
        r[1] = ninf;
        rows.push((r, 8));
        let n = rows.len();
        let logits: Vec<f32> = rows.iter().flat_map(|(r, _)| r.iter().copied()).collect();
        let labels: Vec<i32> = rows.iter().map(|(_, y)| *y).collect();
        let shape = Shape::matrix(n as u32, k as u32).unwrap();
        let batch = Batch::classes(shape, &logits, &labels);
        for eps in [0.0f32, 0.1] {
            for (extra, spec) in [
                ("plain", LossSpec::pytorch(eps)),
                (
                    "softcap+zloss",
                    LossSpec::pytorch(eps)
                        .with_softcap(Some(20.0))
                        .with_z_loss(1e-4),
                ),
            ] {
                let spec = spec.with_reduction(Reduction::None);
                for (path, kernel) in &kernels {
                    let what = format!("extreme K={k} eps={eps} {extra} {path}");
                    errors.merge(check(&what, g, kernel, &spec, &batch, &opts()));
                    let out = kernel.compute(&g.queue, &spec, &batch, &opts()).unwrap();
                    let grad = out.grad.unwrap();
                    let grad_row = |r: usize| &grad[r * k..(r + 1) * k];
                    // -inf on a non-target class: infinite loss iff eps > 0; finite gradient.
                    if eps > 0.0 {
                        assert_eq!(out.loss[4], f32::INFINITY, "{what}: row 4");
                    } else {
                        assert!(out.loss[4].is_finite(), "{what}: row 4 {}", out.loss[4]);
                    }
                    assert!(
                        grad_row(4).iter().all(|v| v.is_finite()),
                        "{what}: row 4 grad"
                    );
                    assert_eq!(out.loss[5], f32::INFINITY, "{what}: -inf at the target");
                    // NaN rows are NaN throughout; the others are untouched.
                    for r in [7, 8] {
                        assert!(out.loss[r].is_nan(), "{what}: row {r} loss {}", out.loss[r]);
                        assert!(
                            grad_row(r).iter().all(|v| v.is_nan()),
                            "{what}: row {r} grad"
                        );
                    }
                    for r in [0, 1, 2, 3, 9, 11] {
                        // Row 11 starts with -inf: an infinite loss for eps > 0, as row 4.
                        if r != 11 || eps == 0.0 {
                            assert!(
                                out.loss[r].is_finite(),
                                "{what}: row {r} loss {}",
                                out.loss[r]
                            );
                        }
                        assert!(grad_row(r).iter().all(|v| v.is_finite()), "{what}: row {r}");
                    }
                    assert_eq!(out.loss[10], 0.0, "{what}: ignored row");
                    assert!(
                        grad_row(10).iter().all(|&v| v == 0.0),
                        "{what}: ignored row"
                    );
                    // All-equal rows: lse = z + ln K, loss = ln K + z_loss lse^2 for every eps
                    // (A = 1 and B = z); the f32 error is a few ulp of lse (~1e-6).
                    let lse = lsce::cpu::transform(3.0, &spec).0 + (k as f64).ln();
                    let want = (k as f64).ln() + f64::from(spec.z_loss) * lse * lse;
                    assert!(
                        (f64::from(out.loss[2]) - want).abs() < 1e-5,
                        "{what}: {}",
                        out.loss[2]
                    );
                    assert!(
                        (f64::from(out.lse[2]) - lse).abs() < 1e-5,
                        "{what}: {}",
                        out.lse[2]
                    );
                }
            }
        }
    }
    errors.report("extreme logits");
}

/// The same input twice gives the same bits (no float atomics, fixed reduction order).
#[test]
fn deterministic_bits() {
    let g = gpu();
    let streaming = streaming_kernel(g);
    let mut kernels = g.kernels();
    kernels.push(("streaming", &streaming));
    let mut rng = Rng::new(9);
    for (rows, k) in [(2100u32, 257u32), (9, 32000)] {
        let shape = Shape::matrix(rows, k).unwrap();
        let logits = rng.logits((rows * k) as usize, 3.0);
        let labels = rng.labels(rows as usize, k, -100, 0.1);
        let weights = rng.weights(k as usize);
        let spec = LossSpec::pytorch(0.1).with_z_loss(1e-3);
        let batch = Batch::classes(shape, &logits, &labels).with_weights(&weights);
        for (path, kernel) in &kernels {
            let a = kernel.compute(&g.queue, &spec, &batch, &opts()).unwrap();
            let b = kernel.compute(&g.queue, &spec, &batch, &opts()).unwrap();
            let what = format!("{rows}x{k} {path}");
            assert_eq!(bits(&a.loss), bits(&b.loss), "{what}: loss bits differ");
            assert_eq!(
                bits(&a.z_loss),
                bits(&b.z_loss),
                "{what}: z-loss bits differ"
            );
            assert_eq!(bits(&a.lse), bits(&b.lse), "{what}: lse bits differ");
            assert_eq!(
                bits(&a.grad.unwrap()),
                bits(&b.grad.unwrap()),
                "{what}: gradient bits differ"
            );
            assert_eq!(a.denominator.to_bits(), b.denominator.to_bits(), "{what}");
            assert_eq!(a.correct, b.correct, "{what}");
        }
    }
}

/// The accuracy count: rows whose first argmax is the label, ties included (all-equal rows
/// count for class 0 only).
#[test]
fn accuracy_counts_first_argmax() {
    let g = gpu();
    let (rows, k) = (6u32, 5u32);
    let shape = Shape::matrix(rows, k).unwrap();
    let logits = [
        0.0, 1.0, 2.0, 3.0, 4.0, // argmax 4
        9.0, 1.0, 9.0, 3.0, 4.0, // tie: first is 0
        1.0, 1.0, 1.0, 1.0, 1.0, // all equal: 0
        1.0, 1.0, 1.0, 1.0, 1.0, // all equal, label 3: not counted
        5.0, 1.0, 7.0, 3.0, 4.0, // ignored
        -1.0, -1.0, -1.0, -0.5, -1.0, // argmax 3
    ];
    let labels = [4, 0, 0, 3, -100, 3];
    let batch = Batch::classes(shape, &logits, &labels);
    for (path, kernel) in g.kernels() {
        let out = kernel
            .compute(&g.queue, &LossSpec::default(), &batch, &opts())
            .unwrap();
        assert_eq!(out.correct, Some(4), "{path}");
    }
}

/// Workgroup sizes and register caches on both sides of every switch: K = W * cache is the
/// last cached row length, K = W * cache + 1 the first streamed one.
#[test]
fn kernel_configurations() {
    let g = gpu();
    let mut rng = Rng::new(10);
    let mut errors = Errors::default();
    // (workgroup, cache, subgroups, a subgroup per row, workgroups per dispatch, teams wanted:
    // rows of 9 split into parts when this exceeds 9 and the row is long enough)
    let configs = [
        (32, 1, true, false, None, 1),
        (32, 1, false, false, Some(3), 64),
        (64, 4, true, false, Some(1), 1),
        (128, 2, false, false, None, 1000),
        (1024, 1, true, false, None, 1),
        (256, 32, false, false, Some(2), 1),
        (64, 3, true, true, None, 1),
        (32, 1, true, true, Some(1), 1),
        (64, 2, true, true, Some(5), 400),
    ];
    for (wg, cache, sg, sg_rows, groups, min_teams) in configs {
        let config = KernelConfig {
            row_workgroup: wg,
            row_cache: cache,
            use_subgroups: sg,
            subgroup_rows_max_classes: if sg_rows { u32::MAX } else { 0 },
            max_row_workgroups: groups,
            min_row_teams: min_teams,
        };
        let kernel = LossKernel::with_config(&g.device, config).unwrap();
        // The team is the workgroup, or one subgroup (of the adapter's smallest size).
        let team = if sg_rows && kernel.uses_subgroups() {
            g.device.adapter_info().subgroup_min_size
        } else {
            wg
        };
        let edge = team * cache;
        for k in [1, 2, 31, 33, edge - 1, edge, edge + 1, 3 * edge + 7] {
            let rows = 9u32;
            let shape = Shape::matrix(rows, k).unwrap();
            let logits = rng.logits((rows * k) as usize, 3.0);
            let labels = rng.labels(rows as usize, k, -100, 0.1);
            let weights = rng.weights(k as usize);
            let spec = LossSpec::pytorch(0.2)
                .with_softcap(Some(15.0))
                .with_z_loss(1e-3);
            let batch = Batch::classes(shape, &logits, &labels).with_weights(&weights);
            let what = format!(
                "config {wg}x{cache} subgroups={sg} per-row={sg_rows} groups={groups:?} K={k}"
            );
            errors.merge(check(&what, g, &kernel, &spec, &batch, &opts()));
        }
    }
    errors.report("kernel configurations");
}

/// The reduced losses equal the sum / mean of the per-row losses of the same run.
#[test]
fn reductions_agree_with_each_other() {
    let g = gpu();
    let mut rng = Rng::new(12);
    let (rows, k) = (3000u32, 100u32);
    let shape = Shape::matrix(rows, k).unwrap();
    let logits = rng.logits((rows * k) as usize, 2.0);
    let labels = rng.labels(rows as usize, k, -100, 0.25);
    let batch = Batch::classes(shape, &logits, &labels);
    for (path, kernel) in g.kernels() {
        let run = |r| {
            kernel
                .compute(
                    &g.queue,
                    &LossSpec::pytorch(0.1).with_reduction(r),
                    &batch,
                    &opts(),
                )
                .unwrap()
        };
        let (none, sum, mean) = (
            run(Reduction::None),
            run(Reduction::Sum),
            run(Reduction::Mean),
        );
        let total: f64 = none.loss.iter().map(|&v| f64::from(v)).sum();
        let abs: f64 = none.loss.iter().map(|&v| f64::from(v).abs()).sum();
        // The GPU's chunked f32 sum vs an f64 sum of the same f32 values: (20 + 3/256) E sum|.|.
        let bound = 2.0 * 21.0 * common::E * abs;
        assert!(
            (f64::from(sum.loss[0]) - total).abs() <= bound,
            "{path}: sum"
        );
        let count = labels.iter().filter(|&&l| l != -100).count() as f64;
        assert_eq!(f64::from(mean.denominator), count, "{path}");
        assert!(
            (f64::from(mean.loss[0]) - total / count).abs() <= bound / count + 2.0 * common::E,
            "{path}: mean"
        );
        assert_eq!(
            bits(&none.lse),
            bits(&sum.lse),
            "{path}: lse depends on the reduction"
        );
    }
}

/// Rows `[B, B, 0, ..]` with label 0 and eps = 0 for B = 1e4 (the extreme), 1e8 and
/// 1e20: `exp(-B)` is 0 in any precision, so softmax is exactly (1/2, 1/2, 0, ..), the gradient
/// exactly (-1/2, 1/2, 0, ..) and the loss exactly ln 2, whatever the size of B. Every path
/// that forms the softmax from (max, sum) gets this to an ulp; one that forms it as
/// `exp(z - lse)` after rounding `lse = max + ln 2` does not (the ulp of 1e4 in f32 is 1e-3,
/// the ulp of 1e20 in f64 is 16384).
fn huge_rows(k: usize) -> Vec<(f32, Vec<f32>)> {
    [1e4f32, 1e8, 1e20]
        .iter()
        .map(|&b| {
            let mut logits = vec![0.0f32; 2 * k];
            logits[..2].fill(b);
            logits[k..k + 2].fill(b);
            logits[k + 2] = -b; // a second row with a far negative entry too
            (b, logits)
        })
        .collect()
}

/// See [`huge_rows`]. Every GPU path (cached, streaming, soft-cap) and the CPU reference form
/// the softmax as `exp(z - m) / s`; this guards against a return to `exp(z - lse)`.
#[test]
fn huge_logits_keep_an_exact_softmax_gradient() {
    let g = gpu();
    let k = 300usize;
    let streaming = streaming_kernel(g);
    let shape = Shape::matrix(2, k as u32).unwrap();
    let mut failures = Vec::new();
    for (b, logits) in huge_rows(k) {
        let batch = Batch::classes(shape, &logits, &[0, 0]);
        for (name, spec) in [
            ("plain", LossSpec::default().with_reduction(Reduction::None)),
            // The soft-cap path with tanh(1/2): the tied maxima stay tied.
            (
                "softcap 2B",
                LossSpec::default()
                    .with_reduction(Reduction::None)
                    .with_softcap(Some(2.0 * b)),
            ),
        ] {
            let mut grads: Vec<(String, Vec<f64>)> = vec![(
                "cpu".into(),
                lsce::cpu::compute(&spec, &batch, lsce::Gradient::Separate)
                    .unwrap()
                    .grad
                    .unwrap(),
            )];
            for (path, kernel) in [("cached", &g.kernel), ("streaming", &streaming)] {
                let out = kernel.compute(&g.queue, &spec, &batch, &opts()).unwrap();
                grads.push((
                    path.into(),
                    out.grad.unwrap().iter().map(|&v| f64::from(v)).collect(),
                ));
            }
            // dz/dx at B: 1 without a cap, 1 - tanh(1/2)^2 with cap 2B.
            let half = 0.5 * lsce::cpu::transform(f64::from(b), &spec).1;
            for (path, grad) in grads {
                for r in 0..2 {
                    let (g0, g1) = (grad[r * k], grad[r * k + 1]);
                    // An ulp of 1/2 in f32 is 6e-8.
                    if (g0 + half).abs() > 1e-6 || (g1 - half).abs() > 1e-6 {
                        failures.push(format!(
                            "B={b:e} {name} {path} row {r}: grad ({g0}, {g1}), want (-{half}, {half})"
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// See [`huge_rows`]: the loss is ln 2 exactly. PyTorch's `x - max - log(sum)` gets it to an
/// ulp in f32, and so does lsce's `A log s + sum a (max - z)`; the textbook `A * lse - B` loses
/// everything below the ulp of lse (1e-3 at 1e4, all of it at 1e8) to cancellation.
#[test]
fn huge_logits_keep_the_loss() {
    let g = gpu();
    let k = 300usize;
    let streaming = streaming_kernel(g);
    let shape = Shape::matrix(2, k as u32).unwrap();
    let spec = LossSpec::default().with_reduction(Reduction::None);
    let mut failures = Vec::new();
    for (b, logits) in huge_rows(k) {
        let batch = Batch::classes(shape, &logits, &[0, 0]);
        let mut losses: Vec<(String, Vec<f64>)> = vec![(
            "cpu".into(),
            lsce::cpu::compute(&spec, &batch, lsce::Gradient::None)
                .unwrap()
                .loss,
        )];
        for (path, kernel) in [("cached", &g.kernel), ("streaming", &streaming)] {
            let out = kernel.compute(&g.queue, &spec, &batch, &opts()).unwrap();
            losses.push((
                path.into(),
                out.loss.iter().map(|&v| f64::from(v)).collect(),
            ));
        }
        for (path, loss) in losses {
            for (r, l) in loss.iter().enumerate() {
                if (l - std::f64::consts::LN_2).abs() > 1e-6 {
                    failures.push(format!("B={b:e} {path} row {r}: loss {l}, want ln 2"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Soft-capping with a cap much larger than the logits is (nearly) the identity, and
/// `cap * tanh(x / cap)` must be as accurate as `x` is (PyTorch's tanh has an ulp of relative
/// error). `1 - 2 / (exp(2u) + 1)` alone cancels for small `u = x / cap` (an absolute error of
/// an ulp of 1, so z was off by ~`cap * E`: 1e-3 for cap 1e4, and cap 1e30 mapped every logit
/// to 0); the kernel's Taylor branch for small |u| must keep it accurate.
///
/// Bound: with an accurate transform the lse of these rows (|lse| < 20) is within a few ulp of
/// |lse| plus the sum's `(n1 + 16) E` (tests/common): under 1e-5.
#[test]
fn softcap_is_accurate_when_the_cap_is_large() {
    let g = gpu();
    let mut rng = Rng::new(13);
    let (rows, k) = (8u32, 33u32);
    let shape = Shape::matrix(rows, k).unwrap();
    let logits = rng.logits((rows * k) as usize, 3.0);
    let labels = rng.labels(rows as usize, k, -100, 0.0);
    let batch = Batch::classes(shape, &logits, &labels);
    let mut failures = Vec::new();
    for cap in [30.0f32, 1e4, 1e30] {
        let spec = LossSpec::default()
            .with_reduction(Reduction::None)
            .with_softcap(Some(cap));
        let cpu = lsce::cpu::compute(&spec, &batch, lsce::Gradient::None).unwrap();
        for (path, kernel) in g.kernels() {
            let out = kernel.compute(&g.queue, &spec, &batch, &opts()).unwrap();
            for r in 0..rows as usize {
                let err = (f64::from(out.lse[r]) - cpu.lse[r]).abs();
                // lse of a row: max + ln(sum); an accurate transform gives errors of a few ulp
                // of |lse| + the sum's (n1 + 16) E: under 1e-5 for |lse| < 20.
                if err > 1e-5 {
                    failures.push(format!(
                        "cap {cap:e} {path} row {r}: lse GPU {} CPU {} (|diff| {err:.2e})",
                        out.lse[r], cpu.lse[r]
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
