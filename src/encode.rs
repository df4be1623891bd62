//! Binding and encoding: a plan bound to the caller's buffers, recorded into the caller's
//! `CommandEncoder` with no submission, readback or wait.

use std::sync::Arc;

use crate::buffers::{LossBuffers, Regions, Scratch, WORD};
use crate::device::upload;
use crate::error::{LsceError, Result};
use crate::layout::{Params, Slot, Summary};
use crate::plan::{LossPlan, PlanInner};
use crate::problem::Gradient;
use crate::row_kernel::RowPass;
use crate::spec::Reduction;
use crate::windows::{Placeholders, Window};

/// A plan bound to the caller's buffers (see [`LossPlan::bind`]). Encoding it records the
/// loss's compute pass and the summary copy, and allocates nothing.
#[derive(Clone, Debug)]
pub struct LossBinding {
    plan: Arc<PlanInner>,
    /// The row passes for these buffers (`vec4` units where they allow it).
    rows: Vec<(RowPass, wgpu::ComputePipeline)>,
    /// One per window.
    bind_groups: Vec<wgpu::BindGroup>,
    summary: (wgpu::Buffer, u64),
    loss_copy: Option<(wgpu::Buffer, u64)>,
}

impl LossPlan {
    /// Validates `buffers` against the plan and binds them: the window parameters are uploaded
    /// and the bind groups created once, so that [`LossBinding::encode`] allocates nothing.
    /// Keep the binding while the buffers stay the same (an engine's usual case).
    pub fn bind(&self, buffers: &LossBuffers<'_>) -> Result<LossBinding> {
        LossBinding::new(&self.inner, buffers)
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

impl LossBinding {
    fn new(plan: &Arc<PlanInner>, buffers: &LossBuffers<'_>) -> Result<Self> {
        let kernel = &plan.kernel.inner;
        let device = &kernel.device;
        let problem = &plan.problem;
        let scratch = Scratch {
            control: &plan.control,
            row_loss: plan.row_loss_scratch.as_ref(),
            lse: &plan.lse_scratch,
        };
        let regions = Regions::validate(problem, buffers, scratch)?;
        let in_place = problem.gradient == Gradient::InPlace;
        let wide = plan.pipelines.wide && regions.allow_wide();
        let rows = if wide || !plan.pipelines.wide {
            plan.pipelines.rows.clone()
        } else {
            plan.pipelines
                .narrow_rows
                .iter()
                .map(|&(pass, key)| Ok((pass, kernel.pipeline(key)?)))
                .collect::<Result<_>>()?
        };
        let placeholders = Placeholders {
            read: &kernel.placeholder_read,
            write: &kernel.placeholder_write,
        };
        let bound: Vec<_> = plan
            .windows
            .iter()
            .map(|w| regions.bind(w, &problem.shape, &kernel.limits, wide, &placeholders))
            .collect();
        let params_size = std::mem::size_of::<Params>();
        let mut params = vec![0u8; (plan.param_stride * plan.windows.len() as u64) as usize];
        for (i, (w, b)) in plan.windows.iter().zip(&bound).enumerate() {
            let at = i * plan.param_stride as usize;
            params[at..at + params_size].copy_from_slice(bytemuck::bytes_of(&plan.params(w, b)));
        }
        // A buffer of another device is only caught by wgpu's validation: scope it into an Err
        // (the scope resolves immediately on native backends).
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let params = upload(device, "lsce params", &params, wgpu::BufferUsages::UNIFORM)?;
        let bind_groups = bound
            .iter()
            .map(|b| {
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &params,
                        offset: 0,
                        size: wgpu::BufferSize::new(params_size as u64),
                    }),
                }];
                entries.extend(Slot::ALL.into_iter().zip(&b.ranges).map(|(slot, r)| {
                    wgpu::BindGroupEntry {
                        binding: slot.binding(),
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: r.buffer,
                            offset: r.offset,
                            size: wgpu::BufferSize::new(r.size),
                        }),
                    }
                }));
                device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("lsce"),
                    layout: kernel.layout(in_place),
                    entries: &entries,
                })
            })
            .collect();
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(LsceError::Device(err.to_string()));
        }
        let loss_copy = match (buffers.loss, problem.spec.reduction) {
            (Some(loss), Reduction::Sum | Reduction::Mean) => {
                Some((loss.buffer().clone(), loss.offset()))
            }
            _ => None,
        };
        Ok(LossBinding {
            plan: Arc::clone(plan),
            rows,
            bind_groups,
            summary: (buffers.summary.buffer().clone(), buffers.summary.offset()),
            loss_copy,
        })
    }

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
            // Per-window passes run once per window, combining passes once; wgpu orders the
            // dispatches of a pass by their storage hazards.
            let pipelines = &plan.pipelines;
            if let Some(setup) = &pipelines.setup_partials {
                self.per_window(&mut pass, setup, Window::chunks);
            }
            self.once(&mut pass, &pipelines.setup_final);
            let split_parts = plan.row_kernel.split_parts();
            for (row_pass, pipeline) in &self.rows {
                let teams_per_row = if row_pass.per_part() { split_parts } else { 1 };
                // Teams per window, in workgroups.
                self.per_window(&mut pass, pipeline, |w| {
                    (w.rows * teams_per_row)
                        .div_ceil(plan.rows_per_workgroup)
                        .min(plan.max_row_workgroups)
                });
            }
            if let Some((partials, last)) = &pipelines.finalize {
                self.per_window(&mut pass, partials, Window::chunks);
                self.once(&mut pass, last);
            }
        }
        // The summary is the first words of `control`, the reduced loss its first word.
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

/// Dispatches `n` workgroups as a 2D grid so that no dimension exceeds 65535.
pub(crate) fn dispatch(pass: &mut wgpu::ComputePass<'_>, n: u32) {
    const MAX: u32 = 65535;
    if n == 0 {
        return;
    }
    let x = n.min(MAX);
    pass.dispatch_workgroups(x, n.div_ceil(x), 1);
}
