//! Binding a fused linear head plan to the caller's buffers, and encoding it.

use std::sync::Arc;

use crate::buffers::{loss_buffer_setters, region, WORD};
use crate::encode::dispatch;
use crate::error::{LsceError, Result};
use crate::layout::{HeadSlot, LinearParams, Params, Slot, Summary};
use crate::spec::Reduction;

use super::plan::{ChunkSteps, LinearPlan, PlanInner};
use super::problem::HeadGradients;

/// The caller's buffers of one fused linear head step. Every slice starts at a multiple of
/// the device's `min_storage_buffer_offset_alignment` and has `STORAGE` usage (the summary
/// `COPY_DST`).
///
/// | buffer | contents |
/// |---|---|
/// | `hidden` | `H [rows, dim]` of the problem's dtype (16-bit: two per word) |
/// | `head` | `W [vocab, dim]`, nn.Linear's weight layout, same dtype |
/// | `bias` | `b [vocab]`, same dtype, iff the problem has a bias |
/// | `targets` | `rows` i32 labels, or `[rows, vocab]` f32 probabilities |
/// | `weights` | `vocab` f32 class weights, iff weighted |
/// | `upstream` | one f32 (`Sum`/`Mean`) or `rows` (`None`), iff the problem has one |
/// | `summary` | 32 bytes: [`Summary`] (loss, denominator, accuracy, bad labels) |
/// | `loss` | `rows` f32 per-row losses (required for `Reduction::None`; optional otherwise) |
/// | `lse` | `rows` f32 log-sum-exp, optional |
/// | `d_hidden` | `dH [rows, dim]` f32, iff gradients are asked for |
/// | `d_head`, `d_bias` | `dW [vocab, dim]`, `db [vocab]` f32, with [`HeadGradients::All`] (`d_bias` iff a bias) |
#[derive(Clone, Copy, Debug)]
pub struct LinearBuffers<'a> {
    /// `H`.
    pub hidden: wgpu::BufferSlice<'a>,
    /// `W`.
    pub head: wgpu::BufferSlice<'a>,
    /// `b`.
    pub bias: Option<wgpu::BufferSlice<'a>>,
    /// Labels or probabilities.
    pub targets: wgpu::BufferSlice<'a>,
    /// Class weights.
    pub weights: Option<wgpu::BufferSlice<'a>>,
    /// The upstream gradient.
    pub upstream: Option<wgpu::BufferSlice<'a>>,
    /// The summary.
    pub summary: wgpu::BufferSlice<'a>,
    /// Per-row losses.
    pub loss: Option<wgpu::BufferSlice<'a>>,
    /// Per-row log-sum-exp.
    pub lse: Option<wgpu::BufferSlice<'a>>,
    /// `dH`.
    pub d_hidden: Option<wgpu::BufferSlice<'a>>,
    /// `dW`.
    pub d_head: Option<wgpu::BufferSlice<'a>>,
    /// `db`.
    pub d_bias: Option<wgpu::BufferSlice<'a>>,
}

impl<'a> LinearBuffers<'a> {
    /// The required buffers; the optional ones are set by the `with_*` methods.
    pub fn new(
        hidden: wgpu::BufferSlice<'a>,
        head: wgpu::BufferSlice<'a>,
        targets: wgpu::BufferSlice<'a>,
        summary: wgpu::BufferSlice<'a>,
    ) -> Self {
        Self {
            hidden,
            head,
            bias: None,
            targets,
            weights: None,
            upstream: None,
            summary,
            loss: None,
            lse: None,
            d_hidden: None,
            d_head: None,
            d_bias: None,
        }
    }

    /// Sets [`LinearBuffers::bias`].
    pub fn with_bias(mut self, bias: wgpu::BufferSlice<'a>) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Sets the gradient outputs: `dH`, and `dW` and `db` where the problem has them.
    pub fn with_grads(
        mut self,
        d_hidden: wgpu::BufferSlice<'a>,
        d_head: Option<wgpu::BufferSlice<'a>>,
        d_bias: Option<wgpu::BufferSlice<'a>>,
    ) -> Self {
        self.d_hidden = Some(d_hidden);
        self.d_head = d_head;
        self.d_bias = d_bias;
        self
    }
}

loss_buffer_setters!(LinearBuffers);

/// A plan bound to buffers: [`LinearBinding::encode`] records the step into the caller's
/// encoder, with no allocation, submit or wait.
pub struct LinearBinding {
    op: Op,
    /// `linear_logits` for [`LinearPlan::bind_logits`].
    unfused: Option<wgpu::ComputePipeline>,
    pub(super) plan: Arc<PlanInner>,
    /// Group 0: the loss's buffers.
    pub(super) loss: wgpu::BindGroup,
    /// Group 1, per vocabulary window of the head.
    pub(super) heads: Vec<wgpu::BindGroup>,
    summary: (wgpu::Buffer, u64),
    /// Where the reduced loss is copied for `Sum`/`Mean` when a loss buffer was given.
    loss_copy: Option<(wgpu::Buffer, u64)>,
}

fn whole(buffer: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
    buffer.as_entire_binding()
}

/// The slice, or the whole placeholder where there is none.
fn slice_or<'a>(
    s: Option<wgpu::BufferSlice<'a>>,
    placeholder: &'a wgpu::Buffer,
) -> wgpu::BindingResource<'a> {
    s.map_or_else(
        || placeholder.as_entire_binding(),
        |s| {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: s.buffer(),
                offset: s.offset(),
                size: wgpu::BufferSize::new(s.size()),
            })
        },
    )
}

/// `slice` if `wanted`, an `Err` naming `what` if one is given without the other.
fn presence<'a>(
    what: &'static str,
    slice: Option<wgpu::BufferSlice<'a>>,
    wanted: bool,
) -> Result<Option<wgpu::BufferSlice<'a>>> {
    match (slice, wanted) {
        (s, true) if s.is_some() => Ok(s),
        (None, false) => Ok(None),
        (None, _) => Err(LsceError::MissingBuffer(what)),
        (Some(_), _) => Err(LsceError::UnexpectedBuffer(what)),
    }
}

/// What a binding encodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// The fused head: loss and gradients, no logits.
    Fused,
    /// Unfused step 1: the logits into the caller's buffer.
    Logits,
    /// Unfused step 3: `dH`, `dW`, `db` from the caller's logit gradient.
    Products,
}

impl LinearPlan {
    /// Binds the plan to `buffers`, checking presence, usages, offsets and sizes against the
    /// problem.
    pub fn bind(&self, buffers: &LinearBuffers<'_>) -> Result<LinearBinding> {
        self.bind_op(buffers, None, Op::Fused)
    }

    /// The head's logits alone, unfused: a binding whose encode writes `z = H W^T + b` into
    /// `logits` (`[rows, vocab]` f32, `STORAGE`, within one storage binding) with the same
    /// matmul, and nothing else (no loss, no summary). For evaluation that wants the logits
    /// (sampling), and as the baseline the benchmark compares the fused head against.
    pub fn bind_logits(
        &self,
        buffers: &LinearBuffers<'_>,
        logits: wgpu::BufferSlice<'_>,
    ) -> Result<LinearBinding> {
        self.bind_op(buffers, Some(logits), Op::Logits)
    }

    /// The head's two gradient products alone, unfused: a binding whose encode computes `dH =
    /// G W`, and with [`HeadGradients::All`] `dW = G^T H` and `db`, from the caller's logit
    /// gradient `G` (`[rows, vocab]` f32, as lsce's loss writes it), with the same kernels and
    /// owners as the fused head (deterministic), and nothing else.
    pub fn bind_products(
        &self,
        buffers: &LinearBuffers<'_>,
        grad_logits: wgpu::BufferSlice<'_>,
    ) -> Result<LinearBinding> {
        if self.inner.problem.gradients == HeadGradients::None {
            return Err(LsceError::Unsupported(
                "bind_products needs a problem with gradients",
            ));
        }
        self.bind_op(buffers, Some(grad_logits), Op::Products)
    }

    fn bind_op(
        &self,
        buffers: &LinearBuffers<'_>,
        logits: Option<wgpu::BufferSlice<'_>>,
        op: Op,
    ) -> Result<LinearBinding> {
        let p = &self.inner;
        let kernel = &p.kernel.inner;
        let device = &kernel.device;
        let problem = &p.problem;
        let loss = &problem.loss;
        let (rows, dim, vocab) = (
            u64::from(problem.rows()),
            u64::from(problem.dim),
            u64::from(problem.vocab()),
        );
        let element = loss.dtype.bytes();
        let storage = wgpu::BufferUsages::STORAGE;
        let alignment = u64::from(kernel.limits.min_storage_buffer_offset_alignment);
        let with_grad = problem.gradients != HeadGradients::None;
        let all = problem.gradients == HeadGradients::All;
        let soft = loss.targets == crate::TargetKind::Probabilities;
        let per_row_loss = loss.spec.reduction == Reduction::None;
        let upstream_len = if per_row_loss { rows } else { 1 };
        if per_row_loss && buffers.loss.is_none() {
            return Err(LsceError::MissingBuffer("loss"));
        }
        // The loss's f32 buffers bound in group 0: (what, slice, elements). A summed loss is
        // copied out of the summary, not bound (checked below).
        let inputs = [
            (
                "targets",
                Some(buffers.targets),
                if soft { rows * vocab } else { rows },
            ),
            (
                "weights",
                presence("weights", buffers.weights, loss.weighted)?,
                vocab,
            ),
            (
                "upstream",
                presence("upstream", buffers.upstream, loss.upstream_grad)?,
                upstream_len,
            ),
            ("loss", buffers.loss.filter(|_| per_row_loss), rows),
            ("lse", buffers.lse, rows),
        ];
        let head_inputs = [
            (HeadSlot::Hidden, "hidden", Some(buffers.hidden), rows * dim),
            (HeadSlot::Head, "head", Some(buffers.head), vocab * dim),
            (
                HeadSlot::Bias,
                "bias",
                presence("bias", buffers.bias, problem.bias)?,
                vocab,
            ),
            (
                HeadSlot::DHidden,
                "d_hidden",
                presence("d_hidden", buffers.d_hidden, with_grad)?,
                rows * dim,
            ),
            (
                HeadSlot::DHead,
                "d_head",
                presence("d_head", buffers.d_head, all)?,
                vocab * dim,
            ),
            (
                HeadSlot::DBias,
                "d_bias",
                presence("d_bias", buffers.d_bias, all && problem.bias)?,
                vocab,
            ),
        ];
        let aligned = |what, s: &wgpu::BufferSlice<'_>| {
            if s.offset() % alignment == 0 {
                Ok(())
            } else {
                Err(LsceError::MisalignedOffset {
                    what,
                    offset: s.offset(),
                    alignment,
                })
            }
        };
        for (what, slice, elems) in &inputs {
            if let Some(s) = slice {
                aligned(*what, s)?;
                region(what, *s, *elems, WORD, storage)?;
            }
        }
        for (slot, what, slice, elems) in &head_inputs {
            if let Some(s) = slice {
                aligned(*what, s)?;
                let bytes = if slot.info().1 { WORD } else { element };
                region(what, *s, *elems, bytes, storage)?;
            }
        }
        region(
            "summary",
            buffers.summary,
            Summary::SIZE / WORD,
            WORD,
            wgpu::BufferUsages::COPY_DST,
        )?;
        if let Some(l) = logits {
            aligned("logits", &l)?;
            region("logits", l, rows * vocab, WORD, storage)?;
            if rows * vocab * WORD > kernel.limits.max_storage_buffer_binding_size {
                return Err(LsceError::ExceedsDeviceLimit {
                    limit: "max_storage_buffer_binding_size",
                    needed: rows * vocab * WORD,
                    available: kernel.limits.max_storage_buffer_binding_size,
                });
            }
        }
        if let Some(l) = buffers.loss.filter(|_| !per_row_loss) {
            region("loss", l, 1, WORD, wgpu::BufferUsages::COPY_DST)?;
        }

        let read = &kernel.placeholder_read;
        let write = &kernel.placeholder_write;
        let uniform = |size: usize| {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &p.uniforms,
                offset: 0,
                size: wgpu::BufferSize::new(size as u64),
            })
        };
        let group0: Vec<(Slot, wgpu::BindingResource<'_>)> = vec![
            (
                Slot::Logits,
                match (logits, &p.chunk) {
                    (Some(l), _) => slice_or(Some(l), write),
                    (None, Some(chunk)) => whole(chunk),
                    (None, None) => whole(write),
                },
            ),
            (Slot::Targets, slice_or(Some(buffers.targets), read)),
            (Slot::Weights, slice_or(buffers.weights, read)),
            (Slot::Upstream, slice_or(buffers.upstream, read)),
            // Per-row losses go to the caller for Reduction::None, else to scratch (reduced).
            (
                Slot::RowLoss,
                slice_or(buffers.loss.filter(|_| per_row_loss), &p.row_loss),
            ),
            (Slot::Lse, slice_or(buffers.lse, &p.lse)),
            (Slot::Grad, whole(write)),
            (Slot::Control, whole(&p.control)),
        ];
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform(std::mem::size_of::<Params>()),
        }];
        entries.extend(
            group0
                .into_iter()
                .map(|(slot, resource)| wgpu::BindGroupEntry {
                    binding: slot.binding(),
                    resource,
                }),
        );
        let loss_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("lsce linear loss"),
            layout: kernel.layout(true),
            entries: &entries,
        });
        // One group 1 per vocabulary window: the head, bias and their gradients from the
        // window's first entry (offsets of whole 512-entry blocks, aligned for any D).
        let part = |s: Option<wgpu::BufferSlice<'_>>, begin: u32, end: u32, bytes: u64| {
            s.map(|s| {
                let at = s.offset() + u64::from(begin) * bytes;
                let size = u64::from(end - begin) * bytes;
                (s.buffer().clone(), at, size.next_multiple_of(WORD))
            })
        };
        let mut heads = Vec::new();
        for &(begin, end) in &p.windows {
            let parts = [
                part(buffers.bias, begin, end, element),
                part(buffers.d_head, begin, end, dim * WORD),
                part(buffers.d_bias, begin, end, WORD),
                part(Some(buffers.head), begin, end, dim * element),
            ];
            let bound = |i: usize, placeholder: &'_ wgpu::Buffer| match &parts[i] {
                Some((buffer, at, size)) => (buffer.clone(), *at, Some(*size)),
                None => (placeholder.clone(), 0, None),
            };
            let resources = [
                (
                    buffers.hidden.buffer().clone(),
                    buffers.hidden.offset(),
                    Some(buffers.hidden.size()),
                ),
                bound(3, read),
                bound(0, read),
                buffers.d_hidden.map_or((write.clone(), 0, None), |s| {
                    (s.buffer().clone(), s.offset(), Some(s.size()))
                }),
                bound(1, write),
                bound(2, write),
            ];
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: uniform(std::mem::size_of::<LinearParams>()),
            }];
            entries.extend(HeadSlot::ALL.into_iter().zip(&resources).map(
                |(slot, (buffer, offset, size))| wgpu::BindGroupEntry {
                    binding: slot.binding(),
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: *offset,
                        size: size.and_then(wgpu::BufferSize::new),
                    }),
                },
            ));
            heads.push(device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("lsce linear head"),
                layout: kernel.head_layout()?,
                entries: &entries,
            }));
        }
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(LsceError::Device(err.to_string()));
        }
        let unfused = match op {
            Op::Fused => None,
            Op::Logits => Some(p.head_pipeline("linear_logits")?),
            Op::Products => None,
        };
        Ok(LinearBinding {
            op,
            unfused,
            plan: Arc::clone(p),
            loss: loss_group,
            heads,
            summary: (buffers.summary.buffer().clone(), buffers.summary.offset()),
            loss_copy: buffers
                .loss
                .filter(|_| !per_row_loss)
                .map(|l| (l.buffer().clone(), l.offset())),
        })
    }
}

impl LinearBinding {
    /// Records the step into `encoder`: the loss, then the gradients the problem asks for.
    /// Nothing is submitted, read back or waited for; nothing is allocated.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        match self.op {
            Op::Fused => self.encode_fused(encoder),
            Op::Logits | Op::Products => self.encode_unfused(encoder),
        }
    }

    /// The unfused ops: over all rows, the caller's logits (or their gradient) as the chunk.
    fn encode_unfused(&self, encoder: &mut wgpu::CommandEncoder) {
        let p = &self.plan;
        let steps = &p.materialized;
        let entry = |i: u32| [(p.stride * u64::from(i)) as u32];
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("lsce linear, unfused"),
            timestamp_writes: None,
        });
        pass.set_bind_group(0, &self.loss, &[0]);
        if let Some(logits) = &self.unfused {
            pass.set_pipeline(logits);
            for w in &steps.windows {
                pass.set_bind_group(1, &self.heads[w.window], &entry(w.stats));
                pass.dispatch_workgroups(PlanInner::row_tiles(steps.rows), w.tiles, 1);
            }
            return;
        }
        self.encode_products(&mut pass, steps);
    }

    /// `dH`, `dW` and `db` of one chunk's G: every window's segments in order.
    pub(super) fn encode_products(&self, pass: &mut wgpu::ComputePass<'_>, chunk: &ChunkSteps) {
        let p = &self.plan;
        let pipelines = &p.pipelines;
        let entry = |i: u32| [(p.stride * u64::from(i)) as u32];
        let column_tiles = chunk.column_tiles;
        if let Some(grad_hidden) = &pipelines.grad_hidden {
            pass.set_pipeline(grad_hidden);
            for w in &chunk.windows {
                for &step in &w.hidden {
                    pass.set_bind_group(1, &self.heads[w.window], &entry(step));
                    pass.dispatch_workgroups(PlanInner::row_tiles(chunk.rows), 1, column_tiles);
                }
            }
        }
        if let Some(grad_head) = &pipelines.grad_head {
            pass.set_pipeline(grad_head);
            for w in &chunk.windows {
                for &step in &w.head {
                    pass.set_bind_group(1, &self.heads[w.window], &entry(step));
                    pass.dispatch_workgroups(w.tiles, 1, column_tiles);
                }
            }
        }
    }

    fn encode_fused(&self, encoder: &mut wgpu::CommandEncoder) {
        let p = &self.plan;
        let pipelines = &p.pipelines;
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("lsce linear"),
                timestamp_writes: None,
            });
            pass.set_bind_group(0, &self.loss, &[0]);
            pass.set_bind_group(1, &self.heads[0], &[p.stride as u32]);
            if let Some(setup) = &pipelines.setup_partials {
                pass.set_pipeline(setup);
                dispatch(&mut pass, p.setup_chunks);
            }
            pass.set_pipeline(&pipelines.setup_final);
            pass.dispatch_workgroups(1, 1, 1);
            // Chunks in order, segments in order: dH and dW owners add each dispatch's terms
            // after the previous ones'.
            let entry = |i: u32| [(p.stride * u64::from(i)) as u32];
            for chunk in &p.chunks {
                for w in &chunk.windows {
                    pass.set_bind_group(1, &self.heads[w.window], &entry(w.stats));
                    pass.set_pipeline(&pipelines.stats);
                    pass.dispatch_workgroups(PlanInner::row_tiles(chunk.rows), w.blocks, 1);
                }
                pass.set_bind_group(1, &self.heads[0], &entry(chunk.whole));
                pass.set_pipeline(&pipelines.merge);
                dispatch(&mut pass, PlanInner::row_groups(chunk.rows));
                if let Some(logit_grad) = &pipelines.logit_grad {
                    pass.set_pipeline(logit_grad);
                    dispatch(&mut pass, p.quad_groups(chunk.rows));
                }
                self.encode_products(&mut pass, chunk);
            }
            if let Some((partials, last)) = &pipelines.finalize {
                pass.set_pipeline(partials);
                dispatch(&mut pass, p.setup_chunks);
                pass.set_pipeline(last);
                pass.dispatch_workgroups(1, 1, 1);
            }
        }
        encoder.copy_buffer_to_buffer(
            &p.control,
            0,
            &self.summary.0,
            self.summary.1,
            Summary::SIZE,
        );
        if let Some((buffer, at)) = &self.loss_copy {
            encoder.copy_buffer_to_buffer(&p.control, 0, buffer, *at, WORD);
        }
    }
}
