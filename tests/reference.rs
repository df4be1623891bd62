//! The CPU reference is the ground truth of every GPU test, so it is checked independently here:
//! its gradient against an f64 finite difference of its own loss, its loss against PyTorch's
//! formulation (log-softmax, nll, smooth term) written out literally, and against the
//! explicit target distribution `q` of each smoothing convention. No GPU needed.

mod common;

use common::{coefficients, Rng, RowTarget};
use lsce::{cpu, Batch, LossSpec, Reduction, Shape, Smoothing, Targets, UpstreamGrad};

/// Every smoothing convention, with and without an excluded (padding) class.
fn conventions(eps: f32, k: u32) -> Vec<(String, LossSpec)> {
    let base = LossSpec::default();
    vec![
        (
            "uniform".into(),
            base.with_smoothing(Smoothing::Uniform(eps)),
        ),
        (
            "off_target".into(),
            base.with_smoothing(Smoothing::OffTarget(eps)),
        ),
        (
            "explicit".into(),
            base.with_smoothing(Smoothing::Explicit {
                on: 1.0 - eps,
                off: eps / 3.0,
            }),
        ),
        (
            "uniform+excluded".into(),
            base.with_smoothing(Smoothing::Uniform(eps))
                .with_excluded_class(Some(0)),
        ),
        (
            "off_target+excluded".into(),
            base.with_smoothing(Smoothing::OffTarget(eps))
                .with_excluded_class(Some(k - 1)),
        ),
    ]
}

/// Logits on the grid of multiples of 2^-10 in [-4, 4]: `x +- h` and `x +- 2h` with
/// `h = 2^-10` are then exact f32 values, so a finite difference has exactly the step it claims.
fn grid_logits(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.range(-4.0, 4.0) * 1024.0).round() / 1024.0) as f32)
        .collect()
}

/// The scalar whose gradient `cpu::compute` returns: the reduced loss times the scalar upstream
/// gradient, or `sum_r u_r loss_r` for a per-row upstream gradient.
fn objective(spec: &LossSpec, batch: &Batch<'_>) -> f64 {
    let out = cpu::compute(spec, batch, lsce::Gradient::None).unwrap();
    match (spec.reduction, batch.upstream) {
        (Reduction::None, UpstreamGrad::PerRow(u)) => {
            out.loss.iter().zip(u).map(|(l, u)| l * f64::from(*u)).sum()
        }
        (Reduction::None, _) => out.loss.iter().sum(),
        (_, UpstreamGrad::Scalar(g)) => out.loss[0] * f64::from(g),
        _ => out.loss[0],
    }
}

/// Checks `cpu::compute`'s gradient against a 4th-order central difference (Richardson:
/// `(8 (L(x+h) - L(x-h)) - (L(x+2h) - L(x-2h))) / 12h`, h = 2^-10).
///
/// Error budget: truncation `h^4 / 30 |L^(5)|` ~ 3e-14 |L^(5)|, and |L^(5)| stays below ~1e3 for
/// these scales (logit_scale 1.5 gives 1.5^5 ~ 8 times bounded cumulants of a softmax); round-off
/// `1.5 delta / h` with `delta` the f64 error of one loss evaluation (~ K rows 1e-16 |terms|,
/// ~1e-13 here) ~ 2e-10. So `1e-8 (1 + |g|)` is a bound with two orders of margin, and still
/// five orders below any real slip (a missing factor, a wrong sign, a lost slope).
fn check_fd(name: &str, spec: &LossSpec, batch: &Batch<'_>, logits: &[f32]) -> f64 {
    let analytic = cpu::compute(spec, batch, lsce::Gradient::Separate)
        .unwrap()
        .grad
        .unwrap();
    let h = 2f32.powi(-10);
    let mut worst = 0.0f64;
    let mut x = logits.to_vec();
    for i in 0..logits.len() {
        let mut eval = |delta: f32| {
            x[i] = logits[i] + delta;
            assert_eq!(f64::from(x[i]) - f64::from(logits[i]), f64::from(delta));
            let b = Batch {
                logits: lsce::Logits::F32(&x),
                ..*batch
            };
            let v = objective(spec, &b);
            x[i] = logits[i];
            v
        };
        let (p1, m1, p2, m2) = (eval(h), eval(-h), eval(2.0 * h), eval(-2.0 * h));
        let fd = (8.0 * (p1 - m1) - (p2 - m2)) / (12.0 * f64::from(h));
        let g = analytic[i];
        let err = (fd - g).abs();
        assert!(
            err <= 1e-8 * (1.0 + g.abs()),
            "{name}: d loss / d x[{i}]: analytic {g:e} vs finite difference {fd:e} (|diff| {err:e})"
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn gradient_matches_finite_differences_for_every_convention() {
    let (rows, k) = (4usize, 7u32);
    let shape = Shape::matrix(rows as u32, k).unwrap();
    let mut rng = Rng::new(11);
    let logits = grid_logits(&mut rng, rows * k as usize);
    // Row 2 ignored, row 3 labelled with the class that some specs exclude.
    let labels = [3, 6, -100, 0];
    let weights = rng.weights(k as usize);
    let probs = rng.probabilities(rows, k as usize, false);
    let per_row = [0.7f32, -1.3, 2.0, 0.25];
    let mut worst = 0.0f64;
    let mut cases = 0;
    for eps in [0.0, 0.1, 0.9, 1.0] {
        for (name, base) in conventions(eps, k) {
            let extras = [
                ("plain", base),
                (
                    "softcap+zloss+scale",
                    base.with_softcap(Some(3.0))
                        .with_z_loss(0.01)
                        .with_logit_scale(1.5),
                ),
            ];
            for (extra, spec) in extras {
                for weighted in [false, true] {
                    for (reduction, upstream) in [
                        (Reduction::Mean, UpstreamGrad::One),
                        (Reduction::Mean, UpstreamGrad::Scalar(-0.6)),
                        (Reduction::Sum, UpstreamGrad::Scalar(1.7)),
                        (Reduction::None, UpstreamGrad::PerRow(&per_row)),
                    ] {
                        let spec = spec.with_reduction(reduction);
                        for soft in [false, true] {
                            let mut batch = if soft {
                                Batch::probabilities(shape, &logits, &probs)
                            } else {
                                Batch::classes(shape, &logits, &labels)
                            };
                            if weighted {
                                batch = batch.with_weights(&weights);
                            }
                            let batch = batch.with_upstream(upstream);
                            let what = format!(
                                "{name} eps={eps} {extra} weighted={weighted} {reduction:?} \
                                 {upstream:?} soft={soft}"
                            );
                            worst = worst.max(check_fd(&what, &spec, &batch, &logits));
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    eprintln!("[reference] finite differences: {cases} cases, max |analytic - FD| {worst:.3e}");
}

/// `log_softmax` of one row in f64, the way PyTorch computes it (x - max - log sum exp(x - max)).
fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
    z.iter().map(|v| v - m - s.ln()).collect()
}

/// PyTorch's `cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)`
/// for class-index targets, transcribed from `cross_entropy_loss_label_smoothing` in
/// aten/src/ATen/native/LossNLL.cpp: `(1 - eps) * nll + eps / K * smooth`, with
/// `smooth_r = -sum_c w_c logp_rc` (0 on ignored rows), the mean's smooth term divided by the
/// same weight sum as nll_loss.
fn pytorch_class_targets(
    logits: &[f32],
    labels: &[i32],
    k: usize,
    weights: Option<&[f32]>,
    ignore: i32,
    reduction: Reduction,
    eps: f64,
) -> Vec<f64> {
    let w = |c: usize| weights.map_or(1.0, |w| f64::from(w[c]));
    let rows = labels.len();
    let mut nll = vec![0.0; rows];
    let mut smooth = vec![0.0; rows];
    let mut weight_sum = 0.0;
    for r in 0..rows {
        if labels[r] == ignore {
            continue;
        }
        let y = labels[r] as usize;
        let z: Vec<f64> = logits[r * k..(r + 1) * k]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let lp = log_softmax(&z);
        nll[r] = -w(y) * lp[y];
        smooth[r] = -(0..k).map(|c| w(c) * lp[c]).sum::<f64>();
        weight_sum += w(y);
    }
    let combine = |n: f64, s: f64| (1.0 - eps) * n + eps / k as f64 * s;
    match reduction {
        Reduction::None => (0..rows).map(|r| combine(nll[r], smooth[r])).collect(),
        Reduction::Sum => vec![combine(nll.iter().sum(), smooth.iter().sum())],
        Reduction::Mean => vec![combine(
            nll.iter().sum::<f64>() / weight_sum,
            smooth.iter().sum::<f64>() / weight_sum,
        )],
    }
}

/// PyTorch for probability targets: `-sum_c w_c ((1 - eps) t_c + eps / K) logp_c` per row,
/// the mean over all rows (`N * d1 * ...`), no ignore index.
fn pytorch_prob_targets(
    logits: &[f32],
    probs: &[f32],
    k: usize,
    weights: Option<&[f32]>,
    reduction: Reduction,
    eps: f64,
) -> Vec<f64> {
    let w = |c: usize| weights.map_or(1.0, |w| f64::from(w[c]));
    let rows = logits.len() / k;
    let per_row: Vec<f64> = (0..rows)
        .map(|r| {
            let z: Vec<f64> = logits[r * k..(r + 1) * k]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let lp = log_softmax(&z);
            -(0..k)
                .map(|c| {
                    let q = (1.0 - eps) * f64::from(probs[r * k + c]) + eps / k as f64;
                    w(c) * q * lp[c]
                })
                .sum::<f64>()
        })
        .collect();
    match reduction {
        Reduction::None => per_row,
        Reduction::Sum => vec![per_row.iter().sum()],
        Reduction::Mean => vec![per_row.iter().sum::<f64>() / rows as f64],
    }
}

fn assert_rel(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * (1.0 + w.abs()),
            "{what}[{i}]: {g:e} vs {w:e}"
        );
    }
}

/// Both sides are f64 sums of ~K terms of size ~|logit| (<= 5 here): their rounding differs by
/// ~K * 1e-16 * 5, far below 1e-12.
const F64_REL: f64 = 1e-12;

#[test]
fn uniform_smoothing_matches_pytorch_formulation() {
    let mut rng = Rng::new(5);
    for (rows, k) in [(9usize, 5usize), (20, 33), (3, 1000)] {
        let shape = Shape::matrix(rows as u32, k as u32).unwrap();
        let logits = rng.logits(rows * k, 1.5);
        let labels = rng.labels(rows, k as u32, -100, 0.2);
        let probs = rng.probabilities(rows, k, false);
        let weights = rng.weights(k);
        for eps in [0.0f32, 0.1, 0.9, 1.0] {
            for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                for weighted in [false, true] {
                    let spec = LossSpec::pytorch(eps).with_reduction(reduction);
                    let w = weighted.then_some(weights.as_slice());
                    let mut batch = Batch::classes(shape, &logits, &labels);
                    let mut soft = Batch::probabilities(shape, &logits, &probs);
                    if let Some(w) = w {
                        batch = batch.with_weights(w);
                        soft = soft.with_weights(w);
                    }
                    let what = format!("K={k} eps={eps} {reduction:?} weighted={weighted}");
                    let want = pytorch_class_targets(
                        &logits,
                        &labels,
                        k,
                        w,
                        -100,
                        reduction,
                        f64::from(eps),
                    );
                    let got = cpu::compute(&spec, &batch, lsce::Gradient::None)
                        .unwrap()
                        .loss;
                    assert_rel(&format!("{what} classes"), &got, &want, F64_REL);
                    let want =
                        pytorch_prob_targets(&logits, &probs, k, w, reduction, f64::from(eps));
                    let got = cpu::compute(&spec, &soft, lsce::Gradient::None)
                        .unwrap()
                        .loss;
                    assert_rel(&format!("{what} probabilities"), &got, &want, F64_REL);
                }
            }
        }
    }
}

/// Each convention's loss equals `-sum_c w_c q_c log softmax(z)_c + z_loss lse^2` with `q` built
/// from the table in src/spec.rs by `common::coefficients` (independent of `target_values`),
/// `z = cap tanh(scale x / cap)` written out here.
#[test]
fn every_convention_matches_its_explicit_distribution() {
    let mut rng = Rng::new(6);
    let (rows, k) = (12usize, 9usize);
    let shape = Shape::matrix(rows as u32, k as u32).unwrap();
    let logits = rng.logits(rows * k, 2.0);
    let mut labels = rng.labels(rows, k as u32, -100, 0.2);
    labels[0] = 0; // the class excluded below, as a label
    labels[1] = k as i32 - 1;
    let probs = rng.probabilities(rows, k, true);
    let weights = rng.weights(k);
    for eps in [0.0f32, 0.1, 0.9, 1.0] {
        for (name, base) in conventions(eps, k as u32) {
            for (cap, scale, zl) in [(None, 1.0f32, 0.0f32), (Some(2.5f32), 0.7, 0.05)] {
                let spec = base
                    .with_reduction(Reduction::None)
                    .with_softcap(cap)
                    .with_logit_scale(scale)
                    .with_z_loss(zl);
                for soft in [false, true] {
                    let batch = if soft {
                        Batch::probabilities(shape, &logits, &probs)
                    } else {
                        Batch::classes(shape, &logits, &labels)
                    }
                    .with_weights(&weights);
                    let got = cpu::compute(&spec, &batch, lsce::Gradient::None).unwrap();
                    for r in 0..rows {
                        let target = if soft {
                            RowTarget::Soft(&probs[r * k..(r + 1) * k])
                        } else if labels[r] == -100 {
                            assert_eq!(got.loss[r], 0.0);
                            assert_eq!(got.lse[r], 0.0);
                            continue;
                        } else {
                            RowTarget::Class(labels[r])
                        };
                        let z: Vec<f64> = logits[r * k..(r + 1) * k]
                            .iter()
                            .map(|&x| {
                                let u = f64::from(scale) * f64::from(x);
                                cap.map_or(u, |c| f64::from(c) * (u / f64::from(c)).tanh())
                            })
                            .collect();
                        let lp = log_softmax(&z);
                        let lse = z[0] - lp[0];
                        let a = coefficients(&spec, Some(&weights), target, k);
                        let want =
                            -(0..k).map(|c| a[c] * lp[c]).sum::<f64>() + f64::from(zl) * lse * lse;
                        let what = format!("{name} eps={eps} cap={cap:?} soft={soft} row {r}");
                        assert_rel(&what, &[got.loss[r]], &[want], F64_REL);
                        assert_rel(&format!("{what} lse"), &[got.lse[r]], &[lse], F64_REL);
                    }
                }
            }
        }
    }
}

/// K = 1: every convention puts all target mass... on the only class, so loss and gradient are
/// 0 (`q = (1)` for Uniform and OffTarget; `on * (lse - z) = 0` for Explicit).
/// K = 2: the closed form with `sigma`.
#[test]
fn one_and_two_classes_are_defined() {
    let logits = [3.5f32, -2.0, 0.0];
    let shape = Shape::matrix(3, 1).unwrap();
    for eps in [0.0f32, 0.1, 0.9, 1.0] {
        for smoothing in [
            Smoothing::Uniform(eps),
            Smoothing::OffTarget(eps),
            Smoothing::Explicit {
                on: 1.0 - eps,
                off: eps,
            },
        ] {
            let spec = LossSpec::default()
                .with_smoothing(smoothing)
                .with_reduction(Reduction::None);
            let out = cpu::compute(
                &spec,
                &Batch::classes(shape, &logits, &[0, 0, 0]),
                lsce::Gradient::Separate,
            )
            .unwrap();
            assert_eq!(out.loss, vec![0.0; 3], "{smoothing:?}");
            assert_eq!(out.grad.unwrap(), vec![0.0; 3], "{smoothing:?}");
            assert_eq!(out.lse, vec![3.5, -2.0, 0.0]);
        }
    }
    // An excluded class needs a second class.
    let spec = LossSpec::default().with_excluded_class(Some(0));
    assert_eq!(
        cpu::compute(
            &spec,
            &Batch::classes(shape, &logits, &[0, 0, 0]),
            lsce::Gradient::None
        ),
        Err(lsce::LsceError::InvalidExcludedClass {
            class: 0,
            classes: 1
        })
    );

    // K = 2, label 0, d = z0 - z1: loss = -q0 log sigma(d) - q1 log sigma(-d).
    let logits = [1.25f32, -0.5];
    let shape = Shape::matrix(1, 2).unwrap();
    let d = 1.75f64;
    let log_sig = |x: f64| -(1.0 + (-x).exp()).ln();
    for eps in [0.0f32, 0.1, 0.9, 1.0] {
        let e = f64::from(eps);
        for (smoothing, q0, q1) in [
            (Smoothing::Uniform(eps), 1.0 - e / 2.0, e / 2.0),
            (Smoothing::OffTarget(eps), 1.0 - e, e),
        ] {
            let spec = LossSpec::default().with_smoothing(smoothing);
            let out = cpu::compute(
                &spec,
                &Batch::classes(shape, &logits, &[0]),
                lsce::Gradient::Separate,
            )
            .unwrap();
            let want = -q0 * log_sig(d) - q1 * log_sig(-d);
            assert_rel(&format!("{smoothing:?}"), &out.loss, &[want], F64_REL);
            // grad_0 = sigma(d) - q0, grad_1 = -grad_0 (mass 1).
            let p0 = 1.0 / (1.0 + (-d).exp());
            assert_rel(
                &format!("{smoothing:?} grad"),
                &out.grad.unwrap(),
                &[p0 - q0, q0 - p0],
                F64_REL,
            );
        }
        // Excluding class 1 leaves one receiving class: plain cross-entropy whatever eps.
        for smoothing in [Smoothing::Uniform(eps), Smoothing::OffTarget(eps)] {
            let spec = LossSpec::default()
                .with_smoothing(smoothing)
                .with_excluded_class(Some(1));
            let out = cpu::compute(
                &spec,
                &Batch::classes(shape, &logits, &[0]),
                lsce::Gradient::None,
            )
            .unwrap();
            let want = if matches!(smoothing, Smoothing::Uniform(_)) {
                -log_sig(d)
            } else {
                -(1.0 - e) * log_sig(d)
            };
            assert_rel(
                &format!("{smoothing:?} excluded"),
                &out.loss,
                &[want],
                F64_REL,
            );
        }
    }
}

#[test]
fn golden_values() {
    // Equal logits: lse = ln K + x, loss = A ln K for every target (A = 1 for Uniform).
    let shape = Shape::matrix(2, 4).unwrap();
    let logits = [2.0f32; 8];
    for eps in [0.0f32, 0.3, 1.0] {
        let spec = LossSpec::pytorch(eps).with_reduction(Reduction::None);
        let out = cpu::compute(
            &spec,
            &Batch::classes(shape, &logits, &[1, 3]),
            lsce::Gradient::Separate,
        )
        .unwrap();
        assert_rel("equal logits", &out.loss, &[4f64.ln(), 4f64.ln()], F64_REL);
        assert_rel("equal lse", &out.lse, &[2.0 + 4f64.ln(); 2], F64_REL);
        // grad = 1/4 - q: q_y = 1 - 3 eps / 4, q_other = eps / 4.
        let e = f64::from(eps);
        let g = out.grad.unwrap();
        assert_rel("equal grad y", &[g[1]], &[0.25 - (1.0 - 0.75 * e)], F64_REL);
        assert_rel("equal grad other", &[g[0]], &[0.25 - e / 4.0], F64_REL);
    }
    // Mean with weights divides by the label weights: rows (y=0, w=2), (y=1, w=0.5).
    let shape = Shape::matrix(2, 2).unwrap();
    let logits = [0.0f32, 0.0, 0.0, 0.0];
    let out = cpu::compute(
        &LossSpec::default(),
        &Batch::classes(shape, &logits, &[0, 1]).with_weights(&[2.0, 0.5]),
        lsce::Gradient::Separate,
    )
    .unwrap();
    assert_eq!(out.denominator, 2.5);
    assert_rel("weighted mean", &out.loss, &[2f64.ln()], F64_REL);
    // d/dx of (2 ln2 + 0.5 ln2) / 2.5 for row 0: w_0 (p - onehot) / 2.5 = 2 (0.5 - 1) / 2.5.
    assert_rel(
        "weighted mean grad",
        &out.grad.unwrap(),
        &[-0.4, 0.4, 0.1, -0.1],
        F64_REL,
    );
}

#[test]
fn ignored_rows_and_the_empty_mean() {
    let shape = Shape::matrix(3, 4).unwrap();
    let logits: Vec<f32> = (0..12).map(|v| v as f32 * 0.3).collect();
    let labels = [-100, -100, -100];
    let batch = Batch::classes(shape, &logits, &labels);
    let mean = cpu::compute(&LossSpec::pytorch(0.1), &batch, lsce::Gradient::Separate).unwrap();
    assert!(
        mean.loss[0].is_nan(),
        "mean over no rows is NaN, as PyTorch"
    );
    assert_eq!(mean.denominator, 0.0);
    assert!(
        mean.grad.unwrap().iter().all(|&g| g == 0.0),
        "gradient of ignored rows is 0"
    );
    assert_eq!(mean.lse, vec![0.0; 3]);
    let sum = cpu::compute(
        &LossSpec::pytorch(0.1).with_reduction(Reduction::Sum),
        &batch,
        lsce::Gradient::Separate,
    )
    .unwrap();
    assert_eq!(sum.loss, vec![0.0]);
    // ignore_index None: -100 is just an invalid label.
    let err = cpu::compute(
        &LossSpec::default().with_ignore_index(None),
        &batch,
        lsce::Gradient::None,
    );
    assert_eq!(
        err,
        Err(lsce::LsceError::LabelOutOfRange {
            row: 0,
            label: -100,
            classes: 4
        })
    );
    // A custom ignore value that is a valid class.
    let labels = [2, 1, 2];
    let spec = LossSpec::default().with_ignore_index(Some(2));
    let out = cpu::compute(
        &spec,
        &Batch::classes(shape, &logits, &labels),
        lsce::Gradient::Separate,
    )
    .unwrap();
    assert_eq!(out.denominator, 1.0);
    let only = cpu::compute(
        &LossSpec::default(),
        &Batch::classes(Shape::matrix(1, 4).unwrap(), &logits[4..8], &[1]),
        lsce::Gradient::None,
    )
    .unwrap();
    assert_eq!(out.loss, only.loss);
}

/// The statistics sweep against a naive two-pass log-sum-exp, including rows that start with
/// -inf and rows that are all -inf.
#[test]
fn row_statistics_match_a_two_pass_lse() {
    let mut rng = Rng::new(8);
    for _ in 0..200 {
        let k = 1 + rng.below(50) as usize;
        let mut z: Vec<f64> = (0..k).map(|_| rng.normal() * 10.0).collect();
        for v in z.iter_mut() {
            if rng.uniform() < 0.2 {
                *v = f64::NEG_INFINITY;
            }
        }
        let st = cpu::row_statistics(&z);
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            assert_eq!(st.lse, f64::NEG_INFINITY);
            continue;
        }
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        assert!((st.lse - lse).abs() <= 1e-13 * (1.0 + lse.abs()), "{z:?}");
        assert_eq!(st.max, m);
        assert_eq!(
            cpu::argmax(&z) as usize,
            z.iter().position(|&v| v == m).unwrap()
        );
    }
}

/// The extreme-logit semantics the GPU tests hold the kernels to, on the reference itself.
#[test]
fn extreme_logits_semantics() {
    let shape = Shape::matrix(3, 4).unwrap();
    let inf = f32::INFINITY;
    let logits = [
        1.0,
        -inf,
        0.5,
        0.0, // -inf on a non-target class
        1.0,
        f32::NAN,
        0.5,
        0.0, // NaN
        1.0,
        2.0,
        0.5,
        0.0, // plain
    ];
    let labels = [0, 0, 0];
    let batch = Batch::classes(shape, &logits, &labels);
    let none = |eps| LossSpec::pytorch(eps).with_reduction(Reduction::None);
    let smooth = cpu::compute(&none(0.1), &batch, lsce::Gradient::Separate).unwrap();
    assert_eq!(
        smooth.loss[0],
        f64::INFINITY,
        "eps > 0 puts mass on the -inf class"
    );
    let g = smooth.grad.unwrap();
    assert!(
        g[..4].iter().all(|v| v.is_finite()),
        "gradient stays finite: {:?}",
        &g[..4]
    );
    assert!(smooth.loss[1].is_nan() && g[4..8].iter().all(|v| v.is_nan()));
    assert!(smooth.loss[2].is_finite() && g[8..].iter().all(|v| v.is_finite()));
    let plain = cpu::compute(&none(0.0), &batch, lsce::Gradient::Separate).unwrap();
    assert!(
        plain.loss[0].is_finite(),
        "eps = 0 never reads the -inf class's log-prob"
    );
    assert_eq!(plain.grad.unwrap()[1], 0.0);
    // Probability targets: 0 * -inf is NaN, as in PyTorch.
    let probs = [
        0.5f32, 0.0, 0.5, 0.0, 0.25, 0.25, 0.25, 0.25, 1.0, 0.0, 0.0, 0.0,
    ];
    let soft = cpu::compute(
        &none(0.0),
        &Batch::probabilities(shape, &logits, &probs),
        lsce::Gradient::None,
    )
    .unwrap();
    assert!(soft.loss[0].is_nan());
    assert!(matches!(
        Batch::probabilities(shape, &logits, &probs).targets,
        Targets::Probabilities(_)
    ));
}
