//! All shards of a step on one device, from host data: the staging form of the one-device use
//! (P buffers, pass 1 of every shard into one record buffer, pass 2 merging on the device).

use crate::device::{buffer, upload};
use crate::error::{LsceError, Result};
use crate::kernel::LossKernel;
use crate::output::LossOutput;
use crate::{LossBuffers, Shape, Summary};
use crate::{Reduction, UpstreamGrad};

use super::batch::ShardBatch;
use super::gpu::{read_back, widen, MergeOn, ShardOptions, ShardPlan};
use super::layout::ShardProblem;

/// Runs every shard of `problem` on `kernel`'s device, `batches[p]` being shard `p`'s slice
/// (all with the same labels and upstream gradient), in one submission: pass 1 of every shard,
/// then pass 2 with the merge on the device ([`MergeOn::Device`]). Returns the step's output,
/// with the gradient gathered into the global layout (`[rows, K]`, or `[N, K, d..]`).
///
/// ```
/// use lsce::shards::{compute_on_device, ShardBatch, ShardLayout, ShardProblem};
/// use lsce::{cpu, Batch, LossSpec, Shape};
/// let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
/// let kernel = lsce::LossKernel::new(&device)?;
/// let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0, 3.0, 0.5, -2.0, 1.0, 0.0];
/// let labels = [2, 0];
/// let problem = ShardProblem::new(LossSpec::pytorch(0.1), 2, ShardLayout::from_widths(&[2, 3])?);
/// let (left, right) = ([0.5f32, -1.0, 3.0, 0.5], [2.0f32, 0.0, 1.0, -2.0, 1.0, 0.0]);
/// let out = compute_on_device(&kernel, &queue, &problem, &[
///     ShardBatch::new(0, Batch::classes(problem.shard_shape(0)?, &left, &labels)),
///     ShardBatch::new(1, Batch::classes(problem.shard_shape(1)?, &right, &labels)),
/// ], Default::default())?;
/// let whole = cpu::compute(&LossSpec::pytorch(0.1),
///     &Batch::classes(Shape::matrix(2, 5)?, &logits, &labels), lsce::Gradient::Separate)?;
/// assert!((f64::from(out.loss[0]) - whole.loss[0]).abs() < 1e-5);
/// # Ok::<(), lsce::LsceError>(())
/// ```
pub fn compute_on_device(
    kernel: &LossKernel,
    queue: &wgpu::Queue,
    problem: &ShardProblem,
    batches: &[ShardBatch<'_>],
    options: ShardOptions,
) -> Result<LossOutput<f32>> {
    let shards = problem.layout.shards();
    if batches.len() != shards {
        return Err(LsceError::RankCount {
            expected: shards,
            actual: batches.len(),
        });
    }
    if let Some(p) = (0..shards).find(|&p| batches[p].shard != p) {
        return Err(LsceError::ForeignRecords {
            shard: p,
            reason: "batches must be given in rank order",
        });
    }
    let upstream = batches[0].batch.upstream;
    let options = ShardOptions {
        merge: MergeOn::Device,
        upstream_grad: !matches!(upstream, UpstreamGrad::One),
        ..options
    };
    let plans: Vec<ShardPlan> = (0..shards)
        .map(|p| ShardPlan::new(kernel, problem, p, options))
        .collect::<Result<_>>()?;
    let device = kernel.device();
    let inputs: Vec<_> = plans
        .iter()
        .zip(batches)
        .map(|(plan, b)| plan.upload(device, b))
        .collect::<Result<_>>()?;
    let rows = problem.rows as usize;
    let global = Shape::new(
        problem.rows / problem.spatial,
        problem.layout.classes(),
        problem.spatial,
    )?;
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let block = plans[0].block_bytes();
    let records = buffer(
        device,
        "lsce shard records",
        block * shards as u64,
        wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
    );
    let upstream = match upstream {
        UpstreamGrad::One => None,
        UpstreamGrad::Scalar(g) => Some(upload(
            device,
            "lsce upstream",
            bytemuck::bytes_of(&g),
            storage,
        )?),
        UpstreamGrad::PerRow(g) => Some(upload(
            device,
            "lsce upstream",
            bytemuck::cast_slice(g),
            storage,
        )?),
    };
    let per_row = problem.spec.reduction == Reduction::None;
    let rows_bytes = rows as u64 * 4;
    let grad_dtype = plans[0].grad_dtype();
    let grads: Vec<_> = plans
        .iter()
        .map(|plan| {
            let elements = plan.shape().elements();
            buffer(
                device,
                "lsce shard grad",
                (elements * grad_dtype.bytes()).next_multiple_of(4),
                storage,
            )
        })
        .collect();
    let outputs: Vec<_> = (0..shards)
        .map(|_| {
            (
                per_row.then(|| buffer(device, "lsce shard loss", rows_bytes, storage)),
                buffer(device, "lsce shard lse", rows_bytes, storage),
                buffer(
                    device,
                    "lsce shard summary",
                    Summary::SIZE,
                    wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                ),
            )
        })
        .collect();

    let mut encoder = device.create_command_encoder(&Default::default());
    for (p, (plan, input)) in plans.iter().zip(&inputs).enumerate() {
        let at = p as u64 * block;
        plan.encode_records(
            &mut encoder,
            &input.buffers(),
            records.slice(at..at + block),
        )?;
    }
    let with_grad = options.staging.gradient == crate::Gradient::Separate;
    for (p, plan) in plans.iter().enumerate() {
        let (loss, lse, summary) = &outputs[p];
        let b = inputs[p].buffers();
        let buffers = LossBuffers {
            logits: b.logits,
            targets: b.targets,
            weights: b.weights,
            upstream: upstream.as_ref().map(|u| u.slice(..)),
            loss: loss.as_ref().map(|l| l.slice(..)),
            lse: Some(lse.slice(..)),
            grad: with_grad.then(|| grads[p].slice(..)),
            summary: summary.slice(..),
        };
        plan.encode_merged_gradient(&mut encoder, &buffers, records.slice(..))?;
    }

    // Shard 0's loss, lse and summary (every shard writes the same), every shard's gradient.
    let (loss, lse, summary) = &outputs[0];
    let mut sources: Vec<(&wgpu::Buffer, u64)> = vec![(summary, Summary::SIZE), (lse, rows_bytes)];
    if let Some(loss) = loss {
        sources.push((loss, rows_bytes));
    }
    let grad_sources: Vec<&wgpu::Buffer> = match options.staging.gradient {
        crate::Gradient::None => Vec::new(),
        crate::Gradient::Separate => grads.iter().collect(),
        crate::Gradient::InPlace => inputs.iter().map(|i| &i.logits).collect(),
    };
    for (plan, g) in plans.iter().zip(&grad_sources) {
        let elements = plan.shape().elements();
        sources.push((g, (elements * grad_dtype.bytes()).next_multiple_of(4)));
    }
    let data = read_back(device, queue, encoder, &sources)?;
    let summary = Summary::from_bytes(&data[0]);
    let floats = |b: &[u8]| -> Vec<f32> { bytemuck::cast_slice(b).to_vec() };
    let lse = floats(&data[1]);
    let z = problem.spec.z_loss;
    let (loss, z_loss) = if per_row {
        (floats(&data[2]), lse.iter().map(|l| z * l * l).collect())
    } else {
        (vec![summary.loss], vec![summary.z_loss])
    };
    let first_grad = if per_row { 3 } else { 2 };
    let grad = (!grad_sources.is_empty()).then(|| {
        let mut out = vec![0.0f32; global.elements() as usize];
        for (p, plan) in plans.iter().enumerate() {
            let shape = plan.shape();
            let c0 = problem.layout.range(p).start;
            let g = widen(&data[first_grad + p], grad_dtype, shape.elements() as usize);
            for row in 0..rows as u32 {
                for c in 0..shape.classes() {
                    out[global.index(row, c0 + c) as usize] = g[shape.index(row, c) as usize];
                }
            }
        }
        out
    });
    // The per-row z-loss of ignored rows is 0 (their lse is 0).
    summary.check(problem.layout.classes())?;
    Ok(LossOutput {
        loss,
        z_loss,
        lse,
        grad,
        denominator: summary.denominator,
        correct: problem.accuracy.then_some(u64::from(summary.correct)),
    })
}
