//! Planning: a [`Problem`] checked against the spec and the device, its row kernel and passes
//! chosen, their pipelines compiled, its windows laid out and its O(rows) scratch allocated.
//! Binding and encoding a plan live in src/encode.rs.

use std::sync::Arc;

use crate::batch::TargetKind;
use crate::buffers::WORD;
use crate::compose::Family;
use crate::dtype::{Dtype, GradDtype};
use crate::error::{LsceError, Result};
use crate::kernel::{LossKernel, PipelineKey, Switches};
use crate::layout::{
    reduction_code, Params, ShardHeader, ShardMergedRow, ShardRecord, SharedLayout, Slot,
    SplitRecord, UpstreamMode, AUX_WG_SIZE, CONTROL_HEADER_WORDS, PARTIAL_WORDS,
};
use crate::problem::{Gradient, Problem};
use crate::row_kernel::{RowKernel, RowPass};
use crate::spec::{Reduction, TargetValues};
use crate::windows::{row_windows, BoundWindow, Window};

/// A validated, reusable recording of the loss for one [`Problem`] on one device.
///
/// It owns the O(rows) scratch (partial sums, per-row losses for the reductions) and the
/// compiled pipelines. [`LossPlan::encode`] may be called any number of times, from any thread;
/// commands recorded from one plan execute in submission order, so the scratch is never shared
/// by two executions at once. Cloning is cheap (an `Arc`).
#[derive(Clone, Debug)]
pub struct LossPlan {
    pub(crate) inner: Arc<PlanInner>,
}

#[derive(Debug)]
pub(crate) struct PlanInner {
    pub kernel: LossKernel,
    pub problem: Problem,
    pub values: TargetValues,
    pub windows: Vec<Window>,
    /// Partial slots of all windows together.
    pub chunks: u32,
    pub row_kernel: RowKernel,
    pub control: wgpu::Buffer,
    pub row_loss_scratch: Option<wgpu::Buffer>,
    pub lse_scratch: wgpu::Buffer,
    pub pipelines: Pipelines,
    /// Bytes between the windows' parameter blocks (the uniform offset alignment).
    pub param_stride: u64,
    /// Rows one workgroup of the row kernel handles at a time: its subgroup teams, 1 for a
    /// workgroup team, or the strided kernel's invocations.
    pub rows_per_workgroup: u32,
    /// The most row-kernel workgroups per dispatch (they loop over the window's rows).
    pub max_row_workgroups: u32,
    /// Set for a plan over one vocabulary shard.
    pub shard: Option<ShardRole>,
}

#[derive(Debug)]
pub(crate) struct Pipelines {
    /// `setup_partials` (class labels only) and `setup_final`.
    pub setup_partials: Option<wgpu::ComputePipeline>,
    pub setup_final: wgpu::ComputePipeline,
    /// The row passes, in `vec4` units when `wide`.
    pub rows: Vec<(RowPass, wgpu::ComputePipeline)>,
    pub wide: bool,
    /// The scalar (*narrow*) row passes, for bindings whose buffers cannot be read as `vec4`;
    /// compiled when such a binding is made.
    pub narrow_rows: Vec<(RowPass, PipelineKey)>,
    /// `finalize_partials` and `finalize_final`, for `Sum`/`Mean`.
    pub finalize: Option<(wgpu::ComputePipeline, wgpu::ComputePipeline)>,
}

/// A plan over one vocabulary shard (src/shards): `problem.shape` is the shard's
/// `[rows, c1 - c0]` or `[N, c1 - c0, d..]`, the spec is the global one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ShardRole {
    /// `c0`: the shard's first global class.
    pub class_begin: u32,
    /// `K`: the global class count (labels, smoothing values, the excluded class).
    pub classes: u32,
    /// Which pass the plan runs.
    pub pass: ShardPass,
}

/// The row pass of a shard plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShardPass {
    /// Pass 1: a `ShardRecord` per row into the split-record region of `control`.
    Stats,
    /// Pass 2: the gradient from the host-merged rows (`ShardMergedRow`) in that region.
    Grad,
    /// Pass 2 on one device: merges the record blocks of all `shards` in that region itself,
    /// then writes the gradient, the loss, the lse and the summary.
    MergeGrad {
        /// `P`.
        shards: u32,
    },
}

impl ShardPass {
    /// The pass's entry point in the family of `row_kernel`: rows.wgsl for `[rows, C]`,
    /// strided.wgsl for `[N, C, d..]`.
    fn row_pass(self, row_kernel: RowKernel) -> RowPass {
        let strided = row_kernel == RowKernel::Strided;
        match (self, strided) {
            (ShardPass::Stats, false) => RowPass::ShardStats,
            (ShardPass::Grad, false) => RowPass::ShardGrad,
            (ShardPass::MergeGrad { .. }, false) => RowPass::ShardMergeGrad,
            (ShardPass::Stats, true) => RowPass::StridedShardStats,
            (ShardPass::Grad, true) => RowPass::StridedShardGrad,
            (ShardPass::MergeGrad { .. }, true) => RowPass::StridedShardMergeGrad,
        }
    }

    /// Words of `control` the pass keeps after the partial slots.
    fn record_words(self, rows: u32) -> u64 {
        let rows = u64::from(rows);
        match self {
            ShardPass::Stats => rows * ShardRecord::WORDS,
            ShardPass::Grad => rows * ShardMergedRow::WORDS,
            ShardPass::MergeGrad { shards } => {
                u64::from(shards) * (ShardHeader::WORDS + rows * ShardRecord::WORDS)
            }
        }
    }
}

impl LossKernel {
    /// Validates `problem` against the spec and the device limits, compiles (or reuses) its
    /// pipelines and allocates its O(rows) scratch.
    pub fn plan(&self, problem: &Problem) -> Result<LossPlan> {
        LossPlan::new(self, problem, None)
    }
}

impl LossPlan {
    /// A shard plan: the setup pass (the shard's part of the denominator, its off-mass), one
    /// shard row pass, and the reduction only when pass 2 merges on the device.
    pub(crate) fn for_shard(
        kernel: &LossKernel,
        problem: &Problem,
        role: ShardRole,
    ) -> Result<Self> {
        Self::new(kernel, problem, Some(role))
    }

    /// The device the plan runs on.
    pub(crate) fn device(&self) -> &wgpu::Device {
        self.inner.kernel.device()
    }

    /// The plan's `control` scratch and the byte offset of its record region (after the
    /// partial slots), where a shard plan keeps its records or merged rows.
    pub(crate) fn record_region(&self) -> (&wgpu::Buffer, u64) {
        let p = &self.inner;
        (&p.control, p.record_base() * WORD)
    }

    fn new(kernel: &LossKernel, problem: &Problem, shard: Option<ShardRole>) -> Result<Self> {
        let inner = &kernel.inner;
        let spec = &problem.spec;
        let shape = problem.shape;
        let values = spec.resolve(shard.map_or(shape.classes(), |s| s.classes))?;
        let soft = problem.targets == TargetKind::Probabilities;
        if soft && problem.accuracy {
            return Err(LsceError::Unsupported("accuracy needs class-label targets"));
        }
        if problem.gradient == Gradient::InPlace && problem.grad_dtype != GradDtype::AsLogits {
            return Err(LsceError::Unsupported(
                "an in-place gradient has the logits' dtype",
            ));
        }
        let limits = &inner.limits;
        let (windows, chunks) = row_windows(problem, limits)?;

        let strided = shape.spatial() > 1;
        // f32 rows are read and written as vec4 units when the caller's buffers allow it (see
        // `Regions::allow_wide`); the scalar pipeline is the fallback, compiled when needed.
        let wide = !strided && problem.dtype == Dtype::F32;
        let row_kernel = if strided {
            RowKernel::Strided
        } else {
            let row_shape = inner.row_shape(
                shape.rows(),
                shape.classes(),
                if wide { None } else { Some(problem.dtype) },
            );
            RowKernel::Teams {
                shape: row_shape,
                // A shard is one part: its records are the parts the merge combines.
                split_parts: match shard {
                    Some(_) => 1,
                    None => row_shape.split_parts(shape.rows(), inner.config.min_row_teams),
                },
            }
        };
        let split_words = match (shard, row_kernel.split_parts()) {
            (Some(role), _) => role.pass.record_words(shape.rows()),
            (None, 1) => 0,
            (None, parts) => u64::from(shape.rows()) * u64::from(parts) * SplitRecord::WORDS,
        };
        let control_bytes =
            (CONTROL_HEADER_WORDS + PARTIAL_WORDS * u64::from(chunks) + split_words) * WORD;
        let rows_bytes = u64::from(shape.rows()) * WORD;
        for bytes in [control_bytes, rows_bytes] {
            if bytes > limits.max_buffer_size {
                return Err(LsceError::ExceedsDeviceLimit {
                    limit: "max_buffer_size",
                    needed: bytes,
                    available: limits.max_buffer_size,
                });
            }
        }
        let device = &inner.device;
        let scratch_with = |label, size, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | usage,
                mapped_at_creation: false,
            })
        };
        let scratch = |label, size| scratch_with(label, size, wgpu::BufferUsages::empty());
        // A shard's pass 2 copies the merged rows or all shards' records into its control.
        let control = scratch_with(
            "lsce control",
            control_bytes,
            if shard.is_some() {
                wgpu::BufferUsages::COPY_DST
            } else {
                wgpu::BufferUsages::empty()
            },
        );
        // Shard plans always bind a row-loss buffer (pass 1 and a host-merged pass 2 write none).
        let row_loss_scratch = (spec.reduction != Reduction::None || shard.is_some())
            .then(|| scratch("lsce row losses", rows_bytes));
        let lse_scratch = scratch("lsce lse", rows_bytes);

        let switches = Switches {
            weights: problem.weighted,
            soft_targets: soft,
            softcap: spec.softcap.is_some(),
            write_grad: problem.gradient.is_some(),
            accuracy: problem.accuracy,
        };
        let key = |family, entry, wide| PipelineKey {
            module: inner.module_key(family, row_kernel, problem, wide),
            entry,
            switches,
        };
        let pipeline = |family, entry| inner.pipeline(key(family, entry, false));
        let passes = match shard {
            Some(role) => vec![role.pass.row_pass(row_kernel)],
            None => row_kernel.passes(problem.gradient),
        };
        // Only a device-merging shard pass 2 has a loss to reduce.
        let reduces = match shard {
            Some(role) => matches!(role.pass, ShardPass::MergeGrad { .. }),
            None => true,
        };
        let row_keys = |wide| {
            passes
                .iter()
                .map(|&pass| (pass, key(pass.family(), pass.entry(), wide)))
                .collect::<Vec<_>>()
        };
        let pipelines = Pipelines {
            setup_partials: if soft {
                None
            } else {
                Some(pipeline(Family::Setup, "setup_partials")?)
            },
            setup_final: pipeline(Family::Setup, "setup_final")?,
            rows: row_keys(wide)
                .into_iter()
                .map(|(pass, k)| Ok((pass, inner.pipeline(k)?)))
                .collect::<Result<_>>()?,
            wide,
            narrow_rows: row_keys(false),
            finalize: match spec.reduction {
                _ if !reduces => None,
                Reduction::None => None,
                _ => Some((
                    pipeline(Family::Finalize, "finalize_partials")?,
                    pipeline(Family::Finalize, "finalize_final")?,
                )),
            },
        };
        let param_stride = (std::mem::size_of::<Params>() as u64)
            .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment));
        let (rows_per_workgroup, max_row_workgroups) = match row_kernel {
            RowKernel::Strided => (AUX_WG_SIZE, u32::MAX),
            RowKernel::Teams { shape, .. } => (
                shape.rows_per_workgroup,
                inner.config.max_row_workgroups.unwrap_or(u32::MAX).max(1),
            ),
        };
        let inner = PlanInner {
            kernel: kernel.clone(),
            problem: *problem,
            values,
            windows,
            chunks,
            row_kernel,
            control,
            row_loss_scratch,
            lse_scratch,
            pipelines,
            param_stride,
            rows_per_workgroup,
            max_row_workgroups,
            shard,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The problem this plan was made for.
    pub fn problem(&self) -> &Problem {
        &self.inner.problem
    }

    /// The number of row windows (1 unless a binding would exceed the device limit).
    pub fn windows(&self) -> usize {
        self.inner.windows.len()
    }

    /// Bytes of scratch this plan allocated (all O(rows)).
    pub fn scratch_bytes(&self) -> u64 {
        let p = &self.inner;
        p.control.size()
            + p.lse_scratch.size()
            + p.row_loss_scratch.as_ref().map_or(0, wgpu::Buffer::size)
    }

    /// `Err(LabelOutOfRange)` if a summary written by this plan reports an invalid label.
    pub fn check(&self, summary: &crate::Summary) -> Result<()> {
        summary.check(self.inner.problem.shape.classes())
    }
}

impl PlanInner {
    /// The parameters of window `w` bound as `b`.
    /// The first word of the record region of `control`: after the partial slots.
    pub fn record_base(&self) -> u64 {
        CONTROL_HEADER_WORDS + PARTIAL_WORDS * u64::from(self.chunks)
    }

    /// The parameters of window `w` bound as `b`.
    pub fn params(&self, w: &Window, b: &BoundWindow<'_>) -> Params {
        let shape = self.problem.shape;
        // A shard holds classes [c0, c0 + classes).
        let (class_begin, label_classes) = self
            .shard
            .map_or((0, shape.classes()), |s| (s.class_begin, s.classes));
        let in_place = self.problem.gradient == Gradient::InPlace;
        Params {
            row_count: w.rows,
            row_begin: w.first_row as u32,
            logits_base: b.base(Slot::Logits),
            targets_base: b.base(Slot::Targets),
            upstream_base: b.base(Slot::Upstream),
            loss_base: b.base(Slot::RowLoss),
            lse_base: b.base(Slot::Lse),
            // In place the gradient is written where the logits are read.
            grad_base: b.base(if in_place { Slot::Logits } else { Slot::Grad }),
            weights_base: b.base(Slot::Weights),
            chunk_base: w.chunk_base,
            chunk_count: self.chunks,
            split_base: self.record_base() as u32,
            split_parts: match self.shard {
                Some(ShardRole {
                    pass: ShardPass::MergeGrad { shards },
                    ..
                }) => shards,
                _ => self.row_kernel.split_parts(),
            },
            ..spec_params(&self.problem, self.values, class_begin, label_classes)
        }
    }
}

/// The parameters that follow from a problem's spec and shape, for its classes
/// `[class_begin, class_begin + classes)` of `label_classes` (a vocabulary shard's, or all of
/// them): one window of all rows from 0, no record region. The excluded class is local or absent.
pub(crate) fn spec_params(
    problem: &Problem,
    values: TargetValues,
    class_begin: u32,
    label_classes: u32,
) -> Params {
    let spec = &problem.spec;
    let shape = problem.shape;
    let excluded = spec
        .excluded_class
        .and_then(|c| c.checked_sub(class_begin))
        .filter(|&c| c < shape.classes());
    let receiving = shape.classes() - u32::from(excluded.is_some());
    Params {
        classes: shape.classes(),
        spatial: shape.spatial(),
        row_count: shape.rows(),
        excluded: excluded.unwrap_or(u32::MAX),
        ignore_index: spec.ignore_index.unwrap_or(0),
        has_ignore: u32::from(spec.ignore_index.is_some()),
        reduction: reduction_code(spec.reduction),
        upstream_mode: match (problem.upstream_grad, spec.reduction) {
            (false, _) => UpstreamMode::One,
            (true, Reduction::None) => UpstreamMode::PerRow,
            (true, _) => UpstreamMode::Scalar,
        } as u32,
        total_rows: shape.rows(),
        on: values.on as f32,
        off: values.off as f32,
        off_mass: (values.off * f64::from(receiving)) as f32,
        logit_scale: spec.logit_scale,
        softcap: spec.softcap.unwrap_or(0.0),
        z_loss: spec.z_loss,
        split_parts: 1,
        class_begin,
        label_classes,
        ..Params::default()
    }
}
