//! Planning: a [`Problem`] checked against the spec and the device, its row kernel and passes
//! chosen, their pipelines compiled, its windows laid out and its O(rows) scratch allocated.
//! Binding and encoding a plan live in src/encode.rs.

use std::sync::Arc;

use crate::batch::TargetKind;
use crate::buffers::WORD;
use crate::compose::Family;
use crate::dtype::{Dtype, GradDtype};
use crate::error::{LsceError, Result};
use crate::kernel::{LossKernel, PipelineKey, RowShape, Switches};
use crate::layout::{
    reduction_code, Params, SharedLayout, Slot, SplitRecord, UpstreamMode, AUX_WG_SIZE,
    CONTROL_HEADER_WORDS, PARTIAL_WORDS,
};
use crate::problem::{Gradient, Problem};
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

/// Which row kernel a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowKernel {
    /// rows.wgsl: one team per row, or per part when `split_parts > 1`.
    Teams { shape: RowShape, split_parts: u32 },
    /// strided.wgsl: `[N, C, d..]` logits, one invocation per row.
    Strided,
}

/// One dispatch of the row kernel (per window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowPass {
    /// `rows_main`: the whole row (loss, lse, gradient) per team.
    Main,
    /// `split_stats`: each part's statistics into its [`SplitRecord`].
    SplitStats,
    /// `split_finish`: per row, the parts' records merged in order.
    SplitFinish,
    /// `split_grad`: each part's gradient.
    SplitGrad,
    /// `strided_main`: the whole row per invocation.
    Strided,
}

impl RowPass {
    pub fn entry(self) -> &'static str {
        match self {
            RowPass::Main => "rows_main",
            RowPass::SplitStats => "split_stats",
            RowPass::SplitFinish => "split_finish",
            RowPass::SplitGrad => "split_grad",
            RowPass::Strided => "strided_main",
        }
    }

    pub fn family(self) -> Family {
        match self {
            RowPass::Strided => Family::Strided,
            _ => Family::Rows,
        }
    }

    /// Whether it runs one team per part of a row rather than one per row.
    pub fn per_part(self) -> bool {
        matches!(self, RowPass::SplitStats | RowPass::SplitGrad)
    }
}

impl RowKernel {
    /// The row passes in dispatch order.
    pub fn passes(self, gradient: Gradient) -> Vec<RowPass> {
        match self {
            RowKernel::Strided => vec![RowPass::Strided],
            RowKernel::Teams { split_parts: 1, .. } => vec![RowPass::Main],
            RowKernel::Teams { .. } => {
                let mut passes = vec![RowPass::SplitStats, RowPass::SplitFinish];
                if gradient.is_some() {
                    passes.push(RowPass::SplitGrad);
                }
                passes
            }
        }
    }

    /// Parts per row.
    pub fn split_parts(self) -> u32 {
        match self {
            RowKernel::Teams { split_parts, .. } => split_parts,
            RowKernel::Strided => 1,
        }
    }
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

impl LossKernel {
    /// Validates `problem` against the spec and the device limits, compiles (or reuses) its
    /// pipelines and allocates its O(rows) scratch.
    pub fn plan(&self, problem: &Problem) -> Result<LossPlan> {
        LossPlan::new(self, problem)
    }
}

impl LossPlan {
    fn new(kernel: &LossKernel, problem: &Problem) -> Result<Self> {
        let inner = &kernel.inner;
        let spec = &problem.spec;
        let shape = problem.shape;
        let values = spec.resolve(shape.classes())?;
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
                split_parts: row_shape.split_parts(shape.rows(), inner.config.min_row_teams),
            }
        };
        let split_words = match row_kernel.split_parts() {
            1 => 0,
            parts => u64::from(shape.rows()) * u64::from(parts) * SplitRecord::WORDS,
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
        let scratch = |label, size| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        let control = scratch("lsce control", control_bytes);
        let row_loss_scratch =
            (spec.reduction != Reduction::None).then(|| scratch("lsce row losses", rows_bytes));
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
        let passes = row_kernel.passes(problem.gradient);
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
    pub fn params(&self, w: &Window, b: &BoundWindow<'_>) -> Params {
        let spec = &self.problem.spec;
        let shape = self.problem.shape;
        let receiving = shape.classes() - u32::from(spec.excluded_class.is_some());
        let in_place = self.problem.gradient == Gradient::InPlace;
        Params {
            classes: shape.classes(),
            spatial: shape.spatial(),
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
            excluded: spec.excluded_class.unwrap_or(u32::MAX),
            ignore_index: spec.ignore_index.unwrap_or(0),
            has_ignore: u32::from(spec.ignore_index.is_some()),
            reduction: reduction_code(spec.reduction),
            upstream_mode: match (self.problem.upstream_grad, spec.reduction) {
                (false, _) => UpstreamMode::One,
                (true, Reduction::None) => UpstreamMode::PerRow,
                (true, _) => UpstreamMode::Scalar,
            } as u32,
            total_rows: shape.rows(),
            on: self.values.on as f32,
            off: self.values.off as f32,
            off_mass: (self.values.off * f64::from(receiving)) as f32,
            logit_scale: spec.logit_scale,
            softcap: spec.softcap.unwrap_or(0.0),
            z_loss: spec.z_loss,
            split_base: (CONTROL_HEADER_WORDS + PARTIAL_WORDS * u64::from(self.chunks)) as u32,
            split_parts: self.row_kernel.split_parts(),
            _pad: 0,
        }
    }
}
