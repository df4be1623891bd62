//! Vocabulary shards on the host: the f64 shard reference (pass 1, merge, pass 2) against the
//! unsharded `cpu::compute`, the record bytes round trip, the thread transport, and the errors.
//!
//! Bounds. The shard reference and `cpu::compute` are both f64 and differ only in summation
//! order and in the merge's rescaling: every compared value is a sum of at most `K + P` terms,
//! each below `T = 64 (1 + |value|)` here (logits ~ N(0, 9) so |z| < 30, coefficients and
//! upstream below 2), so the two differ by at most `2 (K + P) 2^-53 T` (recursive summation,
//! twice). The record round trip narrows each record field to f32 once (relative `E / 2`);
//! its bound is derived per row in `record_bound`.

mod shard_cases;

use lsce::shards::{
    self, block_bytes, exchange, merge, merge_records, record, reference, Collective, ShardBatch,
    ShardLayout, ShardProblem, ThreadCollective,
};
use lsce::{Batch, LossSpec, LsceError, Reduction, UpstreamGrad};
use shard_cases::common::E;
use shard_cases::{case, cases, close, layouts, Case};

const F64_E: f64 = f64::EPSILON / 2.0;

fn f64_bound(k: u32, p: usize, value: f64) -> f64 {
    2.0 * f64::from(k + p as u32) * F64_E * 64.0 * (1.0 + value.abs())
}

/// Runs the shard reference over `layout` and checks everything against the unsharded result.
fn check_reference(c: &Case, layout: &ShardLayout) -> f64 {
    let problem = c.problem(layout);
    let data: Vec<_> = (0..layout.shards()).map(|p| c.slices(layout, p)).collect();
    let parts: Vec<_> = data
        .iter()
        .map(|d| reference::partials(&problem, &d.batch(c)).unwrap())
        .collect();
    let merged = merge(&problem, &parts, c.upstream()).unwrap();
    let grads: Vec<Vec<f64>> = data
        .iter()
        .map(|d| reference::gradient(&problem, &d.batch(c), &merged).unwrap())
        .collect();
    let want = c.reference();
    let what = format!("{} P={}", c.name, layout.shards());
    let k = c.classes;
    let p = layout.shards();
    let out = &merged.output;
    let mut worst = close(&format!("{what} loss"), &out.loss, &want.loss, |i| {
        f64_bound(k * c.rows, p, want.loss[i])
    });
    worst = worst.max(close(
        &format!("{what} z_loss"),
        &out.z_loss,
        &want.z_loss,
        |i| f64_bound(k * c.rows, p, want.z_loss[i]),
    ));
    worst = worst.max(close(&format!("{what} lse"), &out.lse, &want.lse, |i| {
        f64_bound(k, p, want.lse[i])
    }));
    worst = worst.max(close(
        &format!("{what} denominator"),
        &[out.denominator],
        &[want.denominator],
        |_| f64_bound(c.rows, p, want.denominator),
    ));
    assert_eq!(out.correct, want.correct, "{what} correct");
    let grad = c.gather(layout, &grads);
    let want_grad = want.grad.unwrap();
    worst.max(close(&format!("{what} grad"), &grad, &want_grad, |i| {
        f64_bound(k, p, want_grad[i])
    }))
}

/// Issue 14, item 3: `[N, K, d]` logits split along dimension 1, each shard's part
/// `[N, c1 - c0, d]`, through the shard reference, against the unsharded `cpu::compute`.
#[test]
fn reference_matches_unsharded_for_class_dim1_logits() {
    for c in cases(12, 23) {
        let c = c.with_spatial(3);
        for layout in layouts(23) {
            assert!(check_reference(&c, &layout) <= 1.0);
        }
    }
}

#[test]
fn reference_matches_unsharded_for_every_feature_and_layout() {
    for classes in [23u32, 300] {
        for c in cases(9, classes) {
            for layout in layouts(classes) {
                let worst = check_reference(&c, &layout);
                assert!(worst <= 1.0);
            }
        }
    }
}

#[test]
fn accuracy_argmax_is_the_first_maximum_by_global_class() {
    // Ties across shard boundaries: the earlier class wins, as torch.argmax.
    let mut c = case("ties", LossSpec::default(), 4, 6, 3);
    c.logits = vec![
        1.0,
        5.0,
        0.0,
        5.0,
        0.0,
        5.0, // row 0: max 5 at classes 1, 3, 5
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0, // row 1: all equal: argmax 0
        0.0,
        1.0,
        2.0,
        3.0,
        9.0,
        9.0, // row 2: 4 and 5
        f32::NEG_INFINITY,
        0.0,
        0.0,
        0.0,
        0.0,
        7.0,
    ];
    c.labels = vec![1, 0, 4, 5];
    for widths in [
        [1u32, 1, 1, 1, 1, 1].as_slice(),
        &[2, 2, 2],
        &[1, 3, 2],
        &[3, 3],
    ] {
        let layout = ShardLayout::from_widths(widths).unwrap();
        check_reference(&c, &layout);
        let problem = c.problem(&layout);
        let parts: Vec<_> = (0..layout.shards())
            .map(|p| reference::partials(&problem, &c.slices(&layout, p).batch(&c)).unwrap())
            .collect();
        let merged = merge(&problem, &parts, c.upstream()).unwrap();
        assert_eq!(merged.argmax, vec![1, 0, 4, 5], "{widths:?}");
        assert_eq!(merged.output.correct, Some(4), "{widths:?}");
    }
}

#[test]
fn large_logits_do_not_cancel_across_shards() {
    // Confident rows of huge logits: the loss is tiny and must keep its digits.
    let mut c = case("huge", LossSpec::pytorch(0.05), 3, 40, 5);
    for (i, v) in c.logits.iter_mut().enumerate() {
        *v += 1.0e6
            + if i % 40 == c.labels[i / 40].max(0) as usize {
                30.0
            } else {
                0.0
            };
    }
    for layout in layouts(40) {
        check_reference(&c, &layout);
    }
}

/// The error of a merge from f32 records, per row: each field is rounded once to f32.
fn record_bound(parts: &[shards::ShardPartials], row: usize, z_loss: f64) -> (f64, f64) {
    let parts: Vec<&[shards::PartialRow]> = parts.iter().map(|p| p.rows.as_slice()).collect();
    if parts[0][row].kind != shards::RowKind::Valid {
        return (0.0, 0.0); // exactly 0 or NaN
    }
    let max = parts.iter().map(|p| p[row].max).fold(f64::MIN, f64::max);
    let m_abs = parts.iter().map(|p| p[row].max.abs()).fold(0.0, f64::max);
    let sum: f64 = parts
        .iter()
        .map(|p| p[row].sum_exp * (p[row].max - max).exp())
        .sum();
    let mass: f64 = parts.iter().map(|p| p[row].mass).sum();
    let lse = max + sum.ln();
    // ln S: s_p's rounding (E/2) and exp(m_p - M)'s argument (|m_p| + |M|) E/2; lse adds M's.
    let lse_err = E * (1.0 + max.abs() + 2.0 * m_abs);
    let terms: f64 = parts
        .iter()
        .map(|p| p[row].shifted.abs() + p[row].mass * ((max - p[row].max).abs() + 2.0 * m_abs))
        .sum();
    let loss_err = mass * lse_err
        + E * (mass * sum.ln().abs() + terms)
        + z_loss * (2.0 * lse.abs() * lse_err + E * lse * lse);
    (2.0 * lse_err, 2.0 * loss_err)
}

#[test]
fn records_round_trip_through_bytes() {
    for c in cases(11, 97) {
        for layout in layouts(97).into_iter().step_by(3) {
            let problem = c.problem(&layout);
            let data: Vec<_> = (0..layout.shards()).map(|p| c.slices(&layout, p)).collect();
            let parts: Vec<_> = data
                .iter()
                .map(|d| reference::partials(&problem, &d.batch(&c)).unwrap())
                .collect();
            let blocks: Vec<Vec<u8>> = parts
                .iter()
                .enumerate()
                .map(|(p, part)| record::encode(&problem, p, part).unwrap())
                .collect();
            for b in &blocks {
                assert_eq!(b.len(), block_bytes(&problem));
                assert_eq!(b.len(), 32 + 32 * c.rows as usize);
            }
            let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
            let from_bytes = merge_records(&problem, &refs, c.upstream()).unwrap();
            let exact = merge(&problem, &parts, c.upstream()).unwrap();
            let z = f64::from(c.spec.z_loss);
            let bounds: Vec<(f64, f64)> = (0..c.rows as usize)
                .map(|r| record_bound(&parts, r, z))
                .collect();
            let what = format!("{} P={} bytes", c.name, layout.shards());
            close(
                &format!("{what} lse"),
                &from_bytes.output.lse,
                &exact.output.lse,
                |i| bounds[i].0,
            );
            let upstream_max = c.upstream.iter().fold(1.0f32, |a, &b| a.max(b)) as f64;
            let total: f64 = bounds.iter().map(|b| b.1).sum::<f64>() * upstream_max;
            let loss_tol = |i: usize| match c.spec.reduction {
                Reduction::None => bounds[i].0.max(bounds[i].1),
                Reduction::Sum => total,
                Reduction::Mean => {
                    (total + E * exact.output.loss[0].abs() * c.rows as f64)
                        / exact.output.denominator
                }
            };
            close(
                &format!("{what} loss"),
                &from_bytes.output.loss,
                &exact.output.loss,
                loss_tol,
            );
            assert_eq!(from_bytes.output.correct, exact.output.correct, "{what}");
            assert_eq!(from_bytes.argmax, exact.argmax, "{what}");
        }
    }
}

#[test]
fn threads_exchange_once_and_agree_bitwise() {
    let c = &cases(13, 120)[4];
    let layout = ShardLayout::from_widths(&[50, 1, 69]).unwrap();
    let problem = c.problem(&layout);
    let ranks = ThreadCollective::group(3);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut col| {
                let problem = &problem;
                let layout = &layout;
                s.spawn(move || {
                    let d = c.slices(layout, col.rank());
                    let parts = reference::partials(problem, &d.batch(c)).unwrap();
                    let block = record::encode(problem, col.rank(), &parts).unwrap();
                    let merged =
                        exchange(problem, &mut col, Ok(block.as_slice()), c.upstream()).unwrap();
                    let grad = reference::gradient(problem, &d.batch(c), &merged).unwrap();
                    (merged, grad)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (merged, _) in &results[1..] {
        assert_eq!(
            merged, &results[0].0,
            "every rank merges the same bytes the same way"
        );
    }
    let want = c.reference();
    let got = &results[0].0.output;
    let (_, loss_bound) = {
        let parts: Vec<_> = (0..3)
            .map(|p| reference::partials(&problem, &c.slices(&layout, p).batch(c)).unwrap())
            .collect();
        let b: Vec<_> = (0..c.rows as usize)
            .map(|r| record_bound(&parts, r, f64::from(c.spec.z_loss)))
            .collect();
        (
            0,
            b.iter().map(|b| b.1).sum::<f64>() * 2.0 / want.denominator,
        )
    };
    close("threads loss", &got.loss, &want.loss, |_| loss_bound);
    assert_eq!(got.correct, want.correct);
}

#[test]
fn bad_input_is_an_err() {
    // Tiling.
    let tiling = |r: LsceError| matches!(r, LsceError::ShardTiling { .. });
    assert!(
        tiling(ShardLayout::new(10, &[0..4, 5..10]).unwrap_err()),
        "gap"
    );
    assert!(
        tiling(ShardLayout::new(10, &[0..5, 4..10]).unwrap_err()),
        "overlap"
    );
    assert!(
        tiling(ShardLayout::new(10, &[0..5, 5..9]).unwrap_err()),
        "short"
    );
    assert!(
        tiling(ShardLayout::new(10, &[0..5, 5..11]).unwrap_err()),
        "past K"
    );
    assert!(
        tiling(ShardLayout::new(10, &[0..5, 5..5, 5..10]).unwrap_err()),
        "empty"
    );
    assert!(
        tiling(ShardLayout::new(10, &[5..10, 0..5]).unwrap_err()),
        "out of rank order"
    );
    assert!(ShardLayout::from_widths(&[3, 0, 7]).is_err());

    let c = case("errors", LossSpec::pytorch(0.1), 6, 20, 1);
    let layout = ShardLayout::from_widths(&[5, 15]).unwrap();
    let problem = c.problem(&layout);
    let d: Vec<_> = (0..2).map(|p| c.slices(&layout, p)).collect();
    let parts: Vec<_> = d
        .iter()
        .map(|d| reference::partials(&problem, &d.batch(&c)).unwrap())
        .collect();
    let blocks: Vec<Vec<u8>> = (0..2)
        .map(|p| record::encode(&problem, p, &parts[p]).unwrap())
        .collect();
    let refs = |b: &[Vec<u8>]| b.to_vec();
    let run = |b: &[Vec<u8>], problem: &ShardProblem| {
        let r: Vec<&[u8]> = b.iter().map(|v| v.as_slice()).collect();
        merge_records(problem, &r, UpstreamGrad::One)
    };
    assert!(run(&blocks, &problem).is_ok());
    let foreign = |r: Result<_, LsceError>| matches!(r, Err(LsceError::ForeignRecords { .. }));

    // Records of another plan: another spec, another layout, another row count.
    let other_spec = ShardProblem::new(LossSpec::pytorch(0.2), 6, layout.clone());
    assert!(foreign(run(&blocks, &other_spec)));
    let other_layout = ShardProblem::new(c.spec, 6, ShardLayout::from_widths(&[6, 14]).unwrap());
    assert!(foreign(run(&blocks, &other_layout)));
    let other_rows = ShardProblem::new(c.spec, 5, layout.clone());
    assert!(foreign(run(&blocks, &other_rows)));
    // Blocks out of rank order, truncated, or corrupted.
    let mut swapped = refs(&blocks);
    swapped.swap(0, 1);
    assert!(foreign(run(&swapped, &problem)));
    let mut short = refs(&blocks);
    short[1].truncate(40);
    assert!(foreign(run(&short, &problem)));
    let mut bad_magic = refs(&blocks);
    bad_magic[0][0] ^= 1;
    assert!(foreign(run(&bad_magic, &problem)));
    // Shards that disagree about a row (different labels on two ranks).
    let mut labels = c.labels.clone();
    labels[0] = if labels[0] == 2 { 3 } else { 2 };
    let other = reference::partials(
        &problem,
        &ShardBatch::new(1, Batch::classes(d[1].shape, &d[1].logits, &labels)),
    )
    .unwrap();
    let mixed = [parts[0].clone(), other];
    let disagree = merge(&problem, &mixed, UpstreamGrad::One);
    assert!(foreign(disagree), "two shards holding one row's label");

    // Wrong rank count: blocks, and a collective of another size.
    assert!(matches!(
        run(&blocks[..1], &problem),
        Err(LsceError::RankCount {
            expected: 2,
            actual: 1
        })
    ));
    // Every rank of the group of 3 takes part in the exchange and gets the error.
    let three = ThreadCollective::group(3);
    assert_eq!(three[0].size(), 3);
    let counts: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = three
            .into_iter()
            .map(|mut col| {
                let (problem, block) = (&problem, &blocks[0]);
                s.spawn(move || {
                    exchange(problem, &mut col, Ok(block.as_slice()), UpstreamGrad::One)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for count in counts {
        assert_eq!(
            count,
            Err(LsceError::RankCount {
                expected: 2,
                actual: 3
            })
        );
    }

    // Mismatched rows: a shard's logits of another row count; a shard index past the layout.
    let short_logits = &d[0].logits[..25];
    assert!(matches!(
        reference::partials(
            &problem,
            &ShardBatch::new(0, Batch::classes(d[0].shape, short_logits, &c.labels))
        ),
        Err(LsceError::LengthMismatch { .. })
    ));
    assert!(reference::partials(
        &problem,
        &ShardBatch::new(2, Batch::classes(d[0].shape, &d[0].logits, &c.labels))
    )
    .is_err());
    // A part of another shard's shape.
    assert!(matches!(
        reference::partials(
            &problem,
            &ShardBatch::new(1, Batch::classes(d[0].shape, &d[0].logits, &c.labels))
        ),
        Err(LsceError::ShardShape { shard: 1, .. })
    ));
}

/// Issue 14, item 4: with the host merge, a bad label is the `Err` the unsharded loss returns
/// (`LabelOutOfRange`, row and value), from the calls that produce the result (`merge`,
/// `merge_records`, `exchange` on every rank), not a loss with a NaN row to be checked after.
#[test]
fn host_merge_returns_a_bad_label_as_label_out_of_range() {
    let layout = ShardLayout::from_widths(&[5, 15]).unwrap();
    let mut bad = case(
        "bad label",
        LossSpec::default().with_reduction(Reduction::None),
        6,
        20,
        1,
    );
    bad.labels[4] = 20;
    bad.labels[5] = -7;
    let want = Err(LsceError::LabelOutOfRange {
        row: 4,
        label: 20,
        classes: 20,
    });
    let problem = bad.problem(&layout);
    let parts: Vec<_> = (0..2)
        .map(|p| reference::partials(&problem, &bad.slices(&layout, p).batch(&bad)).unwrap())
        .collect();
    assert_eq!(merge(&problem, &parts, bad.upstream()), want);
    let blocks: Vec<Vec<u8>> = (0..2)
        .map(|p| record::encode(&problem, p, &parts[p]).unwrap())
        .collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    assert_eq!(merge_records(&problem, &refs, bad.upstream()), want);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadCollective::group(2)
            .into_iter()
            .map(|mut col| {
                let (problem, blocks, bad) = (&problem, &blocks, &bad);
                s.spawn(move || {
                    let block = &blocks[col.rank()];
                    exchange(problem, &mut col, Ok(block.as_slice()), bad.upstream())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![want.clone(), want]);
}
