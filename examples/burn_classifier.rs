//! A Burn model trained with lsce's loss and with Burn's own `CrossEntropyLoss` (feature
//! `burn`): Burn's layers, Burn's Adam, Burn's autodiff, one line apart.
//!
//! The task is `train_classifier`'s: overlapping Gaussian blobs, 20% of the training labels
//! flipped to another class, PyTorch's label smoothing eps = 0.1. The same network (one hidden
//! ReLU layer) is trained twice from the same initialisation on the same minibatches, once per
//! loss, then evaluated on a clean held-out set. It prints the held-out accuracy and the time
//! per training step (forward, loss, backward, optimiser step) of each: time is a ratio
//! measured in this run, not an absolute figure for anyone else's machine.
//!
//! ```text
//! cargo run --release --features burn --example burn_classifier
//! cargo run --release --features burn --example burn_classifier -- 20      # epochs
//! ```

use std::error::Error;
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, IntDType, Tensor, TensorData};
use lsce::burn::LsceLossConfig;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const CLASSES: usize = 10;
const DIMS: usize = 24;
const HIDDEN: usize = 64;
const TRAIN_POINTS: usize = 3000;
const TEST_POINTS: usize = 2000;
/// Every `FLIP_EVERY`-th training label is replaced by a uniformly chosen other class: 20%.
const FLIP_EVERY: usize = 5;
/// Standard deviation of the class centres' coordinates, against unit noise within a class.
const CENTRE_SPREAD: f64 = 0.55;
const BATCH: usize = 100;
/// The default; the first command-line argument overrides it.
const EPOCHS: usize = 30;
const LEARNING_RATE: f64 = 3e-3;
const SMOOTHING: f32 = 0.1;
const SEED: u64 = 2024;

/// One hidden ReLU layer, from Burn's own layers.
#[derive(Module, Debug)]
struct Classifier {
    hidden: Linear,
    relu: Relu,
    out: Linear,
}

impl Classifier {
    fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(DIMS, HIDDEN).init(device),
            relu: Relu::new(),
            out: LinearConfig::new(HIDDEN, CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.relu.forward(self.hidden.forward(x)))
    }
}

/// Which loss a run trains with.
#[derive(Clone, Copy, Debug)]
enum Loss {
    Lsce,
    Burn,
}

struct Outcome {
    loss: Loss,
    accuracy: f64,
    final_loss: f32,
    step: Duration,
}

fn main() -> Result<()> {
    let epochs = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|e| format!("the argument is a number of epochs: {arg:?}: {e}"))?,
        None => EPOCHS,
    };
    // Burn's wgpu runtime, sharing its device and queue with lsce.
    let device = lsce::burn::init_device()?.autodiff();
    println!("device: {device:?}");
    let mut rng = Rng(SEED);
    let data = Data::generate(&mut rng);
    println!(
        "data: {CLASSES} Gaussian blobs in {DIMS} dimensions, {TRAIN_POINTS} training points \
         ({}% of labels flipped), {TEST_POINTS} clean held-out points; eps = {SMOOTHING}, \
         {epochs} epochs of {} steps",
        100 / FLIP_EVERY,
        TRAIN_POINTS / BATCH
    );
    // The same initialisation for both runs.
    let initial = Classifier::new(&device);
    let mut outcomes = Vec::new();
    for loss in [Loss::Lsce, Loss::Burn] {
        outcomes.push(train(loss, initial.clone(), &data, epochs, &device)?);
    }
    println!("\n| loss | held-out accuracy | final training loss | time per step |");
    println!("|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {:?} | {:.3} | {:.4} | {:.2} ms |",
            o.loss,
            o.accuracy,
            o.final_loss,
            o.step.as_secs_f64() * 1e3
        );
    }
    let (l, b) = (&outcomes[0], &outcomes[1]);
    println!(
        "lsce's step takes {:.2}x the time of Burn's; accuracies differ by {:.3}",
        l.step.as_secs_f64() / b.step.as_secs_f64(),
        (l.accuracy - b.accuracy).abs()
    );
    Ok(())
}

fn train(
    which: Loss,
    mut model: Classifier,
    data: &Data,
    epochs: usize,
    device: &Device,
) -> Result<Outcome> {
    let lsce_loss = LsceLossConfig::new()
        .with_smoothing(Some(SMOOTHING))
        .init(device)?;
    let burn_loss = CrossEntropyLossConfig::new()
        .with_smoothing(Some(SMOOTHING))
        .init(device);
    let mut optim = AdamConfig::new().init();
    let mut final_loss = 0.0;
    let mut busy = Duration::ZERO;
    let mut steps = 0u32;
    for epoch in 0..epochs {
        for batch in 0..TRAIN_POINTS / BATCH {
            let (x, y) = data.train_batch(batch, device);
            // The step is timed to its end on the device: reading the loss waits for it.
            let start = Instant::now();
            let logits = model.forward(x);
            let loss = match which {
                Loss::Lsce => lsce_loss.try_forward(logits, y)?,
                Loss::Burn => burn_loss.forward(logits, y),
            };
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(LEARNING_RATE, model, grads);
            final_loss = loss.into_data().try_into_vec::<f32>()?[0];
            // The first epoch compiles kernels (and autotunes): left out of the timing.
            if epoch > 0 {
                busy += start.elapsed();
                steps += 1;
            }
        }
    }
    let accuracy = data.test_accuracy(&model, device)?;
    println!("{which:?}: held-out accuracy {accuracy:.3}, final training loss {final_loss:.4}");
    Ok(Outcome {
        loss: which,
        accuracy,
        final_loss,
        step: busy / steps.max(1),
    })
}

/// SplitMix64: tiny and deterministic.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }

    /// Standard normal (Box-Muller; `1 - u` keeps the logarithm finite).
    fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// The synthetic data set, row-major `[points, DIMS]`.
struct Data {
    train_x: Vec<f32>,
    /// The labels training sees, 20% of them wrong.
    train_labels: Vec<i32>,
    test_x: Vec<f32>,
    test_labels: Vec<i32>,
}

impl Data {
    fn generate(rng: &mut Rng) -> Self {
        let centres: Vec<f64> = (0..CLASSES * DIMS)
            .map(|_| CENTRE_SPREAD * rng.normal())
            .collect();
        let mut sample = |points: usize| {
            let mut x = Vec::with_capacity(points * DIMS);
            let mut labels = Vec::with_capacity(points);
            for _ in 0..points {
                let class = rng.below(CLASSES);
                let centre = &centres[class * DIMS..][..DIMS];
                x.extend(centre.iter().map(|c| (c + rng.normal()) as f32));
                labels.push(class as i32);
            }
            (x, labels)
        };
        let (train_x, clean) = sample(TRAIN_POINTS);
        let (test_x, test_labels) = sample(TEST_POINTS);
        let train_labels = clean
            .iter()
            .enumerate()
            .map(|(i, &y)| {
                if i % FLIP_EVERY == 0 {
                    (y + 1 + rng.below(CLASSES - 1) as i32) % CLASSES as i32
                } else {
                    y
                }
            })
            .collect();
        Self {
            train_x,
            train_labels,
            test_x,
            test_labels,
        }
    }

    fn train_batch(&self, batch: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let rows = batch * BATCH..(batch + 1) * BATCH;
        let x = self.train_x[rows.start * DIMS..rows.end * DIMS].to_vec();
        let y = self.train_labels[rows].to_vec();
        (
            Tensor::from_data(TensorData::new(x, [BATCH, DIMS]), device),
            Tensor::from_data(TensorData::new(y, [BATCH]), device),
        )
    }

    fn test_accuracy(&self, model: &Classifier, device: &Device) -> Result<f64> {
        let x = Tensor::<2>::from_data(
            TensorData::new(self.test_x.clone(), [TEST_POINTS, DIMS]),
            device,
        );
        let predicted = model
            .forward(x)
            .argmax(1)
            .reshape([TEST_POINTS])
            .cast(IntDType::I32)
            .into_data()
            .try_into_vec::<i32>()?;
        let right = predicted
            .iter()
            .zip(&self.test_labels)
            .filter(|(p, y)| p == y)
            .count();
        Ok(right as f64 / TEST_POINTS as f64)
    }
}
