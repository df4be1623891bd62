//! A small word-level language model trained in Burn with lsce's fused linear head
//! (`LsceLinearLoss`, feature `burn`), and the same model with Burn's `Linear` +
//! `CrossEntropyLoss` side by side: tokens per second and peak device memory.
//!
//! ```text
//! cargo run --release --features burn --example burn_lm            # about 2 minutes on lavapipe, 2 cores
//! cargo run --release --features burn --example burn_lm -- --quick # a short run
//! cargo run --release --features burn --example burn_lm -- --steps 300 --compare 20
//! ```
//!
//! **Corpus**: this repository's own text, compiled in with `include_str!` (the README and
//! the library's sources, about 400 kB; nothing is downloaded), split into words and
//! punctuation; the last 10% is held out. **Vocabulary**: the most frequent tokens of the
//! training part, up to `VOCAB - 1` of them, and one `<unk>`. A word-level vocabulary of
//! several thousand entries is where the logits (`N x V` per step) outweigh the rest of a
//! small model, which is the case the fused head is for; a byte-level vocabulary of 256
//! would show no difference.
//!
//! **Model**: a fixed-window causal model: the embeddings of the previous `CONTEXT` tokens,
//! concatenated, through two residual GELU layers and a layer norm to `D_MODEL` hidden
//! states, then the head. Trained with Adam and PyTorch's label smoothing eps = 0.1; it
//! prints the training loss falling and the held-out perplexity (of the unsmoothed
//! cross-entropy, from the model's logits) before and after.
//!
//! **Side by side**: the same model, initialisation and batches, with the head replaced by
//! Burn's `Linear` + `CrossEntropyLoss` (smoothing 0.1), each run for `--compare` steps on
//! its own Burn device on the same adapter (two runtimes, so that each device's memory is
//! its own); tokens per second from the wall clock of those steps, peak device memory the
//! largest `total_reserved_bytes` of wgpu's allocator report seen after a step (Burn's
//! memory pool keeps what a step needed). The fused device runs with
//! `MemoryConfiguration::ExclusivePages`, which lsce needs (see `lsce::burn::register_setup`);
//! Burn's device with Burn's default.

use std::collections::HashMap;
use std::error::Error;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::wgpu::{MemoryConfiguration, WgpuSetup};
use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use lsce::burn::{LsceLinearLoss, LsceLinearLossConfig};
use lsce::linear::Memory;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Previous tokens each prediction sees.
const CONTEXT: usize = 4;
const D_EMBED: usize = 32;
const D_MODEL: usize = 128;
const VOCAB: usize = 4096;
/// Sequences per batch and positions per sequence: `BATCH * SEQ` rows per step.
const BATCH: usize = 16;
const SEQ: usize = 64;
const LEARNING_RATE: f64 = 2e-3;
const SMOOTHING: f32 = 0.1;
const SEED: u64 = 7;

/// The repository's own text: the README and the library's sources.
const CORPUS: &[&str] = &[
    include_str!("../README.md"),
    include_str!("../src/lib.rs"),
    include_str!("../src/spec.rs"),
    include_str!("../src/problem.rs"),
    include_str!("../src/plan.rs"),
    include_str!("../src/kernel.rs"),
    include_str!("../src/cpu.rs"),
    include_str!("../src/batch.rs"),
    include_str!("../src/encode.rs"),
    include_str!("../src/error.rs"),
    include_str!("../src/linear/mod.rs"),
    include_str!("../src/linear/plan.rs"),
    include_str!("../src/linear/encode.rs"),
    include_str!("../src/burn/mod.rs"),
    include_str!("../src/burn/ops.rs"),
    include_str!("../src/burn/linear_loss.rs"),
    include_str!("../src/shards/mod.rs"),
];

/// Words (runs of letters, digits and `_`) and single punctuation characters.
fn tokenize(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        let word = c.is_alphanumeric() || c == '_';
        match (word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(&text[s..i]);
                start = None;
            }
            _ => {}
        }
        if !word && !c.is_whitespace() {
            out.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

/// Token ids of the training and held-out parts, and the vocabulary size.
fn corpus() -> (Vec<i32>, Vec<i32>, usize) {
    let text = CORPUS.join("\n");
    let tokens = tokenize(&text);
    let split = tokens.len() * 9 / 10;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &tokens[..split] {
        *counts.entry(t).or_default() += 1;
    }
    let mut by_count: Vec<(&str, usize)> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    by_count.truncate(VOCAB - 1);
    // Id 0 is <unk>.
    let ids: HashMap<&str, i32> = by_count
        .iter()
        .enumerate()
        .map(|(i, (t, _))| (*t, i as i32 + 1))
        .collect();
    let encode = |part: &[&str]| -> Vec<i32> {
        part.iter()
            .map(|t| ids.get(t).copied().unwrap_or(0))
            .collect()
    };
    (
        encode(&tokens[..split]),
        encode(&tokens[split..]),
        by_count.len() + 1,
    )
}

/// The model's body: token ids `[B, S + CONTEXT]` to hidden states `[B, S, D_MODEL]`.
#[derive(Module, Debug)]
struct Body {
    embed: Embedding,
    input: Linear,
    mlp1: Linear,
    mlp2: Linear,
    norm: LayerNorm,
    gelu: Gelu,
}

impl Body {
    fn new(vocab: usize, device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(vocab, D_EMBED).init(device),
            input: LinearConfig::new(CONTEXT * D_EMBED, D_MODEL).init(device),
            mlp1: LinearConfig::new(D_MODEL, 2 * D_MODEL).init(device),
            mlp2: LinearConfig::new(2 * D_MODEL, D_MODEL).init(device),
            norm: LayerNormConfig::new(D_MODEL).init(device),
            gelu: Gelu::new(),
        }
    }

    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [batch, width] = tokens.dims();
        let seq = width - CONTEXT;
        let e = self.embed.forward(tokens); // [B, S + C, E]
                                            // Position s sees tokens s .. s + CONTEXT (it predicts token s + CONTEXT).
        let windows: Vec<Tensor<3>> = (0..CONTEXT)
            .map(|k| e.clone().slice([0..batch, k..k + seq, 0..D_EMBED]))
            .collect();
        let x = self
            .gelu
            .forward(self.input.forward(Tensor::cat(windows, 2)));
        let x = x.clone() + self.mlp2.forward(self.gelu.forward(self.mlp1.forward(x)));
        self.norm.forward(x)
    }
}

/// The LM with lsce's fused head.
#[derive(Module, Debug)]
struct FusedLm {
    body: Body,
    head: LsceLinearLoss,
}

/// The same LM with Burn's `Linear` head (its loss is `CrossEntropyLoss`).
#[derive(Module, Debug)]
struct BurnLm {
    body: Body,
    head: Linear,
}

/// One batch: inputs `[B, SEQ + CONTEXT]` and targets `[B, SEQ]` from random offsets.
fn batch(data: &[i32], rng: &mut Rng, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let width = SEQ + CONTEXT;
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for _ in 0..BATCH {
        let at = rng.below(data.len() - width - 1);
        inputs.extend_from_slice(&data[at..at + width]);
        targets.extend_from_slice(&data[at + CONTEXT..at + width]);
    }
    (
        Tensor::from_data(TensorData::new(inputs, [BATCH, width]), device),
        Tensor::from_data(TensorData::new(targets, [BATCH, SEQ]), device),
    )
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// Held-out perplexity: `exp` of the mean unsmoothed cross-entropy over consecutive windows
/// of the held-out tokens, from the logits (no autodiff).
fn perplexity(model: &FusedLm, held_out: &[i32], device: &Device) -> f64 {
    let body = model.body.valid();
    let head = model.head.valid();
    let width = SEQ + CONTEXT;
    let (mut total, mut count) = (0.0f64, 0usize);
    for chunk in held_out.windows(width).step_by(SEQ).take(64) {
        let x = Tensor::<2, Int>::from_data(TensorData::new(chunk.to_vec(), [1, width]), device);
        let y = Tensor::<3, Int>::from_data(
            TensorData::new(chunk[CONTEXT..].to_vec(), [1, SEQ, 1]),
            device,
        );
        let logp = log_softmax(head.logits(body.forward(x)), 2); // [1, SEQ, V]
        let picked: Tensor<3> = logp.gather(2, y);
        total -= picked.sum().into_scalar::<f32>() as f64;
        count += SEQ;
    }
    (total / count as f64).exp()
}

fn peak(setup: &WgpuSetup, peak: &mut u64) {
    if let Some(report) = setup.device.generate_allocator_report() {
        *peak = (*peak).max(report.total_reserved_bytes);
    }
}

/// Steps of the fused model: (tokens per second, peak reserved bytes).
fn run_fused(
    mut model: FusedLm,
    steps: usize,
    train: &[i32],
    setup: &WgpuSetup,
    device: &Device,
    log: bool,
) -> Result<(FusedLm, f64, u64)> {
    let mut optim = AdamConfig::new().init();
    let mut rng = Rng(SEED);
    let mut top = 0;
    let start = Instant::now();
    let mut window = 0.0;
    for step in 1..=steps {
        let (x, y) = batch(train, &mut rng, device);
        let loss = model.head.try_forward(model.body.forward(x), y)?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(LEARNING_RATE, model, grads);
        peak(setup, &mut top);
        if log {
            window += loss.into_scalar::<f32>() as f64;
            if step % 10 == 0 || step == steps {
                let n = if step % 10 == 0 { 10 } else { step % 10 };
                println!(
                    "  step {step:>4}  training loss (smoothed) {:.3}",
                    window / n as f64
                );
                window = 0.0;
            }
        }
    }
    device.sync()?;
    let rate = (steps * BATCH * SEQ) as f64 / start.elapsed().as_secs_f64();
    Ok((model, rate, top))
}

/// Steps of the Burn-head model: (tokens per second, peak reserved bytes).
fn run_burn(
    mut model: BurnLm,
    steps: usize,
    train: &[i32],
    setup: &WgpuSetup,
    device: &Device,
) -> Result<(f64, u64)> {
    let loss_fn = CrossEntropyLossConfig::new()
        .with_smoothing(Some(SMOOTHING))
        .init(device);
    let mut optim = AdamConfig::new().init();
    let mut rng = Rng(SEED);
    let mut top = 0;
    let start = Instant::now();
    for _ in 0..steps {
        let (x, y) = batch(train, &mut rng, device);
        let logits = model.head.forward(model.body.forward(x)); // [B, S, V]
        let [b, s, v] = logits.dims();
        let loss = loss_fn.forward(logits.reshape([b * s, v]), y.reshape([b * s]));
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(LEARNING_RATE, model, grads);
        peak(setup, &mut top);
    }
    device.sync()?;
    let rate = (steps * BATCH * SEQ) as f64 / start.elapsed().as_secs_f64();
    Ok((rate, top))
}

fn arg(args: &[String], name: &str) -> Option<usize> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let steps = arg(&args, "--steps").unwrap_or(if quick { 10 } else { 100 });
    let compare = arg(&args, "--compare").unwrap_or(if quick { 2 } else { 8 });

    // The fused model's device, shared with lsce; Burn's on the same kind of adapter.
    let (plain, setup) = Device::wgpu_options()
        .memory_config(MemoryConfiguration::ExclusivePages)
        .init_with_setup()?;
    lsce::burn::register_setup(&plain, &setup)?;
    let info = setup.adapter.get_info();
    let kind = match info.device_type {
        wgpu::DeviceType::Cpu => DeviceKind::Cpu,
        wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(0),
        wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(0),
        _ => DeviceKind::DiscreteGpu(0),
    };
    let (burn_plain, burn_setup) = Device::wgpu_options().device_kind(kind).init_with_setup()?;
    let device = plain.clone().autodiff();
    let burn_device = burn_plain.autodiff();

    let (train, held_out, vocab) = corpus();
    println!(
        "corpus: {} training and {} held-out tokens, vocabulary {vocab} (word level), on {} ({:?})",
        train.len(),
        held_out.len(),
        info.name,
        info.backend
    );
    println!(
        "model: {CONTEXT}-token window, embedding {D_EMBED}, hidden {D_MODEL}, fused head \
         {vocab} x {D_MODEL}; {BATCH} x {SEQ} = {} tokens per step, label smoothing {SMOOTHING}",
        BATCH * SEQ
    );

    device.seed(SEED);
    let head_config = LsceLinearLossConfig::new()
        .with_smoothing(Some(SMOOTHING))
        .with_memory(Memory::Chunked {
            budget_bytes: 16 << 20,
        })
        // The labels are the corpus' own ids: no read-back per step.
        .with_label_check(false);
    let model = FusedLm {
        body: Body::new(vocab, &device),
        head: head_config.init(D_MODEL, vocab, &device)?,
    };
    println!(
        "held-out perplexity before training: {:.1}",
        perplexity(&model, &held_out, &plain)
    );
    let start = Instant::now();
    println!("training {steps} steps with the fused head:");
    let (model, _, _) = run_fused(model, steps, &train, &setup, &device, true)?;
    println!(
        "held-out perplexity after {steps} steps ({:.0} s): {:.1}",
        start.elapsed().as_secs_f64(),
        perplexity(&model, &held_out, &plain)
    );

    // Side by side: the same fresh model, same batches, each head on its own device.
    println!("\nside by side, {compare} training steps each (after one warm-up step):");
    device.seed(SEED + 1);
    let fresh = || FusedLm {
        body: Body::new(vocab, &device),
        head: head_config
            .clone()
            .init(D_MODEL, vocab, &device)
            .expect("head"),
    };
    let (warm, _, _) = run_fused(fresh(), 1, &train, &setup, &device, false)?;
    drop(warm);
    let (_, fused_rate, fused_peak) = run_fused(fresh(), compare, &train, &setup, &device, false)?;
    burn_device.seed(SEED + 1);
    let burn_model = || BurnLm {
        body: Body::new(vocab, &burn_device),
        head: LinearConfig::new(D_MODEL, vocab).init(&burn_device),
    };
    run_burn(burn_model(), 1, &train, &burn_setup, &burn_device)?;
    let (burn_rate, burn_peak) =
        run_burn(burn_model(), compare, &train, &burn_setup, &burn_device)?;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "  {:<34} {:>12} {:>16}",
        "head", "tokens/s", "peak device MB"
    );
    println!(
        "  {:<34} {:>12.0} {:>16.1}",
        "lsce LsceLinearLoss (fused)",
        fused_rate,
        mb(fused_peak)
    );
    println!(
        "  {:<34} {:>12.0} {:>16.1}",
        "Burn Linear + CrossEntropyLoss",
        burn_rate,
        mb(burn_peak)
    );
    println!(
        "  fused / Burn: {:.2}x the tokens per second, {:.2}x the peak memory \
         (the logits alone: {:.1} MB per step in f32)",
        fused_rate / burn_rate,
        fused_peak as f64 / burn_peak.max(1) as f64,
        mb((BATCH * SEQ * vocab * 4) as u64)
    );
    Ok(())
}
