//! The staging API: host slices in, `Vec`s out. It creates the buffers, records one plan,
//! submits, and reads the results back (map_async, poll, a futures-intrusive channel).

use crate::batch::{Batch, Targets, UpstreamGrad};
use crate::buffers::LossBuffers;
use crate::device::{buffer, read_sections, upload};
use crate::dtype::{Dtype, GradDtype};
use crate::error::{LsceError, Result};
use crate::kernel::LossKernel;
use crate::layout::Summary;
use crate::output::LossOutput;
use crate::problem::{Gradient, Problem};
use crate::spec::{LossSpec, Reduction};

/// What a staging call computes besides the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingOptions {
    /// `Gradient::None` for evaluation; `InPlace` writes the gradient over the uploaded logits
    /// (and is read back from there).
    pub gradient: Gradient,
    /// Count the rows whose argmax is the label.
    pub accuracy: bool,
    /// The gradient's element type (see [`Problem::grad_dtype`]). The returned gradient is
    /// always decoded to `f32`.
    pub grad_dtype: GradDtype,
    /// See [`Problem::max_binding_bytes`].
    pub max_binding_bytes: Option<u64>,
}

impl Default for StagingOptions {
    fn default() -> Self {
        Self {
            gradient: Gradient::Separate,
            accuracy: false,
            grad_dtype: GradDtype::AsLogits,
            max_binding_bytes: None,
        }
    }
}

impl StagingOptions {
    /// `problem` with these options (also a vocabulary shard's plan, src/shards/gpu.rs).
    pub(crate) fn apply(&self, problem: Problem) -> Problem {
        problem
            .with_gradient(self.gradient)
            .with_accuracy(self.accuracy)
            .with_grad_dtype(match self.gradient {
                // The gradient overwrites the logits, in their type.
                Gradient::InPlace => GradDtype::AsLogits,
                _ => self.grad_dtype,
            })
            .with_max_binding_bytes(self.max_binding_bytes)
    }
}

impl LossKernel {
    /// Computes the loss (and gradient) of a host batch on the GPU and reads it back.
    ///
    /// Blocks until the results are read. Invalid labels are found by the kernel and returned
    /// as [`LsceError::LabelOutOfRange`]; device errors (out of memory, device lost) as `Err`.
    ///
    /// ```
    /// use lsce::{Batch, LossKernel, LossSpec, Shape, StagingOptions};
    /// # let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default()).unwrap();
    /// let kernel = LossKernel::new(&device).unwrap();
    /// let logits = [1.0, 2.0, 3.0, 1.0, 0.0, -1.0];
    /// let batch = Batch::classes(Shape::matrix(2, 3).unwrap(), &logits, &[2, 0]);
    /// let out = kernel.compute(&queue, &LossSpec::pytorch(0.1), &batch, &StagingOptions::default()).unwrap();
    /// assert_eq!((out.loss.len(), out.grad.unwrap().len()), (1, 6));
    /// ```
    pub fn compute(
        &self,
        queue: &wgpu::Queue,
        spec: &LossSpec,
        batch: &Batch<'_>,
        options: &StagingOptions,
    ) -> Result<LossOutput<f32>> {
        batch.validate_layout(spec)?;
        let device = &self.inner.device;
        let shape = batch.shape;
        let problem = options.apply(Problem::for_batch(*spec, batch));
        let plan = self.plan(&problem)?;
        let max_buffer = self.inner.limits.max_buffer_size;
        let grad_dtype = problem.grad_dtype();
        let grad_bytes = (shape.elements() * grad_dtype.bytes()).next_multiple_of(4);
        for bytes in [shape.elements() * problem.dtype.bytes(), grad_bytes] {
            if bytes > max_buffer {
                return Err(LsceError::ExceedsDeviceLimit {
                    limit: "max_buffer_size",
                    needed: bytes,
                    available: max_buffer,
                });
            }
        }

        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let storage = wgpu::BufferUsages::STORAGE;
        let copy_src = wgpu::BufferUsages::COPY_SRC;
        let upload = |label, contents: &[u8], usage| upload(device, label, contents, usage);
        let output = |label, bytes: u64, usage| buffer(device, label, bytes, usage);
        let logits = upload("lsce logits", batch.logits.bytes(), storage | copy_src)?;
        let targets = match batch.targets {
            Targets::Classes(labels) => {
                upload("lsce targets", bytemuck::cast_slice(labels), storage)
            }
            Targets::Probabilities(p) => upload("lsce targets", bytemuck::cast_slice(p), storage),
        }?;
        let weights = batch
            .weights
            .map(|w| upload("lsce weights", bytemuck::cast_slice(w), storage))
            .transpose()?;
        let upstream = match batch.upstream {
            UpstreamGrad::One => None,
            UpstreamGrad::Scalar(g) => {
                Some(upload("lsce upstream", bytemuck::bytes_of(&g), storage)?)
            }
            UpstreamGrad::PerRow(g) => {
                Some(upload("lsce upstream", bytemuck::cast_slice(g), storage)?)
            }
        };
        let rows_bytes = u64::from(shape.rows()) * 4;
        let per_row_loss = spec.reduction == Reduction::None;
        let loss = per_row_loss.then(|| output("lsce loss", rows_bytes, storage | copy_src));
        let lse = output("lsce lse", rows_bytes, storage | copy_src);
        let grad = (options.gradient == Gradient::Separate)
            .then(|| output("lsce grad", grad_bytes, storage | copy_src));
        let summary = output(
            "lsce summary",
            Summary::SIZE,
            wgpu::BufferUsages::COPY_DST | copy_src,
        );

        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("lsce staging"),
        });
        plan.encode(
            &mut encoder,
            &LossBuffers {
                logits: logits.slice(..),
                targets: targets.slice(..),
                weights: weights.as_ref().map(|b| b.slice(..)),
                upstream: upstream.as_ref().map(|b| b.slice(..)),
                loss: loss.as_ref().map(|b| b.slice(..)),
                lse: Some(lse.slice(..)),
                grad: grad.as_ref().map(|b| b.slice(..)),
                summary: summary.slice(..),
            },
        )?;

        // Everything read back goes through one mappable buffer.
        let grad_source = match options.gradient {
            Gradient::None => None,
            Gradient::Separate => grad.as_ref(),
            Gradient::InPlace => Some(&logits),
        };
        let mut sections = vec![(&summary, Summary::SIZE), (&lse, rows_bytes)];
        sections.extend(loss.as_ref().map(|b| (b, rows_bytes)));
        sections.extend(grad_source.map(|b| (b, grad_bytes)));
        let read = read_sections(device, queue, encoder, &sections, vec![scope, validation])?;
        let floats = |bytes: &[u8]| -> Vec<f32> { bytemuck::cast_slice(bytes).to_vec() };
        let summary = Summary::from_bytes(&read[0]);
        let out = LossOutput {
            loss: match loss {
                Some(_) => floats(&read[2]),
                None => vec![summary.loss],
            },
            z_loss: if per_row_loss {
                floats(&read[1])
                    .into_iter()
                    .map(|l| spec.z_loss * l * l)
                    .collect()
            } else {
                vec![summary.z_loss]
            },
            lse: floats(&read[1]),
            grad: grad_source.map(|_| {
                let n = shape.elements() as usize;
                let bytes = &read[read.len() - 1];
                match grad_dtype {
                    Dtype::F32 => bytemuck::cast_slice::<u8, f32>(bytes)[..n].to_vec(),
                    Dtype::F16 => bytemuck::cast_slice::<u8, u16>(bytes)[..n]
                        .iter()
                        .map(|&b| crate::half::f16_to_f32(b))
                        .collect(),
                    Dtype::Bf16 => bytemuck::cast_slice::<u8, u16>(bytes)[..n]
                        .iter()
                        .map(|&b| crate::half::bf16_to_f32(b))
                        .collect(),
                }
            }),
            denominator: summary.denominator,
            correct: options.accuracy.then_some(u64::from(summary.correct)),
        };
        summary.check(shape.classes())?;
        Ok(out)
    }
}
