//! The fused linear head's staging call: host slices in, `Vec`s out.

use crate::batch::{Targets, UpstreamGrad};
use crate::device::{buffer, read_sections, upload};
use crate::error::Result;
use crate::kernel::LossKernel;
use crate::layout::Summary;
use crate::output::LossOutput;
use crate::problem::Problem;
use crate::spec::{LossSpec, Reduction};

use super::batch::{LinearBatch, LinearOptions, LinearOutput};
use super::encode::LinearBuffers;
use super::plan::LinearPlan;
use super::problem::{HeadGradients, LinearProblem};

impl LossKernel {
    /// Computes the fused linear head of a host batch on the GPU and reads it back: plans,
    /// uploads, encodes, submits, waits.
    ///
    /// Invalid labels are found by the kernel and returned as
    /// [`LsceError::LabelOutOfRange`](crate::LsceError::LabelOutOfRange); device errors as `Err`.
    ///
    /// ```
    /// use lsce::linear::{LinearBatch, LinearOptions};
    /// # let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default()).unwrap();
    /// let kernel = lsce::LossKernel::new(&device).unwrap();
    /// let hidden: Vec<f32> = (0..8 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let head: Vec<f32> = (0..100 * 16).map(|i| (i as f32 * 0.11).cos()).collect();
    /// let labels = [3, 1, 4, 1, 5, 9, 2, 6];
    /// let batch = LinearBatch::classes(16, &hidden, &head, &labels).unwrap();
    /// let out = kernel
    ///     .compute_linear(&queue, &lsce::LossSpec::pytorch(0.1), &batch, &LinearOptions::default())
    ///     .unwrap();
    /// assert_eq!((out.d_hidden.unwrap().len(), out.d_head.unwrap().len()), (8 * 16, 100 * 16));
    /// ```
    pub fn compute_linear(
        &self,
        queue: &wgpu::Queue,
        spec: &LossSpec,
        batch: &LinearBatch<'_>,
        options: &LinearOptions,
    ) -> Result<LinearOutput<f32>> {
        batch.validate_layout(spec)?;
        let device = &self.inner.device;
        let loss = Problem::for_batch(*spec, &batch.loss)
            .with_dtype(batch.dtype())
            .with_accuracy(options.accuracy)
            .with_max_binding_bytes(options.max_binding_bytes);
        let problem = LinearProblem::new(*spec, batch.rows(), batch.dim, batch.vocab())?
            .with_loss(loss)
            .with_bias(batch.bias.is_some())
            .with_gradients(options.gradients)
            .with_memory(options.memory);
        let plan = LinearPlan::new(self, &problem)?;
        let (rows, dim, vocab) = (
            u64::from(batch.rows()),
            u64::from(batch.dim),
            u64::from(batch.vocab()),
        );

        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let storage = wgpu::BufferUsages::STORAGE;
        let copy_src = wgpu::BufferUsages::COPY_SRC;
        let upload = |label, contents: &[u8]| upload(device, label, contents, storage);
        let output = |label, bytes: u64, usage| buffer(device, label, bytes, usage);
        let hidden = upload("lsce hidden", batch.hidden.bytes())?;
        let head = upload("lsce head", batch.head.bytes())?;
        let bias = batch
            .bias
            .map(|b| upload("lsce bias", b.bytes()))
            .transpose()?;
        let targets = match batch.loss.targets {
            Targets::Classes(labels) => upload("lsce targets", bytemuck::cast_slice(labels)),
            Targets::Probabilities(p) => upload("lsce targets", bytemuck::cast_slice(p)),
        }?;
        let weights = batch
            .loss
            .weights
            .map(|w| upload("lsce weights", bytemuck::cast_slice(w)))
            .transpose()?;
        let upstream = match batch.loss.upstream {
            UpstreamGrad::One => None,
            UpstreamGrad::Scalar(g) => Some(upload("lsce upstream", bytemuck::bytes_of(&g))?),
            UpstreamGrad::PerRow(g) => Some(upload("lsce upstream", bytemuck::cast_slice(g))?),
        };
        let per_row_loss = spec.reduction == Reduction::None;
        let out = storage | copy_src;
        let loss_rows = per_row_loss.then(|| output("lsce loss", rows * 4, out));
        let lse = output("lsce lse", rows * 4, out);
        let summary = output(
            "lsce summary",
            Summary::SIZE,
            wgpu::BufferUsages::COPY_DST | copy_src,
        );
        let with_grad = options.gradients != HeadGradients::None;
        let all = options.gradients == HeadGradients::All;
        let d_hidden = with_grad.then(|| output("lsce d_hidden", rows * dim * 4, out));
        let d_head = all.then(|| output("lsce d_head", vocab * dim * 4, out));
        let d_bias = (all && bias.is_some()).then(|| output("lsce d_bias", vocab * 4, out));

        let mut buffers = LinearBuffers::new(
            hidden.slice(..),
            head.slice(..),
            targets.slice(..),
            summary.slice(..),
        )
        .with_lse(lse.slice(..));
        buffers.bias = bias.as_ref().map(|b| b.slice(..));
        buffers.weights = weights.as_ref().map(|b| b.slice(..));
        buffers.upstream = upstream.as_ref().map(|b| b.slice(..));
        buffers.loss = loss_rows.as_ref().map(|b| b.slice(..));
        buffers.d_hidden = d_hidden.as_ref().map(|b| b.slice(..));
        buffers.d_head = d_head.as_ref().map(|b| b.slice(..));
        buffers.d_bias = d_bias.as_ref().map(|b| b.slice(..));
        let binding = plan.bind(&buffers)?;
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("lsce linear staging"),
        });
        binding.encode(&mut encoder);

        // Everything read back goes through one mappable buffer.
        let mut sections = vec![(&summary, Summary::SIZE), (&lse, rows * 4)];
        sections.extend(loss_rows.as_ref().map(|b| (b, rows * 4)));
        let gradients = [
            d_hidden.as_ref().map(|b| (b, rows * dim * 4)),
            d_head.as_ref().map(|b| (b, vocab * dim * 4)),
            d_bias.as_ref().map(|b| (b, vocab * 4)),
        ];
        sections.extend(gradients.iter().flatten().copied());
        let read = read_sections(device, queue, encoder, &sections, vec![scope, validation])?;
        let floats = |bytes: &[u8]| -> Vec<f32> { bytemuck::cast_slice(bytes).to_vec() };
        let summary = Summary::from_bytes(&read[0]);
        let lse_values = floats(&read[1]);
        // The gradients follow the sections before them, in order.
        let mut next = 2 + usize::from(loss_rows.is_some());
        let [d_hidden, d_head, d_bias] = gradients.map(|g| {
            g.map(|_| {
                next += 1;
                floats(&read[next - 1])
            })
        });
        let result = LinearOutput {
            loss: LossOutput {
                loss: match loss_rows {
                    Some(_) => floats(&read[2]),
                    None => vec![summary.loss],
                },
                z_loss: if per_row_loss {
                    lse_values.iter().map(|l| spec.z_loss * l * l).collect()
                } else {
                    vec![summary.z_loss]
                },
                lse: lse_values,
                grad: None,
                denominator: summary.denominator,
                correct: options.accuracy.then_some(u64::from(summary.correct)),
            },
            d_hidden,
            d_head,
            d_bias,
        };
        plan.check(&summary)?;
        Ok(result)
    }
}
