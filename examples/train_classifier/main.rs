//! Trains a small classifier the way an engine uses lsce: the example owns the device, every
//! buffer and one `CommandEncoder` per training step, and lsce records the loss and its gradient
//! into that encoder between the example's own WGSL forward and backward passes
//! (`classifier.wgsl`). Nothing is read back while training except the
//! [`Summary`] of one step in every `REPORT_EVERY` epochs, for the progress line.
//!
//! The data are overlapping Gaussian blobs with 20% of the training labels flipped to another
//! class. The same network (one hidden ReLU layer) is trained from the same initialisation on
//! the same minibatches twice, with plain cross-entropy and with PyTorch's label smoothing
//! (eps = 0.1), and then evaluated on a clean held-out set: accuracy, NLL and expected
//! calibration error (ECE, 15 bins).
//!
//! How the two compare depends on how far training goes (how much of the wrong labels the
//! network has memorised), so the number of epochs is an optional argument:
//!
//! ```text
//! cargo run --release --example train_classifier
//! cargo run --release --example train_classifier -- 200
//! WGPU_BACKEND=gl cargo run --release --example train_classifier
//! ```
//!
//! The files, one job each: `data.rs` (the data set), `model.rs` (the MLP and its shader
//! `classifier.wgsl`), `training.rs` (the training loop), `metrics.rs` (evaluation and its
//! metrics), `gpu.rs` (buffers and readback).

mod data;
mod gpu;
mod metrics;
mod model;
mod training;

use lsce::LossKernel;

use data::{Data, Rng, CLASSES, DIMS, FLIP_EVERY, TEST_POINTS, TRAIN_POINTS};
use gpu::Result;
use metrics::Outcome;
use model::{initial_parameters, HIDDEN, PARAMETERS};
use training::{Trainer, BATCH, BATCHES_PER_EPOCH, LEARNING_RATE};

/// The default; the first command-line argument overrides it.
const EPOCHS: u32 = 60;
const SEED: u64 = 2024;
const SMOOTHING: [f32; 2] = [0.0, 0.1];

fn main() -> Result<()> {
    let epochs = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|e| format!("the argument is a number of epochs: {arg:?}: {e}"))?,
        None => EPOCHS,
    };
    let steps = epochs * BATCHES_PER_EPOCH;
    let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
    let info = device.adapter_info();
    println!("adapter: {} ({:?})", info.name, info.backend);

    let mut rng = Rng::new(SEED);
    let data = Data::generate(&mut rng);
    let initial = initial_parameters(&mut rng);
    println!(
        "data: {CLASSES} Gaussian blobs in {DIMS} dimensions; {TRAIN_POINTS} training points \
         ({} labels flipped), {TEST_POINTS} clean held-out points",
        TRAIN_POINTS as usize / FLIP_EVERY
    );
    println!(
        "      the Bayes classifier (nearest true centre) gets {:.4} of the held-out points right",
        data.bayes_accuracy()
    );
    println!(
        "model: {DIMS} -> {HIDDEN} ReLU -> {CLASSES}, {PARAMETERS} parameters; SGD lr \
         {LEARNING_RATE}, batch {BATCH}, {epochs} epochs = {steps} steps"
    );

    let kernel = LossKernel::new(&device)?;
    let trainer = Trainer::new(&device, &kernel, &data)?;
    let mut outcomes = Vec::new();
    for eps in SMOOTHING {
        println!("\ntraining with LossSpec::pytorch({eps}) (PyTorch's label_smoothing={eps})");
        queue.write_buffer(&trainer.params, 0, bytemuck::cast_slice(&initial));
        let time = trainer.train(&queue, &kernel, eps, epochs)?;
        println!(
            "trained {steps} steps in {:.2} s ({:.2} ms/step)",
            time.as_secs_f64(),
            time.as_secs_f64() * 1e3 / f64::from(steps)
        );
        outcomes.push(Outcome::measure(
            &queue,
            &trainer.test,
            &trainer.train_eval,
            &data,
            eps,
            time,
        )?);
    }
    Outcome::print_table(&outcomes);
    Ok(())
}
