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
use std::time::{Duration, Instant};

use common::linear::{check_head, head_specs, linear_batch, report, Case, Split};
use common::{bits, vulkan, Gpu, Rng};
use lsce::linear::{
    compute_linear_shard, cpu, sum_in_rank_order, HeadGradients, LinearBatch, LinearOptions,
    LinearOutput, LinearShardPlan, Memory,
};
use lsce::shards::{merge_records, Collective, ShardLayout, ShardProblem, ThreadCollective};
use lsce::{Logits, LossSpec, LsceError, TargetKind, UpstreamGrad};

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

/// A case of the module's sizes: every 7th row ignored.
fn case(seed: u64, bias: bool) -> Case {
    Case::new(seed, ROWS, DIM, VOCAB, bias, true)
}

/// The problem of `case` over `layout`: its target kind, weights, and `accuracy`.
fn problem(case: &Case, spec: LossSpec, layout: &ShardLayout, accuracy: bool) -> ShardProblem {
    let targets = if case.probabilities.is_some() {
        TargetKind::Probabilities
    } else {
        TargetKind::Classes
    };
    ShardProblem::new(spec, ROWS as u32, layout.clone())
        .with_targets(targets)
        .with_weighted(case.weights.is_some())
        .with_accuracy(accuracy)
}

/// One rank's slices of the head and of the class-dependent inputs (`W_p`, `b_p`, the
/// probabilities and weights of its classes).
struct Slice {
    head: Vec<f32>,
    bias: Option<Vec<f32>>,
    probabilities: Option<Vec<f32>>,
    weights: Option<Vec<f32>>,
}

impl Slice {
    /// Rank data of `case`'s classes `range`.
    fn new(case: &Case, range: Range<u32>) -> Self {
        let (c0, c1) = (range.start as usize, range.end as usize);
        Slice {
            head: case.head[c0 * DIM..c1 * DIM].to_vec(),
            bias: case.bias.as_ref().map(|b| b[c0..c1].to_vec()),
            probabilities: case.probabilities.as_ref().map(|p| {
                (0..ROWS)
                    .flat_map(|r| p[r * VOCAB + c0..r * VOCAB + c1].to_vec())
                    .collect()
            }),
            weights: case.weights.as_ref().map(|w| w[c0..c1].to_vec()),
        }
    }

    fn batch<'a>(&'a self, case: &'a Case, upstream: UpstreamGrad<'a>) -> LinearBatch<'a> {
        linear_batch(
            DIM,
            Logits::F32(&case.hidden),
            Logits::F32(&self.head),
            self.bias.as_deref().map(Logits::F32),
            &case.labels,
            self.probabilities.as_deref(),
            self.weights.as_deref(),
            upstream,
        )
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
            // A panicking rank is reported now, not as a hang at the deadline.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(rank, &mut c)));
            drop(c);
            let _ = send.send((rank, out));
        });
    }
    let mut out: Vec<Option<T>> = (0..ranks).map(|_| None).collect();
    for _ in 0..ranks {
        let (rank, value) = recv
            .recv_timeout(Duration::from_secs(120))
            .expect("a rank did not finish within 120 s: a hang");
        let value = value.unwrap_or_else(|_| panic!("rank {rank} panicked"));
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
    let problem = problem(case, spec, layout, options.accuracy);
    let slices: Vec<Slice> = (0..layout.shards())
        .map(|p| Slice::new(case, layout.range(p)))
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
    let reference = cpu::compute(spec, &case.batch(spec.reduction), options.gradients).unwrap();
    let gather = |f: fn(&LinearOutput<f32>) -> &Option<Vec<f32>>| -> Option<Vec<f32>> {
        out.iter()
            .map(|o| f(o).clone())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat())
    };
    let ranks = LinearOutput {
        loss: out[0].loss.clone(),
        d_hidden: out[0].d_hidden.clone(),
        d_head: gather(|o| &o.d_head),
        d_bias: gather(|o| &o.d_bias),
    };
    let split = Split::layout(layout);
    check_head(
        what,
        spec,
        case,
        split,
        &reference,
        &ranks,
        options.accuracy,
    )
}

fn leak<T>(v: T) -> &'static T {
    Box::leak(Box::new(v))
}

/// Every option, every layout: the threaded run bitwise equal to the sequential one, and
/// within the bound of the unsharded f64 reference.
#[test]
fn every_option_every_layout_matches_one_process_and_the_reference() {
    let g = vulkan();
    let base = leak(case(1, true));
    let padded = leak({
        let mut c = case(1, true);
        c.labels = c.labels.iter().map(|&l| l.max(0)).collect();
        c
    });
    let weighted = leak({
        let mut c = case(2, false);
        c.weights = Some(Rng::new(7).weights(VOCAB));
        c.upstream = vec![65536.0];
        c
    });
    let soft = leak({
        let mut c = case(3, true);
        c.probabilities = Some(Rng::new(8).probabilities(ROWS, VOCAB, true));
        c
    });
    let per_row = leak({
        let mut c = case(4, true);
        c.upstream = (0..ROWS).map(|r| (r as f32 * 0.37).sin() * 4.0).collect();
        c
    });
    let pytorch = LossSpec::pytorch(0.1);
    let all = LinearOptions {
        accuracy: true,
        ..Default::default()
    };
    let mut worst = Vec::new();
    for layout in layouts() {
        let ranks = layout.shards();
        // The excluded class in a different slice for each layout (the last slice's first class).
        let excluded = layout.range(ranks - 1).start;
        // The head tests' specs, each with a case and options that also cover the gradient
        // choices, chunked mode and the upstream gradients.
        let mut cases: Vec<(String, LossSpec, &'static Case, LinearOptions)> = head_specs(VOCAB)
            .into_iter()
            .map(|(name, spec)| {
                let with = |what: &str, spec, case, options| {
                    (format!("{name}{what}"), spec, case, options)
                };
                match name {
                    "eps 0" => with(
                        ", frozen head",
                        spec,
                        base,
                        LinearOptions {
                            gradients: HeadGradients::Hidden,
                            ..all
                        },
                    ),
                    "off-target" => with(
                        ", excluded",
                        spec.with_excluded_class(Some(excluded)),
                        base,
                        all,
                    ),
                    "excluded pad" => with(" = ignore 0", spec, padded, all),
                    "z-loss softcap scale" => with(
                        ", chunked",
                        spec,
                        base,
                        LinearOptions {
                            memory: Memory::Chunked {
                                budget_bytes: 64 * 1100 * 4,
                            },
                            ..all
                        },
                    ),
                    "sum" => with(
                        ", evaluation",
                        spec,
                        base,
                        LinearOptions {
                            gradients: HeadGradients::None,
                            ..all
                        },
                    ),
                    "none" => with(", per-row upstream", spec, per_row, all),
                    _ => with("", spec, base, all),
                }
            })
            .collect();
        cases.push(("weights x65536, no bias".into(), pytorch, weighted, all));
        cases.push((
            "probabilities".into(),
            pytorch,
            soft,
            LinearOptions::default(),
        ));
        for (name, spec, case, options) in cases {
            let what = format!("P={ranks} {name}");
            let (threaded, sequential) = run(g, case, spec, &layout, options);
            assert_bitwise(&what, &threaded, &sequential);
            worst.push(against_reference(
                &what, &spec, case, &layout, &options, &threaded,
            ));
        }
    }
    report("vocabulary-parallel head, P = 1..4", &worst);
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
    let case = leak(case(5, true));
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
        let mut c = case(6, false);
        c.labels[9] = VOCAB as i32 + 3;
        c
    });
    let layout = leak(ShardLayout::from_widths(&[700, 400]).unwrap());
    let results = on_threads(2, move |rank, c| {
        let slice = Slice::new(case, layout.range(rank));
        let problem = problem(case, LossSpec::pytorch(0.1), layout, false);
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

/// Rank `faulty`'s collective: once the records' all-gather has returned (the step's second
/// call), it destroys the rank's own device, so that its pass 2 fails on the device after pass
/// 1 and the exchange succeeded, as a device lost mid-step would. Counts the calls.
struct LoseDeviceAfterRecords<'a> {
    inner: &'a mut ThreadCollective,
    device: wgpu::Device,
    calls: usize,
}

impl Collective for LoseDeviceAfterRecords<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn all_gather(&mut self, send: &[u8]) -> lsce::Result<Vec<u8>> {
        let out = self.inner.all_gather(send);
        self.calls += 1;
        if self.calls == 2 {
            self.device.destroy();
        }
        out
    }
}

/// A pass-2 failure on one rank (its device lost after the exchange): every rank returns an
/// `Err` within the deadline, the failed rank its own device error, the others
/// `RankFailed` naming it, from the `dH` round's status; no rank waits for the failed one's
/// partial `dH`.
#[test]
fn a_pass_2_failure_on_one_rank_is_an_err_naming_it_on_every_rank() {
    let g = vulkan();
    let case = leak(case(5, true));
    let layout = leak(layouts().pop().unwrap());
    let ranks = layout.shards();
    let adapter = lsce::adapters(wgpu::Backends::VULKAN)
        .into_iter()
        .next()
        .expect("a Vulkan adapter (lavapipe)");
    let (device, queue) = lsce::device_for_adapter(&adapter).unwrap();
    let kernel = lsce::LossKernel::new(&device).unwrap();
    let lost = leak((device, queue, kernel));
    // A middle rank: ranks before and after it wait on it.
    let faulty = 2;
    {
        let start = Instant::now();
        let results = on_threads(ranks, move |rank, c| {
            let slice = Slice::new(case, layout.range(rank));
            let problem = problem(case, LossSpec::pytorch(0.1), layout, false);
            let batch = slice.batch(case, UpstreamGrad::One);
            let options = LinearOptions::default();
            if rank != faulty {
                let out = compute_linear_shard(&g.kernel, &g.queue, &problem, &batch, &options, c);
                return (out, None);
            }
            // The faulty rank on a device of its own, lost after the records' round.
            let (device, queue, kernel) = lost;
            let mut c = LoseDeviceAfterRecords {
                inner: c,
                device: device.clone(),
                calls: 0,
            };
            let out = compute_linear_shard(kernel, queue, &problem, &batch, &options, &mut c);
            (out, Some(c.calls))
        });
        let elapsed = start.elapsed();
        assert!(
            elapsed < Duration::from_secs(60),
            "faulty rank {faulty}: the step took {elapsed:?}"
        );
        for (rank, (r, calls)) in results.iter().enumerate() {
            if rank == faulty {
                // Status, records, then the dH round's status with its error; no dH gather.
                assert_eq!(*calls, Some(3), "rank {rank}: collective calls");
                assert!(
                    matches!(r, Err(LsceError::Device(_) | LsceError::Readback(_))),
                    "faulty rank {rank}: {r:?}"
                );
            } else {
                assert!(
                    matches!(r, Err(LsceError::RankFailed { rank: f, .. }) if *f == faulty),
                    "rank {rank} does not name rank {faulty}: {r:?}"
                );
            }
        }
    }
}
