//! The vocabulary-parallel fused linear head: `W` split by vocabulary across `P` ranks (any
//! widths), `H` replicated. Each rank's slice is shard `p` of a
//! [`ShardLayout`](crate::shards::ShardLayout) over the global `V`, and its plan is the fused head over the classes `[c0, c1)` with the loss's
//! class-dependent terms indexed globally (labels, the excluded class) or sliced (weights,
//! probability targets) and the smoothing of the global `K`, as [`ShardProblem`] defines it.
//!
//! A step ([`LinearShardPlan::step`], [`compute_linear_shard`]):
//!
//! 1. **pass 1** on each rank: setup and `linear_stats` over its slice; its 512-entry blocks'
//!    records are merged per row in block order into **one** record per row (the shards' record
//!    merge, on the host) — the rank's record block, exactly what [`exchange`] expects;
//! 2. **[`exchange`]**: the status round (a failed rank fails every rank), one all-gather of
//!    the blocks, the merge in rank order on every rank: loss, lse, accuracy and the rows'
//!    gradient constants, bitwise the same everywhere;
//! 3. **pass 2** on each rank from the merged row constants (16 bytes per row, uploaded as the
//!    shards' pass 2 does): its own `dW` and `db` slice and its partial `dH = G_p W_p`;
//! 4. **the `dH` sum**: a second status round (a rank whose merge or pass 2 failed fails every
//!    rank instead of leaving them waiting), one all-gather of the partial `dH`s, and the sum in
//!    rank order, `((dH_0 + dH_1) + dH_2) + ...` in f32, on every rank: bitwise the same on every
//!    rank and from run to run for a given layout.
//!
//! Why an all-gather and not `MPI_Allreduce`: the standard leaves the order of an
//! all-reduce's additions to the implementation (it only advises the same result on every rank;
//! Open MPI picks its algorithm by message size and process count, so the bits of a sum
//! change with `P`, the message size and the library version), and floating-point addition is
//! not associative. A user-defined reduction would not fix the order either. Gathering the
//! partials and adding them in rank order costs `P - 1` times the bytes received of a
//! reduce-scatter based all-reduce, and makes the result a function of the layout alone.
//!
//! ## Bytes sent per rank and step
//!
//! | round | bytes |
//! |---|---|
//! | status | [`STATUS_BYTES`] (256) |
//! | records | `32 + 32 N` |
//! | status (with gradients) | 256 |
//! | partial `dH` (with gradients) | `4 N D` |
//!
//! [`LinearShardPlan::bytes_sent`] gives the sum; each rank receives `P` times each.
//!
//! [`exchange`]: crate::shards::exchange
//! [`STATUS_BYTES`]: crate::shards::STATUS_BYTES

use crate::batch::{Targets, UpstreamGrad};
use crate::device::{buffer, read_sections, upload};
use crate::encode::dispatch;
use crate::error::{LsceError, Result};
use crate::kernel::LossKernel;
use crate::layout::{ShardHeader, ShardMergedRow, ShardRecord, SharedLayout, Summary};
use crate::output::LossOutput;
use crate::problem::Problem;
use crate::shape::Shape;
use crate::shards::record::{self, decode_rows, RECORD_BYTES};
use crate::shards::{
    agree, block_bytes, exchange_as, fold_rows, Collective, Merged, PartialRow, RowKind,
    ShardPartials, ShardProblem, STATUS_BYTES,
};
use crate::spec::Reduction;
use crate::TargetKind;

use super::batch::{LinearBatch, LinearOptions, LinearOutput};
use super::encode::{LinearBinding, LinearBuffers};
use super::plan::{ChunkSteps, LinearPlan, PlanInner};
use super::problem::{HeadGradients, LinearProblem};

/// One rank's slice of the vocabulary-parallel fused linear head: the fused head over its
/// classes `[c0, c1)` of a [`ShardProblem`], planned once, stepped with
/// [`step`](Self::step).
///
/// The rank's [`LinearBatch`] holds all of `H [N, D]`, its slice `W_p [c1 - c0, D]` (and `b_p`),
/// the global labels of all `N` rows (or its `[N, c1 - c0]` slice of probability targets), its
/// `c1 - c0` class weights, and the step's upstream gradient (the same on every rank).
///
/// ```
/// use lsce::linear::{LinearBatch, LinearOptions, LinearShardPlan};
/// use lsce::shards::{ShardLayout, ShardProblem, ThreadCollective};
/// # let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
/// let kernel = lsce::LossKernel::new(&device)?;
/// let (rows, dim) = (8u32, 16u32);
/// let layout = ShardLayout::new(100, &[0..37, 37..100])?; // V = 100 over two ranks
/// let problem = ShardProblem::new(lsce::LossSpec::pytorch(0.1), rows, layout);
/// let hidden: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.37).sin()).collect();
/// let head: Vec<f32> = (0..100 * dim).map(|i| (i as f32 * 0.11).cos()).collect();
/// let labels = [3, 1, 4, 1, 59, 92, 65, 35];
/// let outputs: Vec<_> = std::thread::scope(|s| {
///     let handles: Vec<_> = ThreadCollective::group(2).into_iter().map(|mut collective| {
///         let (kernel, queue, problem) = (&kernel, &queue, &problem);
///         let (hidden, head, labels) = (&hidden, &head, &labels);
///         s.spawn(move || {
///             use lsce::shards::Collective;
///             let range = problem.layout.range(collective.rank());
///             let slice = &head[(range.start * dim) as usize..(range.end * dim) as usize];
///             let batch = LinearBatch::classes(dim, &hidden[..], slice, labels)?;
///             let plan = LinearShardPlan::new(
///                 kernel, problem, collective.rank(), &batch, &LinearOptions::default())?;
///             plan.step(queue, &batch, &mut collective)
///         })
///     }).collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// let (a, b) = (outputs[0].as_ref().unwrap(), outputs[1].as_ref().unwrap());
/// // The loss and the summed dH are the same bits on both ranks; dW is each rank's slice.
/// assert_eq!((&a.loss, &a.d_hidden), (&b.loss, &b.d_hidden));
/// assert_eq!(b.d_head.as_ref().unwrap().len(), 63 * 16);
/// # Ok::<(), lsce::LsceError>(())
/// ```
pub struct LinearShardPlan {
    problem: ShardProblem,
    shard: usize,
    plan: LinearPlan,
    /// What every rank must agree on: the problem, `D`, the gradients, the bias, the dtype.
    fingerprint: u64,
}

/// What the status rounds agree on besides the records' problem: `D`, which gradients (they
/// decide whether the `dH` round happens), the bias and the element type.
fn fingerprint(problem: &ShardProblem, batch: &LinearBatch<'_>, options: &LinearOptions) -> u64 {
    problem.fingerprint_with(&[
        batch.dim,
        options.gradients as u32,
        u32::from(batch.bias.is_some()),
        batch.dtype() as u32,
    ])
}

/// Checks rank `shard`'s batch against `problem`: the slice's width, `H`'s and `W`'s `D`, the
/// rows, the targets' kind and the weights.
fn check_slice(problem: &ShardProblem, shard: usize, batch: &LinearBatch<'_>) -> Result<()> {
    problem.validate()?;
    problem.layout.check_shard(shard)?;
    if problem.spatial != 1 {
        return Err(LsceError::Unsupported(
            "the vocabulary-parallel linear head's logits are [rows, vocab] (spatial 1)",
        ));
    }
    let (rows, dim) = (problem.rows as usize, batch.dim as usize);
    let width = problem.layout.width(shard) as usize;
    let checks = [
        (
            "hidden (problem rows x dim)",
            rows * dim,
            batch.hidden.len(),
        ),
        (
            "head slice (this rank's shard width x dim)",
            width * dim,
            batch.head.len(),
        ),
        (
            "bias slice (this rank's shard width)",
            width,
            batch.bias.map_or(width, |b| b.len()),
        ),
    ];
    if let Some((what, expected, actual)) = checks.into_iter().find(|(_, e, a)| e != a) {
        return Err(LsceError::LengthMismatch {
            what,
            expected,
            actual,
        });
    }
    problem.check_kinds(&batch.loss.targets, batch.loss.weights.is_some())?;
    if batch.head.dtype() != batch.dtype() || batch.bias.is_some_and(|b| b.dtype() != batch.dtype())
    {
        return Err(LsceError::Unsupported(
            "hidden, head and bias must have one element type",
        ));
    }
    // The targets, weights and upstream against the slice's [rows, width] (the spec is the
    // global K's: ShardProblem::validate checked it).
    batch.loss.check_targets(problem.spec.reduction)
}

/// The device buffers of one step's inputs and outputs.
struct Inputs {
    hidden: wgpu::Buffer,
    head: wgpu::Buffer,
    bias: Option<wgpu::Buffer>,
    targets: wgpu::Buffer,
    weights: Option<wgpu::Buffer>,
    summary: wgpu::Buffer,
    loss: Option<wgpu::Buffer>,
    d_hidden: Option<wgpu::Buffer>,
    d_head: Option<wgpu::Buffer>,
    d_bias: Option<wgpu::Buffer>,
}

impl LinearShardPlan {
    /// Plans rank `shard`'s slice of `problem` for batches shaped like `batch` (its `D`, bias
    /// and element type), with `options`' gradients, memory mode and binding cap. Accuracy is
    /// the problem's ([`ShardProblem::accuracy`]): `options.accuracy` may be `false`, and `true`
    /// needs the problem to count it.
    ///
    /// Errors: the problem's own ([`ShardProblem::validate`]); a batch whose `W` slice is not
    /// `width(shard) x D` or whose `H` is not `rows x D` ([`LsceError::LengthMismatch`]);
    /// targets or weights other than the problem names; what [`LinearPlan::new`] rejects.
    /// A rank whose plan fails must still take part in the step's collective calls: use
    /// [`compute_linear_shard`], which does.
    pub fn new(
        kernel: &LossKernel,
        problem: &ShardProblem,
        shard: usize,
        batch: &LinearBatch<'_>,
        options: &LinearOptions,
    ) -> Result<Self> {
        check_slice(problem, shard, batch)?;
        if options.accuracy && !problem.accuracy {
            return Err(LsceError::Unsupported(
                "shard accuracy is the ShardProblem's (every rank must agree): set it there",
            ));
        }
        let range = problem.layout.range(shard);
        let width = range.end - range.start;
        let spec = problem.spec;
        let loss = Problem::new(spec, Shape::matrix(problem.rows, width)?)
            .with_targets(problem.targets)
            .with_weighted(problem.weighted)
            .with_dtype(batch.dtype())
            .with_accuracy(problem.accuracy)
            .with_max_binding_bytes(options.max_binding_bytes);
        let linear = LinearProblem::new(spec, problem.rows, batch.dim, width)?
            .with_loss(loss)
            .with_bias(batch.bias.is_some())
            .with_gradients(options.gradients)
            .with_memory(options.memory);
        let plan = LinearPlan::for_classes(kernel, &linear, range.start, problem.layout.classes())?;
        Ok(Self {
            problem: problem.clone(),
            shard,
            plan,
            fingerprint: fingerprint(problem, batch, options),
        })
    }

    /// The problem.
    pub fn problem(&self) -> &ShardProblem {
        &self.problem
    }

    /// The rank's shard index.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The slice's fused head plan (its vocabulary is the slice's width).
    pub fn linear(&self) -> &LinearPlan {
        &self.plan
    }

    /// Bytes this rank sends per step: the status (256), its record block (`32 + 32 N`), and
    /// with gradients a second status and its partial `dH` (`4 N D`).
    pub fn bytes_sent(&self) -> u64 {
        let p = self.plan.problem();
        let records = (STATUS_BYTES + block_bytes(&self.problem)) as u64;
        match p.gradients {
            HeadGradients::None => records,
            _ => records + STATUS_BYTES as u64 + dh_bytes(p),
        }
    }

    fn check_batch(&self, batch: &LinearBatch<'_>) -> Result<()> {
        check_slice(&self.problem, self.shard, batch)?;
        let p = self.plan.problem();
        if batch.dim != p.dim || batch.bias.is_some() != p.bias || batch.dtype() != p.dtype() {
            return Err(LsceError::Unsupported(
                "the batch's D, bias or element type is not the one the plan was made for",
            ));
        }
        Ok(())
    }

    fn upload(&self, batch: &LinearBatch<'_>) -> Result<Inputs> {
        self.check_batch(batch)?;
        let device = &self.plan.inner.kernel.inner.device;
        let p = self.plan.problem();
        let (rows, dim, width) = (u64::from(p.rows()), u64::from(p.dim), u64::from(p.vocab()));
        let storage = wgpu::BufferUsages::STORAGE;
        let out = storage | wgpu::BufferUsages::COPY_SRC;
        let up = |label, contents: &[u8]| upload(device, label, contents, storage);
        let output = |label, bytes: u64, usage| buffer(device, label, bytes, usage);
        let all = p.gradients == HeadGradients::All;
        Ok(Inputs {
            hidden: up("lsce hidden", batch.hidden.bytes())?,
            head: up("lsce head slice", batch.head.bytes())?,
            bias: batch
                .bias
                .map(|b| up("lsce bias slice", b.bytes()))
                .transpose()?,
            targets: match batch.loss.targets {
                Targets::Classes(labels) => up("lsce targets", bytemuck::cast_slice(labels)),
                Targets::Probabilities(t) => up("lsce targets", bytemuck::cast_slice(t)),
            }?,
            weights: batch
                .loss
                .weights
                .map(|w| up("lsce weights slice", bytemuck::cast_slice(w)))
                .transpose()?,
            summary: output("lsce summary", Summary::SIZE, wgpu::BufferUsages::COPY_DST),
            loss: (p.loss.spec.reduction == Reduction::None)
                .then(|| output("lsce loss", rows * 4, storage)),
            d_hidden: (p.gradients != HeadGradients::None)
                .then(|| output("lsce partial d_hidden", rows * dim * 4, out)),
            d_head: all.then(|| output("lsce d_head slice", width * dim * 4, out)),
            d_bias: (all && p.bias).then(|| output("lsce d_bias slice", width * 4, out)),
        })
    }

    fn bind(&self, inputs: &Inputs) -> Result<LinearBinding> {
        let mut buffers = LinearBuffers::new(
            inputs.hidden.slice(..),
            inputs.head.slice(..),
            inputs.targets.slice(..),
            inputs.summary.slice(..),
        );
        buffers.bias = inputs.bias.as_ref().map(|b| b.slice(..));
        buffers.weights = inputs.weights.as_ref().map(|b| b.slice(..));
        buffers.loss = inputs.loss.as_ref().map(|b| b.slice(..));
        buffers.d_hidden = inputs.d_hidden.as_ref().map(|b| b.slice(..));
        buffers.d_head = inputs.d_head.as_ref().map(|b| b.slice(..));
        buffers.d_bias = inputs.d_bias.as_ref().map(|b| b.slice(..));
        self.plan.bind(&buffers)
    }

    /// Pass 1 on host data: this rank's record block (`32 + 32 N` bytes, the header and one
    /// record per row over the slice's classes, its blocks merged in block order), as
    /// [`exchange`](crate::shards::exchange) and [`merge_records`](crate::shards::merge_records)
    /// take it.
    pub fn records(&self, queue: &wgpu::Queue, batch: &LinearBatch<'_>) -> Result<Vec<u8>> {
        let inputs = self.upload(batch)?;
        self.records_of(queue, &inputs)
    }

    fn records_of(&self, queue: &wgpu::Queue, inputs: &Inputs) -> Result<Vec<u8>> {
        let binding = self.bind(inputs)?;
        let p = &self.plan.inner;
        let device = &p.kernel.inner.device;
        // Two locals, not a Vec: an early return drops them last-first, the order wgpu
        // requires of error scopes (a Vec drops first-first, and wgpu panics).
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("lsce linear slice, pass 1"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("lsce linear slice stats"),
                timestamp_writes: None,
            });
            pass.set_bind_group(0, &binding.loss, &[0]);
            pass.set_bind_group(1, &binding.heads[0], &[p.stride as u32]);
            if let Some(setup) = &p.pipelines.setup_partials {
                pass.set_pipeline(setup);
                dispatch(&mut pass, p.setup_chunks);
            }
            pass.set_pipeline(&p.pipelines.setup_final);
            pass.dispatch_workgroups(1, 1, 1);
            for chunk in &p.chunks {
                encode_stats(&mut pass, &binding, chunk);
            }
        }
        let words = p.merged_base * 4;
        let control = read_sections(
            device,
            queue,
            encoder,
            &[(&p.control, words)],
            vec![oom, validation],
        )?
        .remove(0);
        let summary = Summary::from_bytes(&control);
        let rows = self.problem.rows as usize;
        let block = (ShardHeader::WORDS * 4) as usize + rows * RECORD_BYTES;
        let header = (ShardHeader::WORDS * 4) as usize;
        let blocks = (0..p.blocks as usize)
            .map(|b| {
                let at = (p.record_base * 4) as usize + b * block + header;
                decode_rows(self.shard, &control[at..at + rows * RECORD_BYTES])
            })
            .collect::<Result<Vec<Vec<PartialRow>>>>()?;
        let partials = ShardPartials {
            rows: (0..rows)
                .map(|r| merge_blocks(self.shard, &blocks, r))
                .collect::<Result<_>>()?,
            denominator: match self.problem.targets {
                TargetKind::Classes => f64::from(summary.denominator),
                TargetKind::Probabilities => 0.0,
            },
        };
        debug_assert_eq!(ShardRecord::WORDS as usize * 4, RECORD_BYTES);
        record::encode(&self.problem, self.shard, &partials)
    }

    /// Pass 2 on host data, from the step's merged rows: the loss (the merge's, in f32), this
    /// rank's **partial** `dH = G_p W_p` (not yet summed over ranks), its `dW` and `db` slices.
    pub fn gradients(
        &self,
        queue: &wgpu::Queue,
        batch: &LinearBatch<'_>,
        merged: &Merged,
    ) -> Result<LinearOutput<f32>> {
        let inputs = self.upload(batch)?;
        self.gradients_of(queue, &inputs, merged)
    }

    fn gradients_of(
        &self,
        queue: &wgpu::Queue,
        inputs: &Inputs,
        merged: &Merged,
    ) -> Result<LinearOutput<f32>> {
        let loss = loss_f32(&merged.output);
        if self.plan.problem().gradients == HeadGradients::None {
            return Ok(LinearOutput {
                loss,
                d_hidden: None,
                d_head: None,
                d_bias: None,
            });
        }
        if merged.rows.len() != self.problem.rows as usize {
            return Err(LsceError::LengthMismatch {
                what: "merged rows",
                expected: self.problem.rows as usize,
                actual: merged.rows.len(),
            });
        }
        let binding = self.bind(inputs)?;
        let p = &self.plan.inner;
        let device = &p.kernel.inner.device;
        // The linear head's row constants carry the logit scale in `scale` (linear_merge's
        // finish_merged_row); the shards' host merge leaves it to the shader.
        let mut rows: Vec<ShardMergedRow> = bytemuck::pod_collect_to_vec(&merged.grad_words());
        for r in &mut rows {
            r.scale *= self.problem.spec.logit_scale;
        }
        // Two locals, not a Vec: an early return drops them last-first, the order wgpu
        // requires of error scopes (a Vec drops first-first, and wgpu panics).
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let constants = upload(
            device,
            "lsce merged rows",
            bytemuck::cast_slice(&rows),
            wgpu::BufferUsages::COPY_SRC,
        )?;
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("lsce linear slice, pass 2"),
        });
        encoder.copy_buffer_to_buffer(
            &constants,
            0,
            &p.control,
            p.merged_base * 4,
            (rows.len() * std::mem::size_of::<ShardMergedRow>()) as u64,
        );
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("lsce linear slice gradients"),
                timestamp_writes: None,
            });
            pass.set_bind_group(0, &binding.loss, &[0]);
            let entry = |i: u32| [(p.stride * u64::from(i)) as u32];
            for chunk in &p.chunks {
                if let Some(logit_grad) = &p.pipelines.logit_grad {
                    // Chunked: the chunk's logits again (its records are not read), then G.
                    encode_stats(&mut pass, &binding, chunk);
                    pass.set_bind_group(1, &binding.heads[0], &entry(chunk.whole));
                    pass.set_pipeline(logit_grad);
                    dispatch(&mut pass, p.quad_groups(chunk.rows));
                }
                binding.encode_products(&mut pass, chunk);
            }
        }
        let pr = self.plan.problem();
        let (rows, dim, width) = (
            u64::from(pr.rows()),
            u64::from(pr.dim),
            u64::from(pr.vocab()),
        );
        let outputs = [
            inputs.d_hidden.as_ref().map(|b| (b, rows * dim * 4)),
            inputs.d_head.as_ref().map(|b| (b, width * dim * 4)),
            inputs.d_bias.as_ref().map(|b| (b, width * 4)),
        ];
        let sections: Vec<_> = outputs.iter().flatten().copied().collect();
        let mut read =
            read_sections(device, queue, encoder, &sections, vec![oom, validation])?.into_iter();
        let [d_hidden, d_head, d_bias] =
            outputs.map(|o| o.and_then(|_| read.next().map(|b| floats(&b))));
        Ok(LinearOutput {
            loss,
            d_hidden,
            d_head,
            d_bias,
        })
    }

    /// One step of this rank: pass 1, [`exchange`](crate::shards::exchange), pass 2, the `dH`
    /// sum (see [the module's section](crate::linear#vocabulary-parallel-over-ranks)). Every rank of the step must call it (or
    /// [`compute_linear_shard`]), the failing ones too.
    ///
    /// Returns the loss (the unsharded one, bitwise the same on every rank), the summed `dH`
    /// (bitwise the same on every rank), and this rank's `dW` and `db` slices.
    ///
    /// Errors, on every rank: a batch that does not fit the plan (a `W` slice whose width is
    /// not the layout's, `H`'s `D` not `W`'s); any rank's failure
    /// ([`LsceError::RankFailed`] naming it, on the others); a rank with another problem, `D`,
    /// gradients, bias or element type ([`LsceError::ForeignRecords`] naming it); a bad label
    /// ([`LsceError::LabelOutOfRange`]); the transport's errors.
    pub fn step(
        &self,
        queue: &wgpu::Queue,
        batch: &LinearBatch<'_>,
        collective: &mut dyn Collective,
    ) -> Result<LinearOutput<f32>> {
        run(self, queue, batch, self.fingerprint, collective)
    }
}

/// Row `r`'s record over the slice: its blocks' records merged in block order.
fn merge_blocks(shard: usize, blocks: &[Vec<PartialRow>], r: usize) -> Result<PartialRow> {
    let first = &blocks[0][r];
    if blocks.iter().any(|b| b[r].kind != first.kind) {
        return Err(LsceError::ForeignRecords {
            shard,
            reason: "the slice's vocabulary blocks disagree about a row's kind",
        });
    }
    Ok(match first.kind {
        RowKind::Valid => fold_rows(blocks.iter().map(|b| &b[r])),
        kind => PartialRow::unusable(kind, first.label),
    })
}

/// `linear_stats` over one chunk's rows, every window.
fn encode_stats(pass: &mut wgpu::ComputePass<'_>, binding: &LinearBinding, chunk: &ChunkSteps) {
    let p = &binding.plan;
    pass.set_pipeline(&p.pipelines.stats);
    for w in &chunk.windows {
        let at = (p.stride * u64::from(w.stats)) as u32;
        pass.set_bind_group(1, &binding.heads[w.window], &[at]);
        pass.dispatch_workgroups(PlanInner::row_tiles(chunk.rows), w.blocks, 1);
    }
}

fn dh_bytes(p: &LinearProblem) -> u64 {
    u64::from(p.rows()) * u64::from(p.dim) * 4
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(bytes)
}

fn loss_f32(o: &LossOutput<f64>) -> LossOutput<f32> {
    let narrow = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
    LossOutput {
        loss: narrow(&o.loss),
        z_loss: narrow(&o.z_loss),
        lse: narrow(&o.lse),
        grad: None,
        denominator: o.denominator as f32,
        correct: o.correct,
    }
}

/// The partial `dH`s of all ranks (`parts[p]` rank `p`'s) summed in rank order:
/// `((dH_0 + dH_1) + dH_2) + ...`, in f32. What every rank of a step computes from the
/// gathered partials; the same bits for the same parts.
///
/// ```
/// let sum = lsce::linear::sum_in_rank_order(&[&[1.0, 2.0], &[0.5, 0.25]]);
/// assert_eq!(sum, vec![1.5, 2.25]);
/// ```
pub fn sum_in_rank_order(parts: &[&[f32]]) -> Vec<f32> {
    let mut sum = parts.first().map_or_else(Vec::new, |p| p.to_vec());
    for part in &parts[1.min(parts.len())..] {
        for (s, v) in sum.iter_mut().zip(part.iter()) {
            *s += v;
        }
    }
    sum
}

/// One step of the vocabulary-parallel linear head on this rank, planning its slice first:
/// [`LinearShardPlan::new`] then [`LinearShardPlan::step`], with a failure to plan (a
/// mismatched `V` split, `H`'s `D` not `W`'s, ...) reported to every rank through the status
/// round instead of leaving them waiting. `batch` is this rank's (see [`LinearShardPlan`]);
/// the rank is `collective.rank()`.
pub fn compute_linear_shard(
    kernel: &LossKernel,
    queue: &wgpu::Queue,
    problem: &ShardProblem,
    batch: &LinearBatch<'_>,
    options: &LinearOptions,
    collective: &mut dyn Collective,
) -> Result<LinearOutput<f32>> {
    let plan = LinearShardPlan::new(kernel, problem, collective.rank(), batch, options);
    let fingerprint = match &plan {
        Ok(plan) => plan.fingerprint,
        Err(_) => fingerprint(problem, batch, options),
    };
    match &plan {
        Ok(plan) => run(plan, queue, batch, fingerprint, collective),
        Err(err) => {
            // This rank takes part in the status round with its error, and every rank fails.
            exchange_as(
                problem,
                fingerprint,
                collective,
                Err(err),
                UpstreamGrad::One,
            )?;
            Err(err.clone())
        }
    }
}

/// The step: pass 1, the exchange, pass 2, the `dH` round.
fn run(
    plan: &LinearShardPlan,
    queue: &wgpu::Queue,
    batch: &LinearBatch<'_>,
    fingerprint: u64,
    collective: &mut dyn Collective,
) -> Result<LinearOutput<f32>> {
    let inputs = plan.upload(batch);
    let block = inputs
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|inputs| plan.records_of(queue, inputs));
    // An exchange that fails, fails on every rank: its status round is every rank's, and its
    // merge reads the same bytes everywhere (the upstream gradient checked before the round).
    let merged = exchange_as(
        &plan.problem,
        fingerprint,
        collective,
        block.as_deref(),
        batch.loss.upstream,
    )?;
    let linear = plan.plan.problem();
    if linear.gradients == HeadGradients::None {
        return Ok(LinearOutput {
            loss: loss_f32(&merged.output),
            d_hidden: None,
            d_head: None,
            d_bias: None,
        });
    }
    // Pass 2 can fail on one rank alone (the device): the dH round's status tells the others.
    let out = inputs.and_then(|inputs| plan.gradients_of(queue, &inputs, &merged));
    let len = dh_bytes(linear) as usize;
    agree(
        collective,
        out.as_ref().map(|_| ()).map_err(Clone::clone),
        fingerprint,
        len,
    )?;
    let mut out = out?;
    let partial = out.d_hidden.take().unwrap_or_default();
    let all = collective.all_gather(bytemuck::cast_slice(&partial))?;
    if all.len() != len * plan.problem.layout.shards() {
        return Err(LsceError::Transport(format!(
            "the dH all-gather returned {} bytes, expected {}",
            all.len(),
            len * plan.problem.layout.shards()
        )));
    }
    let parts: Vec<Vec<f32>> = all.chunks(len).map(floats).collect();
    let parts: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
    out.d_hidden = Some(sum_in_rank_order(&parts));
    Ok(out)
}
