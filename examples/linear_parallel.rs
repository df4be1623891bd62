//! The vocabulary-parallel fused linear head over MPI (issue 16 part 2): `W [V, D]` split by
//! vocabulary across the ranks (uneven widths), `H [N, D]` on every rank. Each rank computes
//! its slice's records on its own wgpu device, exchanges them in one all-gather (after a status
//! round), and from the merged rows its own `dW`, `db` slice and its partial `dH`; the partial
//! `dH`s are all-gathered and summed in rank order, so every rank holds the same `dH`.
//!
//! ```text
//! cargo build --release --features mpi --example linear_parallel
//! mpirun --allow-run-as-root --oversubscribe -np 4 target/release/examples/linear_parallel
//! ```
//!
//! Every rank prints its slice, the bytes it sent in the step and the step's time, then checks
//! that its loss, `dH` and its `dW`/`db` slice are bitwise what the same slices computed one
//! after another in one process give (`bitwise OK`). Rank 0 then checks the one-process
//! result against the unsharded `f64` reference (`linear::cpu::compute`) and prints the
//! largest errors: the loss within `1e-5 (1 + |loss|)`, each gradient within `1e-4` of its
//! largest magnitude (an end-to-end check; `tests/linear_mpi.rs` holds the derived bounds).
//!
//! With `--fail KIND RANK` (`KIND`: `wide-slice`, `head-dim` or `spec`), rank `RANK` brings
//! bad input (a `W` slice one row wider than the layout's, a `W` slice of `D - 1` columns,
//! another z-loss) and every rank prints the `Err` its step returned and how long it took: no
//! rank waits for the failed one.

use std::time::Instant;

use lsce::linear::{
    compute_linear_shard, cpu, sum_in_rank_order, HeadGradients, LinearBatch, LinearOptions,
    LinearOutput, LinearShardPlan,
};
use lsce::shards::{merge_records, Collective, MpiCollective, ShardLayout, ShardProblem};
use lsce::{LossKernel, LossSpec, UpstreamGrad};

mod mpi_common;

use mpi_common::{Error, SplitMix64};

const ROWS: u32 = 64;
const DIM: u32 = 32;
const VOCAB: u32 = 1000;

/// The same data on every rank: a fixed-seed generator (SplitMix64). `H`, `W`, `b`, labels.
struct Data {
    hidden: Vec<f32>,
    head: Vec<f32>,
    bias: Vec<f32>,
    labels: Vec<i32>,
}

fn data() -> Data {
    let mut rng = SplitMix64::fixed_seed();
    let mut uniform = |n, scale| rng.uniform(n, scale);
    let hidden = uniform(ROWS * DIM, 1.0);
    let head = uniform(VOCAB * DIM, 1.0);
    let bias = uniform(VOCAB, 0.5);
    let labels = uniform(ROWS, 1.0)
        .iter()
        .enumerate()
        .map(|(r, u)| {
            if r % 9 == 4 {
                -100
            } else {
                (((u + 0.5) * VOCAB as f32) as i32).min(VOCAB as i32 - 1)
            }
        })
        .collect();
    Data {
        hidden,
        head,
        bias,
        labels,
    }
}

/// Rank `p`'s `W` and `b` slices.
fn slice(data: &Data, layout: &ShardLayout, p: usize) -> (Vec<f32>, Vec<f32>) {
    let r = layout.range(p);
    let (c0, c1) = (r.start as usize, r.end as usize);
    (
        data.head[c0 * DIM as usize..c1 * DIM as usize].to_vec(),
        data.bias[c0..c1].to_vec(),
    )
}

fn main() -> Result<(), Error> {
    let fault = mpi_common::fault("usage: linear_parallel [--fail wide-slice|head-dim|spec RANK]")?;
    let universe = mpi::initialize().ok_or("MPI is already initialised")?;
    let mut collective = MpiCollective::new(universe.world());
    let (rank, ranks) = (collective.rank(), collective.size());
    let mut spec = LossSpec::pytorch(0.1).with_z_loss(1e-4);
    let layout = ShardLayout::ramp(VOCAB, ranks)?;
    let data = data();
    let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
    let kernel = LossKernel::new(&device)?;
    let options = LinearOptions {
        accuracy: true,
        ..LinearOptions::default()
    };

    // This rank's slice (or the bad input `--fail` asks for).
    let (mut head, mut bias) = slice(&data, &layout, rank);
    if let Some((kind, faulty)) = &fault {
        match kind.as_str() {
            _ if *faulty != rank => {}
            "wide-slice" => {
                head.extend_from_slice(&data.head[..DIM as usize]);
                bias.push(0.0);
            }
            "head-dim" => {
                head = head
                    .chunks(DIM as usize)
                    .flat_map(|row| row[..DIM as usize - 1].to_vec())
                    .collect();
            }
            "spec" => spec = spec.with_z_loss(2e-4),
            other => return Err(format!("unknown failure kind {other}").into()),
        }
    }
    let mut problem = ShardProblem::new(spec, ROWS, layout.clone());
    problem.accuracy = true;
    let batch =
        LinearBatch::classes(DIM, &data.hidden[..], &head[..], &data.labels)?.with_bias(&bias[..]);

    // The step: pass 1, the status round and the records' all-gather, the merge, pass 2, the
    // dH round. A rank whose input is bad takes part with its error.
    let start = Instant::now();
    let step = compute_linear_shard(&kernel, &queue, &problem, &batch, &options, &mut collective);
    if fault.is_some() {
        return mpi_common::report_failure(rank, ranks, start, step);
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let out = step?;
    let plan = LinearShardPlan::new(&kernel, &problem, rank, &batch, &options)?;
    println!(
        "rank {rank}/{ranks}: vocabulary {:?}, loss {:.7}, sent {} bytes in the step (256 status + {} records + 256 status + {} partial dH), {ms:.1} ms for the first step (planning and compiling included)",
        layout.range(rank),
        out.loss.loss[0],
        plan.bytes_sent(),
        32 + 32 * ROWS,
        4 * ROWS * DIM,
    );

    // The same slices one after another in this process: records, merge, pass 2, sum.
    let slices: Vec<(Vec<f32>, Vec<f32>)> = (0..ranks).map(|p| slice(&data, &layout, p)).collect();
    let batches: Vec<LinearBatch<'_>> = slices
        .iter()
        .map(|(h, b)| {
            Ok(
                LinearBatch::classes(DIM, &data.hidden[..], &h[..], &data.labels)?
                    .with_bias(&b[..]),
            )
        })
        .collect::<Result<_, lsce::LsceError>>()?;
    let plans: Vec<LinearShardPlan> = (0..ranks)
        .map(|p| LinearShardPlan::new(&kernel, &problem, p, &batches[p], &options))
        .collect::<Result<_, _>>()?;
    let blocks: Vec<Vec<u8>> = (0..ranks)
        .map(|p| plans[p].records(&queue, &batches[p]))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    let merged = merge_records(&problem, &refs, UpstreamGrad::One)?;
    let local: Vec<LinearOutput<f32>> = (0..ranks)
        .map(|p| plans[p].gradients(&queue, &batches[p], &merged))
        .collect::<Result<_, _>>()?;
    let partials: Vec<&[f32]> = local
        .iter()
        .map(|o| o.d_hidden.as_deref().unwrap_or(&[]))
        .collect();
    let d_hidden = sum_in_rank_order(&partials);
    let bitwise = out.loss == local[rank].loss
        && out.d_hidden.as_ref() == Some(&d_hidden)
        && out.d_head == local[rank].d_head
        && out.d_bias == local[rank].d_bias;
    if !bitwise {
        return Err(format!(
            "rank {rank}: the MPI step differs from the same slices in one process"
        )
        .into());
    }
    println!("rank {rank}/{ranks}: bitwise OK (loss, dH, its dW and db slices vs one process)");
    if rank != 0 {
        return Ok(());
    }

    // The unsharded f64 reference.
    let whole = LinearBatch::classes(DIM, &data.hidden[..], &data.head[..], &data.labels)?
        .with_bias(&data.bias[..]);
    let reference = cpu::compute(&spec, &whole, HeadGradients::All)?;
    let concat = |f: fn(&LinearOutput<f32>) -> &Option<Vec<f32>>| -> Vec<f32> {
        local
            .iter()
            .flat_map(|o| f(o).clone().unwrap_or_default())
            .collect()
    };
    let max_err = |got: &[f32], want: &[f64]| -> (f64, f64) {
        let err = got
            .iter()
            .zip(want)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .fold(0.0, f64::max);
        (err, want.iter().map(|w| w.abs()).fold(0.0, f64::max))
    };
    let loss_err = (f64::from(out.loss.loss[0]) - reference.loss.loss[0]).abs();
    let checks = [
        (
            "dH",
            max_err(&d_hidden, reference.d_hidden.as_deref().unwrap_or(&[])),
        ),
        (
            "dW",
            max_err(
                &concat(|o| &o.d_head),
                reference.d_head.as_deref().unwrap_or(&[]),
            ),
        ),
        (
            "db",
            max_err(
                &concat(|o| &o.d_bias),
                reference.d_bias.as_deref().unwrap_or(&[]),
            ),
        ),
    ];
    println!(
        "max |P={ranks} - f64 unsharded|: loss {loss_err:.2e}, {}",
        checks
            .iter()
            .map(|(name, (err, _))| format!("{name} {err:.2e}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if loss_err > 1e-5 * (1.0 + reference.loss.loss[0].abs())
        || checks.iter().any(|(_, (err, top))| *err > 1e-4 * top)
        || out.loss.correct != reference.loss.correct
    {
        return Err(
            "the vocabulary-parallel head is not within its bounds of the unsharded reference"
                .into(),
        );
    }
    println!("linear_parallel: OK");
    Ok(())
}
