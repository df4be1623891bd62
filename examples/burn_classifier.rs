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

/// `train_classifier`'s data set: the same noisy-label task, the same draws.
#[allow(dead_code)] // train_classifier reads the fields this example does not
#[path = "train_classifier/data.rs"]
mod data;
use data::{Data, Rng, FLIP_EVERY};

const CLASSES: usize = data::CLASSES as usize;
const DIMS: usize = data::DIMS as usize;
const TRAIN_POINTS: usize = data::TRAIN_POINTS as usize;
const TEST_POINTS: usize = data::TEST_POINTS as usize;
const HIDDEN: usize = 64;
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
    let mut rng = Rng::new(SEED);
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

impl Data {
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
