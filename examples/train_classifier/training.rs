//! The training loop: every buffer and dispatch of a step built once, then per step one
//! encoder with the minibatch copy, the model's forward pass, lsce's loss and gradient, and the
//! backward pass with the SGD update; a summary is read back only for the progress line.

use std::time::{Duration, Instant};

use lsce::{
    Gradient, LossBinding, LossBuffers, LossKernel, LossPlan, LossSpec, Problem, Shape, Summary,
};

use crate::data::{Data, CLASSES, DIMS, TRAIN_POINTS};
use crate::gpu::{storage, submit_and_read, upload, Result, F32};
use crate::metrics::Evaluation;
use crate::model::{backward, record, Dispatch, Forward, Kernels, PARAMETERS};

pub const BATCH: u32 = 100;
pub const BATCHES_PER_EPOCH: u32 = TRAIN_POINTS / BATCH;
pub const LEARNING_RATE: f32 = 0.2;
/// A progress line every `REPORT_EVERY` epochs.
const REPORT_EVERY: u32 = 10;

/// Everything on the GPU, built once: the data, the parameters, the training step's buffers and
/// dispatches, and the two evaluations.
pub struct Trainer {
    device: wgpu::Device,
    pub params: wgpu::Buffer,
    train_x: wgpu::Buffer,
    train_labels: wgpu::Buffer,
    /// This step's minibatch: the static bind groups read it, a copy fills it.
    batch_x: wgpu::Buffer,
    forward: Forward,
    backward: Vec<Dispatch>,
    summary: wgpu::Buffer,
    pub test: Evaluation,
    pub train_eval: Evaluation,
}

impl Trainer {
    pub fn new(device: &wgpu::Device, kernel: &LossKernel, data: &Data) -> Result<Self> {
        let kernels = Kernels::new(device);
        let params = storage(
            device,
            "params",
            u64::from(PARAMETERS) * F32,
            wgpu::BufferUsages::COPY_DST,
        );
        let grads = storage(
            device,
            "grads",
            u64::from(PARAMETERS) * F32,
            wgpu::BufferUsages::empty(),
        );
        let batch_x = storage(
            device,
            "batch x",
            u64::from(BATCH * DIMS) * F32,
            wgpu::BufferUsages::COPY_DST,
        );
        let forward = Forward::new(device, &kernels, &params, &batch_x, BATCH);
        let backward = backward(
            device,
            &kernels,
            &forward,
            &batch_x,
            &params,
            &grads,
            LEARNING_RATE,
        );
        let train_x = upload(
            device,
            "train x",
            &data.train_x,
            wgpu::BufferUsages::COPY_SRC,
        );
        let train_labels = upload(
            device,
            "train labels",
            &data.train_labels,
            wgpu::BufferUsages::empty(),
        );
        let test_x = upload(device, "test x", &data.test_x, wgpu::BufferUsages::empty());
        let test_labels = upload(
            device,
            "test labels",
            &data.test_labels,
            wgpu::BufferUsages::empty(),
        );
        Ok(Self {
            device: device.clone(),
            summary: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("summary"),
                size: Summary::SIZE,
                usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            test: Evaluation::new(device, kernel, &kernels, &params, &test_x, &test_labels)?,
            train_eval: Evaluation::new(
                device,
                kernel,
                &kernels,
                &params,
                &train_x,
                &train_labels,
            )?,
            train_x,
            train_labels,
            params,
            batch_x,
            forward,
            backward,
        })
    }

    /// Trains from the current parameters with `LossSpec::pytorch(eps)`; returns the wall time.
    pub fn train(
        &self,
        queue: &wgpu::Queue,
        kernel: &LossKernel,
        eps: f32,
        epochs: u32,
    ) -> Result<Duration> {
        let plan = kernel.plan(
            &Problem::new(LossSpec::pytorch(eps), Shape::matrix(BATCH, CLASSES)?)
                // The logits are not needed after the loss: the gradient may replace them.
                .with_gradient(Gradient::InPlace)
                .with_accuracy(true),
        )?;
        // One binding per minibatch, made once: the buffers never change, so a step's encode
        // allocates nothing.
        let bindings = (0..BATCHES_PER_EPOCH)
            .map(|batch| self.bind_loss(&plan, u64::from(batch * BATCH)))
            .collect::<Result<Vec<_>>>()?;
        let start = Instant::now();
        let steps = epochs * BATCHES_PER_EPOCH;
        for step in 0..steps {
            // Fixed minibatches in a fixed order: the data were generated in random order.
            let first = u64::from(step % BATCHES_PER_EPOCH * BATCH);
            let mut encoder = self.device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(
                &self.train_x,
                first * u64::from(DIMS) * F32,
                &self.batch_x,
                0,
                self.batch_x.size(),
            );
            record(&mut encoder, "forward", &self.forward.dispatches);
            bindings[(step % BATCHES_PER_EPOCH) as usize].encode(&mut encoder);
            record(&mut encoder, "backward", &self.backward);
            if (step + 1) % (REPORT_EVERY * BATCHES_PER_EPOCH) == 0 || step + 1 == steps {
                let bytes = submit_and_read(&self.device, queue, encoder, &[&self.summary])?;
                let summary = Summary::from_bytes(&bytes[0]);
                plan.check(&summary)?;
                println!(
                    "  step {:>5}/{steps}  epoch {:>3}  batch loss {:.4}  \
                     batch accuracy {:.2} (against its noisy labels)",
                    step + 1,
                    (step + 1) / BATCHES_PER_EPOCH,
                    summary.loss,
                    f64::from(summary.correct) / f64::from(BATCH),
                );
            } else {
                queue.submit([encoder.finish()]);
            }
        }
        self.device.poll(wgpu::PollType::wait_indefinitely())?;
        Ok(start.elapsed())
    }

    /// lsce's part of a step, bound once: the loss of the minibatch starting at point `first`
    /// and its gradient over the logits. The labels are a slice of the whole training set's
    /// buffer: lsce takes any 4-byte-aligned offset.
    fn bind_loss(&self, plan: &LossPlan, first: u64) -> Result<LossBinding> {
        let labels = first * F32..(first + u64::from(BATCH)) * F32;
        Ok(plan.bind(&LossBuffers::new(
            self.forward.logits.slice(..),
            self.train_labels.slice(labels),
            self.summary.slice(..),
        ))?)
    }
}
