//! Ignored rows are never read: NaN or infinite logits in a row whose label is `ignore_index`
//! leave the loss, the mean's denominator and every other row untouched, and the row's
//! gradient is exactly 0. This is where lsce deliberately differs from PyTorch, whose
//! log-softmax backward multiplies the row's NaN by 0 and gives a NaN gradient there (the
//! README and the crate docs say so); zeros are what padding wants.

mod common;

use common::*;
use lsce::{Batch, LossSpec, Reduction, Shape, StagingOptions};

/// Rows 1 and 4 of each batch are ignored; their logits hold NaN, +inf and -inf (the poisoned
/// batch) or ordinary values (the clean batch).
fn poison(x: &mut [f32], k: usize, rows: &[usize]) {
    for &r in rows {
        let row = &mut x[r * k..(r + 1) * k];
        for (c, v) in row.iter_mut().enumerate() {
            *v = match c % 3 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                _ => f32::NEG_INFINITY,
            };
        }
    }
}

#[test]
fn non_finite_logits_in_ignored_rows_change_nothing() {
    let g = gpu();
    let mut rng = Rng::new(0x1e0);
    let ignored = [1usize, 4];
    for k in [7u32, 37, 2000] {
        let rows = 6u32;
        let shape = Shape::matrix(rows, k).unwrap();
        let clean = rng.logits((rows * k) as usize, 2.0);
        let mut poisoned = clean.clone();
        poison(&mut poisoned, k as usize, &ignored);
        let mut labels = rng.labels(rows as usize, k, -100, 0.0);
        for &r in &ignored {
            labels[r] = -100;
        }
        let weights = rng.weights(k as usize);
        for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            for eps in [0.0f32, 0.1] {
                for weighted in [false, true] {
                    let spec = LossSpec::pytorch(eps).with_reduction(reduction);
                    let batch = |x| {
                        let b = Batch::classes(shape, x, &labels);
                        if weighted {
                            b.with_weights(&weights)
                        } else {
                            b
                        }
                    };
                    let what = format!("K={k} {reduction:?} eps={eps} weighted={weighted}");
                    let options = StagingOptions {
                        accuracy: true,
                        ..StagingOptions::default()
                    };
                    let want = check_paths(&what, &g.kernels(), &spec, &batch(&clean), &options);
                    let got = check_paths(
                        &format!("{what} poisoned"),
                        &g.kernels(),
                        &spec,
                        &batch(&poisoned),
                        &options,
                    );
                    for ((path, _), ((clean_out, _, _), (out, _, _))) in
                        g.kernels().iter().zip(want.iter().zip(&got))
                    {
                        let what = format!("{what} [{path}]");
                        // Bit for bit: the ignored rows are never read, so nothing else can
                        // differ, reductions included.
                        assert_eq!(bits(&out.loss), bits(&clean_out.loss), "{what}: loss");
                        assert_eq!(bits(&out.lse), bits(&clean_out.lse), "{what}: lse");
                        assert_eq!(
                            out.denominator.to_bits(),
                            clean_out.denominator.to_bits(),
                            "{what}: denominator"
                        );
                        assert_eq!(out.correct, clean_out.correct, "{what}: accuracy");
                        let grad = out.grad.as_ref().unwrap();
                        assert_eq!(
                            bits(grad),
                            bits(clean_out.grad.as_ref().unwrap()),
                            "{what}: gradient"
                        );
                        for &r in &ignored {
                            let row = &grad[r * k as usize..(r + 1) * k as usize];
                            assert!(
                                row.iter().all(|v| v.to_bits() == 0),
                                "{what}: ignored row {r} has a nonzero gradient"
                            );
                            if reduction == Reduction::None {
                                assert_eq!(out.loss[r].to_bits(), 0, "{what}: ignored row {r}");
                            }
                        }
                        let expected_denominator: f64 = labels
                            .iter()
                            .filter(|&&y| y != -100)
                            .map(|&y| {
                                if weighted {
                                    f64::from(weights[y as usize])
                                } else {
                                    1.0
                                }
                            })
                            .sum();
                        assert!(
                            (f64::from(out.denominator) - expected_denominator).abs()
                                <= 1e-6 * expected_denominator,
                            "{what}: denominator {} vs {expected_denominator}",
                            out.denominator
                        );
                    }
                }
            }
        }
    }
}

/// The strided `[N, C, d]` kernel: the same for ignored positions.
#[test]
fn non_finite_logits_in_ignored_positions_change_nothing() {
    let g = gpu();
    let mut rng = Rng::new(0x1e1);
    let shape = Shape::new(2, 11, 3).unwrap();
    let n = shape.elements() as usize;
    let clean = rng.logits(n, 2.0);
    let mut poisoned = clean.clone();
    let ignored = [1u32, 5];
    for &r in &ignored {
        for c in 0..11 {
            poisoned[shape.index(r, c) as usize] =
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][c as usize % 3];
        }
    }
    let mut labels = rng.labels(shape.rows() as usize, 11, -100, 0.0);
    for &r in &ignored {
        labels[r as usize] = -100;
    }
    let spec = LossSpec::pytorch(0.1);
    let options = StagingOptions::default();
    let want = g
        .kernel
        .compute(
            &g.queue,
            &spec,
            &Batch::classes(shape, &clean, &labels),
            &options,
        )
        .unwrap();
    let got = check_paths(
        "strided poisoned",
        &[("strided", &g.kernel)],
        &spec,
        &Batch::classes(shape, &poisoned, &labels),
        &options,
    );
    let out = &got[0].0;
    assert_eq!(bits(&out.loss), bits(&want.loss));
    assert_eq!(out.denominator, want.denominator);
    assert_eq!(out.denominator, 4.0);
    let grad = out.grad.as_ref().unwrap();
    assert_eq!(bits(grad), bits(want.grad.as_ref().unwrap()));
    for &r in &ignored {
        for c in 0..11 {
            assert_eq!(
                grad[shape.index(r, c) as usize].to_bits(),
                0,
                "row {r} class {c}"
            );
        }
    }
}
