//! The shard passes on a wgpu device: pass 1 writes a shard's record block into a caller
//! buffer, pass 2 writes its gradient from the merged rows. Each is a [`LossPlan`] over the
//! shard's `[rows, c1 - c0]` logits whose parameters carry `c0` and the global `K`
//! (`shard_stats` and `shard_grad` in `shaders/rows.wgsl`, after the usual setup pass that
//! counts the shard's part of the denominator and its weighted off-mass).
//!
//! Bytes moved per step and shard (f32 logits, `w = c1 - c0`): pass 1 reads `4 rows w` logits
//! once (plus `4 rows w` probabilities) and writes `32 rows + 32` record bytes; pass 2 reads
//! the logits again and `16 rows` merged bytes, and writes `4 rows w` gradient bytes.

use std::mem::offset_of;

use crate::device::{submit_and_map, upload};
use crate::error::{LsceError, Result};
use crate::kernel::LossKernel;
use crate::layout::{ShardHeader, ShardMergedRow, SharedLayout, Summary};
use crate::plan::{LossPlan, ShardPass, ShardRole};
use crate::LossBuffers;
use crate::{Dtype, GradDtype, Gradient, Problem, Shape, StagingOptions, Targets};

use super::batch::ShardBatch;
use super::layout::ShardProblem;
use super::merge::Merged;
use super::record::{header, HEADER_BYTES, RECORD_BYTES};

/// Bytes per row of the merged rows pass 2 reads: `M`, `coef`, `scale` (f32) and the row kind
/// (u32), as [`Merged::grad_words`] lays them out.
pub const MERGED_ROW_BYTES: u64 = ShardMergedRow::WORDS * 4;

/// Where the shards' records are merged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MergeOn {
    /// On the host ([`merge_records`](super::merge_records), after any transport): pass 2
    /// reads the merged rows ([`ShardPlan::encode_gradient`]).
    #[default]
    Host,
    /// On the device, for shards on one device: pass 2 reads all shards' record blocks, merges
    /// each row itself and writes the loss, lse and summary too
    /// ([`ShardPlan::encode_merged_gradient`]).
    Device,
}

/// What a shard plan reads and writes: the one-device [`StagingOptions`] (the gradient, its
/// element type and the binding cap, as for one device), plus what only a shard has.
///
/// Accuracy is the problem's ([`ShardProblem::accuracy`](super::ShardProblem::accuracy)),
/// which every shard must agree on: `staging.accuracy` may be left `false`, and `true` needs
/// the problem to count it too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardOptions {
    /// `gradient` (`Separate`, `InPlace` over the shard's logits, or `None`), `grad_dtype` and
    /// `max_binding_bytes` (larger shards are processed in row windows).
    pub staging: StagingOptions,
    /// The logits' element type.
    pub dtype: Dtype,
    /// Where the records are merged.
    pub merge: MergeOn,
    /// Whether an upstream-gradient buffer is bound in pass 2 ([`MergeOn::Device`]; the host
    /// merge takes it as an argument).
    pub upstream_grad: bool,
}

impl ShardOptions {
    /// Sets [`ShardOptions::staging`].
    pub fn with_staging(mut self, staging: StagingOptions) -> Self {
        self.staging = staging;
        self
    }

    /// Sets [`ShardOptions::dtype`].
    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self
    }
}

/// One shard's inputs on the device.
///
/// | buffer | contents | usage |
/// |---|---|---|
/// | `logits` | the shard's shape (`[rows, c1 - c0]`, `[N, c1 - c0, d..]`) of the dtype | `STORAGE` |
/// | `targets` | all `rows` i32 global labels, or f32 probabilities in the shard's shape | `STORAGE` |
/// | `weights` | the shard's `c1 - c0` f32 class weights, iff weighted | `STORAGE` |
#[derive(Clone, Copy, Debug)]
pub struct ShardBuffers<'a> {
    /// The shard's logits.
    pub logits: wgpu::BufferSlice<'a>,
    /// Labels or the shard's probabilities.
    pub targets: wgpu::BufferSlice<'a>,
    /// The shard's class weights.
    pub weights: Option<wgpu::BufferSlice<'a>>,
}

/// The two passes of one shard of a [`ShardProblem`] on one device.
///
/// ```
/// use lsce::shards::{ShardBuffers, ShardLayout, ShardOptions, ShardPlan, ShardProblem};
/// let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
/// let kernel = lsce::LossKernel::new(&device)?;
/// let problem = ShardProblem::new(lsce::LossSpec::pytorch(0.1), 4, ShardLayout::even(10, 2)?);
/// let plan = ShardPlan::new(&kernel, &problem, 1, ShardOptions::default())?;
/// assert_eq!(plan.block_bytes(), 32 + 4 * 32);
/// # Ok::<(), lsce::LsceError>(())
/// ```
#[derive(Debug)]
pub struct ShardPlan {
    problem: ShardProblem,
    shard: usize,
    options: ShardOptions,
    stats: LossPlan,
    grad: Option<LossPlan>,
    /// Header words 0..7 of the record block (word 7, the denominator, comes from `control`).
    header: wgpu::Buffer,
    /// Where the inner plans' summaries go (unused: the merge makes the step's summary).
    summary: wgpu::Buffer,
}

const WORD: u64 = 4;

impl ShardPlan {
    /// Plans shard `shard` of `problem` on `kernel`'s device.
    pub fn new(
        kernel: &LossKernel,
        problem: &ShardProblem,
        shard: usize,
        options: ShardOptions,
    ) -> Result<Self> {
        problem.validate()?;
        let shape = problem.shard_shape(shard)?;
        if options.staging.accuracy && !problem.accuracy {
            return Err(LsceError::Unsupported(
                "shard accuracy is the ShardProblem's (every shard must agree): set it there",
            ));
        }
        let range = problem.layout.range(shard);
        let base = options
            .staging
            .apply(Problem::new(problem.spec, shape))
            .with_targets(problem.targets)
            .with_weighted(problem.weighted)
            .with_dtype(options.dtype);
        let role = |pass| ShardRole {
            class_begin: range.start,
            classes: problem.layout.classes(),
            pass,
        };
        let stats = LossPlan::for_shard(
            kernel,
            &base
                .with_gradient(Gradient::None)
                .with_accuracy(problem.accuracy),
            role(ShardPass::Stats),
        )?;
        // Pass 2 counts accuracy only where it merges (on the device).
        let pass2 = base.with_accuracy(false);
        let grad = match (options.merge, options.staging.gradient) {
            (MergeOn::Host, Gradient::None) => None,
            (MergeOn::Host, _) if options.upstream_grad => {
                return Err(LsceError::Unsupported(
                    "with MergeOn::Host the upstream gradient goes to the merge, not to the plan",
                ))
            }
            (MergeOn::Host, _) => Some(LossPlan::for_shard(kernel, &pass2, role(ShardPass::Grad))?),
            (MergeOn::Device, _) => Some(LossPlan::for_shard(
                kernel,
                &pass2
                    .with_upstream_grad(options.upstream_grad)
                    .with_accuracy(problem.accuracy),
                role(ShardPass::MergeGrad {
                    shards: problem.layout.shards() as u32,
                }),
            )?),
        };
        let device = kernel.device();
        let header = upload(
            device,
            "lsce shard header",
            bytemuck::bytes_of(&header(problem, shard)),
            wgpu::BufferUsages::COPY_SRC,
        )?;
        let summary = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lsce shard summary"),
            size: Summary::SIZE,
            usage: wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Self {
            problem: problem.clone(),
            shard,
            options,
            stats,
            grad,
            header,
            summary,
        })
    }

    pub(crate) fn device(&self) -> &wgpu::Device {
        self.stats.device()
    }

    /// The problem.
    pub fn problem(&self) -> &ShardProblem {
        &self.problem
    }

    /// The shard's index.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The row windows each pass is cut into (1 unless a binding would exceed the limit).
    pub fn windows(&self) -> usize {
        self.stats.windows()
    }

    /// Bytes of the record block pass 1 writes: `32 + 32 rows`.
    pub fn block_bytes(&self) -> u64 {
        (HEADER_BYTES + self.problem.rows as usize * RECORD_BYTES) as u64
    }

    /// Bytes of the merged rows pass 2 reads: `16 rows`.
    pub fn merged_bytes(&self) -> u64 {
        u64::from(self.problem.rows) * MERGED_ROW_BYTES
    }

    fn loss_buffers<'a>(&'a self, b: &ShardBuffers<'a>) -> LossBuffers<'a> {
        LossBuffers {
            logits: b.logits,
            targets: b.targets,
            weights: b.weights,
            upstream: None,
            loss: None,
            lse: None,
            grad: None,
            summary: self.summary.slice(..),
        }
    }

    /// Pass 1: records the shard's statistics into `encoder` and copies its record block
    /// ([`block_bytes`](Self::block_bytes) bytes, `COPY_DST`) to `records`. Binds on every call.
    pub fn encode_records(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: &ShardBuffers<'_>,
        records: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        check_copy(
            "records",
            records,
            self.block_bytes(),
            wgpu::BufferUsages::COPY_DST,
        )?;
        self.stats.encode(encoder, &self.loss_buffers(buffers))?;
        let (control, at) = self.stats.record_region();
        let (dst, offset) = (records.buffer(), records.offset());
        let header = HEADER_BYTES as u64;
        let denominator = offset_of!(ShardHeader, denominator) as u64;
        encoder.copy_buffer_to_buffer(&self.header, 0, dst, offset, denominator);
        // The shard's part of the denominator: the setup pass's summary word.
        encoder.copy_buffer_to_buffer(
            control,
            offset_of!(Summary, denominator) as u64,
            dst,
            offset + denominator,
            WORD,
        );
        let after = denominator + WORD;
        if after < header {
            encoder.copy_buffer_to_buffer(&self.header, after, dst, offset + after, header - after);
        }
        encoder.copy_buffer_to_buffer(
            control,
            at,
            dst,
            offset + header,
            self.block_bytes() - header,
        );
        Ok(())
    }

    /// Pass 2: copies the merged rows ([`merged_bytes`](Self::merged_bytes) bytes, `COPY_SRC`)
    /// in and records the shard's gradient into `grad` (`[rows, c1 - c0]` of the gradient's
    /// dtype, `STORAGE`; `None` for an in-place gradient, which overwrites the logits).
    pub fn encode_gradient(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: &ShardBuffers<'_>,
        merged: wgpu::BufferSlice<'_>,
        grad: Option<wgpu::BufferSlice<'_>>,
    ) -> Result<()> {
        if self.options.merge != MergeOn::Host {
            return Err(LsceError::Unsupported(
                "the shard plan merges on the device: use encode_merged_gradient",
            ));
        }
        let plan = self.grad.as_ref().ok_or(LsceError::Unsupported(
            "the shard plan was made with Gradient::None",
        ))?;
        check_copy(
            "merged",
            merged,
            self.merged_bytes(),
            wgpu::BufferUsages::COPY_SRC,
        )?;
        let mut b = self.loss_buffers(buffers);
        b.grad = grad;
        let binding = plan.bind(&b)?;
        let (control, at) = plan.record_region();
        encoder.copy_buffer_to_buffer(
            merged.buffer(),
            merged.offset(),
            control,
            at,
            self.merged_bytes(),
        );
        binding.encode(encoder);
        Ok(())
    }

    /// Bytes of the record blocks of all shards, as [`encode_merged_gradient`] reads them.
    ///
    /// [`encode_merged_gradient`]: Self::encode_merged_gradient
    pub fn all_blocks_bytes(&self) -> u64 {
        self.block_bytes() * self.problem.layout.shards() as u64
    }

    /// Pass 2 with the merge on the device ([`MergeOn::Device`]): copies all `P` shards'
    /// record blocks in (`records`: [`all_blocks_bytes`](Self::all_blocks_bytes), block `p` at
    /// byte `p * block_bytes()`, as each shard's [`encode_records`](Self::encode_records) wrote
    /// it there; `COPY_SRC`), merges every row in rank order and records this shard's gradient
    /// and the step's loss, lse and summary into `buffers` (the table of [`LossBuffers`] with
    /// the shard's `[rows, c1 - c0]` shape; the labels are global, `weights` the shard's).
    ///
    /// The blocks are trusted to be of plans of this problem on this device (the host merge
    /// checks their fingerprints; here they never leave the device).
    pub fn encode_merged_gradient(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: &LossBuffers<'_>,
        records: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let plan = match (self.options.merge, &self.grad) {
            (MergeOn::Device, Some(plan)) => plan,
            _ => {
                return Err(LsceError::Unsupported(
                    "the shard plan merges on the host: use encode_gradient",
                ))
            }
        };
        check_copy(
            "records",
            records,
            self.all_blocks_bytes(),
            wgpu::BufferUsages::COPY_SRC,
        )?;
        let binding = plan.bind(buffers)?;
        let (control, at) = plan.record_region();
        encoder.copy_buffer_to_buffer(
            records.buffer(),
            records.offset(),
            control,
            at,
            self.all_blocks_bytes(),
        );
        binding.encode(encoder);
        Ok(())
    }

    /// Pass 1 on host data: uploads the shard's slice, runs pass 1 and returns its record
    /// block. For tests, examples and transports that start from host memory.
    pub fn compute_records(&self, queue: &wgpu::Queue, batch: &ShardBatch<'_>) -> Result<Vec<u8>> {
        let device = self.device();
        let inputs = self.upload(device, batch)?;
        let records = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lsce shard records"),
            size: self.block_bytes(),
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        self.encode_records(&mut encoder, &inputs.buffers(), records.slice(..))?;
        let mut out = read_back(device, queue, encoder, &[(&records, self.block_bytes())])?;
        Ok(out.remove(0))
    }

    /// Pass 2 on host data: the shard's gradient in its shape, widened to `f32`.
    pub fn compute_gradient(
        &self,
        queue: &wgpu::Queue,
        batch: &ShardBatch<'_>,
        merged: &Merged,
    ) -> Result<Vec<f32>> {
        let device = self.device();
        let inputs = self.upload(device, batch)?;
        let merged = upload(
            device,
            "lsce shard merged",
            &merged.grad_words(),
            wgpu::BufferUsages::COPY_SRC,
        )?;
        let elements = self.shape().elements();
        let grad_dtype = self.grad_dtype();
        let bytes = (elements * grad_dtype.bytes()).next_multiple_of(WORD);
        let grad = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lsce shard grad"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let in_place = self.options.staging.gradient == Gradient::InPlace;
        let mut encoder = device.create_command_encoder(&Default::default());
        self.encode_gradient(
            &mut encoder,
            &inputs.buffers(),
            merged.slice(..),
            (!in_place).then(|| grad.slice(..)),
        )?;
        let source = if in_place { &inputs.logits } else { &grad };
        let raw = read_back(device, queue, encoder, &[(source, bytes)])?;
        Ok(widen(&raw[0], grad_dtype, elements as usize))
    }

    /// The shard's part of the logits, `[N, c1 - c0, d..]`.
    pub(crate) fn shape(&self) -> Shape {
        self.stats.problem().shape
    }

    /// The options.
    pub fn options(&self) -> &ShardOptions {
        &self.options
    }

    /// The gradient's element type.
    pub(crate) fn grad_dtype(&self) -> Dtype {
        match (
            self.options.staging.gradient,
            self.options.staging.grad_dtype,
        ) {
            (Gradient::InPlace, _) | (_, GradDtype::AsLogits) => self.options.dtype,
            (_, GradDtype::F32) => Dtype::F32,
        }
    }

    /// Checks a host batch, its label values included (so that a bad label is an `Err` on this
    /// rank before anything runs or moves), and uploads it.
    pub(crate) fn upload(&self, device: &wgpu::Device, part: &ShardBatch<'_>) -> Result<Inputs> {
        part.validate_labels(&self.problem)?;
        if part.shard != self.shard {
            return Err(LsceError::ForeignRecords {
                shard: part.shard,
                reason: "the batch is another shard's than the plan's",
            });
        }
        let batch = &part.batch;
        if batch.logits.dtype() != self.options.dtype {
            return Err(LsceError::Unsupported(
                "the shard's logits are not of the plan's dtype",
            ));
        }
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let targets = match batch.targets {
            Targets::Classes(l) => bytemuck::cast_slice(l),
            Targets::Probabilities(p) => bytemuck::cast_slice(p),
        };
        Ok(Inputs {
            logits: upload(device, "lsce shard logits", batch.logits.bytes(), storage)?,
            targets: upload(device, "lsce shard targets", targets, storage)?,
            weights: batch
                .weights
                .map(|w| {
                    upload(
                        device,
                        "lsce shard weights",
                        bytemuck::cast_slice(w),
                        storage,
                    )
                })
                .transpose()?,
        })
    }
}

pub(crate) struct Inputs {
    pub logits: wgpu::Buffer,
    pub targets: wgpu::Buffer,
    pub weights: Option<wgpu::Buffer>,
}

impl Inputs {
    pub(crate) fn buffers(&self) -> ShardBuffers<'_> {
        ShardBuffers {
            logits: self.logits.slice(..),
            targets: self.targets.slice(..),
            weights: self.weights.as_ref().map(|w| w.slice(..)),
        }
    }
}

fn check_copy(
    what: &'static str,
    s: wgpu::BufferSlice<'_>,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> Result<()> {
    if !s.buffer().usage().contains(usage) {
        return Err(LsceError::MissingUsage {
            what,
            usage: if usage == wgpu::BufferUsages::COPY_DST {
                "COPY_DST"
            } else {
                "COPY_SRC"
            },
        });
    }
    if s.offset() % WORD != 0 {
        return Err(LsceError::MisalignedOffset {
            what,
            offset: s.offset(),
            alignment: WORD,
        });
    }
    if s.size() < bytes {
        return Err(LsceError::BufferTooSmall {
            what,
            needed: bytes,
            available: s.size(),
        });
    }
    Ok(())
}

/// Submits `encoder` with copies of `(source, bytes)` into one mapped buffer and returns each.
pub(crate) fn read_back(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    mut encoder: wgpu::CommandEncoder,
    sources: &[(&wgpu::Buffer, u64)],
) -> Result<Vec<Vec<u8>>> {
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let mut at = Vec::with_capacity(sources.len());
    let mut total = 0u64;
    for &(_, bytes) in sources {
        at.push(total);
        total += bytes.next_multiple_of(wgpu::MAP_ALIGNMENT);
    }
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("lsce shard readback"),
        size: total.max(wgpu::MAP_ALIGNMENT),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    for (&(source, bytes), &to) in sources.iter().zip(&at) {
        encoder.copy_buffer_to_buffer(source, 0, &readback, to, bytes);
    }
    let mapped = submit_and_map(device, queue, encoder, &readback);
    if let Some(err) = pollster::block_on(validation.pop()) {
        return Err(LsceError::Device(err.to_string()));
    }
    mapped?;
    let slice = readback.slice(..);
    let view = slice
        .get_mapped_range()
        .map_err(|e| LsceError::Readback(e.to_string()))?;
    Ok(sources
        .iter()
        .zip(&at)
        .map(|(&(_, bytes), &to)| view[to as usize..(to + bytes) as usize].to_vec())
        .collect())
}

/// `elements` gradient values of `dtype` from their bytes, widened to `f32`.
pub(crate) fn widen(raw: &[u8], dtype: Dtype, elements: usize) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytemuck::cast_slice(&raw[..elements * 4]).to_vec(),
        Dtype::F16 | Dtype::Bf16 => raw
            .chunks_exact(2)
            .take(elements)
            .map(|b| {
                let bits = u16::from_le_bytes([b[0], b[1]]);
                if dtype == Dtype::F16 {
                    crate::half::f16_to_f32(bits)
                } else {
                    crate::half::bf16_to_f32(bits)
                }
            })
            .collect(),
    }
}
