//! Vocabulary-parallel cross-entropy over MPI: each rank holds a slice of the vocabulary
//! (uneven widths), computes its records on its own wgpu device, exchanges them in **one**
//! all-gather, merges them in rank order and writes its own gradient.
//!
//! ```text
//! cargo build --release --features mpi --example vocab_parallel
//! mpirun --allow-run-as-root --oversubscribe -np 4 target/release/examples/vocab_parallel
//! ```
//!
//! With `--fail KIND RANK` (`KIND`: `bad-label`, `short-block` or `fingerprint`), rank `RANK`
//! fails its step (a label outside `[0, K)`, a block cut short, another problem) and every
//! rank prints the `Err` its exchange returned, naming the failed rank, and how long it took:
//! no rank waits for the failed one's records.
//!
//! ```text
//! mpirun --allow-run-as-root --oversubscribe -np 4 target/release/examples/vocab_parallel --fail bad-label 2
//! ```
//!
//! Without it, rank 0 then checks the step: the loss and the gradient gathered from all ranks (a second
//! all-gather, for the check only) must equal bitwise what one device computes over the same
//! shards in one process, and agree with one device's unsharded `LossKernel::compute` within
//! `1e-5 (1 + |loss|)` for the loss and `1e-6 + 1e-5 |g|` for the gradient (the suite's
//! derived bounds, `tests/gpu_shards.rs`, are tighter per value; this is the end-to-end check).

use std::time::Instant;

use lsce::shards::{
    block_bytes, exchange, merge_records, Collective, MpiCollective, ShardBatch, ShardLayout,
    ShardPlan, ShardProblem,
};
use lsce::{Batch, LossKernel, LossSpec, Shape, StagingOptions, UpstreamGrad};

mod mpi_common;

use mpi_common::{Error, SplitMix64};

const ROWS: u32 = 64;
const CLASSES: u32 = 1000;

/// The same data on every rank: a fixed-seed generator (SplitMix64).
fn data() -> (Vec<f32>, Vec<i32>) {
    let mut rng = SplitMix64::fixed_seed();
    let logits = rng.uniform(ROWS * CLASSES, 8.0);
    let labels = (0..ROWS)
        .map(|r| {
            if r % 9 == 4 {
                -100
            } else {
                (rng.next_u64() % u64::from(CLASSES)) as i32
            }
        })
        .collect();
    (logits, labels)
}

/// Columns `range` of the `[ROWS, CLASSES]` logits.
fn columns(logits: &[f32], range: std::ops::Range<u32>) -> Vec<f32> {
    (0..ROWS as usize)
        .flat_map(|r| {
            let row = &logits[r * CLASSES as usize..(r + 1) * CLASSES as usize];
            row[range.start as usize..range.end as usize].to_vec()
        })
        .collect()
}

/// The failure `--fail KIND RANK` asks for.
struct Fault {
    kind: String,
    rank: usize,
}

/// One step with `fault` injected on its rank: every rank must get an `Err` from its
/// exchange; prints it and the time from the start of pass 1.
#[allow(clippy::too_many_arguments)]
fn failing_step(
    fault: &Fault,
    collective: &mut dyn Collective,
    kernel: &LossKernel,
    queue: &wgpu::Queue,
    problem: &ShardProblem,
    logits: &[f32],
    labels: &[i32],
) -> Result<(), Error> {
    let (rank, ranks) = (collective.rank(), collective.size());
    let mine = rank == fault.rank;
    let mut labels = labels.to_vec();
    let mut problem = problem.clone();
    match fault.kind.as_str() {
        "bad-label" if mine => labels[3] = CLASSES as i32,
        "fingerprint" if mine => problem.spec = problem.spec.with_z_loss(2e-4),
        "bad-label" | "fingerprint" | "short-block" => {}
        other => return Err(format!("unknown failure kind {other}").into()),
    }
    let start = Instant::now();
    let outcome = ShardPlan::new(kernel, &problem, rank, Default::default()).and_then(|plan| {
        let part = columns(logits, problem.layout.range(rank));
        let shape = problem.shard_shape(rank)?;
        let mut block = plan.compute_records(
            queue,
            &ShardBatch::new(rank, Batch::classes(shape, &part, &labels)),
        )?;
        if mine && fault.kind == "short-block" {
            block.truncate(block.len() - 32);
        }
        Ok(block)
    });
    let result = exchange(&problem, collective, outcome.as_deref(), UpstreamGrad::One);
    mpi_common::report_failure(rank, ranks, start, result)
}

fn main() -> Result<(), Error> {
    let fault =
        mpi_common::fault("usage: vocab_parallel [--fail bad-label|short-block|fingerprint RANK]")?
            .map(|(kind, rank)| Fault { kind, rank });
    let universe = mpi::initialize().ok_or("MPI is already initialised")?;
    let mut collective = MpiCollective::new(universe.world());
    let (rank, ranks) = (collective.rank(), collective.size());

    let spec = LossSpec::pytorch(0.1).with_z_loss(1e-4);
    let layout = ShardLayout::ramp(CLASSES, ranks)?;
    let problem = ShardProblem::new(spec, ROWS, layout.clone());
    let (logits, labels) = data();
    let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
    let kernel = LossKernel::new(&device)?;

    if let Some(fault) = &fault {
        return failing_step(
            fault,
            &mut collective,
            &kernel,
            &queue,
            &problem,
            &logits,
            &labels,
        );
    }

    // The step: pass 1, the exchange (a status all-gather, then the records'), the merge,
    // pass 2. Pass 1's outcome goes to the exchange even when it failed, so that the other
    // ranks learn of it instead of waiting.
    let plan = ShardPlan::new(&kernel, &problem, rank, Default::default())?;
    let mine = columns(&logits, layout.range(rank));
    let batch = ShardBatch::new(
        rank,
        Batch::classes(problem.shard_shape(rank)?, &mine, &labels),
    );
    let block = plan.compute_records(&queue, &batch);
    let merged = exchange(
        &problem,
        &mut collective,
        block.as_deref(),
        UpstreamGrad::One,
    )?;
    let block = block?;
    let grad = plan.compute_gradient(&queue, &batch, &merged)?;
    println!(
        "rank {rank}/{ranks}: classes {:?}, loss {:.7}, sent {} bytes of records in 1 exchange = {:.2} bytes per row ({} per row + a {}-byte header; plus a {}-byte status)",
        layout.range(rank),
        merged.output.loss[0],
        block.len(),
        block.len() as f64 / f64::from(ROWS),
        lsce::shards::RECORD_BYTES,
        block_bytes(&problem) - ROWS as usize * lsce::shards::RECORD_BYTES,
        lsce::shards::STATUS_BYTES,
    );

    // The check: gather every rank's gradient (padded to the widest shard) to compare.
    let widest = (0..ranks).map(|p| layout.width(p)).max().unwrap_or(0) as usize;
    let mut padded = grad.clone();
    padded.resize(widest * ROWS as usize, 0.0);
    let gathered = collective.all_gather(bytemuck::cast_slice(&padded))?;
    if rank != 0 {
        return Ok(());
    }
    let gathered: Vec<f32> = bytemuck::cast_slice(&gathered).to_vec();
    let k = CLASSES as usize;
    let mut sharded = vec![0.0f32; ROWS as usize * k];
    for p in 0..ranks {
        let r = layout.range(p);
        let w = layout.width(p) as usize;
        for row in 0..ROWS as usize {
            let from = p * widest * ROWS as usize + row * w;
            sharded[row * k + r.start as usize..row * k + r.end as usize]
                .copy_from_slice(&gathered[from..from + w]);
        }
    }

    // One device, the same shards, merged in one process: bitwise the same.
    let slices: Vec<Vec<f32>> = (0..ranks)
        .map(|p| columns(&logits, layout.range(p)))
        .collect();
    let plans: Vec<ShardPlan> = (0..ranks)
        .map(|p| ShardPlan::new(&kernel, &problem, p, Default::default()))
        .collect::<Result<_, _>>()?;
    let part = |p: usize| -> Result<ShardBatch<'_>, lsce::LsceError> {
        let shape = problem.shard_shape(p)?;
        Ok(ShardBatch::new(
            p,
            Batch::classes(shape, &slices[p], &labels),
        ))
    };
    let blocks: Vec<Vec<u8>> = (0..ranks)
        .map(|p| plans[p].compute_records(&queue, &part(p)?))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    let local = merge_records(&problem, &refs, UpstreamGrad::One)?;
    let local_grad: Vec<Vec<f32>> = plans
        .iter()
        .enumerate()
        .map(|(p, plan)| plan.compute_gradient(&queue, &part(p)?, &local))
        .collect::<Result<_, _>>()?;
    let mut one_device = vec![0.0f32; ROWS as usize * k];
    for (p, g) in local_grad.iter().enumerate() {
        let r = layout.range(p);
        let w = layout.width(p) as usize;
        for row in 0..ROWS as usize {
            one_device[row * k + r.start as usize..row * k + r.end as usize]
                .copy_from_slice(&g[row * w..(row + 1) * w]);
        }
    }
    if local.output.loss != merged.output.loss || one_device != sharded {
        return Err("the MPI step differs from the same shards on one device".into());
    }

    // One device, unsharded.
    let whole = kernel.compute(
        &queue,
        &spec,
        &Batch::classes(Shape::matrix(ROWS, CLASSES)?, &logits, &labels),
        &StagingOptions::default(),
    )?;
    let loss_err = (merged.output.loss[0] - f64::from(whole.loss[0])).abs();
    let whole_grad = whole.grad.ok_or("no gradient")?;
    let mut grad_err = 0.0f64;
    let mut grad_ratio = 0.0f64;
    for (&s, &w) in sharded.iter().zip(&whole_grad) {
        let err = f64::from((s - w).abs());
        grad_err = grad_err.max(err);
        grad_ratio = grad_ratio.max(err / (1e-6 + 1e-5 * f64::from(w.abs())));
    }
    println!(
        "rank 0: {ranks} ranks bitwise equal to the same shards on one device; vs one device unsharded: |loss diff| {loss_err:.3e}, max |grad diff| {grad_err:.3e}"
    );
    if loss_err > 1e-5 * (1.0 + f64::from(whole.loss[0]).abs()) || grad_ratio > 1.0 {
        return Err(format!(
            "the MPI step differs from one device: loss {loss_err:e}, grad {grad_err:e}"
        )
        .into());
    }
    println!("vocab_parallel: OK");
    Ok(())
}
