//! A failed rank fails every rank, never hangs them (issue 14, item 2). One rank of 2, 3 and 4
//! fails its step before the records move: a label outside `[0, K)` (pass 1's host check), a
//! block of the wrong length, or another problem (its fingerprint differs); or it leaves
//! without calling the exchange at all (its thread returns early). Every rank's step must
//! return an `Err` that names the failed rank within `DEADLINE`, and the failed rank its own
//! error. Threads with `ThreadCollective` here, each rank a thread on one shared device; MPI
//! processes in `tests/mpi_shards.rs`.
//!
//! The ranks run on detached threads and report through a channel, so that a rank that hangs
//! (the bug) fails the test at the deadline instead of hanging it.

mod shard_cases;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use lsce::shards::{exchange, Collective, ShardLayout, ShardPlan, ThreadCollective};
use lsce::{LossSpec, LsceError};
use shard_cases::{case, common, Case};

/// How long every rank may take, device work included (a step here takes milliseconds).
const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// A label outside `[0, K)` in the failed rank's copy of the labels.
    BadLabel,
    /// The failed rank's block cut short by one record.
    ShortBlock,
    /// The failed rank's problem has another spec: another fingerprint.
    Fingerprint,
    /// The failed rank returns before its exchange (its collective dropped).
    LeavesEarly,
}

const ROWS: u32 = 12;
const CLASSES: u32 = 50;

fn the_case() -> Case {
    case("failures", LossSpec::pytorch(0.1), ROWS, CLASSES, 41)
}

/// One rank's step with `fault` on rank `failed`: pass 1 on the device, the exchange.
fn step(
    mut collective: ThreadCollective,
    failed: usize,
    fault: Fault,
) -> Result<lsce::shards::Merged, LsceError> {
    let g = common::gpu();
    let rank = collective.rank();
    let mine = rank == failed;
    let mut c = the_case();
    let layout = ShardLayout::even(CLASSES, collective.size()).expect("layout");
    let mut problem = c.problem(&layout);
    if mine {
        match fault {
            Fault::BadLabel => c.labels[3] = CLASSES as i32,
            Fault::Fingerprint => problem.spec = problem.spec.with_z_loss(1e-4),
            Fault::LeavesEarly => {
                return Err(LsceError::Unsupported("this rank left before its exchange"))
            }
            Fault::ShortBlock => {}
        }
    }
    let data = c.slices(&layout, rank);
    let outcome = ShardPlan::new(&g.kernel, &problem, rank, Default::default())
        .and_then(|plan| plan.compute_records(&g.queue, &data.batch(&c)))
        .map(|mut block| {
            if mine && fault == Fault::ShortBlock {
                block.truncate(block.len() - 32);
            }
            block
        });
    exchange(&problem, &mut collective, outcome.as_deref(), c.upstream())
}

/// Runs a step on `ranks` threads with `fault` on rank `failed`; returns each rank's result
/// and time, or panics at the deadline naming the ranks still waiting.
fn run(
    ranks: usize,
    failed: usize,
    fault: Fault,
) -> Vec<(Result<lsce::shards::Merged, LsceError>, Duration)> {
    let (send, receive) = mpsc::channel();
    let start = Instant::now();
    for collective in ThreadCollective::group(ranks) {
        let send = send.clone();
        std::thread::spawn(move || {
            let rank = collective.rank();
            let result = step(collective, failed, fault);
            // The receiver is gone only when the test already failed.
            let _ = send.send((rank, result, start.elapsed()));
        });
    }
    drop(send);
    let mut results: Vec<Option<_>> = (0..ranks).map(|_| None).collect();
    for _ in 0..ranks {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match receive.recv_timeout(left) {
            Ok((rank, result, took)) => results[rank] = Some((result, took)),
            Err(_) => {
                let waiting: Vec<usize> = (0..ranks).filter(|&r| results[r].is_none()).collect();
                panic!(
                    "{fault:?} on rank {failed} of {ranks}: ranks {waiting:?} still waiting after {DEADLINE:?}"
                );
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every rank reported"))
        .collect()
}

#[test]
fn a_failed_rank_fails_every_rank_within_seconds() {
    // Warm the device and the pipelines, so that the times below are the step's.
    let _ = run(2, 0, Fault::LeavesEarly);
    for fault in [
        Fault::BadLabel,
        Fault::ShortBlock,
        Fault::Fingerprint,
        Fault::LeavesEarly,
    ] {
        for ranks in [2usize, 3, 4] {
            for failed in [0, ranks - 1] {
                let results = run(ranks, failed, fault);
                let slowest = results.iter().map(|r| r.1).max().unwrap_or_default();
                eprintln!(
                    "[shard failures] {fault:?} on rank {failed} of {ranks}: every rank Err within {:.1} ms",
                    slowest.as_secs_f64() * 1e3
                );
                for (rank, (result, _)) in results.iter().enumerate() {
                    let what = format!("{fault:?} on rank {failed} of {ranks}, rank {rank}");
                    let err = result.as_ref().expect_err(&what);
                    match (fault, rank == failed) {
                        // The failed rank: its own error.
                        (Fault::BadLabel, true) => assert_eq!(
                            err,
                            &LsceError::LabelOutOfRange {
                                row: 3,
                                label: CLASSES as i32,
                                classes: CLASSES
                            },
                            "{what}"
                        ),
                        (Fault::ShortBlock, true) => assert!(
                            matches!(err, LsceError::ForeignRecords { shard, .. } if *shard == failed),
                            "{what}: {err}"
                        ),
                        (Fault::LeavesEarly, true) => {}
                        // Every other rank: the failed rank named, with why.
                        (Fault::BadLabel | Fault::ShortBlock, false) => match err {
                            LsceError::RankFailed { rank: r, reason } => {
                                assert_eq!(*r, failed, "{what}");
                                let why = if fault == Fault::BadLabel {
                                    "label 50"
                                } else {
                                    "rows * 32 bytes"
                                };
                                assert!(reason.contains(why), "{what}: {reason}");
                            }
                            other => panic!("{what}: {other}"),
                        },
                        // Another problem: every rank, the failed one too, names it (the
                        // majority's problem is the others').
                        (Fault::Fingerprint, _) if ranks > 2 => assert!(
                            matches!(err, LsceError::ForeignRecords { shard, .. } if *shard == failed),
                            "{what}: {err}"
                        ),
                        // Two ranks, two problems: no majority; both fail naming the same rank.
                        (Fault::Fingerprint, _) => assert!(
                            matches!(err, LsceError::ForeignRecords { .. }),
                            "{what}: {err}"
                        ),
                        (Fault::LeavesEarly, false) => assert!(
                            matches!(err, LsceError::Transport(m) if m.contains(&format!("rank {failed} left"))),
                            "{what}: {err}"
                        ),
                    }
                }
            }
        }
    }
}
