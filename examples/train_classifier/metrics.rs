//! Evaluation and its metrics: a whole data set through the model's forward pass and a
//! forward-only lsce plan, then accuracy, held-out NLL, expected calibration error and how many
//! wrong training labels the model reproduces.

use std::time::Duration;

use lsce::{Gradient, LossBuffers, LossKernel, LossPlan, LossSpec, Problem, Shape, Summary};

use crate::data::{Data, CLASSES, FLIP_EVERY};
use crate::gpu::{storage, submit_and_read, Result, F32};
use crate::model::{record, Forward, Kernels};

const ECE_BINS: usize = 15;

/// A whole data set evaluated at once: the forward pass, then a forward-only lsce plan (plain
/// cross-entropy, accuracy, and the per-row log-sum-exp that turns logits into probabilities).
pub struct Evaluation {
    device: wgpu::Device,
    labels: wgpu::Buffer,
    forward: Forward,
    plan: LossPlan,
    lse: wgpu::Buffer,
    summary: wgpu::Buffer,
}

/// What an evaluation reads back.
struct Evaluated {
    logits: Vec<f32>,
    lse: Vec<f32>,
    summary: Summary,
}

impl Evaluation {
    pub fn new(
        device: &wgpu::Device,
        kernel: &LossKernel,
        kernels: &Kernels,
        params: &wgpu::Buffer,
        x: &wgpu::Buffer,
        labels: &wgpu::Buffer,
    ) -> Result<Self> {
        let rows = (labels.size() / F32) as u32;
        let problem = Problem::new(LossSpec::pytorch(0.0), Shape::matrix(rows, CLASSES)?)
            .with_gradient(Gradient::None)
            .with_accuracy(true);
        Ok(Self {
            device: device.clone(),
            labels: labels.clone(),
            forward: Forward::new(device, kernels, params, x, rows),
            plan: kernel.plan(&problem)?,
            lse: storage(
                device,
                "eval lse",
                u64::from(rows) * F32,
                wgpu::BufferUsages::COPY_SRC,
            ),
            summary: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("eval summary"),
                size: Summary::SIZE,
                usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
        })
    }

    fn run(&self, queue: &wgpu::Queue) -> Result<Evaluated> {
        let mut encoder = self.device.create_command_encoder(&Default::default());
        record(&mut encoder, "eval forward", &self.forward.dispatches);
        self.plan.encode(
            &mut encoder,
            &LossBuffers::new(
                self.forward.logits.slice(..),
                self.labels.slice(..),
                self.summary.slice(..),
            )
            .with_lse(self.lse.slice(..)),
        )?;
        let bytes = submit_and_read(
            &self.device,
            queue,
            encoder,
            &[&self.forward.logits, &self.lse, &self.summary],
        )?;
        let summary = Summary::from_bytes(&bytes[2]);
        self.plan.check(&summary)?;
        Ok(Evaluated {
            logits: bytemuck::pod_collect_to_vec(&bytes[0]),
            lse: bytemuck::pod_collect_to_vec(&bytes[1]),
            summary,
        })
    }
}

/// The argmax and the softmax probability of the argmax (the confidence) of every row, from the
/// logits and lsce's log-sum-exp: `p_max = exp(z_max - lse)`.
fn predictions(e: &Evaluated) -> Vec<(i32, f64)> {
    e.logits
        .chunks(CLASSES as usize)
        .zip(&e.lse)
        .map(|(z, &lse)| {
            let (class, &z_max) = z
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("CLASSES > 0");
            (class as i32, f64::from(z_max - lse).exp())
        })
        .collect()
}

/// Expected calibration error over `ECE_BINS` equal-width confidence bins: the
/// population-weighted mean of |accuracy - mean confidence| per bin.
fn expected_calibration_error(predictions: &[(i32, f64)], labels: &[i32]) -> f64 {
    // Per bin, the sum over its points of (correct - confidence): |sum| / n is the bin's
    // |accuracy - confidence| weighted by its share n / N of the points.
    let mut gaps = [0.0f64; ECE_BINS];
    for (&(class, confidence), &label) in predictions.iter().zip(labels) {
        let bin = ((confidence * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        gaps[bin] += f64::from(u8::from(class == label)) - confidence;
    }
    gaps.iter().map(|gap| gap.abs()).sum::<f64>() / predictions.len() as f64
}

/// The results of one training run.
pub struct Outcome {
    eps: f32,
    time: Duration,
    test_accuracy: f64,
    test_nll: f64,
    test_ece: f64,
    test_confidence: f64,
    train_accuracy_clean: f64,
    flipped_fitted: f64,
}

impl Outcome {
    /// Runs the `test` and `train` evaluations of a model trained with smoothing `eps` in
    /// `time`.
    pub fn measure(
        queue: &wgpu::Queue,
        test: &Evaluation,
        train: &Evaluation,
        data: &Data,
        eps: f32,
        time: Duration,
    ) -> Result<Self> {
        let test = test.run(queue)?;
        let test_predictions = predictions(&test);
        // Its summary counts agreement with the noisy labels; the true classes are on the host.
        let train = predictions(&train.run(queue)?);
        let flipped: Vec<usize> = (0..train.len()).step_by(FLIP_EVERY).collect();
        let fraction = |count: usize, of: usize| count as f64 / of as f64;
        Ok(Self {
            eps,
            time,
            test_accuracy: fraction(test.summary.correct as usize, data.test_labels.len()),
            // Plain cross-entropy whatever the training loss: the held-out NLL.
            test_nll: f64::from(test.summary.loss),
            test_ece: expected_calibration_error(&test_predictions, &data.test_labels),
            test_confidence: test_predictions.iter().map(|p| p.1).sum::<f64>()
                / test_predictions.len() as f64,
            train_accuracy_clean: fraction(
                train
                    .iter()
                    .zip(&data.train_clean)
                    .filter(|(p, &y)| p.0 == y)
                    .count(),
                train.len(),
            ),
            flipped_fitted: fraction(
                flipped
                    .iter()
                    .filter(|&&i| train[i].0 == data.train_labels[i])
                    .count(),
                flipped.len(),
            ),
        })
    }

    pub fn print_table(outcomes: &[Outcome]) {
        println!();
        let row = |name: &str, value: &dyn Fn(&Outcome) -> String| {
            print!("{name:<46}");
            for o in outcomes {
                print!("{:>12}", value(o));
            }
            println!();
        };
        row("", &|o| format!("eps = {}", o.eps));
        row("held-out accuracy", &|o| format!("{:.4}", o.test_accuracy));
        row("held-out NLL (plain cross-entropy)", &|o| {
            format!("{:.4}", o.test_nll)
        });
        row(&format!("held-out ECE ({ECE_BINS} bins)"), &|o| {
            format!("{:.4}", o.test_ece)
        });
        row("held-out mean confidence", &|o| {
            format!("{:.4}", o.test_confidence)
        });
        row("  minus accuracy (< 0: under-confident)", &|o| {
            format!("{:+.4}", o.test_confidence - o.test_accuracy)
        });
        row("training accuracy against the true classes", &|o| {
            format!("{:.4}", o.train_accuracy_clean)
        });
        row("flipped training labels the model reproduces", &|o| {
            format!("{:.4}", o.flipped_fitted)
        });
        row("training time (s)", &|o| {
            format!("{:.2}", o.time.as_secs_f64())
        });
    }
}
