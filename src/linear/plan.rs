//! Planning a fused linear head: pipelines, the vocabulary blocks, the row chunks, scratch.

use std::sync::Arc;

use crate::batch::TargetKind;
use crate::buffers::WORD;
use crate::compose::{Family, ModuleKey};
use crate::device::{buffer, upload};
use crate::dtype::Dtype;
use crate::error::{LsceError, Result};
use crate::kernel::{LossKernel, PipelineKey, Switches};
use crate::layout::{
    LinearParams, Params, ShardHeader, ShardMergedRow, ShardRecord, SharedLayout, CHUNK_ROWS,
    CONTROL_HEADER_WORDS, PARTIAL_WORDS,
};
use crate::plan::spec_params;
use crate::spec::Reduction;

use super::problem::{HeadGradients, LinearProblem, Memory};

/// Rows and vocabulary entries of one matmul tile (`MM_TILE` in shaders/matmul.wgsl).
pub const TILE: u32 = 64;
/// Vocabulary tiles per block: a block of `8 * 64 = 512` entries makes one 32-byte record
/// per row, 1/64 of its f32 logits.
const BLOCK_TILES: u32 = 8;
/// Invocations per workgroup of every linear pass (`MM_INVOCATIONS`).
const INVOCATIONS: u32 = 64;

/// The back edges one invocation may take in a dispatch (see `segment_tiles`).
const BACK_EDGE_BUDGET: u32 = 30_000;

/// One row chunk's dispatches, by index into the plan's `LinearParams` (1-based: entry 0 of
/// the uniforms is the loss's `Params`).
pub(crate) struct ChunkSteps {
    /// Rows of the chunk.
    pub rows: u32,
    /// The merge and the logits' gradient: the chunk's rows (no head is read).
    pub whole: u32,
    /// Per vocabulary window, in order.
    pub windows: Vec<WindowSteps>,
    /// Column tiles of `dH` and `dW` per product workgroup row (dispatch z): 1 when the
    /// products recompute G (a matmul over all of `D` per tile), `D / 64` when they read it
    /// from memory (shaders/linear.wgsl, `owned_columns`).
    pub column_tiles: u32,
}

/// The dispatches of one chunk over one vocabulary window (bind group `window`).
pub(crate) struct WindowSteps {
    pub window: usize,
    /// `linear_stats` over the window's `blocks` blocks.
    pub stats: u32,
    pub blocks: u32,
    /// `linear_grad_hidden`: one vocabulary segment of the window each, in order.
    pub hidden: Vec<u32>,
    /// `linear_grad_head`: one segment of the chunk's rows each, in order, over `tiles`
    /// vocabulary tiles.
    pub head: Vec<u32>,
    pub tiles: u32,
}

/// Tiles per segment of a gradient walk on a CPU adapter: lavapipe's loop limiter ends a
/// loop of an invocation after 65535 back edges in all, so no dispatch may walk further than
/// that. Counted as if no loop were unrolled, a tile of the walk costs the logits' depth loop
/// (`D / 16` steps of about 40 back edges), the product's in the gradient passes (`D / 64`
/// column blocks of about 230), and the tile's own epilogue and bookkeeping (200). GPUs have
/// no such limit: their walks are one segment.
fn segment_tiles(dim: u32, cpu: bool, products: bool) -> u32 {
    if !cpu {
        return u32::MAX / TILE;
    }
    let per_tile = dim.div_ceil(16) * 40 + u32::from(products) * dim.div_ceil(TILE) * 230 + 200;
    (BACK_EDGE_BUDGET / per_tile).max(1)
}

/// The compiled passes of a plan.
pub(crate) struct Pipelines {
    pub setup_partials: Option<wgpu::ComputePipeline>,
    pub setup_final: wgpu::ComputePipeline,
    pub stats: wgpu::ComputePipeline,
    pub merge: wgpu::ComputePipeline,
    pub finalize: Option<(wgpu::ComputePipeline, wgpu::ComputePipeline)>,
    /// Chunked mode with gradients.
    pub logit_grad: Option<wgpu::ComputePipeline>,
    pub grad_hidden: Option<wgpu::ComputePipeline>,
    pub grad_head: Option<wgpu::ComputePipeline>,
}

/// A fused linear head plan: built once per problem, bound to buffers with
/// [`LinearPlan::bind`], encoded every step with no allocation.
///
/// ```
/// use lsce::linear::{LinearPlan, LinearProblem};
/// # let (device, _queue) = lsce::request_device(&lsce::DeviceOptions::default()).unwrap();
/// let kernel = lsce::LossKernel::new(&device).unwrap();
/// let problem = LinearProblem::new(lsce::LossSpec::pytorch(0.1), 256, 64, 1000).unwrap();
/// let plan = LinearPlan::new(&kernel, &problem).unwrap();
/// // Records and row constants only: far below the 256 x 1000 x 4 bytes of the logits.
/// assert!(plan.scratch_bytes() < 256 * 1000 * 4 / 8);
/// ```
#[derive(Clone)]
pub struct LinearPlan {
    pub(crate) inner: Arc<PlanInner>,
}

pub(crate) struct PlanInner {
    pub kernel: LossKernel,
    pub problem: LinearProblem,
    /// Row chunks (one in recompute mode) and their dispatches.
    pub chunks: Vec<ChunkSteps>,
    /// The dispatches of the unfused ops over all rows, logits in the caller's buffer.
    pub materialized: ChunkSteps,
    /// Vocabulary windows `[begin, end)` of the head (one where it fits a binding).
    pub windows: Vec<(u32, u32)>,
    /// Vocabulary blocks (records per row).
    pub blocks: u32,
    /// Partial slots of the setup and reduction passes.
    pub setup_chunks: u32,
    /// Control words where the blocks' records and the merged row constants begin.
    pub record_base: u64,
    pub merged_base: u64,
    pub control: wgpu::Buffer,
    pub row_loss: wgpu::Buffer,
    pub lse: wgpu::Buffer,
    /// The chunk's logits and then their gradient (chunked mode).
    pub chunk: Option<wgpu::Buffer>,
    /// `Params` at 0, then the `LinearParams` of every step, `stride` apart.
    pub uniforms: wgpu::Buffer,
    pub stride: u64,
    pub pipelines: Pipelines,
    /// The key of the linear module's pipelines (for those compiled on first use).
    pub head_module: ModuleKey,
    pub switches: Switches,
}

impl LinearPlan {
    /// Plans `problem` on `kernel`'s device: checks it against the device's limits, compiles
    /// (or reuses) the pipelines and allocates the scratch.
    pub fn new(kernel: &LossKernel, problem: &LinearProblem) -> Result<Self> {
        Self::for_classes(kernel, problem, 0, problem.vocab())
    }

    /// A plan whose vocabulary is the classes `[class_begin, class_begin + vocab)` of a loss
    /// over `label_classes` (a vocabulary slice of the parallel head: labels, the excluded
    /// class and the smoothing values are global; weights and probabilities the slice's).
    pub(crate) fn for_classes(
        kernel: &LossKernel,
        problem: &LinearProblem,
        class_begin: u32,
        label_classes: u32,
    ) -> Result<Self> {
        problem.check()?;
        let inner = &kernel.inner;
        let limits = &inner.limits;
        kernel.inner.head_layout()?;
        // shaders/matmul.wgsl's workgroup memory: a tile and the two operand tiles.
        const WORKGROUP_BYTES: u32 = (1024 + 512) * 16;
        if limits.max_compute_workgroup_storage_size < WORKGROUP_BYTES {
            return Err(LsceError::ExceedsDeviceLimit {
                limit: "max_compute_workgroup_storage_size",
                needed: u64::from(WORKGROUP_BYTES),
                available: u64::from(limits.max_compute_workgroup_storage_size),
            });
        }
        let loss = &problem.loss;
        let values = loss.spec.resolve(label_classes)?;
        let soft = loss.targets == TargetKind::Probabilities;
        if soft && loss.accuracy {
            return Err(LsceError::Unsupported("accuracy needs class-label targets"));
        }
        let (rows, dim, vocab) = (
            u64::from(problem.rows()),
            u64::from(problem.dim),
            u64::from(problem.vocab()),
        );
        let element = loss.dtype.bytes();
        // The caller may cap it lower (`Problem::max_binding_bytes`): the head is then bound
        // in more windows.
        let binding = loss
            .max_binding_bytes
            .map_or(limits.max_storage_buffer_binding_size, |cap| {
                cap.min(limits.max_storage_buffer_binding_size)
            });
        let exceeds = |limit, needed: u64, available: u64| {
            (needed > available).then_some(LsceError::ExceedsDeviceLimit {
                limit,
                needed,
                available,
            })
        };
        // Element indices are u32 in the kernels; workgroup counts at most 65535 per dimension.
        let index_limit = u64::from(u32::MAX);
        let checks = [
            exceeds(
                "max_storage_buffer_binding_size",
                rows * dim * element,
                binding,
            ),
            exceeds("u32 element indices", vocab * dim, index_limit),
            exceeds("u32 element indices", rows * dim, index_limit),
            exceeds(
                "max_compute_workgroups_per_dimension (vocabulary tiles)",
                vocab.div_ceil(u64::from(TILE)),
                u64::from(limits.max_compute_workgroups_per_dimension),
            ),
        ];
        if let Some(err) = checks.into_iter().flatten().next() {
            return Err(err);
        }
        if soft {
            if let Some(err) = exceeds("max_storage_buffer_binding_size", rows * vocab * 4, binding)
                .or_else(|| exceeds("u32 element indices", rows * vocab, index_limit))
            {
                return Err(err);
            }
        }
        let gradients = problem.gradients;
        let (ranges, chunk_bytes): (Vec<(u32, u32)>, u64) = match problem.memory {
            Memory::Recompute => (vec![(0, problem.rows())], 0),
            Memory::Chunked { budget_bytes } => {
                let row_bytes = vocab * 4;
                let usable = budget_bytes.min(binding).min(limits.max_buffer_size);
                let chunk_rows = (usable / row_bytes) / u64::from(TILE) * u64::from(TILE);
                if chunk_rows == 0 {
                    return Err(LsceError::InvalidParameter {
                        name: "budget_bytes",
                        value: budget_bytes as f32,
                        expected: "at least 64 rows of f32 logits (64 * vocab * 4 bytes), within the device's binding size",
                    });
                }
                let chunk_rows = chunk_rows.min(rows) as u32;
                let ranges = (0..problem.rows())
                    .step_by(chunk_rows as usize)
                    .map(|r| (r, chunk_rows.min(problem.rows() - r)))
                    .collect();
                (ranges, u64::from(chunk_rows) * row_bytes)
            }
        };
        let cpu = inner.device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        // A block's tiles are one walk of `linear_stats`: under the loop limiter too.
        let block_tiles = segment_tiles(problem.dim, cpu, false).clamp(1, BLOCK_TILES);
        let blocks = problem.vocab().div_ceil(block_tiles * TILE);
        // A head past one storage binding is bound in windows of whole blocks: the largest
        // number of blocks whose W (and dW, in f32) fits one binding.
        let block = u64::from(block_tiles * TILE);
        let widest = if gradients == HeadGradients::All {
            element.max(4)
        } else {
            element
        };
        let window_blocks = binding / (block * dim * widest);
        if window_blocks == 0 {
            return Err(LsceError::ExceedsDeviceLimit {
                limit: "max_storage_buffer_binding_size (one block of rows of the head)",
                needed: block * dim * widest,
                available: binding,
            });
        }
        let window_vocab = (window_blocks * block).min(vocab) as u32;
        let windows: Vec<(u32, u32)> = (0..problem.vocab())
            .step_by(window_vocab as usize)
            .map(|v| (v, (v + window_vocab).min(problem.vocab())))
            .collect();
        let setup_chunks = problem.rows().div_ceil(CHUNK_ROWS);
        let record_base = CONTROL_HEADER_WORDS + PARTIAL_WORDS * u64::from(setup_chunks);
        let record_words = u64::from(blocks) * (ShardHeader::WORDS + rows * ShardRecord::WORDS);
        let merged_base = record_base + record_words;
        let control_bytes = (merged_base + rows * ShardMergedRow::WORDS) * WORD;
        if let Some(err) = exceeds("max_storage_buffer_binding_size", control_bytes, binding)
            .or_else(|| exceeds("u32 control words", control_bytes / WORD, index_limit))
        {
            return Err(err);
        }

        let device = &inner.device;
        let scratch = |label, size: u64, usage| {
            buffer(device, label, size, wgpu::BufferUsages::STORAGE | usage)
        };
        // COPY_DST: a vocabulary slice's pass 2 copies the merged rows in (src/linear/shard.rs).
        let control = scratch(
            "lsce linear control",
            control_bytes,
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        );
        let row_loss = scratch(
            "lsce linear row losses",
            rows * WORD,
            wgpu::BufferUsages::empty(),
        );
        let lse = scratch("lsce linear lse", rows * WORD, wgpu::BufferUsages::empty());
        let chunk = (chunk_bytes > 0).then(|| {
            scratch(
                "lsce linear chunk",
                chunk_bytes,
                wgpu::BufferUsages::empty(),
            )
        });

        // The uniforms: the loss's Params (one window of all rows, the blocks as shards), then
        // each chunk's LinearParams.
        let mut params: Params = spec_params(&problem.loss, values, class_begin, label_classes);
        params.chunk_count = setup_chunks;
        params.split_base = record_base as u32;
        params.split_parts = blocks;
        let stride = (std::mem::size_of::<Params>() as u64)
            .max(std::mem::size_of::<LinearParams>() as u64)
            .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment));
        let base = LinearParams {
            rows: problem.rows(),
            dim: problem.dim,
            vocab: problem.vocab(),
            vocab_end: problem.vocab(),
            block_tiles,
            has_bias: u32::from(problem.bias),
            recompute: u32::from(chunk_bytes == 0),
            store_logits: u32::from(chunk_bytes > 0),
            merged_base: merged_base as u32,
            bias_grad: u32::from(problem.bias && gradients == HeadGradients::All),
            ..LinearParams::default()
        };
        let mut steps: Vec<LinearParams> = Vec::new();
        let mut step = |p: LinearParams| {
            steps.push(p);
            steps.len() as u32
        };
        let vocab_segment = segment_tiles(problem.dim, cpu, true).saturating_mul(TILE);
        let row_segment = vocab_segment;
        let block_vocab = block_tiles * TILE;
        let mut chunk_steps = |chunk_begin: u32, rows: u32, base: LinearParams| {
            let whole = LinearParams {
                row_begin: chunk_begin,
                row_count: rows,
                chunk_begin,
                ..base
            };
            let entry = step(whole);
            let windows = windows
                .iter()
                .enumerate()
                .map(|(window, &(begin, end))| {
                    let in_window = LinearParams {
                        window_begin: begin,
                        window_end: end,
                        block_begin: begin / block_vocab,
                        vocab_begin: begin,
                        vocab_end: end,
                        ..whole
                    };
                    WindowSteps {
                        window,
                        stats: step(in_window),
                        blocks: (end - begin).div_ceil(block_vocab),
                        hidden: (begin..end)
                            .step_by(vocab_segment as usize)
                            .map(|v| {
                                step(LinearParams {
                                    vocab_begin: v,
                                    vocab_end: (v + vocab_segment).min(end),
                                    ..in_window
                                })
                            })
                            .collect(),
                        head: (chunk_begin..chunk_begin + rows)
                            .step_by(row_segment as usize)
                            .map(|r| {
                                step(LinearParams {
                                    row_begin: r,
                                    row_count: row_segment.min(chunk_begin + rows - r),
                                    ..in_window
                                })
                            })
                            .collect(),
                        tiles: (end - begin).div_ceil(TILE),
                    }
                })
                .collect();
            ChunkSteps {
                rows,
                whole: entry,
                windows,
                column_tiles: if base.recompute != 0 {
                    1
                } else {
                    problem.dim.div_ceil(TILE)
                },
            }
        };
        let chunks: Vec<ChunkSteps> = ranges
            .iter()
            .map(|&(chunk_begin, rows)| chunk_steps(chunk_begin, rows, base))
            .collect();
        // The unfused ops (`bind_logits`, `bind_products`): all rows as one chunk of logits
        // (or their gradient) in the caller's buffer.
        let materialized = chunk_steps(
            0,
            problem.rows(),
            LinearParams {
                recompute: 0,
                store_logits: 0,
                ..base
            },
        );
        let mut bytes = vec![0u8; (stride * (1 + steps.len() as u64)) as usize];
        bytes[..std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&params));
        for (i, linear) in steps.iter().enumerate() {
            let at = (stride * (1 + i as u64)) as usize;
            bytes[at..at + std::mem::size_of::<LinearParams>()]
                .copy_from_slice(bytemuck::bytes_of(linear));
        }
        let uniforms = upload(
            device,
            "lsce linear params",
            &bytes,
            wgpu::BufferUsages::UNIFORM,
        )?;

        let switches = Switches {
            weights: loss.weighted,
            soft_targets: soft,
            softcap: loss.spec.softcap.is_some(),
            write_grad: gradients != HeadGradients::None,
            accuracy: loss.accuracy,
        };
        // The loss's setup and finalize, on the same group 0 as the head's module (the in-place
        // layout: the chunk is read and written as `logits`).
        let team = inner.workgroup_team();
        let loss_pipeline = |family, entry| {
            inner.pipeline(PipelineKey {
                module: ModuleKey {
                    family,
                    ..ModuleKey::linear(Dtype::F32, team)
                },
                entry,
                switches,
            })
        };
        let linear = |entry| {
            inner.pipeline(PipelineKey {
                module: ModuleKey::linear(loss.dtype, team),
                entry,
                switches,
            })
        };
        let with_grad = gradients != HeadGradients::None;
        let pipelines = Pipelines {
            setup_partials: (!soft)
                .then(|| loss_pipeline(Family::Setup, "setup_partials"))
                .transpose()?,
            setup_final: loss_pipeline(Family::Setup, "setup_final")?,
            stats: linear("linear_stats")?,
            merge: linear("linear_merge")?,
            finalize: match loss.spec.reduction {
                Reduction::None => None,
                _ => Some((
                    loss_pipeline(Family::Finalize, "finalize_partials")?,
                    loss_pipeline(Family::Finalize, "finalize_final")?,
                )),
            },
            logit_grad: (with_grad && chunk.is_some())
                .then(|| linear("linear_logit_grad"))
                .transpose()?,
            grad_hidden: with_grad
                .then(|| linear("linear_grad_hidden"))
                .transpose()?,
            grad_head: (gradients == HeadGradients::All)
                .then(|| linear("linear_grad_head"))
                .transpose()?,
        };
        Ok(Self {
            inner: Arc::new(PlanInner {
                kernel: kernel.clone(),
                problem: *problem,
                chunks,
                materialized,
                windows,
                blocks,
                setup_chunks,
                record_base,
                merged_base,
                control,
                row_loss,
                lse,
                chunk,
                uniforms,
                stride,
                pipelines,
                head_module: ModuleKey::linear(loss.dtype, team),
                switches,
            }),
        })
    }

    /// The problem this plan was made for.
    pub fn problem(&self) -> &LinearProblem {
        &self.inner.problem
    }

    /// Bytes of scratch this plan allocated: the control words (summary, partial slots, one
    /// 32-byte record per row and vocabulary block, 16 bytes of row constants per row), the
    /// per-row losses and lse, the uniforms, and in chunked mode the chunk of logits.
    pub fn scratch_bytes(&self) -> u64 {
        let p = &self.inner;
        p.control.size()
            + p.row_loss.size()
            + p.lse.size()
            + p.uniforms.size()
            + p.chunk.as_ref().map_or(0, wgpu::Buffer::size)
    }

    /// Rows per chunk (all rows in recompute mode).
    pub fn chunk_rows(&self) -> u32 {
        self.inner.chunks[0].rows
    }

    /// Vocabulary windows the head is bound in (1 unless it exceeds one storage binding).
    pub fn windows(&self) -> usize {
        self.inner.windows.len()
    }

    /// Vocabulary blocks: the records each row gets.
    pub fn blocks(&self) -> u32 {
        self.inner.blocks
    }

    /// `Err(LabelOutOfRange)` if a summary written by this plan reports an invalid label.
    pub fn check(&self, summary: &crate::Summary) -> Result<()> {
        summary.check(self.inner.problem.vocab())
    }
}

impl PlanInner {
    /// A pipeline of the linear module, compiled on first use (cached by the kernel).
    pub fn head_pipeline(&self, entry: &'static str) -> Result<wgpu::ComputePipeline> {
        self.kernel.inner.pipeline(PipelineKey {
            module: self.head_module,
            entry,
            switches: self.switches,
        })
    }

    /// Workgroups of the passes over `rows` rows: row tiles, and invocations of four logits.
    pub fn row_tiles(rows: u32) -> u32 {
        rows.div_ceil(TILE)
    }

    /// Workgroups of one-invocation-per-row passes.
    pub fn row_groups(rows: u32) -> u32 {
        rows.div_ceil(INVOCATIONS)
    }

    /// Workgroups of `linear_logit_grad` over a chunk of `rows`.
    pub fn quad_groups(&self, rows: u32) -> u32 {
        let quads = u64::from(self.problem.vocab().div_ceil(4)) * u64::from(rows);
        quads.div_ceil(u64::from(INVOCATIONS)) as u32
    }
}
