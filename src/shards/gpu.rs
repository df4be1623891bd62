//! The shard passes on a wgpu device: pass 1 writes a shard's record block into a caller
//! buffer, pass 2 writes its gradient from the merged rows. Each is a [`LossPlan`] over the
//! shard's `[rows, c1 - c0]` logits whose parameters carry `c0` and the global `K`
//! (`shard_stats` and `shard_grad` in `shaders/rows.wgsl`, after the usual setup pass that
//! counts the shard's part of the denominator and its weighted off-mass).
//!
//! Bytes moved per step and shard (f32 logits, `w = c1 - c0`): pass 1 reads `4 rows w` logits
//! once (plus `4 rows w` probabilities) and writes `32 rows + 32` record bytes; pass 2 reads
//! the logits again and `16 rows` merged bytes, and writes `4 rows w` gradient bytes.

use crate::error::{LsceError, Result};
use crate::kernel::LossKernel;
use crate::plan::{upload, LossBuffers, LossPlan, ShardPass, ShardRole, Summary};
use crate::{Dtype, GradDtype, Gradient, Problem, Shape, TargetKind, Targets};

use super::batch::ShardBatch;
use super::layout::ShardProblem;
use super::merge::Merged;
use super::record::{header, HEADER_BYTES, RECORD_BYTES};

/// Bytes per row of the merged rows pass 2 reads: `M`, `coef`, `scale` (f32) and the row kind
/// (u32), as [`Merged::grad_words`] lays them out.
pub const MERGED_ROW_BYTES: u64 = 16;

/// Which gradient pass 2 writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardOptions {
    /// The logits' element type.
    pub dtype: Dtype,
    /// The gradient's element type.
    pub grad_dtype: GradDtype,
    /// `Separate`, `InPlace` (over the shard's logits) or `None` (no pass 2).
    pub gradient: Gradient,
}

impl Default for ShardOptions {
    fn default() -> Self {
        Self {
            dtype: Dtype::F32,
            grad_dtype: GradDtype::AsLogits,
            gradient: Gradient::Separate,
        }
    }
}

/// One shard's inputs on the device.
///
/// | buffer | contents | usage |
/// |---|---|---|
/// | `logits` | `[rows, c1 - c0]` of the dtype | `STORAGE` |
/// | `targets` | all `rows` i32 global labels, or the shard's `[rows, c1 - c0]` f32 probabilities | `STORAGE` |
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
        problem.layout.check_shard(shard)?;
        let range = problem.layout.range(shard);
        let shape = Shape::matrix(problem.rows, range.end - range.start)?;
        let classes = problem.targets == TargetKind::Classes;
        let base = Problem::new(problem.spec, shape)
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
            &base.with_gradient(Gradient::None).with_accuracy(classes),
            role(ShardPass::Stats),
        )?;
        let grad = match options.gradient {
            Gradient::None => None,
            gradient => Some(LossPlan::for_shard(
                kernel,
                &base
                    .with_gradient(gradient)
                    .with_grad_dtype(options.grad_dtype),
                role(ShardPass::Grad),
            )?),
        };
        let device = kernel.device();
        let header_words = header(problem, shard);
        let header = upload(
            device,
            "lsce shard header",
            bytemuck::cast_slice(&header_words),
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

    /// The problem.
    pub fn problem(&self) -> &ShardProblem {
        &self.problem
    }

    /// The shard's index.
    pub fn shard(&self) -> usize {
        self.shard
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
        check_copy("records", records, self.block_bytes(), wgpu::BufferUsages::COPY_DST)?;
        self.stats.encode(encoder, &self.loss_buffers(buffers))?;
        let (control, at) = self.stats.record_region();
        let (dst, offset) = (records.buffer(), records.offset());
        let header = HEADER_BYTES as u64;
        encoder.copy_buffer_to_buffer(&self.header, 0, dst, offset, header - WORD);
        // Header word 7: the shard's part of the denominator, CTRL_DENOMINATOR of the setup.
        encoder.copy_buffer_to_buffer(control, 2 * WORD, dst, offset + header - WORD, WORD);
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
        let plan = self.grad.as_ref().ok_or(LsceError::Unsupported(
            "the shard plan was made with Gradient::None",
        ))?;
        check_copy("merged", merged, self.merged_bytes(), wgpu::BufferUsages::COPY_SRC)?;
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

    /// Pass 1 on host data: uploads the shard's slice, runs pass 1 and returns its record
    /// block. For tests, examples and transports that start from host memory.
    pub fn compute_records(&self, queue: &wgpu::Queue, batch: &ShardBatch<'_>) -> Result<Vec<u8>> {
        let device = self.stats.device();
        let inputs = self.upload(device, batch)?;
        let records = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lsce shard records"),
            size: self.block_bytes(),
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        self.encode_records(&mut encoder, &inputs.buffers(), records.slice(..))?;
        read_back(device, queue, encoder, &records, self.block_bytes())
    }

    /// Pass 2 on host data: the shard's `[rows, c1 - c0]` gradient, widened to `f32`.
    pub fn compute_gradient(
        &self,
        queue: &wgpu::Queue,
        batch: &ShardBatch<'_>,
        merged: &Merged,
    ) -> Result<Vec<f32>> {
        let device = self.stats.device();
        let inputs = self.upload(device, batch)?;
        let merged = upload(
            device,
            "lsce shard merged",
            &merged.grad_words(),
            wgpu::BufferUsages::COPY_SRC,
        )?;
        let elements = u64::from(self.problem.rows) * u64::from(self.width());
        let grad_dtype = match (self.options.gradient, self.options.grad_dtype) {
            (Gradient::InPlace, _) | (_, GradDtype::AsLogits) => self.options.dtype,
            (_, GradDtype::F32) => Dtype::F32,
        };
        let bytes = (elements * grad_dtype.bytes()).next_multiple_of(WORD);
        let grad = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lsce shard grad"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let in_place = self.options.gradient == Gradient::InPlace;
        let mut encoder = device.create_command_encoder(&Default::default());
        self.encode_gradient(
            &mut encoder,
            &inputs.buffers(),
            merged.slice(..),
            (!in_place).then(|| grad.slice(..)),
        )?;
        let source = if in_place { &inputs.logits } else { &grad };
        let raw = read_back(device, queue, encoder, source, bytes)?;
        Ok(match grad_dtype {
            Dtype::F32 => bytemuck::cast_slice(&raw).to_vec(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .take(elements as usize)
                .map(|b| crate::half::f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Dtype::Bf16 => raw
                .chunks_exact(2)
                .take(elements as usize)
                .map(|b| crate::half::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
        })
    }

    fn width(&self) -> u32 {
        self.problem.layout.width(self.shard)
    }

    fn upload(&self, device: &wgpu::Device, batch: &ShardBatch<'_>) -> Result<Inputs> {
        batch.validate(&self.problem)?;
        if batch.shard != self.shard {
            return Err(LsceError::ForeignRecords {
                shard: batch.shard,
                reason: "the batch is another shard's than the plan's",
            });
        }
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
                .map(|w| upload(device, "lsce shard weights", bytemuck::cast_slice(w), storage))
                .transpose()?,
        })
    }
}

struct Inputs {
    logits: wgpu::Buffer,
    targets: wgpu::Buffer,
    weights: Option<wgpu::Buffer>,
}

impl Inputs {
    fn buffers(&self) -> ShardBuffers<'_> {
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

/// Submits `encoder` with a copy of `bytes` of `source` into a mapped buffer and returns them.
fn read_back(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    mut encoder: wgpu::CommandEncoder,
    source: &wgpu::Buffer,
    bytes: u64,
) -> Result<Vec<u8>> {
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("lsce shard readback"),
        size: bytes.max(WORD),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    encoder.copy_buffer_to_buffer(source, 0, &readback, 0, bytes);
    let index = queue.submit([encoder.finish()]);
    let slice = readback.slice(..bytes);
    let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = sender.send(r);
    });
    device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        })
        .map_err(|e| LsceError::Readback(e.to_string()))?;
    if let Some(err) = pollster::block_on(validation.pop()) {
        return Err(LsceError::Device(err.to_string()));
    }
    match pollster::block_on(receiver.receive()) {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(LsceError::Readback(e.to_string())),
        None => return Err(LsceError::Readback("the map callback was dropped".into())),
    }
    let view = slice
        .get_mapped_range()
        .map_err(|e| LsceError::Readback(e.to_string()))?;
    Ok(view.to_vec())
}
