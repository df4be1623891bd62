//! Bad input: every invalid input gets its own `Err` (never a panic), from the CPU reference and
//! from the GPU paths alike (staging, plan, encode), and the GPU's is the CPU's.

mod common;

use common::{buffer_at, gpu, Gpu};
use lsce::{
    cpu, Batch, Gradient, KernelConfig, LossBuffers, LossKernel, LossSpec, LsceError, Problem,
    Reduction, Shape, Smoothing, StagingOptions, TargetKind, UpstreamGrad,
};

/// Runs a batch through the CPU reference and the GPU staging API and asserts both give
/// exactly `want`.
fn both_fail(what: &str, spec: &LossSpec, batch: &Batch<'_>, want: &LsceError) {
    let g = gpu();
    assert_eq!(
        cpu::compute(spec, batch, lsce::Gradient::Separate)
            .as_ref()
            .err(),
        Some(want),
        "{what}: CPU reference"
    );
    for (path, kernel) in g.kernels() {
        let got = kernel.compute(&g.queue, spec, batch, &StagingOptions::default());
        assert_eq!(
            got.as_ref().err(),
            Some(want),
            "{what}: GPU staging ({path})"
        );
    }
}

fn param(name: &'static str, value: f32, expected: &'static str) -> LsceError {
    LsceError::InvalidParameter {
        name,
        value,
        expected,
    }
}

#[test]
fn wrong_lengths() {
    let shape = Shape::matrix(3, 4).unwrap();
    let logits = [0.5f32; 12];
    let labels = [0, 1, 2];
    let spec = LossSpec::default();
    let mismatch = |what, expected, actual| LsceError::LengthMismatch {
        what,
        expected,
        actual,
    };
    both_fail(
        "logits too short",
        &spec,
        &Batch::classes(shape, &logits[..11], &labels),
        &mismatch("logits", 12, 11),
    );
    let long = [0.5f32; 13];
    both_fail(
        "logits too long",
        &spec,
        &Batch::classes(shape, &long, &labels),
        &mismatch("logits", 12, 13),
    );
    both_fail(
        "labels",
        &spec,
        &Batch::classes(shape, &logits, &labels[..2]),
        &mismatch("targets", 3, 2),
    );
    both_fail(
        "probabilities",
        &spec,
        &Batch::probabilities(shape, &logits, &[0.25; 3]),
        &mismatch("targets", 12, 3),
    );
    both_fail(
        "weights",
        &spec,
        &Batch::classes(shape, &logits, &labels).with_weights(&[1.0; 5]),
        &mismatch("weights", 4, 5),
    );
    both_fail(
        "per-row upstream",
        &spec.with_reduction(Reduction::None),
        &Batch::classes(shape, &logits, &labels).with_upstream(UpstreamGrad::PerRow(&[1.0; 2])),
        &mismatch("upstream", 3, 2),
    );
}

#[test]
fn empty_and_oversized_shapes() {
    assert_eq!(Shape::matrix(0, 5), Err(LsceError::EmptyShape));
    assert_eq!(Shape::matrix(5, 0), Err(LsceError::EmptyShape));
    assert_eq!(Shape::new(2, 3, 0), Err(LsceError::EmptyShape));
    assert!(matches!(
        Shape::new(1 << 16, 3, 1 << 16),
        Err(LsceError::ShapeTooLarge { .. })
    ));
    assert!(matches!(
        Shape::class_dim1(&[4]),
        Err(LsceError::Unsupported(_))
    ));

    // A shape whose logits exceed max_buffer_size: refused by the plan before any allocation.
    let g = gpu();
    let max = g.device.limits().max_buffer_size;
    let shape = Shape::matrix(1 << 20, 1 << 12).unwrap(); // 16 GiB of f32
    assert!(shape.elements() * 4 > max);
    let err = g
        .kernel
        .plan(&Problem::new(LossSpec::default(), shape))
        .unwrap_err();
    assert_eq!(
        err,
        LsceError::ExceedsDeviceLimit {
            limit: "max_buffer_size",
            needed: shape.elements() * 4,
            available: max,
        }
    );
    // One row larger than a storage binding cannot be windowed.
    let err = g
        .kernel
        .plan(
            &Problem::new(LossSpec::default(), Shape::matrix(4, 1000).unwrap())
                .with_max_binding_bytes(Some(2048)),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            LsceError::ExceedsDeviceLimit {
                limit: "max_storage_buffer_binding_size",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn invalid_spec_parameters() {
    let shape = Shape::matrix(2, 3).unwrap();
    let logits = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
    let labels = [0, 2];
    let batch = Batch::classes(shape, &logits, &labels);
    let base = LossSpec::default();
    let mut cases: Vec<(String, LossSpec, LsceError)> = Vec::new();
    for eps in [f32::NAN, -0.1, 1.01, f32::INFINITY, -f32::INFINITY] {
        for (name, s) in [
            ("uniform", Smoothing::Uniform(eps)),
            ("off_target", Smoothing::OffTarget(eps)),
        ] {
            cases.push((
                format!("{name} eps {eps}"),
                base.with_smoothing(s),
                LsceError::InvalidSmoothing(eps),
            ));
        }
    }
    for (on, off, which, value) in [
        (-0.5, 0.1, "on", -0.5),
        (0.9, -0.01, "off", -0.01),
        (f32::NAN, 0.1, "on", f32::NAN),
        (0.9, f32::INFINITY, "off", f32::INFINITY),
    ] {
        cases.push((
            format!("explicit on {on} off {off}"),
            base.with_smoothing(Smoothing::Explicit { on, off }),
            LsceError::InvalidTargetValue { which, value },
        ));
    }
    for cap in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        cases.push((
            format!("softcap {cap}"),
            base.with_softcap(Some(cap)),
            param("softcap", cap, "finite and > 0"),
        ));
    }
    for scale in [0.0, -2.0, f32::NAN, f32::INFINITY] {
        cases.push((
            format!("logit_scale {scale}"),
            base.with_logit_scale(scale),
            param("logit_scale", scale, "finite and > 0"),
        ));
    }
    for z in [-1e-3, f32::NAN, f32::INFINITY] {
        cases.push((
            format!("z_loss {z}"),
            base.with_z_loss(z),
            param("z_loss", z, "finite and >= 0"),
        ));
    }
    for class in [3, 100] {
        cases.push((
            format!("excluded class {class}"),
            base.with_excluded_class(Some(class)),
            LsceError::InvalidExcludedClass { class, classes: 3 },
        ));
    }
    for (what, spec, want) in &cases {
        // NaN values make the variants unequal to themselves: compare their debug text.
        let g = gpu();
        let cpu_err = cpu::compute(spec, &batch, lsce::Gradient::Separate).unwrap_err();
        assert_eq!(format!("{cpu_err:?}"), format!("{want:?}"), "{what}: CPU");
        let gpu_err = g
            .kernel
            .compute(&g.queue, spec, &batch, &StagingOptions::default())
            .unwrap_err();
        assert_eq!(
            format!("{gpu_err:?}"),
            format!("{want:?}"),
            "{what}: GPU staging"
        );
        let plan_err = g.kernel.plan(&Problem::new(*spec, shape)).unwrap_err();
        assert_eq!(format!("{plan_err:?}"), format!("{want:?}"), "{what}: plan");
        assert!(!want.to_string().is_empty());
    }
    // An excluded class needs K >= 2.
    let one = Shape::matrix(2, 1).unwrap();
    both_fail(
        "excluded with K = 1",
        &base.with_excluded_class(Some(0)),
        &Batch::classes(one, &logits[..2], &[0, 0]),
        &LsceError::InvalidExcludedClass {
            class: 0,
            classes: 1,
        },
    );
    // The boundaries themselves are valid.
    for spec in [
        base.with_smoothing(Smoothing::Uniform(0.0)),
        base.with_smoothing(Smoothing::OffTarget(1.0)),
        base.with_smoothing(Smoothing::Explicit { on: 0.0, off: 0.0 }),
        base.with_z_loss(0.0),
        base.with_excluded_class(Some(2)),
    ] {
        assert!(
            cpu::compute(&spec, &batch, lsce::Gradient::Separate).is_ok(),
            "{spec:?}"
        );
    }
}

#[test]
fn invalid_weights() {
    let shape = Shape::matrix(2, 3).unwrap();
    let logits = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
    let labels = [0, 2];
    for (weights, class, value) in [
        ([1.0, -0.5, 1.0], 1, -0.5f32),
        ([1.0, 1.0, f32::INFINITY], 2, f32::INFINITY),
        ([-0.0, 1.0, -1.0], 2, -1.0),
    ] {
        both_fail(
            &format!("weights {weights:?}"),
            &LossSpec::default(),
            &Batch::classes(shape, &logits, &labels).with_weights(&weights),
            &LsceError::InvalidWeight { class, value },
        );
    }
    // NaN: compare by pattern (NaN != NaN).
    let weights = [1.0, f32::NAN, 1.0];
    let batch = Batch::classes(shape, &logits, &labels).with_weights(&weights);
    assert!(matches!(
        cpu::compute(&LossSpec::default(), &batch, lsce::Gradient::Separate),
        Err(LsceError::InvalidWeight { class: 1, value }) if value.is_nan()
    ));
    let g = gpu();
    assert!(matches!(
        g.kernel.compute(&g.queue, &LossSpec::default(), &batch, &StagingOptions::default()),
        Err(LsceError::InvalidWeight { class: 1, value }) if value.is_nan()
    ));
}

/// Out-of-range labels: the CPU finds them while validating; the GPU finds them in the kernel
/// (`Summary`), and both name the first offending row.
#[test]
fn labels_out_of_range() {
    let shape = Shape::matrix(6, 4).unwrap();
    let logits = [0.25f32; 24];
    let oob = |row, label| LsceError::LabelOutOfRange {
        row,
        label,
        classes: 4,
    };
    let spec = LossSpec::default();
    for (labels, want) in [
        ([0, 1, 4, 2, 3, -100], oob(2, 4)),
        ([0, 1, 2, -1, 9, 3], oob(3, -1)),
        ([i32::MAX, 1, 2, 3, 0, 0], oob(0, i32::MAX)),
        ([0, 1, 2, 3, 0, i32::MIN], oob(5, i32::MIN)),
        ([-100, -100, -100, -100, -100, -99], oob(5, -99)),
    ] {
        both_fail(
            &format!("labels {labels:?}"),
            &spec,
            &Batch::classes(shape, &logits, &labels),
            &want,
        );
    }
    // Without an ignore index, -100 is an ordinary bad label; with a custom one, it is too.
    let labels = [0, -100, 1, 2, 3, 0];
    for ignore in [None, Some(-1)] {
        both_fail(
            &format!("ignore {ignore:?}"),
            &spec.with_ignore_index(ignore),
            &Batch::classes(shape, &logits, &labels),
            &oob(1, -100),
        );
    }
    // Forward-only and in-place runs report it too.
    let g = gpu();
    let labels = [0, 1, 2, 3, 7, 0];
    for gradient in [Gradient::None, Gradient::InPlace] {
        let err = g
            .kernel
            .compute(
                &g.queue,
                &spec,
                &Batch::classes(shape, &logits, &labels),
                &StagingOptions {
                    gradient,
                    ..StagingOptions::default()
                },
            )
            .unwrap_err();
        assert_eq!(err, oob(4, 7), "{gradient:?}");
    }
}

#[test]
fn upstream_that_does_not_fit_the_reduction() {
    let shape = Shape::matrix(3, 4).unwrap();
    let logits = [0.5f32; 12];
    let labels = [0, 1, 2];
    let per_row = [1.0f32; 3];
    for reduction in [Reduction::Sum, Reduction::Mean] {
        both_fail(
            &format!("per-row upstream with {reduction:?}"),
            &LossSpec::default().with_reduction(reduction),
            &Batch::classes(shape, &logits, &labels).with_upstream(UpstreamGrad::PerRow(&per_row)),
            &LsceError::Unsupported("a per-row upstream gradient needs Reduction::None"),
        );
    }
    both_fail(
        "scalar upstream with None",
        &LossSpec::default().with_reduction(Reduction::None),
        &Batch::classes(shape, &logits, &labels).with_upstream(UpstreamGrad::Scalar(2.0)),
        &LsceError::Unsupported("Reduction::None needs a per-row upstream gradient (or One)"),
    );
}

#[test]
fn invalid_plans_and_configs() {
    let g = gpu();
    let shape = Shape::matrix(4, 8).unwrap();
    let problem = Problem::new(LossSpec::default(), shape);
    assert_eq!(
        g.kernel
            .plan(
                &problem
                    .with_targets(TargetKind::Probabilities)
                    .with_accuracy(true)
            )
            .unwrap_err(),
        LsceError::Unsupported("accuracy needs class-label targets")
    );
    for (wg, cache, name, value) in [
        (48, 4, "row_workgroup", 48.0),
        (16, 4, "row_workgroup", 16.0),
        (4096, 4, "row_workgroup", 4096.0),
        (256, 0, "row_cache", 0.0),
        (256, 300, "row_cache", 300.0),
    ] {
        let err = LossKernel::with_config(
            &g.device,
            KernelConfig {
                row_workgroup: wg,
                row_cache: cache,
                ..KernelConfig::for_device(&g.device)
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, LsceError::InvalidParameter { name: n, value: v, .. } if n == name && v == value),
            "{wg}x{cache}: {err:?}"
        );
    }
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE;
const COPY_DST: wgpu::BufferUsages = wgpu::BufferUsages::COPY_DST;

/// Valid buffers for a 4 x 8 problem; each test breaks one.
struct Buffers {
    logits: wgpu::Buffer,
    targets: wgpu::Buffer,
    loss: wgpu::Buffer,
    grad: wgpu::Buffer,
    summary: wgpu::Buffer,
    plain: wgpu::Buffer,
}

fn buffers(g: &Gpu) -> Buffers {
    let f = |x: f32| x.to_bits();
    Buffers {
        logits: buffer_at(g, "logits", &[f(0.5); 32], 0, STORAGE),
        targets: buffer_at(g, "targets", &[0, 1, 2, 3], 0, STORAGE),
        loss: buffer_at(g, "loss", &[0; 4], 0, STORAGE | COPY_DST),
        grad: buffer_at(g, "grad", &[0; 32], 0, STORAGE),
        summary: buffer_at(g, "summary", &[0; 8], 0, COPY_DST),
        // Lacks STORAGE.
        plain: buffer_at(
            g,
            "copy only",
            &[0; 64],
            0,
            COPY_DST | wgpu::BufferUsages::COPY_SRC,
        ),
    }
}

fn encode(g: &Gpu, problem: &Problem, b: &LossBuffers<'_>) -> Result<(), LsceError> {
    let plan = g.kernel.plan(problem)?;
    let mut encoder = g.device.create_command_encoder(&Default::default());
    plan.encode(&mut encoder, b)
}

#[test]
fn invalid_caller_buffers() {
    let g = gpu();
    let shape = Shape::matrix(4, 8).unwrap();
    let problem = Problem::new(LossSpec::default().with_reduction(Reduction::None), shape);
    let b = buffers(g);
    let ok = LossBuffers {
        logits: b.logits.slice(..),
        targets: b.targets.slice(..),
        weights: None,
        upstream: None,
        loss: Some(b.loss.slice(..)),
        lse: None,
        grad: Some(b.grad.slice(..)),
        summary: b.summary.slice(..),
    };
    assert_eq!(encode(g, &problem, &ok), Ok(()));

    let cases: Vec<(&str, Problem, LossBuffers<'_>, LsceError)> = vec![
        (
            "logits without STORAGE",
            problem,
            LossBuffers {
                logits: b.plain.slice(..),
                ..ok
            },
            LsceError::MissingUsage {
                what: "logits",
                usage: "STORAGE",
            },
        ),
        (
            "summary without COPY_DST",
            problem,
            LossBuffers {
                summary: b.grad.slice(..),
                ..ok
            },
            LsceError::MissingUsage {
                what: "summary",
                usage: "COPY_DST",
            },
        ),
        (
            "misaligned logits offset",
            problem,
            LossBuffers {
                logits: b.logits.slice(2..),
                ..ok
            },
            LsceError::MisalignedOffset {
                what: "logits",
                offset: 2,
                alignment: 4,
            },
        ),
        (
            "logits too small",
            problem,
            LossBuffers {
                logits: b.logits.slice(..124),
                ..ok
            },
            LsceError::BufferTooSmall {
                what: "logits",
                needed: 128,
                available: 124,
            },
        ),
        (
            "grad too small",
            problem,
            LossBuffers {
                grad: Some(b.grad.slice(24..)),
                ..ok
            },
            LsceError::BufferTooSmall {
                what: "grad",
                needed: 128,
                available: 148 - 24,
            },
        ),
        (
            "per-row loss too small",
            problem,
            LossBuffers {
                loss: Some(b.loss.slice(..12)),
                ..ok
            },
            LsceError::BufferTooSmall {
                what: "loss",
                needed: 16,
                available: 12,
            },
        ),
        (
            "logits and grad are the same buffer (read-only and writable)",
            problem,
            LossBuffers {
                grad: Some(b.logits.slice(..)),
                ..ok
            },
            LsceError::AliasedBuffers {
                first: "logits",
                second: "grad",
            },
        ),
        (
            "Separate without a grad buffer",
            problem,
            LossBuffers { grad: None, ..ok },
            LsceError::Unsupported("Gradient::Separate needs a grad buffer"),
        ),
        (
            "a grad buffer with Gradient::None",
            problem.with_gradient(Gradient::None),
            ok,
            LsceError::Unsupported(
                "a grad buffer was given but the problem's gradient is not Gradient::Separate",
            ),
        ),
        (
            "Reduction::None without a loss buffer",
            problem,
            LossBuffers { loss: None, ..ok },
            LsceError::Unsupported("Reduction::None needs a loss buffer for the per-row losses"),
        ),
        (
            "weighted without weights",
            problem.with_weighted(true),
            ok,
            LsceError::Unsupported("the problem is weighted but no weights buffer was given"),
        ),
        (
            "weights given to an unweighted problem",
            problem,
            LossBuffers {
                weights: Some(b.targets.slice(..)),
                ..ok
            },
            LsceError::Unsupported("a weights buffer was given but the problem is not weighted"),
        ),
        (
            "upstream missing",
            problem.with_upstream_grad(true),
            ok,
            LsceError::Unsupported("the problem has an upstream gradient but no buffer was given"),
        ),
        (
            "per-row upstream too small",
            problem.with_upstream_grad(true),
            LossBuffers {
                upstream: Some(b.targets.slice(..8)),
                ..ok
            },
            LsceError::BufferTooSmall {
                what: "upstream",
                needed: 16,
                available: 8,
            },
        ),
    ];
    for (what, problem, bufs, want) in cases {
        assert_eq!(encode(g, &problem, &bufs), Err(want), "{what}");
    }
    // Overlapping writable views are refused (see overlapping_writable_buffers_name_the_arguments
    // for the names); non-overlapping ones of one buffer are fine.
    let overlap = LossBuffers {
        loss: Some(b.grad.slice(..)),
        ..ok
    };
    assert!(matches!(
        encode(g, &problem, &overlap),
        Err(LsceError::AliasedBuffers { second: "grad", .. })
    ));
    let apart = LossBuffers {
        loss: Some(b.grad.slice(..16)),
        grad: Some(b.grad.slice(16..)),
        ..ok
    };
    assert_eq!(encode(g, &problem, &apart), Ok(()));
    // In place, the logits are writable: a separate read-only binding of the same buffer
    // (targets) is refused.
    let in_place = problem.with_gradient(Gradient::InPlace);
    assert_eq!(
        encode(
            g,
            &in_place,
            &LossBuffers {
                targets: b.logits.slice(..),
                grad: None,
                ..ok
            }
        ),
        Err(LsceError::AliasedBuffers {
            first: "logits",
            second: "targets",
        })
    );
}

/// Two writable views of one buffer that overlap: the error names the caller's arguments
/// (`LossBuffers::loss` and `LossBuffers::grad`), as `AliasedBuffers` documents ("the first
/// argument's name").
#[test]
fn overlapping_writable_buffers_name_the_arguments() {
    let g = gpu();
    let shape = Shape::matrix(4, 8).unwrap();
    let problem = Problem::new(LossSpec::default().with_reduction(Reduction::None), shape);
    let b = buffers(g);
    let bufs = LossBuffers {
        logits: b.logits.slice(..),
        targets: b.targets.slice(..),
        weights: None,
        upstream: None,
        loss: Some(b.grad.slice(..)),
        lse: None,
        grad: Some(b.grad.slice(..)),
        summary: b.summary.slice(..),
    };
    assert_eq!(
        encode(g, &problem, &bufs),
        Err(LsceError::AliasedBuffers {
            first: "loss",
            second: "grad",
        })
    );
}
