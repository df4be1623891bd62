//! The label-smoothing conventions real codebases use, each on the same batch, GPU beside the
//! CPU reference, and a table of which codebase uses which.
//!
//! The batches come from two published worked examples that print PyTorch's results for them: a
//! 3x5 batch (`F.cross_entropy` 2.1185, `label_smoothing=0.1` 2.1038) and a 4x3 batch (a
//! `LabelSmoothingCrossEntropy` module under the three reductions), so every line marked
//! "PyTorch" can be checked against a real PyTorch run.
//!
//! ```text
//! cargo run --release --example conventions
//! ```

use lsce::{
    cpu, Batch, LossKernel, LossSpec, Reduction, Shape, Smoothing, StagingOptions, Targets,
};

const EPS: f32 = 0.1;

fn main() -> lsce::Result<()> {
    let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())?;
    let info = device.adapter_info();
    println!("adapter: {} ({:?})", info.name, info.backend);
    let kernel = LossKernel::new(&device)?;

    batch_3x5(&kernel, &queue)?;
    batch_4x3(&kernel, &queue)?;
    print_codebases();
    Ok(())
}

/// One batch under every convention, mean reduction as in the published example.
fn batch_3x5(kernel: &LossKernel, queue: &wgpu::Queue) -> lsce::Result<()> {
    const K: u32 = 5;
    let logits = [
        1.2215, -0.9342, -0.1349, -0.5035, 0.4492, //
        -0.1989, 0.2589, 2.1556, -0.5734, 0.8668, //
        0.1215, 0.5060, 0.5376, -1.7609, -0.6566,
    ];
    let labels = [2, 3, 2];
    let shape = Shape::matrix(3, K)?;
    let classes = Batch::classes(shape, &logits, &labels);
    // The published example's last check: PyTorch's smoothing spelled out as probability targets,
    // one_hot * (1 - eps) + eps / K, passed to plain cross-entropy.
    let smoothed: Vec<f32> = labels
        .iter()
        .flat_map(|&y| (0..K as i32).map(move |c| if c == y { 1.0 } else { 0.0 }))
        .map(|one_hot| one_hot * (1.0 - EPS) + EPS / K as f32)
        .collect();
    let probabilities = Batch::probabilities(shape, &logits, &smoothed);

    // NJUNMT's padding class is index 0; its rows are also ignored there. No label here is 0,
    // so the ignore index changes nothing but keeps the spec faithful.
    let padding = LossSpec::default()
        .with_smoothing(Smoothing::OffTarget(EPS))
        .with_excluded_class(Some(0))
        .with_ignore_index(Some(0));
    let cases = [
        (
            "plain cross-entropy",
            LossSpec::default(),
            classes,
            Some("2.1185"),
        ),
        (
            "Uniform(0.1)      PyTorch",
            LossSpec::pytorch(EPS),
            classes,
            Some("2.1038"),
        ),
        (
            "OffTarget(0.1)    Megatron",
            LossSpec::default().with_smoothing(Smoothing::OffTarget(EPS)),
            classes,
            None,
        ),
        (
            "Explicit{.9, .02} CoinCheung",
            coin_cheung(EPS, K),
            classes,
            None,
        ),
        ("OffTarget, excl. 0 NJUNMT", padding, classes, None),
        (
            "probability targets",
            LossSpec::default(),
            probabilities,
            Some("2.1038"),
        ),
    ];

    println!(
        "\nThe 3x5 batch: 3 rows x {K} classes, labels {labels:?}, eps = {EPS}, mean over rows."
    );
    println!("q is the target distribution of the first row (label 2).\n");
    println!(
        "{:<28} {:<36} {:>6} {:>10} {:>10} {:>9} {:>9} {:>7}",
        "convention", "q", "sum q", "GPU", "CPU (f64)", "|dloss|", "|dgrad|", "PyTorch"
    );
    for (name, spec, batch, pytorch) in cases {
        let c = compare(kernel, queue, &spec, &batch)?;
        let q = match batch.targets {
            Targets::Probabilities(p) => p[..K as usize].iter().map(|&v| f64::from(v)).collect(),
            Targets::Classes(_) => target_row(&spec, K, 2)?,
        };
        println!(
            "{name:<28} {:<36} {:>6.4} {:>10.6} {:>10.6} {:>9.1e} {:>9.1e} {:>7}",
            q.iter()
                .map(|v| format!("{v:.4}"))
                .collect::<Vec<_>>()
                .join(" "),
            q.iter().sum::<f64>(),
            c.gpu[0],
            c.cpu[0],
            c.loss_error,
            c.grad_error,
            pytorch.unwrap_or("-"),
        );
    }
    println!(
        "\nThe same eps gives four different q, so a loss moved between codebases must keep its \
         convention."
    );
    Ok(())
}

/// The 4x3 batch under its `LabelSmoothingCrossEntropy`, which is PyTorch's convention,
/// with each reduction.
fn batch_4x3(kernel: &LossKernel, queue: &wgpu::Queue) -> lsce::Result<()> {
    // torch.arange(12, dtype=torch.float32).reshape(4, 3)
    let logits: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let labels = [0, 2, 1, 2];
    let batch = Batch::classes(Shape::matrix(4, 3)?, &logits, &labels);
    let cases = [
        ("plain cross-entropy, Mean", LossSpec::default(), "1.1576"),
        ("Uniform(0.1), Mean", LossSpec::pytorch(EPS), "1.1826"),
        (
            "Uniform(0.1), Sum",
            LossSpec::pytorch(EPS).with_reduction(Reduction::Sum),
            "4.7304",
        ),
        (
            "Uniform(0.1), None",
            LossSpec::pytorch(EPS).with_reduction(Reduction::None),
            "2.3076 0.5076 1.4076 0.5076",
        ),
    ];
    println!("\nThe 4x3 batch: arange(12).reshape(4, 3), labels {labels:?}.\n");
    println!(
        "{:<26} {:<31} {:<31} {:>9} {:>9}  pytorch",
        "spec, reduction", "GPU", "CPU (f64)", "|dloss|", "|dgrad|"
    );
    for (name, spec, pytorch) in cases {
        let c = compare(kernel, queue, &spec, &batch)?;
        println!(
            "{name:<26} {:<31} {:<31} {:>9.1e} {:>9.1e}  {pytorch}",
            join(&c.gpu),
            join(&c.cpu),
            c.loss_error,
            c.grad_error
        );
    }
    Ok(())
}

/// CoinCheung's `LabelSmoothSoftmaxCEV1/V2`: `lb_pos = 1 - eps`, `lb_neg = eps / K`.
fn coin_cheung(eps: f32, classes: u32) -> LossSpec {
    LossSpec::default().with_smoothing(Smoothing::Explicit {
        on: 1.0 - eps,
        off: eps / classes as f32,
    })
}

/// The target distribution `q` lsce builds for a row labelled `label`: the on-value at the
/// label, nothing at an excluded class, the off-value elsewhere.
fn target_row(spec: &LossSpec, classes: u32, label: u32) -> lsce::Result<Vec<f64>> {
    let values = spec.resolve(classes)?;
    Ok((0..classes)
        .map(|c| {
            if c == label {
                values.on
            } else if Some(c) == spec.excluded_class {
                0.0
            } else {
                values.off
            }
        })
        .collect())
}

/// The loss on the GPU (staging API) and on the CPU, and the largest differences of the losses
/// and of the gradients.
struct Comparison {
    gpu: Vec<f32>,
    cpu: Vec<f64>,
    loss_error: f64,
    grad_error: f64,
}

fn compare(
    kernel: &LossKernel,
    queue: &wgpu::Queue,
    spec: &LossSpec,
    batch: &Batch<'_>,
) -> lsce::Result<Comparison> {
    let gpu = kernel.compute(queue, spec, batch, &StagingOptions::default())?;
    let cpu = cpu::compute(spec, batch, lsce::Gradient::Separate)?;
    let max_error = |a: &[f32], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max)
    };
    Ok(Comparison {
        loss_error: max_error(&gpu.loss, &cpu.loss),
        grad_error: max_error(
            gpu.grad.as_deref().unwrap_or_default(),
            cpu.grad.as_deref().unwrap_or_default(),
        ),
        gpu: gpu.loss,
        cpu: cpu.loss,
    })
}

fn join<T: Into<f64> + Copy>(values: &[T]) -> String {
    values
        .iter()
        .map(|&v| format!("{:.5}", v.into()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which codebase builds which target distribution, for eps and K classes.
fn print_codebases() {
    const TABLE: [(&str, &str, &[&str]); 4] = [
        (
            "Uniform(eps) = LossSpec::pytorch(eps)",
            "q_y = 1-eps+eps/K, q_k = eps/K",
            &[
                "PyTorch cross_entropy / CrossEntropyLoss(label_smoothing=eps)",
                "HF transformers Trainer's LabelSmoother",
                "NVIDIA DeepLearningExamples LabelSmoothing",
                "timm LabelSmoothingCrossEntropy; published LabelSmoothingCrossEntropy modules",
                "Keras CategoricalCrossentropy(label_smoothing); the Inception-v3 paper's formula",
            ],
        ),
        (
            "OffTarget(eps)",
            "q_y = 1-eps, q_k = eps/(K-1)",
            &[
                "Megatron-LM vocab_parallel_cross_entropy (after NeMo)",
                "fairseq label_smoothed_nll_loss",
                "PyTorch issue #7455 answers, PistonY torch-toolbox",
                "LabelSmoothingLoss modules with eps/(K-1)",
            ],
        ),
        (
            "Explicit { on: 1-eps, off: eps/K }",
            "q_y = 1-eps, q_k = eps/K (mass 1 - eps/K)",
            &["CoinCheung pytorch-loss LabelSmoothSoftmaxCEV1/V2"],
        ),
        (
            "OffTarget(eps) + excluded_class(PAD) + ignore_index(PAD)",
            "q_y = 1-eps, q_k = eps/(K-2), q_PAD = 0",
            &[
                "NJUNMT-pytorch NMTCriterion, OpenNMT-py LabelSmoothingLoss: \
                 both minimise KLDivLoss summed over tokens, i.e. this loss minus the (constant) \
                 entropy of q, with the same gradient",
            ],
        ),
    ];
    println!("\nWhich codebases use which convention (q_y at the label, q_k elsewhere):");
    for (lsce, q, codebases) in TABLE {
        println!("\n{lsce:<58} {q}");
        for codebase in codebases {
            println!("  - {codebase}");
        }
    }
}
