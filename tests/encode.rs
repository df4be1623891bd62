//! The encode API on caller-owned buffers: nonzero byte offsets, lse output, separate /
//! in-place / no gradient, the Summary copied to a caller buffer, bad labels reported through
//! Summary::check, and plan reuse. Every buffer is sentinel-filled around its region, so a
//! write outside the region handed to the plan fails the test.

mod common;

use common::{
    as_f32, buffer_at, compare_outputs, f32_words, gpu, i32_words, read_words, reference, region,
    Errors, Gpu, Rng,
};
use lsce::{
    Batch, Gradient, LossBuffers, LossKernel, LossOutput, LossSpec, LsceError, Problem, Reduction,
    Shape, StagingOptions, Summary, UpstreamGrad,
};

const STORAGE_RW: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC);
const COPY_RW: wgpu::BufferUsages =
    wgpu::BufferUsages::COPY_DST.union(wgpu::BufferUsages::COPY_SRC);

/// Byte offsets of the caller's regions: none a multiple of the 32-byte storage offset
/// alignment of lavapipe, so the plan must bind an aligned range and index from inside it.
const AT_LOGITS: u64 = 12;
const AT_TARGETS: u64 = 4;
const AT_WEIGHTS: u64 = 16;
const AT_UPSTREAM: u64 = 28;
const AT_LOSS: u64 = 4;
const AT_LSE: u64 = 8;
const AT_GRAD: u64 = 20;
const AT_SUMMARY: u64 = 36;

struct Case<'a> {
    spec: LossSpec,
    batch: Batch<'a>,
    gradient: Gradient,
    max_binding_bytes: Option<u64>,
}

/// Everything one encode produced, read back and checked for stray writes.
struct Run {
    out: LossOutput<f32>,
    summary: Summary,
    /// The logits region after the run (the gradient for Gradient::InPlace).
    logits_after: Vec<f32>,
    /// The reduced loss copied to the caller's loss buffer (Sum / Mean).
    loss_copy: Option<f32>,
}

fn encode_and_read(g: &Gpu, kernel: &LossKernel, case: &Case<'_>) -> Run {
    let Case {
        spec,
        batch,
        gradient,
        max_binding_bytes,
    } = case;
    let shape = batch.shape;
    let (rows, elements) = (shape.rows() as usize, shape.elements() as usize);
    let lsce::Logits::F32(logits) = batch.logits else {
        panic!("f32 logits only")
    };
    let lsce::Targets::Classes(labels) = batch.targets else {
        panic!("class labels only")
    };
    let upstream_words: Option<Vec<u32>> = match batch.upstream {
        UpstreamGrad::One => None,
        UpstreamGrad::Scalar(v) => Some(f32_words(&[v])),
        UpstreamGrad::PerRow(v) => Some(f32_words(v)),
    };
    let problem = Problem::new(*spec, shape)
        .with_weighted(batch.weights.is_some())
        .with_upstream_grad(upstream_words.is_some())
        .with_gradient(*gradient)
        .with_accuracy(true)
        .with_max_binding_bytes(*max_binding_bytes);
    let plan = kernel.plan(&problem).expect("plan");
    let reduced = spec.reduction != Reduction::None;

    let logits_buf = buffer_at(g, "logits", &f32_words(logits), AT_LOGITS, STORAGE_RW);
    let targets_buf = buffer_at(g, "targets", &i32_words(labels), AT_TARGETS, STORAGE_RW);
    let weights_buf = batch
        .weights
        .map(|w| buffer_at(g, "weights", &f32_words(w), AT_WEIGHTS, STORAGE_RW));
    let upstream_buf = upstream_words
        .as_ref()
        .map(|w| buffer_at(g, "upstream", w, AT_UPSTREAM, STORAGE_RW));
    let loss_words = if reduced { 1 } else { rows };
    let loss_usage = if reduced { COPY_RW } else { STORAGE_RW };
    let loss_buf = buffer_at(g, "loss", &vec![0; loss_words], AT_LOSS, loss_usage);
    let lse_buf = buffer_at(g, "lse", &vec![0; rows], AT_LSE, STORAGE_RW);
    let grad_buf = (*gradient == Gradient::Separate)
        .then(|| buffer_at(g, "grad", &vec![0; elements], AT_GRAD, STORAGE_RW));
    let summary_buf = buffer_at(g, "summary", &[0; 8], AT_SUMMARY, COPY_RW);

    let mut encoder = g.device.create_command_encoder(&Default::default());
    plan.encode(
        &mut encoder,
        &LossBuffers {
            logits: logits_buf.slice(AT_LOGITS..),
            targets: targets_buf.slice(AT_TARGETS..),
            weights: weights_buf.as_ref().map(|b| b.slice(AT_WEIGHTS..)),
            upstream: upstream_buf.as_ref().map(|b| b.slice(AT_UPSTREAM..)),
            loss: Some(loss_buf.slice(AT_LOSS..)),
            lse: Some(lse_buf.slice(AT_LSE..)),
            grad: grad_buf.as_ref().map(|b| b.slice(AT_GRAD..)),
            summary: summary_buf.slice(AT_SUMMARY..),
        },
    )
    .expect("encode");
    g.queue.submit([encoder.finish()]);

    let summary_words = region("summary", &read_words(g, &summary_buf), AT_SUMMARY, 8);
    let summary: Summary = bytemuck::pod_read_unaligned(bytemuck::cast_slice(&summary_words));
    let lse = as_f32(&region("lse", &read_words(g, &lse_buf), AT_LSE, rows));
    let loss_region = as_f32(&region(
        "loss",
        &read_words(g, &loss_buf),
        AT_LOSS,
        loss_words,
    ));
    let logits_after = as_f32(&region(
        "logits",
        &read_words(g, &logits_buf),
        AT_LOGITS,
        elements,
    ));
    // Inputs are never written.
    let targets_after = region("targets", &read_words(g, &targets_buf), AT_TARGETS, rows);
    assert_eq!(targets_after, i32_words(labels), "the targets changed");
    if let (Some(b), Some(w)) = (&weights_buf, batch.weights) {
        assert_eq!(
            region("weights", &read_words(g, b), AT_WEIGHTS, w.len()),
            f32_words(w)
        );
    }
    if let (Some(b), Some(w)) = (&upstream_buf, &upstream_words) {
        assert_eq!(
            &region("upstream", &read_words(g, b), AT_UPSTREAM, w.len()),
            w
        );
    }
    if *gradient != Gradient::InPlace {
        assert_eq!(
            f32_words(&logits_after),
            f32_words(logits),
            "the logits changed"
        );
    }
    let grad = match gradient {
        Gradient::None => None,
        Gradient::Separate => Some(as_f32(&region(
            "grad",
            &read_words(g, grad_buf.as_ref().unwrap()),
            AT_GRAD,
            elements,
        ))),
        Gradient::InPlace => Some(logits_after.clone()),
    };
    let out = LossOutput {
        loss: if reduced {
            vec![summary.loss]
        } else {
            loss_region.clone()
        },
        z_loss: if reduced {
            vec![summary.z_loss]
        } else {
            lse.iter().map(|l| spec.z_loss * l * l).collect()
        },
        lse,
        grad,
        denominator: summary.denominator,
        correct: Some(u64::from(summary.correct)),
    };
    Run {
        out,
        summary,
        logits_after,
        loss_copy: reduced.then(|| loss_region[0]),
    }
}

fn check_run(what: &str, g: &Gpu, kernel: &LossKernel, case: &Case<'_>) -> Errors {
    let run = encode_and_read(g, kernel, case);
    let r = reference(&case.spec, &case.batch, case.gradient, kernel.config());
    let e = compare_outputs(what, &run.out, &r);
    let s = run.summary;
    assert_eq!(s.first_bad_row, u32::MAX, "{what}: no bad row");
    assert_eq!(s.bad_label, 0, "{what}");
    assert_eq!(s.reserved, 0, "{what}");
    let lsce::Targets::Classes(labels) = case.batch.targets else {
        unreachable!()
    };
    let counted = labels
        .iter()
        .filter(|&&l| Some(l) != case.spec.ignore_index)
        .count() as u32;
    assert_eq!(s.counted_rows, counted, "{what}: counted rows");
    match case.spec.reduction {
        Reduction::None => {
            assert_eq!(
                (s.loss, s.z_loss),
                (0.0, 0.0),
                "{what}: Summary loss for None"
            );
        }
        _ => assert_eq!(
            run.loss_copy.map(f32::to_bits),
            Some(s.loss.to_bits()),
            "{what}: the loss copy differs from the Summary"
        ),
    }
    // The staging API gives the same results: the same bits when its buffers (offset 0) take
    // the same row kernel, else the same values up to f32 summation order (a caller region
    // that is not 16-byte aligned is read in scalar units, the staging buffers as vec4).
    let staged = kernel
        .compute(
            &g.queue,
            &case.spec,
            &case.batch,
            &StagingOptions {
                gradient: case.gradient,
                accuracy: true,
                max_binding_bytes: case.max_binding_bytes,
                ..StagingOptions::default()
            },
        )
        .unwrap();
    let same = |a: &[f32], b: &[f32], field: &str| {
        let scale = b
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let ok = x.to_bits() == y.to_bits() || (x - y).abs() <= 1e-6 * scale.max(1.0);
            assert!(ok, "{what}: staging {field}[{i}] {x} vs encode {y}");
        }
    };
    same(&staged.loss, &run.out.loss, "loss");
    same(&staged.lse, &run.out.lse, "lse");
    if let (Some(a), Some(b)) = (&staged.grad, &run.out.grad) {
        same(a, b, "gradient");
    }
    e
}

struct Data {
    shape: Shape,
    logits: Vec<f32>,
    labels: Vec<i32>,
    weights: Vec<f32>,
    per_row: Vec<f32>,
}

fn data(seed: u64, rows: u32, k: u32) -> Data {
    let mut rng = Rng::new(seed);
    Data {
        shape: Shape::matrix(rows, k).unwrap(),
        logits: rng.logits((rows * k) as usize, 3.0),
        labels: rng.labels(rows as usize, k, -100, 0.15),
        weights: rng.weights(k as usize),
        per_row: (0..rows).map(|_| rng.range(-2.0, 2.0) as f32).collect(),
    }
}

#[test]
fn caller_buffers_at_nonzero_offsets() {
    let g = gpu();
    let d = data(31, 50, 37);
    let mut errors = Errors::default();
    for (reduction, upstream) in [
        (Reduction::None, UpstreamGrad::PerRow(&d.per_row)),
        (Reduction::Mean, UpstreamGrad::Scalar(0.75)),
        (Reduction::Sum, UpstreamGrad::One),
    ] {
        for weighted in [true, false] {
            let spec = LossSpec::pytorch(0.1)
                .with_z_loss(1e-3)
                .with_reduction(reduction);
            let mut batch = Batch::classes(d.shape, &d.logits, &d.labels).with_upstream(upstream);
            if weighted {
                batch = batch.with_weights(&d.weights);
            }
            for (path, kernel) in g.kernels() {
                let case = Case {
                    spec,
                    batch,
                    gradient: Gradient::Separate,
                    max_binding_bytes: None,
                };
                let what = format!("offsets {reduction:?} weighted={weighted} {path}");
                errors.merge(check_run(&what, g, kernel, &case));
            }
        }
    }
    errors.report("encode: offsets");
}

/// Gradient::InPlace: the gradient ends up in the logits region (and nowhere else), also when
/// the rows run in several windows and on the streaming path.
#[test]
fn in_place_gradient() {
    let g = gpu();
    let streaming = LossKernel::with_config(
        &g.device,
        lsce::KernelConfig {
            row_cache: 1,
            ..lsce::KernelConfig::for_device(&g.device)
        },
    )
    .unwrap();
    let mut kernels = g.kernels();
    kernels.push(("streaming", &streaming));
    let mut errors = Errors::default();
    for (rows, k, max_binding_bytes) in [(40, 300, None), (40, 300, Some(8000)), (9, 1000, None)] {
        let d = data(32, rows, k);
        for reduction in [Reduction::Mean, Reduction::None] {
            let spec = LossSpec::pytorch(0.2)
                .with_softcap(Some(20.0))
                .with_reduction(reduction);
            let batch = Batch::classes(d.shape, &d.logits, &d.labels).with_weights(&d.weights);
            for (path, kernel) in &kernels {
                let case = Case {
                    spec,
                    batch,
                    gradient: Gradient::InPlace,
                    max_binding_bytes,
                };
                let what =
                    format!("in place {rows}x{k} {max_binding_bytes:?} {reduction:?} {path}");
                errors.merge(check_run(&what, g, kernel, &case));
                let run = encode_and_read(g, kernel, &case);
                assert_ne!(f32_words(&run.logits_after), f32_words(&d.logits), "{what}");
            }
        }
    }
    errors.report("encode: in-place gradient");
}

/// Gradient::None: loss and lse only; the logits are untouched and no grad buffer is taken.
#[test]
fn forward_only() {
    let g = gpu();
    let d = data(33, 64, 129);
    let mut errors = Errors::default();
    for reduction in [Reduction::None, Reduction::Mean] {
        let spec = LossSpec::pytorch(0.1).with_reduction(reduction);
        let batch = Batch::classes(d.shape, &d.logits, &d.labels);
        for (path, kernel) in g.kernels() {
            let case = Case {
                spec,
                batch,
                gradient: Gradient::None,
                max_binding_bytes: None,
            };
            errors.merge(check_run(
                &format!("forward {reduction:?} {path}"),
                g,
                kernel,
                &case,
            ));
        }
    }
    errors.report("encode: forward only");
}

/// Bad labels are found on the GPU: the Summary names the first offending row (row 1100: in
/// the second setup chunk of 1024 rows, and with 4000-byte bindings in window 12 of 31, while
/// the later bad rows sit in later chunks and windows), Summary::check turns it into
/// LabelOutOfRange, the bad rows' loss and gradient are NaN, and every other row is computed
/// as usual (the denominator counts the valid rows only).
#[test]
fn summary_reports_the_first_bad_label() {
    let g = gpu();
    let (rows, k) = (3000u32, 10u32);
    let d = data(34, rows, k);
    let mut labels = d.labels.clone();
    labels[2500] = k as i32;
    labels[1100] = -5;
    labels[2999] = i32::MIN;
    for max_binding_bytes in [None, Some(4000)] {
        for (path, kernel) in g.kernels() {
            let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::None);
            let batch = Batch::classes(d.shape, &d.logits, &labels);
            let case = Case {
                spec,
                batch,
                gradient: Gradient::Separate,
                max_binding_bytes,
            };
            let what = format!("bad labels {max_binding_bytes:?} {path}");
            let run = encode_and_read(g, kernel, &case);
            assert_eq!(run.summary.first_bad_row, 1100, "{what}");
            assert_eq!(run.summary.bad_label, -5, "{what}");
            let want = LsceError::LabelOutOfRange {
                row: 1100,
                label: -5,
                classes: k,
            };
            assert_eq!(run.summary.check(k), Err(want.clone()), "{what}");
            let staged = kernel.compute(
                &g.queue,
                &spec,
                &batch,
                &StagingOptions {
                    max_binding_bytes,
                    ..StagingOptions::default()
                },
            );
            assert_eq!(staged.unwrap_err(), want, "{what}: staging");
            assert_eq!(
                lsce::cpu::compute(&spec, &batch, lsce::Gradient::None).unwrap_err(),
                want,
                "{what}: cpu"
            );
            // The bad rows are NaN; the others match the reference with those rows ignored.
            let grad = run.out.grad.as_ref().unwrap();
            for r in [1100usize, 2500, 2999] {
                assert!(run.out.loss[r].is_nan(), "{what}: row {r}");
                assert!(grad[r * k as usize..(r + 1) * k as usize]
                    .iter()
                    .all(|v| v.is_nan()));
            }
            let mut fixed = labels.clone();
            for r in [1100usize, 2500, 2999] {
                fixed[r] = -100;
            }
            let reference = reference(
                &spec,
                &Batch::classes(d.shape, &d.logits, &fixed),
                Gradient::Separate,
                kernel.config(),
            );
            let mut out = run.out.clone();
            for r in [1100usize, 2500, 2999] {
                out.loss[r] = 0.0;
                out.lse[r] = 0.0;
                out.z_loss[r] = 0.0;
                out.grad.as_mut().unwrap()[r * k as usize..(r + 1) * k as usize].fill(0.0);
            }
            out.correct = None;
            compare_outputs(&what, &out, &reference);
        }
    }
}

/// One plan encoded twice into one encoder (different inputs and outputs) and again into a
/// second submission: its scratch is reused, every result is right.
#[test]
fn plan_is_reusable() {
    let g = gpu();
    let (a, b) = (data(35, 300, 77), data(36, 300, 77));
    let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::Sum);
    let plan = g.kernel.plan(&Problem::new(spec, a.shape)).unwrap();
    let make = |d: &Data| {
        (
            buffer_at(g, "logits", &f32_words(&d.logits), 0, STORAGE_RW),
            buffer_at(g, "targets", &i32_words(&d.labels), 0, STORAGE_RW),
            buffer_at(g, "grad", &vec![0; d.logits.len()], 0, STORAGE_RW),
            buffer_at(g, "summary", &[0; 8], 0, COPY_RW),
        )
    };
    let (ba, bb) = (make(&a), make(&b));
    let encode =
        |encoder: &mut wgpu::CommandEncoder,
         bufs: &(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer, wgpu::Buffer)| {
            plan.encode(
                encoder,
                &LossBuffers {
                    logits: bufs.0.slice(..),
                    targets: bufs.1.slice(..),
                    weights: None,
                    upstream: None,
                    loss: None,
                    lse: None,
                    grad: Some(bufs.2.slice(..)),
                    summary: bufs.3.slice(..),
                },
            )
            .unwrap()
        };
    let check_one =
        |d: &Data, bufs: &(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer, wgpu::Buffer), what: &str| {
            let summary: Summary = bytemuck::pod_read_unaligned(bytemuck::cast_slice(&region(
                "summary",
                &read_words(g, &bufs.3),
                0,
                8,
            )));
            let grad = as_f32(&region("grad", &read_words(g, &bufs.2), 0, d.logits.len()));
            let r = reference(
                &spec,
                &Batch::classes(d.shape, &d.logits, &d.labels),
                Gradient::Separate,
                g.kernel.config(),
            );
            common::assert_close(
                &format!("{what} loss"),
                &[summary.loss],
                &r.out.loss,
                &r.loss_tol,
            );
            common::assert_close(
                &format!("{what} grad"),
                &grad,
                r.out.grad.as_ref().unwrap(),
                r.grad_tol.as_ref().unwrap(),
            );
        };
    let mut encoder = g.device.create_command_encoder(&Default::default());
    encode(&mut encoder, &ba);
    encode(&mut encoder, &bb);
    g.queue.submit([encoder.finish()]);
    check_one(&a, &ba, "first of two");
    check_one(&b, &bb, "second of two");
    // Again, in the other order, in a new submission.
    let (ca, cb) = (make(&a), make(&b));
    let mut encoder = g.device.create_command_encoder(&Default::default());
    encode(&mut encoder, &cb);
    encode(&mut encoder, &ca);
    g.queue.submit([encoder.finish()]);
    check_one(&a, &ca, "resubmitted a");
    check_one(&b, &cb, "resubmitted b");
}
