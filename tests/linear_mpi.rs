//! The vocabulary-parallel fused linear head (`lsce::linear::LinearShardPlan`, issue 16 part
//! 2) in one process: `P = 1..4` ranks on threads over `ThreadCollective`, uneven slices (one of
//! a single class), every option, against the unsharded f64 reference
//! (`lsce::linear::cpu::compute`) within a derived bound, and bitwise against the same slices
//! computed one after another in one thread (records, `merge_records`, pass 2, the sum in rank
//! order). Then the errors: every rank returns an `Err`, none hangs. `tests/mpi_shards.rs` runs
//! the example `linear_parallel` under `mpirun`.
//!
//! # The bound
//!
//! tests/linear.rs derives the unsharded head's bounds; the slices change three depths, with
//! `B = sum_p ceil(w_p / 512)` blocks and `P` ranks:
//!
//! * **the sum of exp** of a row: each slice's blocks merged in f32 on the device's records and
//!   then in f64 on the host, each slice's record narrowed to f32 (one rounding of `s`,
//!   `shifted` and `mass`), the ranks' records merged in f64: relative `(80 + 2 B + 2 P) E` plus
//!   each exp's `(3 + 2 |z - m|)` ulp weighted by its share, plus the logits' largest error.
//! * **the loss** and **lse**: as the unsharded head's, from that sum; the merge's f64 result
//!   narrowed to f32 adds `E |loss|`.
//! * **dH** `= sum_p G_p W_p`: each rank's walk over its slice (`64 + w_p / 64` deep), then
//!   `P - 1` f32 additions in rank order: within `(130 + V / 32 + 2 P) E sum_v |G_v w_vd|`
//!   plus `sum_v Gerr_v |w_vd|`. **dW**, **db**: a rank's rows walk, as unsharded
//!   (`(132 + N / 16) E`).
//!
//! `G`'s error is the unsharded one: the merged row constants are the f64 merge's, narrowed to
//! f32. Every bound is doubled (`SAFETY`).

mod common;

use std::ops::Range;
use std::sync::mpsc;
use std::time::Duration;

use common::{vulkan, Gpu, Rng, E, SAFETY};
use lsce::linear::{
    compute_linear_shard, cpu, sum_in_rank_order, HeadGradients, LinearBatch, LinearOptions,
    LinearOutput, LinearShardPlan, Memory,
};
use lsce::shards::{merge_records, Collective, ShardLayout, ShardProblem, ThreadCollective};
use lsce::{LossSpec, LsceError, Reduction, Smoothing, TargetKind, UpstreamGrad};

/// Rows, hidden size, global vocabulary: two row tiles (one partial), three 512-blocks.
const ROWS: usize = 70;
const DIM: usize = 24;
const VOCAB: usize = 1100;

/// Uneven layouts for P = 1..4, a one-class slice among them.
fn layouts() -> Vec<ShardLayout> {
    [
        vec![1100],
        vec![300, 800],
        vec![600, 1, 499],
        vec![513, 100, 387, 100],
    ]
    .iter()
    .map(|w| ShardLayout::from_widths(w).unwrap())
    .collect()
}

/// One case's host data, global (`W [V, D]`, `b [V]`, probabilities `[N, V]`, weights `[V]`).
struct Case {
    hidden: Vec<f32>,
    head: Vec<f32>,
    bias: Option<Vec<f32>>,
    labels: Vec<i32>,
    probabilities: Option<Vec<f32>>,
    weights: Option<Vec<f32>>,
    upstream: Vec<f32>,
}

impl Case {
    fn new(seed: u64, bias: bool) -> Self {
        let mut rng = Rng::new(seed);
        let std = 1.0 / (DIM as f64).powf(0.25);
        let hidden = rng.logits(ROWS * DIM, std);
        let head = rng.logits(VOCAB * DIM, std);
        let bias = bias.then(|| rng.logits(VOCAB, 0.5));
        let labels = (0..ROWS)
            .map(|r| {
                if r % 7 == 3 {
                    -100
                } else {
                    rng.below(VOCAB as u32) as i32
                }
            })
            .collect();
        Self {
            hidden,
            head,
            bias,
            labels,
            probabilities: None,
            weights: None,
            upstream: vec![1.0],
        }
    }

    fn upstream(&self, reduction: Reduction) -> UpstreamGrad<'_> {
        match reduction {
            Reduction::None if self.upstream.len() == ROWS => UpstreamGrad::PerRow(&self.upstream),
            Reduction::None => UpstreamGrad::One,
            _ if self.upstream[0] == 1.0 => UpstreamGrad::One,
            _ => UpstreamGrad::Scalar(self.upstream[0]),
        }
    }

    /// The unsharded batch.
    fn whole(&self, reduction: Reduction) -> LinearBatch<'_> {
        let mut b = match &self.probabilities {
            Some(p) => LinearBatch::probabilities(DIM as u32, &self.hidden[..], &self.head[..], p),
            None => {
                LinearBatch::classes(DIM as u32, &self.hidden[..], &self.head[..], &self.labels)
            }
        }
        .unwrap();
        if let Some(bias) = &self.bias {
            b = b.with_bias(&bias[..]);
        }
        if let Some(w) = &self.weights {
            b = b.with_weights(w);
        }
        b.with_upstream(self.upstream(reduction))
    }

    /// Rank data of the slice `range`: `W_p`, `b_p`, probabilities and weights of its classes.
    fn slice(&self, range: Range<u32>) -> Slice {
        let (c0, c1) = (range.start as usize, range.end as usize);
        Slice {
            head: self.head[c0 * DIM..c1 * DIM].to_vec(),
            bias: self.bias.as_ref().map(|b| b[c0..c1].to_vec()),
            probabilities: self.probabilities.as_ref().map(|p| {
                (0..ROWS)
                    .flat_map(|r| p[r * VOCAB + c0..r * VOCAB + c1].to_vec())
                    .collect()
            }),
            weights: self.weights.as_ref().map(|w| w[c0..c1].to_vec()),
        }
    }

    fn problem(&self, spec: LossSpec, layout: &ShardLayout, accuracy: bool) -> ShardProblem {
        let mut p = ShardProblem::new(spec, ROWS as u32, layout.clone());
        p.targets = if self.probabilities.is_some() {
            TargetKind::Probabilities
        } else {
            TargetKind::Classes
        };
        p.weighted = self.weights.is_some();
        p.accuracy = accuracy;
        p
    }
}

/// One rank's slices of the head and of the class-dependent inputs.
struct Slice {
    head: Vec<f32>,
    bias: Option<Vec<f32>>,
    probabilities: Option<Vec<f32>>,
    weights: Option<Vec<f32>>,
}

impl Slice {
    fn batch<'a>(&'a self, case: &'a Case, upstream: UpstreamGrad<'a>) -> LinearBatch<'a> {
        let mut b = match &self.probabilities {
            Some(p) => LinearBatch::probabilities(DIM as u32, &case.hidden[..], &self.head[..], p),
            None => {
                LinearBatch::classes(DIM as u32, &case.hidden[..], &self.head[..], &case.labels)
            }
        }
        .unwrap();
        if let Some(bias) = &self.bias {
            b = b.with_bias(&bias[..]);
        }
        if let Some(w) = &self.weights {
            b = b.with_weights(w);
        }
        b.with_upstream(upstream)
    }
}

/// Runs `f(rank, collective)` on `ranks` threads, with a deadline: a rank that waits forever
/// fails the test instead of hanging it.
fn on_threads<T: Send + 'static>(
    ranks: usize,
    f: impl Fn(usize, &mut ThreadCollective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let (send, recv) = mpsc::channel();
    let f = std::sync::Arc::new(f);
    for mut c in ThreadCollective::group(ranks) {
        let (send, f) = (send.clone(), f.clone());
        std::thread::spawn(move || {
            let rank = c.rank();
            let out = f(rank, &mut c);
            drop(c);
            let _ = send.send((rank, out));
        });
    }
    let mut out: Vec<Option<T>> = (0..ranks).map(|_| None).collect();
    for _ in 0..ranks {
        let (rank, value) = recv
            .recv_timeout(Duration::from_secs(120))
            .expect("a rank did not finish within 120 s: a hang");
        out[rank] = Some(value);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// The step of every rank on threads (one device shared), and the same slices one after
/// another on this thread: (threaded outputs by rank, sequential outputs by rank).
fn run(
    g: &'static Gpu,
    case: &'static Case,
    spec: LossSpec,
    layout: &ShardLayout,
    options: LinearOptions,
) -> (Vec<LinearOutput<f32>>, Vec<LinearOutput<f32>>) {
    let problem = case.problem(spec, layout, options.accuracy);
    let slices: Vec<Slice> = (0..layout.shards())
        .map(|p| case.slice(layout.range(p)))
        .collect();
    let upstream = case.upstream(spec.reduction);
    // Sequential: records of every slice, the merge, pass 2, the sum in rank order.
    let plans: Vec<LinearShardPlan> = slices
        .iter()
        .enumerate()
        .map(|(p, s)| {
            LinearShardPlan::new(&g.kernel, &problem, p, &s.batch(case, upstream), &options)
                .unwrap()
        })
        .collect();
    let blocks: Vec<Vec<u8>> = plans
        .iter()
        .zip(&slices)
        .map(|(plan, s)| plan.records(&g.queue, &s.batch(case, upstream)).unwrap())
        .collect();
    let blocks_ref: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    let merged = merge_records(&problem, &blocks_ref, upstream).unwrap();
    let mut sequential: Vec<LinearOutput<f32>> = plans
        .iter()
        .zip(&slices)
        .map(|(plan, s)| {
            plan.gradients(&g.queue, &s.batch(case, upstream), &merged)
                .unwrap()
        })
        .collect();
    if options.gradients != HeadGradients::None {
        let parts: Vec<Vec<f32>> = sequential
            .iter()
            .map(|o| o.d_hidden.clone().unwrap())
            .collect();
        let parts: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        let sum = sum_in_rank_order(&parts);
        for o in &mut sequential {
            o.d_hidden = Some(sum.clone());
        }
    }
    let slices = std::sync::Arc::new(slices);
    let problem = std::sync::Arc::new(problem);
    let threaded = on_threads(layout.shards(), move |rank, c| {
        let batch = slices[rank].batch(case, case.upstream(problem.spec.reduction));
        compute_linear_shard(&g.kernel, &g.queue, &problem, &batch, &options, c)
            .unwrap_or_else(|e| panic!("rank {rank}: {e}"))
    });
    (threaded, sequential)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The same bits, rank by rank, in the threaded and the sequential run; the loss and dH the
/// same on every rank.
fn assert_bitwise(what: &str, threaded: &[LinearOutput<f32>], sequential: &[LinearOutput<f32>]) {
    for (p, (t, s)) in threaded.iter().zip(sequential).enumerate() {
        assert_eq!(
            bits(&t.loss.loss),
            bits(&s.loss.loss),
            "{what}: rank {p} loss"
        );
        assert_eq!(bits(&t.loss.lse), bits(&s.loss.lse), "{what}: rank {p} lse");
        assert_eq!(t.loss.correct, s.loss.correct, "{what}: rank {p} accuracy");
        let grads = [
            (&t.d_hidden, &s.d_hidden, "dH"),
            (&t.d_head, &s.d_head, "dW"),
            (&t.d_bias, &s.d_bias, "db"),
        ];
        for (a, b, name) in grads {
            assert_eq!(
                a.as_deref().map(bits),
                b.as_deref().map(bits),
                "{what}: rank {p} {name}"
            );
        }
        assert_eq!(
            bits(&t.loss.loss),
            bits(&threaded[0].loss.loss),
            "{what}: rank {p} vs 0"
        );
        assert_eq!(t.d_hidden, threaded[0].d_hidden, "{what}: rank {p} dH vs 0");
    }
}

/// Bounds of the module docs for the unsharded reference `r` of `case` over `layout`.
struct Bounds {
    loss: Vec<f64>,
    lse: Vec<f64>,
    d_hidden: Vec<f64>,
    d_head: Vec<f64>,
    d_bias: Vec<f64>,
}

fn bounds(spec: &LossSpec, case: &Case, layout: &ShardLayout, r: &LinearOutput<f64>) -> Bounds {
    let ranks = layout.shards();
    let blocks: usize = (0..ranks)
        .map(|p| layout.width(p).div_ceil(512) as usize)
        .sum();
    let values = spec.resolve(VOCAB as u32).unwrap();
    let (scale, cap, zl) = (
        f64::from(spec.logit_scale),
        spec.softcap.map(f64::from),
        f64::from(spec.z_loss),
    );
    let row_scale = |row: usize| {
        let u = case.upstream[if case.upstream.len() == ROWS { row } else { 0 }];
        let u = f64::from(u).abs();
        match spec.reduction {
            Reduction::Mean => u / r.loss.denominator.abs().max(1e-300),
            _ => u,
        }
    };
    let coef = |row: usize, v: usize| {
        let w = case.weights.as_ref().map_or(1.0, |w| f64::from(w[v]));
        let off = if spec.excluded_class == Some(v as u32) {
            0.0
        } else {
            values.off
        };
        w * match &case.probabilities {
            Some(t) => off + (values.on - off) * f64::from(t[row * VOCAB + v]),
            None if case.labels[row] == v as i32 => values.on,
            None => off,
        }
    };
    let mut b = Bounds {
        loss: vec![0.0; ROWS],
        lse: vec![0.0; ROWS],
        d_hidden: vec![0.0; ROWS * DIM],
        d_head: vec![0.0; VOCAB * DIM],
        d_bias: vec![0.0; VOCAB],
    };
    let hidden_depth = (130 + VOCAB / 32 + 2 * ranks) as f64 * E;
    let row_depth = (132 + ROWS / 16) as f64 * E;
    for row in 0..ROWS {
        if case.probabilities.is_none() && Some(case.labels[row]) == spec.ignore_index {
            continue;
        }
        // Logits, their transform and its error, per entry.
        let (mut z, mut zerr, mut slope) = (vec![0.0; VOCAB], vec![0.0; VOCAB], vec![1.0; VOCAB]);
        for v in 0..VOCAB {
            let terms = (0..DIM)
                .map(|d| f64::from(case.hidden[row * DIM + d]) * f64::from(case.head[v * DIM + d]));
            let (x, abs) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            let bias = case.bias.as_ref().map_or(0.0, |b| f64::from(b[v]));
            let x = x + bias;
            let xerr = (DIM as f64 + 2.0) * E * (abs + bias.abs()) + 2.0 * E * x.abs();
            if let Some(c) = cap {
                let t = (scale * x / c).tanh();
                slope[v] = 1.0 - t * t;
                z[v] = c * t;
                zerr[v] = slope[v] * scale * xerr + 17.0 * E * z[v].abs();
            } else {
                z[v] = scale * x;
                zerr[v] = scale * xerr + E * z[v].abs();
            }
        }
        let m = z.iter().copied().fold(f64::MIN, f64::max);
        let s: f64 = z.iter().map(|zv| (zv - m).exp()).sum();
        let lse = m + s.ln();
        let worst_z = zerr.iter().copied().fold(0.0, f64::max);
        let share = |v: usize| (z[v] - m).exp() / s;
        let exps: f64 = (0..VOCAB)
            .map(|v| share(v) * (3.0 + 2.0 * (z[v] - m).abs()) * E)
            .sum();
        let ln_s = (80 + 2 * blocks + 2 * ranks) as f64 * E + exps + 2.0 * worst_z + 2f64.powi(-21);
        let lse_err = ln_s + E * lse.abs();
        let a: Vec<f64> = (0..VOCAB).map(|v| coef(row, v)).collect();
        let mass: f64 = a.iter().sum();
        let spread: f64 = (0..VOCAB).map(|v| (a[v] * (m - z[v])).abs()).sum();
        let logit_terms: f64 = (0..VOCAB).map(|v| a[v].abs() * (zerr[v] + worst_z)).sum();
        let depth = (140 + 3 * blocks + 2 * ranks) as f64 * E;
        let value = (mass * s.ln()).abs() + spread + zl * lse * lse;
        b.loss[row] = SAFETY
            * (mass * ln_s
                + 4.0 * E * mass * s.ln().abs()
                + depth * spread
                + logit_terms
                + zl * (2.0 * lse.abs() * lse_err + 3.0 * E * lse * lse)
                + 4.0 * E * value);
        b.lse[row] = SAFETY * lse_err;
        let big_p = mass + 2.0 * zl * lse;
        let k = row_scale(row) * scale;
        for v in 0..VOCAB {
            let p = share(v);
            let core = p * big_p - a[v];
            let rel = zerr[v] + worst_z + ln_s + (4.0 + 3.0 * (z[v] - lse).abs()) * E;
            let core_err = big_p.abs() * p * rel
                + 2.0 * zl * p * lse_err
                + 6.0 * E * a[v].abs()
                + 3.0 * E * p * big_p.abs();
            let slope_err = cap.map_or(0.0, |c| 2.0 * z[v].abs() * zerr[v] / (c * c) + 2.0 * E);
            let g = (core * k * slope[v]).abs();
            let g_err = k * (slope[v].abs() * core_err + core.abs() * slope_err) + 3.0 * E * g;
            b.d_bias[v] += SAFETY * (row_depth * g + g_err);
            for d in 0..DIM {
                let (h, w) = (
                    f64::from(case.hidden[row * DIM + d]).abs(),
                    f64::from(case.head[v * DIM + d]).abs(),
                );
                b.d_hidden[row * DIM + d] += SAFETY * (hidden_depth * g + g_err) * w;
                b.d_head[v * DIM + d] += SAFETY * (row_depth * g + g_err) * h;
            }
        }
    }
    if spec.reduction != Reduction::None {
        let total = b.loss.iter().sum::<f64>() + 3.0 * E * ROWS as f64 * r.loss.loss[0].abs();
        let per = match spec.reduction {
            Reduction::Mean => 1.0 / r.loss.denominator.abs().max(1e-300),
            _ => 1.0,
        };
        b.loss = vec![total * per];
    }
    b
}

/// Checks rank outputs (loss and dH from rank 0, dW and db concatenated in rank order)
/// against the unsharded reference; returns the worst (error, ratio) of loss, dH, dW, db.
fn against_reference(
    what: &str,
    spec: &LossSpec,
    case: &Case,
    layout: &ShardLayout,
    options: &LinearOptions,
    out: &[LinearOutput<f32>],
) -> [(f64, f64); 4] {
    let reference = cpu::compute(spec, &case.whole(spec.reduction), options.gradients).unwrap();
    let b = bounds(spec, case, layout, &reference);
    let close = common::assert_close;
    let loss = close(
        &format!("{what}: loss"),
        &out[0].loss.loss,
        &reference.loss.loss,
        &b.loss,
    );
    close(
        &format!("{what}: lse"),
        &out[0].loss.lse,
        &reference.loss.lse,
        &b.lse,
    );
    let denominator = reference.loss.denominator;
    assert!(
        (f64::from(out[0].loss.denominator) - denominator).abs()
            <= (ROWS as f64 + 16.0 + 2.0 * layout.shards() as f64) * E * denominator.abs(),
        "{what}: denominator {} vs {denominator}",
        out[0].loss.denominator
    );
    if options.accuracy {
        assert_eq!(
            out[0].loss.correct, reference.loss.correct,
            "{what}: accuracy"
        );
    }
    let gather = |f: fn(&LinearOutput<f32>) -> &Option<Vec<f32>>| -> Option<Vec<f32>> {
        out.iter()
            .map(|o| f(o).clone())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat())
    };
    let mut worst = [loss, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)];
    let outputs = [
        (
            out[0].d_hidden.clone(),
            &reference.d_hidden,
            &b.d_hidden,
            "dH",
        ),
        (gather(|o| &o.d_head), &reference.d_head, &b.d_head, "dW"),
        (gather(|o| &o.d_bias), &reference.d_bias, &b.d_bias, "db"),
    ];
    for (i, (gpu, cpu, tol, name)) in outputs.into_iter().enumerate() {
        assert_eq!(gpu.is_some(), cpu.is_some(), "{what}: {name} presence");
        if let (Some(gv), Some(cv)) = (gpu, cpu) {
            worst[i + 1] = close(&format!("{what}: {name}"), &gv, cv, tol);
        }
    }
    worst
}

fn leak<T>(v: T) -> &'static T {
    Box::leak(Box::new(v))
}

/// Every option, every layout: the threaded run bitwise equal to the sequential one, and
/// within the bound of the unsharded f64 reference.
#[test]
fn every_option_every_layout_matches_one_process_and_the_reference() {
    let g = vulkan();
    let base = leak(Case::new(1, true));
    let padded = leak({
        let mut c = Case::new(1, true);
        c.labels = c.labels.iter().map(|&l| l.max(0)).collect();
        c
    });
    let weighted = leak({
        let mut c = Case::new(2, false);
        c.weights = Some(Rng::new(7).weights(VOCAB));
        c.upstream = vec![65536.0];
        c
    });
    let soft = leak({
        let mut c = Case::new(3, true);
        c.probabilities = Some(Rng::new(8).probabilities(ROWS, VOCAB, true));
        c
    });
    let per_row = leak({
        let mut c = Case::new(4, true);
        c.upstream = (0..ROWS).map(|r| (r as f32 * 0.37).sin() * 4.0).collect();
        c
    });
    let pytorch = LossSpec::pytorch(0.1);
    let none = LossSpec {
        reduction: Reduction::None,
        ..pytorch
    };
    let all = LinearOptions {
        accuracy: true,
        ..Default::default()
    };
    let mut worst = Vec::new();
    for layout in layouts() {
        let ranks = layout.shards();
        // The excluded class in a different slice for each layout (the last slice's first class).
        let excluded = layout.range(ranks - 1).start;
        let cases: Vec<(&str, LossSpec, &'static Case, LinearOptions)> = vec![
            ("pytorch 0.1", pytorch, base, all),
            (
                "eps 0, frozen head",
                LossSpec::pytorch(0.0),
                base,
                LinearOptions {
                    gradients: HeadGradients::Hidden,
                    ..all
                },
            ),
            (
                "off-target, excluded",
                LossSpec {
                    smoothing: Smoothing::OffTarget(0.2),
                    excluded_class: Some(excluded),
                    ..LossSpec::pytorch(0.0)
                },
                base,
                all,
            ),
            (
                "explicit",
                LossSpec {
                    smoothing: Smoothing::Explicit {
                        on: 0.85,
                        off: 0.1 / VOCAB as f32,
                    },
                    ..LossSpec::pytorch(0.0)
                },
                base,
                all,
            ),
            (
                "excluded pad = ignore 0",
                LossSpec {
                    smoothing: Smoothing::OffTarget(0.1),
                    excluded_class: Some(0),
                    ignore_index: Some(0),
                    ..LossSpec::pytorch(0.0)
                },
                padded,
                all,
            ),
            (
                "z-loss softcap scale, chunked",
                LossSpec {
                    z_loss: 1e-3,
                    softcap: Some(3.0),
                    logit_scale: 1.7,
                    ..pytorch
                },
                base,
                LinearOptions {
                    memory: Memory::Chunked {
                        budget_bytes: 64 * 1100 * 4,
                    },
                    ..all
                },
            ),
            (
                "sum, evaluation",
                LossSpec {
                    reduction: Reduction::Sum,
                    ..pytorch
                },
                base,
                LinearOptions {
                    gradients: HeadGradients::None,
                    ..all
                },
            ),
            ("none, per-row upstream", none, per_row, all),
            ("weights x65536, no bias", pytorch, weighted, all),
            ("probabilities", pytorch, soft, LinearOptions::default()),
        ];
        for (name, spec, case, options) in cases {
            let what = format!("P={ranks} {name}");
            let (threaded, sequential) = run(g, case, spec, &layout, options);
            assert_bitwise(&what, &threaded, &sequential);
            worst.push(against_reference(
                &what, &spec, case, &layout, &options, &threaded,
            ));
        }
    }
    let mut m = [(0.0f64, 0.0f64); 4];
    for w in &worst {
        for i in 0..4 {
            m[i] = (m[i].0.max(w[i].0), m[i].1.max(w[i].1));
        }
    }
    eprintln!(
        "[vocabulary-parallel head, P = 1..4] max |GPU - f64|: loss {:.2e} (ratio {:.3}), dH {:.2e} ({:.3}), dW {:.2e} ({:.3}), db {:.2e} ({:.3})",
        m[0].0, m[0].1, m[1].0, m[1].1, m[2].0, m[2].1, m[3].0, m[3].1
    );
}

/// What one rank of an error case changes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Its `W` slice has one row too many: a `V` split that is not the layout's.
    WideSlice,
    /// Its `W` slice has `D - 1` columns for `H`'s `D`.
    HeadDim,
    /// Its `H` and `W` have another `D` (consistent with each other).
    OtherDim,
    /// Another z-loss: a rank with a different spec.
    OtherSpec,
    /// No gradients where the others ask for all (without the check: a rank missing the dH
    /// round).
    OtherGradients,
    /// A label outside `[0, V)` on this rank alone.
    BadLabel,
}

/// `ranks` threads run one step of the uneven 4-way layout over a group of `group` ranks with
/// `fault` on rank `faulty`; every rank's result.
fn faulty_step(
    group: usize,
    fault: Fault,
    faulty: usize,
) -> Vec<Result<LinearOutput<f32>, LsceError>> {
    let g = vulkan();
    let case = leak(Case::new(5, true));
    let layout = leak(layouts().pop().unwrap());
    on_threads(group, move |rank, c| {
        let mine = rank == faulty;
        let mut spec = LossSpec::pytorch(0.1);
        let mut options = LinearOptions::default();
        let range = layout.range(rank.min(layout.shards() - 1));
        let (c0, mut c1) = (range.start as usize, range.end as usize);
        let mut dim = DIM;
        let mut head_dim = DIM;
        let mut labels = case.labels.clone();
        match fault {
            Fault::WideSlice if mine => c1 += 1,
            Fault::HeadDim if mine => head_dim = DIM - 1,
            Fault::OtherDim if mine => (dim, head_dim) = (DIM - 8, DIM - 8),
            Fault::OtherSpec if mine => spec.z_loss = 1e-4,
            Fault::OtherGradients if mine => options.gradients = HeadGradients::None,
            Fault::BadLabel if mine => labels[5] = VOCAB as i32,
            _ => {}
        }
        let hidden: Vec<f32> = (0..ROWS)
            .flat_map(|r| case.hidden[r * DIM..r * DIM + dim].to_vec())
            .collect();
        let head: Vec<f32> = (c0..c1)
            .flat_map(|v| case.head[v * DIM..v * DIM + head_dim].to_vec())
            .collect();
        let bias = case.bias.as_ref().unwrap()[c0..c1].to_vec();
        let problem = ShardProblem::new(spec, ROWS as u32, layout.clone());
        let batch = LinearBatch::classes(dim as u32, &hidden[..], &head[..], &labels)
            .unwrap()
            .with_bias(&bias[..]);
        compute_linear_shard(&g.kernel, &g.queue, &problem, &batch, &options, c)
    })
}

/// Bad input gives a clear `Err` on every rank, never a hang (`on_threads`' deadline): the
/// faulty rank its own error, the others one naming it.
#[test]
fn bad_input_is_an_err_on_every_rank() {
    let named = |r: &Result<LinearOutput<f32>, LsceError>, rank: usize| matches!(r, Err(LsceError::RankFailed { rank: f, .. }) if *f == rank);
    for (fault, faulty) in [(Fault::WideSlice, 1), (Fault::HeadDim, 0)] {
        let results = faulty_step(4, fault, faulty);
        for (rank, r) in results.iter().enumerate() {
            if rank == faulty {
                assert!(
                    matches!(r, Err(LsceError::LengthMismatch { .. })),
                    "{fault:?}: rank {rank}: {r:?}"
                );
            } else {
                assert!(named(r, faulty), "{fault:?}: rank {rank}: {r:?}");
            }
        }
    }
    for (fault, faulty) in [
        (Fault::OtherDim, 2),
        (Fault::OtherSpec, 3),
        (Fault::OtherGradients, 1),
    ] {
        for (rank, r) in faulty_step(4, fault, faulty).iter().enumerate() {
            assert!(
                matches!(r, Err(LsceError::ForeignRecords { shard, .. }) if *shard == faulty),
                "{fault:?}: rank {rank}: {r:?}"
            );
        }
    }
    // A label outside [0, V) where the others have a good one: the ranks' records disagree
    // about the row, and every rank's merge says so.
    for (rank, r) in faulty_step(4, Fault::BadLabel, 2).iter().enumerate() {
        assert!(
            matches!(r, Err(LsceError::ForeignRecords { shard: 2, .. })),
            "bad label: rank {rank}: {r:?}"
        );
    }
    // Three ranks for a four-way layout: every rank says the count is wrong.
    for (rank, r) in faulty_step(3, Fault::BadLabel, usize::MAX)
        .iter()
        .enumerate()
    {
        assert!(
            matches!(
                r,
                Err(LsceError::RankCount { .. }) | Err(LsceError::RankFailed { .. })
            ),
            "3 of 4 ranks: rank {rank}: {r:?}"
        );
    }
}

/// A label outside `[0, V)` on every rank is the unsharded loss's error on every rank.
#[test]
fn a_bad_label_is_label_out_of_range_on_every_rank() {
    let g = vulkan();
    let case = leak({
        let mut c = Case::new(6, false);
        c.labels[9] = VOCAB as i32 + 3;
        c
    });
    let layout = leak(ShardLayout::from_widths(&[700, 400]).unwrap());
    let results = on_threads(2, move |rank, c| {
        let slice = case.slice(layout.range(rank));
        let problem = case.problem(LossSpec::pytorch(0.1), layout, false);
        let batch = slice.batch(case, UpstreamGrad::One);
        compute_linear_shard(
            &g.kernel,
            &g.queue,
            &problem,
            &batch,
            &LinearOptions::default(),
            c,
        )
    });
    for (rank, r) in results.iter().enumerate() {
        assert!(
            matches!(r, Err(LsceError::LabelOutOfRange { row: 9, .. })),
            "rank {rank}: {r:?}"
        );
    }
}
