//! Precision at large offsets: adding a constant `c` to every logit of a row changes neither
//! the smoothed loss nor its gradient, and the kernels must keep it so in f32. They form the
//! loss as `A ln s + sum_c a_c (m - z_c)` from differences to the row's max (or a running max,
//! lifted as it rises), so the derived bound of `tests/common` (see "the shifted target sum")
//! does not grow with `|c|`; the former `A m - sum_c a_c z_c` cancelled and erred by about
//! `E A |c|` (six equal logits at -1e4 gave 1.7918205 for ln 6 = 1.7917595).
//!
//! Every kernel path (a subgroup per row, a workgroup with subgroup operations, the
//! workgroup-memory fallback, split rows, the streaming row path, the strided `[N, C, d]`
//! kernel), every smoothing convention with and without an excluded class, with class weights
//! and with probability targets, f32 and, where the offset is representable, f16 and bf16
//! logits. Run with `--nocapture` to see the largest errors per offset and path.

mod common;

use std::collections::BTreeMap;

use common::*;
use lsce::{
    half, Batch, KernelConfig, Logits, LossKernel, LossSpec, Reduction, Shape, Smoothing,
    StagingOptions, Targets,
};

const OFFSETS: [f64; 7] = [0.0, 1e4, -1e4, 1e6, -1e6, 1e30, -1e30];

/// Token accuracy on for class labels (it needs them).
fn options_for(batch: &Batch<'_>) -> StagingOptions {
    StagingOptions {
        accuracy: matches!(batch.targets, Targets::Classes(_)),
        ..StagingOptions::default()
    }
}

/// Every row path of the device ([`Gpu::kernels`]) and the streaming row path (one unit in
/// registers per invocation, so that every row of more than a team's units is read twice).
fn paths(g: &Gpu) -> Vec<(&'static str, LossKernel)> {
    let streaming = LossKernel::with_config(
        &g.device,
        KernelConfig {
            row_cache: 1,
            ..KernelConfig::for_device(&g.device)
        },
    )
    .expect("LossKernel::with_config(row_cache: 1)");
    let mut v: Vec<(&'static str, LossKernel)> = g
        .kernels()
        .into_iter()
        .map(|(name, k)| (name, k.clone()))
        .collect();
    v.push(("streaming", streaming));
    v
}

fn borrowed<'k>(paths: &'k [(&'static str, LossKernel)]) -> Vec<(&'static str, &'k LossKernel)> {
    paths.iter().map(|(n, k)| (*n, k)).collect()
}

/// `x + c` rounded to f32: the inputs both the GPU and the CPU reference see.
fn shifted(base: &[f32], c: f64) -> Vec<f32> {
    base.iter().map(|&v| (f64::from(v) + c) as f32).collect()
}

/// The largest errors per (path, offset), printed as a table.
#[derive(Default)]
struct Table(BTreeMap<(&'static str, usize), Errors>);

impl Table {
    fn add(&mut self, path: &'static str, offset: usize, e: Errors) {
        self.0.entry((path, offset)).or_default().merge(e);
    }

    fn print(&self, title: &str) {
        eprintln!(
            "[{title}] largest |GPU - CPU| per path and offset (loss, grad; worst err/bound)"
        );
        for ((path, o), e) in &self.0 {
            eprintln!(
                "  {path:<26} c = {:>7.0e}  loss {:.3e}  grad {:.3e}  lse {:.3e}  err/bound {:.3}  ({} values)",
                OFFSETS[*o], e.loss, e.grad, e.lse, e.ratio, e.compared
            );
        }
    }
}

/// The case of the report: six equal logits at -1e4, uniform smoothing 0.1, reduction none.
/// The loss is ln 6; the bound derived for it (under 2e-5) is below the former error (6.1e-5).
#[test]
fn six_equal_logits_at_minus_1e4() {
    let g = gpu();
    let paths = paths(g);
    let shape = Shape::matrix(1, 6).unwrap();
    let x = [-1e4f32; 6];
    let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::None);
    let batch = Batch::classes(shape, &x, &[0]);
    let paths = borrowed(&paths);
    let results = check_paths("six at -1e4", &paths, &spec, &batch, &options_for(&batch));
    for ((path, _), (out, r, _)) in paths.iter().zip(results) {
        let err = (f64::from(out.loss[0]) - 6f64.ln()).abs();
        eprintln!(
            "[six at -1e4] {path:<26} loss {} ln 6 {} |error| {err:.2e} bound {:.2e}",
            out.loss[0],
            6f64.ln(),
            r.loss_tol[0]
        );
        assert!(
            (r.out.loss[0] - 6f64.ln()).abs() < 1e-9,
            "{}",
            r.out.loss[0]
        );
        assert!(err <= r.loss_tol[0]);
    }
}

/// Random rows shifted by each offset, against the CPU reference computed on the same shifted
/// f32 inputs: class labels in every convention (weighted and not, one ignored row), probability
/// targets, z-loss with soft-cap (which is not shift-invariant, but its bound is derived too),
/// row lengths that are cached, streamed or split depending on the path.
#[test]
fn offsets_against_the_reference() {
    let g = gpu();
    let paths = paths(g);
    let paths = borrowed(&paths);
    let mut table = Table::default();
    let mut rng = Rng::new(0x0ff5e7);
    for k in [6u32, 37, 2000] {
        let rows = 5u32;
        let shape = Shape::matrix(rows, k).unwrap();
        let base = rng.logits((rows * k) as usize, 2.0);
        let mut labels = rng.labels(rows as usize, k, -100, 0.0);
        labels[2] = -100;
        let weights = rng.weights(k as usize);
        let probs = rng.probabilities(rows as usize, k as usize, false);
        for (o, &c) in OFFSETS.iter().enumerate() {
            let x = shifted(&base, c);
            let mut specs = conventions(0.1, k);
            specs.push((
                "uniform mean",
                LossSpec::pytorch(0.1).with_reduction(Reduction::Mean),
            ));
            specs.push((
                "softcap+z_loss",
                LossSpec::pytorch(0.1)
                    .with_softcap(Some(30.0))
                    .with_z_loss(1e-4),
            ));
            for (name, spec) in specs {
                let spec = if name == "uniform mean" {
                    spec
                } else {
                    spec.with_reduction(Reduction::None)
                };
                for weighted in [false, true] {
                    let mut batch = Batch::classes(shape, &x, &labels);
                    if weighted {
                        batch = batch.with_weights(&weights);
                    }
                    let what = format!("K={k} c={c:e} {name} weighted={weighted}");
                    for ((path, _), (_, _, e)) in paths.iter().zip(check_paths(
                        &what,
                        &paths,
                        &spec,
                        &batch,
                        &options_for(&batch),
                    )) {
                        table.add(path, o, e);
                    }
                }
            }
            for (name, spec) in [
                ("probabilities uniform", LossSpec::pytorch(0.1)),
                (
                    "probabilities off_target+excluded",
                    LossSpec::default()
                        .with_smoothing(Smoothing::OffTarget(0.2))
                        .with_excluded_class(Some(1)),
                ),
            ] {
                let spec = spec.with_reduction(Reduction::None);
                for weighted in [false, true] {
                    let mut batch = Batch::probabilities(shape, &x, &probs);
                    if weighted {
                        batch = batch.with_weights(&weights);
                    }
                    let what = format!("K={k} c={c:e} {name} weighted={weighted}");
                    for ((path, _), (_, _, e)) in paths.iter().zip(check_paths(
                        &what,
                        &paths,
                        &spec,
                        &batch,
                        &options_for(&batch),
                    )) {
                        table.add(path, o, e);
                    }
                }
            }
        }
    }
    table.print("offsets, f32 [rows, classes]");
}

/// The strided `[N, C, d]` kernel (one invocation per position, four lanes) at every offset.
#[test]
fn offsets_strided() {
    let g = gpu();
    let mut table = Table::default();
    let mut rng = Rng::new(0x5171de);
    let shape = Shape::new(2, 37, 3).unwrap();
    let n = shape.elements() as usize;
    let base = rng.logits(n, 2.0);
    let mut labels = rng.labels(shape.rows() as usize, 37, -100, 0.0);
    labels[4] = -100;
    let weights = rng.weights(37);
    let probs = rng.probabilities(n / 37, 37, true);
    // Probabilities laid out like the logits: class c of row (b, s) at (b * 37 + c) * 3 + s.
    let mut probs_strided = vec![0.0f32; n];
    for row in 0..shape.rows() {
        for c in 0..37 {
            probs_strided[shape.index(row, c) as usize] = probs[(row * 37 + c) as usize];
        }
    }
    let kernels = [
        ("strided", &g.kernel),
        ("strided, no subgroups", &g.fallback),
    ];
    for (o, &c) in OFFSETS.iter().enumerate() {
        let x = shifted(&base, c);
        for (name, spec) in conventions(0.1, 37) {
            let spec = spec.with_reduction(Reduction::None);
            for weighted in [false, true] {
                let mut batch = Batch::classes(shape, &x, &labels);
                if weighted {
                    batch = batch.with_weights(&weights);
                }
                let what = format!("strided c={c:e} {name} weighted={weighted}");
                for ((path, _), (_, _, e)) in kernels.iter().zip(check_paths(
                    &what,
                    &kernels,
                    &spec,
                    &batch,
                    &options_for(&batch),
                )) {
                    table.add(path, o, e);
                }
            }
        }
        let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::None);
        let batch = Batch::probabilities(shape, &x, &probs_strided).with_weights(&weights);
        let what = format!("strided c={c:e} probabilities weighted");
        for ((path, _), (_, _, e)) in kernels.iter().zip(check_paths(
            &what,
            &kernels,
            &spec,
            &batch,
            &options_for(&batch),
        )) {
            table.add(path, o, e);
        }
    }
    table.print("offsets, f32 [N, C, d]");
}

/// f16 logits at the offsets f16 can hold (|c| <= 65504), bf16 at all; the gradient in the
/// logits' type.
#[test]
fn offsets_half_precision() {
    let g = gpu();
    let paths = paths(g);
    let paths = borrowed(&paths);
    let mut f16_table = Table::default();
    let mut bf16_table = Table::default();
    let mut rng = Rng::new(0x4a1f);
    for k in [37u32, 2000] {
        let rows = 4u32;
        let shape = Shape::matrix(rows, k).unwrap();
        let base = rng.logits((rows * k) as usize, 2.0);
        let labels = rng.labels(rows as usize, k, -100, 0.0);
        let weights = rng.weights(k as usize);
        for (o, &c) in OFFSETS.iter().enumerate() {
            let x = shifted(&base, c);
            let f16: Vec<u16> = x.iter().map(|&v| half::f32_to_f16(v)).collect();
            let bf16: Vec<u16> = x.iter().map(|&v| half::f32_to_bf16(v)).collect();
            let mut inputs = vec![(Logits::Bf16(&bf16), &mut bf16_table, "bf16")];
            if c.abs() <= 65504.0 {
                inputs.push((Logits::F16(&f16), &mut f16_table, "f16"));
            }
            for (logits, table, dtype) in inputs {
                for (name, spec) in [
                    ("uniform", LossSpec::pytorch(0.1)),
                    (
                        "off_target+excluded",
                        LossSpec::default()
                            .with_smoothing(Smoothing::OffTarget(0.1))
                            .with_excluded_class(Some(0)),
                    ),
                ] {
                    let spec = spec.with_reduction(Reduction::None);
                    let batch = Batch::classes(shape, logits, &labels).with_weights(&weights);
                    let what = format!("{dtype} K={k} c={c:e} {name} weighted");
                    for ((path, _), (_, _, e)) in paths.iter().zip(check_paths(
                        &what,
                        &paths,
                        &spec,
                        &batch,
                        &options_for(&batch),
                    )) {
                        table.add(path, o, e);
                    }
                }
            }
        }
    }
    f16_table.print("offsets, f16");
    bf16_table.print("offsets, bf16");
}

fn batch_of<'a>(
    shape: Shape,
    x: &'a [f32],
    targets: Targets<'a>,
    weights: Option<&'a [f32]>,
) -> Batch<'a> {
    let b = match targets {
        Targets::Classes(y) => Batch::classes(shape, x, y),
        Targets::Probabilities(p) => Batch::probabilities(shape, x, p),
    };
    match weights {
        Some(w) => b.with_weights(w),
        None => b,
    }
}

/// Shift-invariance itself: logits on a grid that every offset of a group holds exactly (steps
/// of 1/8 for |c| <= 1e6, of the ulp of 1e30 for +-1e30), so the rows at offset c and at 0
/// differ by exactly c. The CPU reference is then the same at both, the derived bounds are the
/// same (the model has no term in |c|), and the GPU's losses and gradients at c and at 0 agree
/// within the sum of the two bounds, on every path.
#[test]
fn shift_leaves_loss_and_gradient_unchanged() {
    let g = gpu();
    let paths = paths(g);
    let paths = borrowed(&paths);
    let mut rng = Rng::new(0x5417f7);
    let (mut loss_diff, mut grad_diff) = (BTreeMap::new(), BTreeMap::new());
    let groups: [(&[f64], f64); 2] = [
        (&[1e4, -1e4, 1e6, -1e6], 0.125),
        (&[1e30, -1e30], 2f64.powi(76)),
    ];
    for (offsets, step) in groups {
        for k in [6u32, 37, 2000] {
            let rows = 4u32;
            let shape = Shape::matrix(rows, k).unwrap();
            let base: Vec<f32> = (0..rows * k)
                .map(|_| (step * (f64::from(rng.below(81)) - 40.0)) as f32)
                .collect();
            let labels = rng.labels(rows as usize, k, -100, 0.0);
            let weights = rng.weights(k as usize);
            let probs = rng.probabilities(rows as usize, k as usize, true);
            for &c in offsets {
                let c32 = f64::from(c as f32);
                let x = shifted(&base, c32);
                for (xv, bv) in x.iter().zip(&base) {
                    assert_eq!(
                        f64::from(*xv) - c32,
                        f64::from(*bv),
                        "grid not exact at {c:e}"
                    );
                }
                let cases: Vec<(&str, LossSpec, bool, bool)> = vec![
                    ("uniform", LossSpec::pytorch(0.1), false, false),
                    ("uniform weighted", LossSpec::pytorch(0.1), true, false),
                    (
                        "off_target+excluded weighted",
                        LossSpec::default()
                            .with_smoothing(Smoothing::OffTarget(0.1))
                            .with_excluded_class(Some(k / 2)),
                        true,
                        false,
                    ),
                    (
                        "explicit",
                        LossSpec::default()
                            .with_smoothing(Smoothing::Explicit { on: 0.7, off: 0.05 }),
                        false,
                        false,
                    ),
                    ("probabilities weighted", LossSpec::pytorch(0.1), true, true),
                ];
                for (name, spec, weighted, soft) in cases {
                    let spec = spec.with_reduction(Reduction::None);
                    let targets = if soft {
                        Targets::Probabilities(&probs)
                    } else {
                        Targets::Classes(&labels)
                    };
                    let w = weighted.then_some(&weights[..]);
                    let make = |x| batch_of(shape, x, targets, w);
                    let what = format!("grid K={k} {name}");
                    let (batch_0, batch_c) = (make(&base), make(&x));
                    let options = options_for(&batch_0);
                    let at_0 =
                        check_paths(&format!("{what} c=0"), &paths, &spec, &batch_0, &options);
                    let at_c = check_paths(
                        &format!("{what} c={c:e}"),
                        &paths,
                        &spec,
                        &batch_c,
                        &options,
                    );
                    for ((path, _), ((out0, r0, _), (outc, rc, _))) in
                        paths.iter().zip(at_0.iter().zip(&at_c))
                    {
                        let what = format!("{what} c={c:e} [{path}]");
                        let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
                        for r in 0..rows as usize {
                            assert!(
                                same(r0.out.loss[r], rc.out.loss[r]),
                                "{what}: CPU loss row {r}"
                            );
                            assert!(
                                same(r0.loss_tol[r], rc.loss_tol[r]),
                                "{what}: the loss bound depends on c"
                            );
                            let d = (f64::from(outc.loss[r]) - f64::from(out0.loss[r])).abs();
                            assert!(
                                d <= r0.loss_tol[r] + rc.loss_tol[r],
                                "{what}: loss row {r} at c {} vs at 0 {}: |diff| {d:e} > {:e}",
                                outc.loss[r],
                                out0.loss[r],
                                r0.loss_tol[r] + rc.loss_tol[r]
                            );
                            let e = loss_diff.entry((*path, c.to_bits())).or_insert(0.0f64);
                            *e = e.max(d);
                        }
                        let (g0, gc) = (out0.grad.as_ref().unwrap(), outc.grad.as_ref().unwrap());
                        let (t0, tc) =
                            (r0.grad_tol.as_ref().unwrap(), rc.grad_tol.as_ref().unwrap());
                        for i in 0..g0.len() {
                            assert!(
                                same(t0[i], tc[i]),
                                "{what}: the gradient bound depends on c"
                            );
                            let d = (f64::from(gc[i]) - f64::from(g0[i])).abs();
                            assert!(
                                d <= t0[i] + tc[i],
                                "{what}: grad[{i}] at c {} vs at 0 {}: |diff| {d:e} > {:e}",
                                gc[i],
                                g0[i],
                                t0[i] + tc[i]
                            );
                            let e = grad_diff.entry((*path, c.to_bits())).or_insert(0.0f64);
                            *e = e.max(d);
                        }
                    }
                }
            }
        }
    }
    eprintln!("[shift invariance] largest |GPU(c) - GPU(0)| per path and offset");
    for (key, l) in &loss_diff {
        eprintln!(
            "  {:<26} c = {:>7.0e}  loss {l:.3e}  grad {:.3e}",
            key.0,
            f64::from_bits(key.1),
            grad_diff[key]
        );
    }
}
