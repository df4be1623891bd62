//! Plans and the encode API: record the loss into the caller's `CommandEncoder`, reading and
//! writing the caller's buffers, with no submission, readback or wait.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::batch::TargetKind;
use crate::dtype::{Dtype, GradDtype};
use crate::error::{LsceError, Result};
use crate::kernel::{LossKernel, PipelineKey, Switches};
use crate::problem::{Gradient, Problem};
use crate::shader::{
    self, Family, Params, CHUNK_ROWS, CONTROL_HEADER_WORDS, PARTIAL_WORDS, SPLIT_WORDS,
};
use crate::shape::Shape;
use crate::spec::{Reduction, TargetValues};

/// The 32-byte summary every encode writes to [`LossBuffers::summary`].
///
/// Valid once the command buffer has executed. Check it with [`Summary::check`]: a label
/// outside `[0, classes)` that is not the ignore index is reported here (its row's loss and
/// gradient are NaN), never clamped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct Summary {
    /// The reduced loss (`Sum`/`Mean`), z-loss included; 0 for `Reduction::None`.
    pub loss: f32,
    /// The z-loss part of `loss`; 0 for `Reduction::None`.
    pub z_loss: f32,
    /// The mean's denominator (see [`LossOutput::denominator`](crate::LossOutput)).
    pub denominator: f32,
    /// Non-ignored rows whose argmax is the label, when accuracy was asked for.
    pub correct: u32,
    /// The first row with an invalid label, or `u32::MAX`.
    pub first_bad_row: u32,
    /// That row's label.
    pub bad_label: i32,
    /// Rows that were not ignored (all rows for probability targets).
    pub counted_rows: u32,
    /// Reserved, 0.
    pub reserved: u32,
}

impl Summary {
    /// Size in bytes.
    pub const SIZE: u64 = 32;

    /// Reads a summary from the bytes of a mapped buffer (at least [`Summary::SIZE`] bytes, any
    /// alignment).
    ///
    /// ```
    /// let bytes = [0u8; 32];
    /// assert_eq!(lsce::Summary::from_bytes(&bytes).loss, 0.0);
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Self {
        bytemuck::pod_read_unaligned(&bytes[..Self::SIZE as usize])
    }

    /// `Err(LabelOutOfRange)` if the kernel found an invalid label.
    pub fn check(&self, classes: u32) -> Result<()> {
        if self.first_bad_row != u32::MAX {
            return Err(LsceError::LabelOutOfRange {
                row: u64::from(self.first_bad_row),
                label: self.bad_label,
                classes,
            });
        }
        Ok(())
    }
}

/// The caller's buffers for one [`LossPlan::encode`]. Each is a `buffer.slice(offset..)`
/// whose offset is a multiple of 4 and whose size covers what the shape needs.
///
/// | field | holds | usage |
/// |---|---|---|
/// | `logits` | `rows * classes` of the problem's dtype (16-bit: padded to a 4-byte multiple) | `STORAGE` |
/// | `targets` | `rows` i32 labels, or `rows * classes` f32 probabilities | `STORAGE` |
/// | `weights` | `classes` f32, iff the problem is weighted | `STORAGE` |
/// | `upstream` | 1 f32 (`Sum`/`Mean`) or `rows` f32 (`None`), iff the problem has one | `STORAGE` |
/// | `loss` | `rows` f32 for `None` (required); 1 f32 for `Sum`/`Mean` (optional copy) | `STORAGE` / `COPY_DST` |
/// | `lse` | `rows` f32, optional | `STORAGE` |
/// | `grad` | `rows * classes` of the gradient's dtype, iff `Gradient::Separate` | `STORAGE` |
/// | `summary` | a [`Summary`] (32 bytes) | `COPY_DST` |
#[derive(Clone, Copy, Debug)]
pub struct LossBuffers<'a> {
    /// Logits.
    pub logits: wgpu::BufferSlice<'a>,
    /// Class labels or probabilities.
    pub targets: wgpu::BufferSlice<'a>,
    /// Class weights.
    pub weights: Option<wgpu::BufferSlice<'a>>,
    /// Upstream gradient.
    pub upstream: Option<wgpu::BufferSlice<'a>>,
    /// Per-row loss (`None`) or a copy of the reduced loss.
    pub loss: Option<wgpu::BufferSlice<'a>>,
    /// Per-row log-sum-exp.
    pub lse: Option<wgpu::BufferSlice<'a>>,
    /// Gradient.
    pub grad: Option<wgpu::BufferSlice<'a>>,
    /// The summary.
    pub summary: wgpu::BufferSlice<'a>,
}

impl<'a> LossBuffers<'a> {
    /// The required buffers; the optional ones are added with the `with_*` methods.
    pub fn new(
        logits: wgpu::BufferSlice<'a>,
        targets: wgpu::BufferSlice<'a>,
        summary: wgpu::BufferSlice<'a>,
    ) -> Self {
        Self {
            logits,
            targets,
            weights: None,
            upstream: None,
            loss: None,
            lse: None,
            grad: None,
            summary,
        }
    }

    /// Sets [`LossBuffers::weights`].
    pub fn with_weights(mut self, weights: wgpu::BufferSlice<'a>) -> Self {
        self.weights = Some(weights);
        self
    }

    /// Sets [`LossBuffers::upstream`].
    pub fn with_upstream(mut self, upstream: wgpu::BufferSlice<'a>) -> Self {
        self.upstream = Some(upstream);
        self
    }

    /// Sets [`LossBuffers::loss`].
    pub fn with_loss(mut self, loss: wgpu::BufferSlice<'a>) -> Self {
        self.loss = Some(loss);
        self
    }

    /// Sets [`LossBuffers::lse`].
    pub fn with_lse(mut self, lse: wgpu::BufferSlice<'a>) -> Self {
        self.lse = Some(lse);
        self
    }

    /// Sets [`LossBuffers::grad`].
    pub fn with_grad(mut self, grad: wgpu::BufferSlice<'a>) -> Self {
        self.grad = Some(grad);
        self
    }
}

/// A contiguous range of batch items processed by one set of dispatches, small enough that
/// every binding fits `max_storage_buffer_binding_size`.
#[derive(Clone, Copy, Debug)]
struct Window {
    first_item: u64,
    items: u64,
    first_row: u64,
    rows: u32,
    chunk_base: u32,
}

/// A validated, reusable recording of the loss for one [`Problem`] on one device.
///
/// It owns the O(rows) scratch (partial sums, per-row losses for the reductions) and the
/// compiled pipelines. [`LossPlan::encode`] may be called any number of times, from any thread;
/// commands recorded from one plan execute in submission order, so the scratch is never shared
/// by two executions at once. Cloning is cheap (an `Arc`).
#[derive(Clone, Debug)]
pub struct LossPlan {
    inner: Arc<PlanInner>,
}

#[derive(Debug)]
struct PlanInner {
    kernel: LossKernel,
    problem: Problem,
    values: TargetValues,
    windows: Vec<Window>,
    chunks: u32,
    control: wgpu::Buffer,
    row_loss_scratch: Option<wgpu::Buffer>,
    lse_scratch: wgpu::Buffer,
    pipelines: Pipelines,
    param_stride: u64,
    /// Rows one workgroup of the row kernel handles at a time: its subgroup teams, 1 for a
    /// workgroup team, or the strided kernel's invocations.
    rows_per_workgroup: u32,
    /// The most row-kernel workgroups per dispatch (they loop over the window's rows).
    max_row_workgroups: u32,
    /// Parts each row is split into (rows.wgsl's split passes), or 1.
    split_parts: u32,
}

#[derive(Debug)]
struct Pipelines {
    setup_partials: Option<wgpu::ComputePipeline>,
    setup_final: wgpu::ComputePipeline,
    /// The row passes (`rows_main`, or the three of split rows): `vec4` units when `wide`.
    rows: Vec<wgpu::ComputePipeline>,
    wide: bool,
    /// The scalar row passes, for bindings whose buffers cannot be read as `vec4`.
    narrow_rows: Vec<PipelineKey>,
    finalize: Option<(wgpu::ComputePipeline, wgpu::ComputePipeline)>,
}

const WORD: u64 = 4;
const VEC4: u64 = 16;

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
        let max_binding = problem
            .max_binding_bytes
            .map_or(limits.max_storage_buffer_binding_size, |b| {
                b.min(limits.max_storage_buffer_binding_size)
            });
        let align = u64::from(limits.min_storage_buffer_offset_alignment);
        // The widest element-indexed binding decides how many batch items a window holds.
        let widest = [
            Some(problem.dtype.bytes()),
            (problem.gradient == Gradient::Separate).then(|| problem.grad_dtype().bytes()),
            soft.then_some(WORD),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(WORD);
        let elements_bytes = shape.elements() * widest;
        if elements_bytes > limits.max_buffer_size {
            return Err(LsceError::ExceedsDeviceLimit {
                limit: "max_buffer_size",
                needed: elements_bytes,
                available: limits.max_buffer_size,
            });
        }
        // One batch item (classes * spatial logits) must fit one binding, with room for the
        // alignment slack of an arbitrary offset.
        let item_bytes = u64::from(shape.classes()) * u64::from(shape.spatial()) * widest;
        let usable = max_binding.saturating_sub(align);
        if item_bytes > usable {
            return Err(LsceError::ExceedsDeviceLimit {
                limit: "max_storage_buffer_binding_size",
                needed: item_bytes + align,
                available: max_binding,
            });
        }
        let items_per_window = usable / item_bytes;
        let mut windows = Vec::new();
        let mut chunks = 0u32;
        let mut first_item = 0u64;
        let batch = u64::from(shape.batch());
        while first_item < batch {
            let items = items_per_window.min(batch - first_item);
            let rows = (items * u64::from(shape.spatial())) as u32;
            windows.push(Window {
                first_item,
                items,
                first_row: first_item * u64::from(shape.spatial()),
                rows,
                chunk_base: chunks,
            });
            chunks += rows.div_ceil(CHUNK_ROWS);
            first_item += items;
        }

        let strided = shape.spatial() > 1;
        // f32 rows are read and written as vec4 units when the caller's buffers allow it (see
        // `Regions::allow_wide`); the scalar pipeline is the fallback, compiled when needed.
        let wide = !strided && problem.dtype == Dtype::F32;
        let row_shape = inner.row_shape(
            shape.rows(),
            shape.classes(),
            if wide { None } else { Some(problem.dtype) },
        );
        let split_parts = if strided {
            1
        } else {
            row_shape.split_parts(shape.rows(), inner.config.min_row_teams)
        };
        let device = &inner.device;
        let split_words = if split_parts > 1 {
            u64::from(shape.rows()) * u64::from(split_parts) * SPLIT_WORDS
        } else {
            0
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
            write_grad: problem.gradient != Gradient::None,
            accuracy: problem.accuracy,
        };
        let key = |family, entry, wide| PipelineKey {
            module: inner.module_key(family, row_shape, problem, wide),
            entry,
            switches,
        };
        let pipeline = |family, entry| inner.pipeline(key(family, entry, false));
        // The row passes: one, or three for split rows (the last only with a gradient).
        let row_entries: &[&'static str] = match (split_parts > 1, problem.gradient) {
            (false, _) => &["rows_main"],
            (true, Gradient::None) => &["split_stats", "split_finish"],
            (true, _) => &["split_stats", "split_finish", "split_grad"],
        };
        let row_keys = |wide| {
            row_entries
                .iter()
                .map(|&entry| key(Family::Rows, entry, wide))
                .collect::<Vec<_>>()
        };
        let narrow_rows = row_keys(false);
        let pipelines = Pipelines {
            setup_partials: if soft {
                None
            } else {
                Some(pipeline(Family::Setup, "setup_partials")?)
            },
            setup_final: pipeline(Family::Setup, "setup_final")?,
            rows: if strided {
                vec![pipeline(Family::Strided, "strided_main")?]
            } else {
                row_keys(wide)
                    .into_iter()
                    .map(|k| inner.pipeline(k))
                    .collect::<Result<_>>()?
            },
            wide,
            narrow_rows,
            finalize: match spec.reduction {
                Reduction::None => None,
                _ => Some((
                    pipeline(Family::Reduce, "finalize_partials")?,
                    pipeline(Family::Reduce, "finalize_final")?,
                )),
            },
        };
        let param_stride = (std::mem::size_of::<Params>() as u64)
            .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment));
        let inner = PlanInner {
            kernel: kernel.clone(),
            problem: *problem,
            values,
            windows,
            chunks,
            control,
            row_loss_scratch,
            lse_scratch,
            pipelines,
            param_stride,
            rows_per_workgroup: if strided {
                shader::AUX_WG_SIZE
            } else {
                row_shape.rows_per_workgroup
            },
            max_row_workgroups: if strided {
                u32::MAX
            } else {
                inner.config.max_row_workgroups.unwrap_or(u32::MAX).max(1)
            },
            split_parts,
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
    pub fn check(&self, summary: &Summary) -> Result<()> {
        summary.check(self.inner.problem.shape.classes())
    }

    /// Validates `buffers` against the plan and binds them: the window parameters are uploaded
    /// and the bind groups created once, so that [`LossBinding::encode`] allocates nothing.
    /// Keep the binding while the buffers stay the same (an engine's usual case).
    pub fn bind(&self, buffers: &LossBuffers<'_>) -> Result<LossBinding> {
        self.inner.bind(&self.inner, buffers)
    }

    /// Records the loss into `encoder`. Nothing is submitted, read back or waited for.
    ///
    /// With [`Gradient::InPlace`] the logits are overwritten by the gradient. Results are valid
    /// once the command buffer has executed; check [`Summary`] for invalid labels.
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: &LossBuffers<'_>,
    ) -> Result<()> {
        self.encode_with_timestamps(encoder, buffers, None)
    }

    /// [`LossPlan::encode`] with timestamp writes around its compute pass (for profiling).
    pub fn encode_with_timestamps(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: &LossBuffers<'_>,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        self.bind(buffers)?
            .encode_with_timestamps(encoder, timestamp_writes);
        Ok(())
    }
}

/// A plan bound to the caller's buffers (see [`LossPlan::bind`]). Encoding it records the
/// loss's compute pass and the summary copy, and allocates nothing.
#[derive(Clone, Debug)]
pub struct LossBinding {
    plan: Arc<PlanInner>,
    /// The row passes for these buffers (`vec4` units where they allow it).
    rows: Vec<wgpu::ComputePipeline>,
    bind_groups: Vec<wgpu::BindGroup>,
    summary: (wgpu::Buffer, u64),
    loss_copy: Option<(wgpu::Buffer, u64)>,
}

impl LossBinding {
    /// Records the loss into `encoder`. Nothing is submitted, read back or waited for.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        self.encode_with_timestamps(encoder, None);
    }

    /// [`LossBinding::encode`] with timestamp writes around its compute pass (for profiling).
    pub fn encode_with_timestamps(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) {
        let plan = &self.plan;
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("lsce"),
                timestamp_writes,
            });
            // Row passes run once per window, combines once; wgpu orders the dispatches of a
            // pass by their storage hazards.
            let chunks = |w: &Window| w.rows.div_ceil(CHUNK_ROWS);
            // Teams (rows, or parts of split rows) per window, in workgroups.
            let teams = |parts: u32| {
                move |w: &Window| {
                    (w.rows * parts)
                        .div_ceil(plan.rows_per_workgroup)
                        .min(plan.max_row_workgroups)
                }
            };
            let pipelines = &plan.pipelines;
            if let Some(setup) = &pipelines.setup_partials {
                self.per_window(&mut pass, setup, chunks);
            }
            self.once(&mut pass, &pipelines.setup_final);
            match self.rows.as_slice() {
                [rows] => self.per_window(&mut pass, rows, teams(1)),
                [stats, finish, grad @ ..] => {
                    self.per_window(&mut pass, stats, teams(plan.split_parts));
                    self.per_window(&mut pass, finish, teams(1));
                    for grad in grad {
                        self.per_window(&mut pass, grad, teams(plan.split_parts));
                    }
                }
                [] => unreachable!("a plan has row passes"),
            }
            if let Some((partials, last)) = &pipelines.finalize {
                self.per_window(&mut pass, partials, chunks);
                self.once(&mut pass, last);
            }
        }
        encoder.copy_buffer_to_buffer(
            &plan.control,
            0,
            &self.summary.0,
            self.summary.1,
            Summary::SIZE,
        );
        if let Some((buffer, at)) = &self.loss_copy {
            encoder.copy_buffer_to_buffer(&plan.control, 0, buffer, *at, WORD);
        }
    }
}

impl LossBinding {
    fn per_window(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        pipeline: &wgpu::ComputePipeline,
        workgroups: impl Fn(&Window) -> u32,
    ) {
        pass.set_pipeline(pipeline);
        for (i, w) in self.plan.windows.iter().enumerate() {
            pass.set_bind_group(
                0,
                &self.bind_groups[i],
                &[(i as u64 * self.plan.param_stride) as u32],
            );
            dispatch(pass, workgroups(w));
        }
    }

    fn once(&self, pass: &mut wgpu::ComputePass<'_>, pipeline: &wgpu::ComputePipeline) {
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &self.bind_groups[0], &[0]);
        pass.dispatch_workgroups(1, 1, 1);
    }
}

impl PlanInner {
    fn bind(&self, this: &Arc<PlanInner>, buffers: &LossBuffers<'_>) -> Result<LossBinding> {
        let regions = self.validate(buffers)?;
        let inner = &self.kernel.inner;
        let device = &inner.device;
        let in_place = self.problem.gradient == Gradient::InPlace;
        let wide = self.pipelines.wide && regions.allow_wide();
        let rows = if wide || !self.pipelines.wide {
            self.pipelines.rows.clone()
        } else {
            self.pipelines
                .narrow_rows
                .iter()
                .map(|&k| inner.pipeline(k))
                .collect::<Result<_>>()?
        };
        let bound: Vec<_> = self
            .windows
            .iter()
            .map(|w| regions.bind(w, &self.problem.shape, &inner.limits, wide))
            .collect();
        let mut params = vec![0u8; (self.param_stride * self.windows.len() as u64) as usize];
        for (i, (w, b)) in self.windows.iter().zip(&bound).enumerate() {
            let at = i * self.param_stride as usize;
            params[at..at + std::mem::size_of::<Params>()]
                .copy_from_slice(bytemuck::bytes_of(&self.params(w, b)));
        }
        // A buffer of another device is only caught by wgpu's validation: scope it into an Err
        // (the scope resolves immediately on native backends).
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let params = upload(device, "lsce params", &params, wgpu::BufferUsages::UNIFORM)?;
        let bind_groups =
            bound
                .iter()
                .map(|b| {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset: 0,
                            size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
                        }),
                    }];
                    entries.extend(b.ranges.iter().enumerate().map(|(i, r)| {
                        wgpu::BindGroupEntry {
                            binding: i as u32 + 1,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: r.buffer,
                                offset: r.offset,
                                size: wgpu::BufferSize::new(r.size),
                            }),
                        }
                    }));
                    device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("lsce"),
                        layout: inner.layout(in_place),
                        entries: &entries,
                    })
                })
                .collect();
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(LsceError::Device(err.to_string()));
        }
        let loss_copy = match (buffers.loss, self.problem.spec.reduction) {
            (Some(loss), Reduction::Sum | Reduction::Mean) => {
                Some((loss.buffer().clone(), loss.offset()))
            }
            _ => None,
        };
        Ok(LossBinding {
            plan: Arc::clone(this),
            rows,
            bind_groups,
            summary: (buffers.summary.buffer().clone(), buffers.summary.offset()),
            loss_copy,
        })
    }

    fn params(&self, w: &Window, b: &BoundWindow<'_>) -> Params {
        let spec = &self.problem.spec;
        let shape = self.problem.shape;
        let receiving = shape.classes() - u32::from(spec.excluded_class.is_some());
        Params {
            classes: shape.classes(),
            spatial: shape.spatial(),
            row_count: w.rows,
            row_begin: w.first_row as u32,
            logits_base: b.ranges[0].base,
            targets_base: b.ranges[1].base,
            upstream_base: b.ranges[3].base,
            loss_base: b.ranges[4].base,
            lse_base: b.ranges[5].base,
            grad_base: b.ranges[6].base,
            weights_base: b.ranges[2].base,
            chunk_base: w.chunk_base,
            chunk_count: self.chunks,
            excluded: spec.excluded_class.unwrap_or(u32::MAX),
            ignore_index: spec.ignore_index.unwrap_or(0),
            has_ignore: u32::from(spec.ignore_index.is_some()),
            reduction: match spec.reduction {
                Reduction::None => 0,
                Reduction::Sum => 1,
                Reduction::Mean => 2,
            },
            upstream_mode: match (self.problem.upstream_grad, spec.reduction) {
                (false, _) => 0,
                (true, Reduction::None) => 2,
                (true, _) => 1,
            },
            total_rows: shape.rows(),
            on: self.values.on as f32,
            off: self.values.off as f32,
            off_mass: (self.values.off * f64::from(receiving)) as f32,
            logit_scale: spec.logit_scale,
            softcap: spec.softcap.unwrap_or(0.0),
            z_loss: spec.z_loss,
            split_base: (CONTROL_HEADER_WORDS + PARTIAL_WORDS * u64::from(self.chunks)) as u32,
            split_parts: self.split_parts,
            _pad: 0,
        }
    }

    /// Checks the caller's buffers against the plan: presence, usages, offsets, sizes, aliasing.
    fn validate<'a>(&'a self, b: &LossBuffers<'a>) -> Result<Regions<'a>> {
        let p = &self.problem;
        let shape = p.shape;
        let rows = u64::from(shape.rows());
        let elements = shape.elements();
        let reduced = p.spec.reduction != Reduction::None;
        let storage = wgpu::BufferUsages::STORAGE;
        let copy_dst = wgpu::BufferUsages::COPY_DST;
        let required =
            |what, slice: Option<wgpu::BufferSlice<'a>>, wanted: bool| {
                match (slice, wanted) {
            (Some(s), true) => Ok(Some(s)),
            (None, false) => Ok(None),
            (None, true) => Err(LsceError::Unsupported(match what {
                "weights" => "the problem is weighted but no weights buffer was given",
                "upstream" => "the problem has an upstream gradient but no buffer was given",
                "grad" => "Gradient::Separate needs a grad buffer",
                _ => "Reduction::None needs a loss buffer for the per-row losses",
            })),
            (Some(_), false) => Err(LsceError::Unsupported(match what {
                "weights" => "a weights buffer was given but the problem is not weighted",
                "upstream" => "an upstream buffer was given but the problem has none",
                _ => "a grad buffer was given but the problem's gradient is not Gradient::Separate",
            })),
        }
            };
        let weights = required("weights", b.weights, p.weighted)?;
        let upstream = required("upstream", b.upstream, p.upstream_grad)?;
        let grad = required("grad", b.grad, p.gradient == Gradient::Separate)?;
        let loss = if reduced {
            b.loss
        } else {
            required("loss", b.loss, true)?
        };
        let target_elems = match p.targets {
            TargetKind::Classes => rows,
            TargetKind::Probabilities => elements,
        };
        let check = |what: &'static str,
                     s: wgpu::BufferSlice<'a>,
                     elems: u64,
                     elem_bytes: u64,
                     usage: wgpu::BufferUsages,
                     usage_name| {
            if !s.buffer().usage().contains(usage) {
                return Err(LsceError::MissingUsage {
                    what,
                    usage: usage_name,
                });
            }
            if s.offset() % WORD != 0 {
                return Err(LsceError::MisalignedOffset {
                    what,
                    offset: s.offset(),
                    alignment: WORD,
                });
            }
            let region = Region {
                buffer: s.buffer(),
                offset: s.offset(),
                elems,
                elem_bytes,
            };
            if s.size() < region.bytes() {
                return Err(LsceError::BufferTooSmall {
                    what,
                    needed: region.bytes(),
                    available: s.size(),
                });
            }
            Ok(region)
        };
        let f32_region =
            |what, s, elems, usage, usage_name| check(what, s, elems, WORD, usage, usage_name);
        let logits = check(
            "logits",
            b.logits,
            elements,
            p.dtype.bytes(),
            storage,
            "STORAGE",
        )?;
        let targets = f32_region("targets", b.targets, target_elems, storage, "STORAGE")?;
        let weights = weights
            .map(|s| f32_region("weights", s, u64::from(shape.classes()), storage, "STORAGE"))
            .transpose()?;
        let upstream = upstream
            .map(|s| {
                f32_region(
                    "upstream",
                    s,
                    if reduced { 1 } else { rows },
                    storage,
                    "STORAGE",
                )
            })
            .transpose()?;
        let loss = match loss {
            Some(s) if reduced => {
                f32_region("loss", s, 1, copy_dst, "COPY_DST")?;
                None
            }
            Some(s) => Some(f32_region("loss", s, rows, storage, "STORAGE")?),
            None => None,
        };
        let lse = b
            .lse
            .map(|s| f32_region("lse", s, rows, storage, "STORAGE"))
            .transpose()?;
        let grad = grad
            .map(|s| {
                check(
                    "grad",
                    s,
                    elements,
                    p.grad_dtype().bytes(),
                    storage,
                    "STORAGE",
                )
            })
            .transpose()?;
        f32_region(
            "summary",
            b.summary,
            Summary::SIZE / WORD,
            copy_dst,
            "COPY_DST",
        )?;

        let inner = &self.kernel.inner;
        let scratch = |buffer| Region {
            buffer,
            offset: 0,
            elems: rows,
            elem_bytes: WORD,
        };
        let row_loss = loss.unwrap_or_else(|| {
            scratch(
                self.row_loss_scratch
                    .as_ref()
                    .expect("reduced plans own row scratch"),
            )
        });
        let lse = lse.unwrap_or_else(|| scratch(&self.lse_scratch));
        let regions = Regions {
            bound: [
                Some(logits),
                Some(targets),
                weights,
                upstream,
                Some(row_loss),
                Some(lse),
                grad,
                Some(Region {
                    buffer: &self.control,
                    offset: 0,
                    elems: self.control.size() / WORD,
                    elem_bytes: WORD,
                }),
            ],
            dummy_read: &inner.dummy_read,
            dummy_write: &inner.dummy_write,
        };
        regions.check_aliasing(p.gradient == Gradient::InPlace)?;
        Ok(regions)
    }
}

/// A buffer initialised with `contents` (padded to 4 bytes). Unlike wgpu's
/// `create_buffer_init`, a lost device gives an `Err` instead of a panic.
pub(crate) fn upload(
    device: &wgpu::Device,
    label: &str,
    contents: &[u8],
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    let size = (contents.len() as u64)
        .next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT)
        .max(WORD);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage,
        mapped_at_creation: true,
    });
    buffer
        .get_mapped_range_mut(..)
        .map_err(|e| LsceError::Device(format!("{label}: {e}")))?
        .slice(..contents.len())
        .copy_from_slice(contents);
    buffer.unmap();
    Ok(buffer)
}

/// Dispatches `n` workgroups as a 2D grid so that no dimension exceeds 65535.
fn dispatch(pass: &mut wgpu::ComputePass<'_>, n: u32) {
    const MAX: u32 = 65535;
    if n == 0 {
        return;
    }
    let x = n.min(MAX);
    pass.dispatch_workgroups(x, n.div_ceil(x), 1);
}

/// A caller (or scratch) buffer region: `elems` elements of `elem_bytes` from `offset`.
#[derive(Clone, Copy, Debug)]
struct Region<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    elems: u64,
    elem_bytes: u64,
}

impl Region<'_> {
    /// Bytes the region spans, padded to whole 4-byte words (16-bit data is bound as words).
    fn bytes(&self) -> u64 {
        (self.elems * self.elem_bytes).next_multiple_of(WORD)
    }
}

/// The caller's regions in binding order (see `shader::BINDINGS`), `None` where absent.
struct Regions<'a> {
    bound: [Option<Region<'a>>; 8],
    dummy_read: &'a wgpu::Buffer,
    dummy_write: &'a wgpu::Buffer,
}

/// A bound sub-range of a buffer and the word offset (`*_base`) of the window's data in it.
struct BoundRange<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
    base: u32,
}

struct BoundWindow<'a> {
    ranges: Vec<BoundRange<'a>>,
}

/// How a binding is indexed: by logit element, by row, or not at all (bound whole).
#[derive(Clone, Copy)]
enum Indexing {
    Elements,
    Rows,
    Whole,
}

const INDEXING: [Indexing; 8] = [
    Indexing::Elements, // logits
    Indexing::Rows,     // targets (labels); probabilities use Elements
    Indexing::Whole,    // weights
    Indexing::Rows,     // upstream (per row); a scalar is bound whole
    Indexing::Rows,     // row_loss
    Indexing::Rows,     // lse
    Indexing::Elements, // grad
    Indexing::Whole,    // control
];

impl<'a> Regions<'a> {
    fn check_aliasing(&self, in_place: bool) -> Result<()> {
        let bound = self.bound.iter().enumerate();
        for (i, a) in bound.clone().filter_map(|(i, r)| Some((i, (*r)?))) {
            for (j, b) in bound
                .clone()
                .skip(i + 1)
                .filter_map(|(j, r)| Some((j, (*r)?)))
            {
                if a.buffer != b.buffer {
                    continue;
                }
                let (wa, wb) = (
                    shader::binding_writable(i, in_place),
                    shader::binding_writable(j, in_place),
                );
                let overlap = a.offset < b.offset + b.bytes() && b.offset < a.offset + a.bytes();
                // wgpu forbids a buffer bound both read-only and writable in one dispatch; two
                // writable views of one buffer are fine as long as they do not overlap.
                if wa != wb || (wa && overlap) {
                    return Err(LsceError::AliasedBuffers {
                        first: shader::BINDINGS[i].arg,
                        second: shader::BINDINGS[j].arg,
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether the logits (and a separate gradient) can be bound as `vec4` arrays: their
    /// offsets agree modulo 16 bytes (so units line up) and each buffer extends to the next
    /// 16-byte boundary after its region (so the last unit is addressable).
    fn allow_wide(&self) -> bool {
        let [logits, .., grad, _] = &self.bound;
        let fits = |r: &Region<'_>| {
            r.offset + (r.elems * r.elem_bytes).next_multiple_of(VEC4) <= r.buffer.size()
        };
        let logits = logits.expect("logits are always bound");
        fits(&logits) && grad.is_none_or(|g| fits(&g) && g.offset % VEC4 == logits.offset % VEC4)
    }

    fn bind(
        &self,
        w: &Window,
        shape: &Shape,
        limits: &wgpu::Limits,
        wide: bool,
    ) -> BoundWindow<'a> {
        let align = u64::from(limits.min_storage_buffer_offset_alignment);
        let k = u64::from(shape.classes());
        let per_item_rows = u64::from(shape.spatial());
        let ranges = self
            .bound
            .iter()
            .enumerate()
            .map(|(i, region)| {
                let Some(r) = region else {
                    let buffer = if shader::BINDINGS[i].writable {
                        self.dummy_write
                    } else {
                        self.dummy_read
                    };
                    return BoundRange {
                        buffer,
                        offset: 0,
                        size: buffer.size(),
                        base: 0,
                    };
                };
                let (first, count) = match INDEXING[i] {
                    _ if r.elems == 1 => (0, 1),
                    Indexing::Elements => (
                        w.first_item * per_item_rows * k,
                        w.items * per_item_rows * k,
                    ),
                    Indexing::Rows if r.elems == u64::from(shape.rows()) => {
                        (w.first_row, u64::from(w.rows))
                    }
                    // Probability targets: indexed like the logits.
                    Indexing::Rows => (
                        w.first_item * per_item_rows * k,
                        w.items * per_item_rows * k,
                    ),
                    Indexing::Whole => (0, r.elems),
                };
                let start = r.offset + first * r.elem_bytes;
                let offset = start / align * align;
                let unit = if wide && matches!(INDEXING[i], Indexing::Elements) {
                    VEC4
                } else {
                    WORD
                };
                let end = (start + count * r.elem_bytes).next_multiple_of(unit);
                BoundRange {
                    buffer: r.buffer,
                    offset,
                    size: end - offset,
                    base: ((start - offset) / r.elem_bytes) as u32,
                }
            })
            .collect();
        BoundWindow { ranges }
    }
}
