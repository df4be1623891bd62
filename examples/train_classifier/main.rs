//! Trains a small classifier the way an engine uses lsce: the example owns the device, every
//! buffer and one `CommandEncoder` per training step, and lsce records the loss and its gradient
//! into that encoder between the example's own WGSL forward and backward passes
//! (`shaders/example_classifier.wgsl`). Nothing is read back while training except the
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

use std::error::Error;
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use lsce::{
    Gradient, LossBinding, LossBuffers, LossKernel, LossPlan, LossSpec, Problem, Shape, Summary,
};
use wgpu::util::DeviceExt;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const CLASSES: u32 = 10;
const DIMS: u32 = 24;
const HIDDEN: u32 = 64;
const TRAIN_POINTS: u32 = 3000;
const TEST_POINTS: u32 = 2000;
/// Every `FLIP_EVERY`-th training label is replaced by a uniformly chosen other class: 20%.
const FLIP_EVERY: usize = 5;
/// Standard deviation of the class centres' coordinates, against unit noise within a class:
/// small enough that neighbouring blobs overlap.
const CENTRE_SPREAD: f64 = 0.55;
const BATCH: u32 = 100;
const BATCHES_PER_EPOCH: u32 = TRAIN_POINTS / BATCH;
/// The default; the first command-line argument overrides it.
const EPOCHS: u32 = 60;
const LEARNING_RATE: f32 = 0.2;
const REPORT_EVERY: u32 = 10;
const ECE_BINS: usize = 15;
const SEED: u64 = 2024;
const SMOOTHING: [f32; 2] = [0.0, 0.1];

// The flat parameter buffer (and the gradient buffer, laid out identically), in f32 elements:
// W1 [DIMS x HIDDEN], b1 [HIDDEN], W2 [HIDDEN x CLASSES], b2 [CLASSES], all row-major.
const W1: u32 = 0;
const B1: u32 = W1 + DIMS * HIDDEN;
const W2: u32 = B1 + HIDDEN;
const B2: u32 = W2 + HIDDEN * CLASSES;
const PARAMETERS: u32 = B2 + CLASSES;

const F32: u64 = 4;

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

    let mut rng = Rng(SEED);
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
    let model = Model::new(&device, &kernel, &data)?;
    let mut outcomes = Vec::new();
    for eps in SMOOTHING {
        println!("\ntraining with LossSpec::pytorch({eps}) (PyTorch's label_smoothing={eps})");
        queue.write_buffer(&model.params, 0, bytemuck::cast_slice(&initial));
        let time = model.train(&queue, &kernel, eps, epochs)?;
        println!(
            "trained {steps} steps in {:.2} s ({:.2} ms/step)",
            time.as_secs_f64(),
            time.as_secs_f64() * 1e3 / f64::from(steps)
        );
        outcomes.push(Outcome::measure(&queue, &model, &data, eps, time)?);
    }
    Outcome::print_table(&outcomes);
    Ok(())
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
    fn below(&mut self, n: u32) -> u32 {
        (self.uniform() * f64::from(n)) as u32
    }

    /// Standard normal (Box-Muller; `1 - u` keeps the logarithm finite).
    fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// The synthetic data set, row-major `[points, DIMS]`.
struct Data {
    centres: Vec<f64>,
    train_x: Vec<f32>,
    /// The labels training sees, 20% of them wrong.
    train_labels: Vec<i32>,
    /// The true classes of the training points.
    train_clean: Vec<i32>,
    test_x: Vec<f32>,
    test_labels: Vec<i32>,
}

impl Data {
    fn generate(rng: &mut Rng) -> Self {
        let centres: Vec<f64> = (0..CLASSES * DIMS)
            .map(|_| CENTRE_SPREAD * rng.normal())
            .collect();
        let mut sample = |points: u32| {
            let mut x = Vec::with_capacity((points * DIMS) as usize);
            let mut labels = Vec::with_capacity(points as usize);
            for _ in 0..points {
                let class = rng.below(CLASSES);
                let centre = &centres[(class * DIMS) as usize..][..DIMS as usize];
                x.extend(centre.iter().map(|c| (c + rng.normal()) as f32));
                labels.push(class as i32);
            }
            (x, labels)
        };
        let (train_x, train_clean) = sample(TRAIN_POINTS);
        let (test_x, test_labels) = sample(TEST_POINTS);
        // The points are i.i.d., so every fifth one is a random fifth, and it spreads the wrong
        // labels evenly over the minibatches.
        let train_labels = train_clean
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
            centres,
            train_x,
            train_labels,
            train_clean,
            test_x,
            test_labels,
        }
    }

    /// Accuracy of the best possible classifier on the held-out set: with equal priors and the
    /// same isotropic noise in every class, that is the nearest true centre.
    fn bayes_accuracy(&self) -> f64 {
        let dims = DIMS as usize;
        let right = self
            .test_x
            .chunks(dims)
            .zip(&self.test_labels)
            .filter(|(x, &y)| {
                let distance = |c: &[f64]| -> f64 {
                    x.iter()
                        .zip(c)
                        .map(|(&x, c)| (f64::from(x) - c).powi(2))
                        .sum()
                };
                let nearest = self
                    .centres
                    .chunks(dims)
                    .map(distance)
                    .enumerate()
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(class, _)| class as i32);
                nearest == Some(y)
            })
            .count();
        right as f64 / self.test_labels.len() as f64
    }
}

/// PyTorch's default `nn.Linear` initialisation: weights and biases uniform in
/// `±1/sqrt(fan_in)`.
fn initial_parameters(rng: &mut Rng) -> Vec<f32> {
    let mut layer = |fan_in: u32, count: u32| -> Vec<f32> {
        let bound = 1.0 / f64::from(fan_in).sqrt();
        (0..count)
            .map(|_| (bound * (2.0 * rng.uniform() - 1.0)) as f32)
            .collect()
    };
    let parameters = [
        layer(DIMS, DIMS * HIDDEN),
        layer(DIMS, HIDDEN),
        layer(HIDDEN, HIDDEN * CLASSES),
        layer(HIDDEN, CLASSES),
    ]
    .concat();
    debug_assert_eq!(parameters.len(), PARAMETERS as usize);
    parameters
}

/// A matrix operand of [`Op`]: element `(i, p)` is at `offset + i * row + p * col`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct View {
    offset: u32,
    row: u32,
    col: u32,
}

impl View {
    /// A row-major matrix with `cols` columns starting at element `offset`.
    fn matrix(offset: u32, cols: u32) -> Self {
        Self {
            offset,
            row: cols,
            col: 1,
        }
    }

    /// The transpose of `View::matrix(offset, cols)`, read in place.
    fn transposed(offset: u32, cols: u32) -> Self {
        Self {
            offset,
            row: 1,
            col: cols,
        }
    }
}

/// The uniform of every kernel in `shaders/example_classifier.wgsl` (which spells the two
/// views out field by field: a nested 12-byte struct would be padded to 16 there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct Op {
    m: u32,
    n: u32,
    k: u32,
    a: View,
    b: View,
    bias_offset: u32,
    c_offset: u32,
    lr: f32,
}

/// The example's own pipelines, one per entry point of its shader.
struct Kernels {
    matmul: wgpu::ComputePipeline,
    linear: wgpu::ComputePipeline,
    linear_relu: wgpu::ComputePipeline,
    matmul_relu_backward: wgpu::ComputePipeline,
    column_sums: wgpu::ComputePipeline,
    sgd: wgpu::ComputePipeline,
}

impl Kernels {
    fn new(device: &wgpu::Device) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("example_classifier"),
            source: wgpu::ShaderSource::Wgsl(
                include_str!("classifier.wgsl").into(),
            ),
        });
        let pipeline = |entry| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        Self {
            matmul: pipeline("matmul"),
            linear: pipeline("linear"),
            linear_relu: pipeline("linear_relu"),
            matmul_relu_backward: pipeline("matmul_relu_backward"),
            column_sums: pipeline("column_sums"),
            sgd: pipeline("sgd"),
        }
    }
}

/// One kernel launch with its uniform and bindings, built once and recorded every step.
struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    workgroups: u32,
}

/// Must match `WG` in the shader.
const WORKGROUP: u32 = 64;

impl Dispatch {
    /// `threads` invocations of `pipeline` reading `op` at binding 0 and `buffers` at the given
    /// bindings (exactly those its entry point uses: the layout is derived from the shader).
    fn new(
        device: &wgpu::Device,
        pipeline: &wgpu::ComputePipeline,
        op: Op,
        threads: u32,
        buffers: &[(u32, &wgpu::Buffer)],
    ) -> Self {
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("op"),
            contents: bytemuck::bytes_of(&op),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        entries.extend(
            buffers
                .iter()
                .map(|&(binding, buffer)| wgpu::BindGroupEntry {
                    binding,
                    resource: buffer.as_entire_binding(),
                }),
        );
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Self {
            pipeline: pipeline.clone(),
            bind_group,
            workgroups: threads.div_ceil(WORKGROUP),
        }
    }
}

/// Records `dispatches` in order in one compute pass (wgpu orders their storage accesses).
fn record(encoder: &mut wgpu::CommandEncoder, label: &str, dispatches: &[Dispatch]) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    for d in dispatches {
        pass.set_pipeline(&d.pipeline);
        pass.set_bind_group(0, &d.bind_group, &[]);
        pass.dispatch_workgroups(d.workgroups, 1, 1);
    }
}

// Shader bindings (see shaders/example_classifier.wgsl).
const A: u32 = 1;
const B: u32 = 2;
const RELU_OUT: u32 = 3;
const C: u32 = 4;

/// An uninitialised storage buffer with extra `usage`.
fn storage(
    device: &wgpu::Device,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | usage,
        mapped_at_creation: false,
    })
}

/// A storage buffer holding `data`, with extra `usage`.
fn upload<T: Pod>(
    device: &wgpu::Device,
    label: &str,
    data: &[T],
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::cast_slice(data),
        usage: wgpu::BufferUsages::STORAGE | usage,
    })
}

/// The buffers of one forward pass over `rows` points, and its two dispatches.
struct Forward {
    hidden: wgpu::Buffer,
    logits: wgpu::Buffer,
    dispatches: Vec<Dispatch>,
}

impl Forward {
    /// `hidden = relu(x W1 + b1)`, `logits = hidden W2 + b2`.
    fn new(
        device: &wgpu::Device,
        kernels: &Kernels,
        params: &wgpu::Buffer,
        x: &wgpu::Buffer,
        rows: u32,
    ) -> Self {
        let hidden = storage(
            device,
            "hidden",
            u64::from(rows * HIDDEN) * F32,
            wgpu::BufferUsages::empty(),
        );
        // COPY_SRC: evaluation reads the logits back.
        let logits = storage(
            device,
            "logits",
            u64::from(rows * CLASSES) * F32,
            wgpu::BufferUsages::COPY_SRC,
        );
        let dispatches = vec![
            Dispatch::new(
                device,
                &kernels.linear_relu,
                Op {
                    m: rows,
                    n: HIDDEN,
                    k: DIMS,
                    a: View::matrix(0, DIMS),
                    b: View::matrix(W1, HIDDEN),
                    bias_offset: B1,
                    ..Op::default()
                },
                rows * HIDDEN,
                &[(A, x), (B, params), (C, &hidden)],
            ),
            Dispatch::new(
                device,
                &kernels.linear,
                Op {
                    m: rows,
                    n: CLASSES,
                    k: HIDDEN,
                    a: View::matrix(0, HIDDEN),
                    b: View::matrix(W2, CLASSES),
                    bias_offset: B2,
                    ..Op::default()
                },
                rows * CLASSES,
                &[(A, &hidden), (B, params), (C, &logits)],
            ),
        ];
        Self {
            hidden,
            logits,
            dispatches,
        }
    }
}

/// The backward pass from `dz = dL/dlogits` (which lsce wrote over the logits) to the gradient
/// of every parameter, then one SGD step.
fn backward(
    device: &wgpu::Device,
    kernels: &Kernels,
    forward: &Forward,
    x: &wgpu::Buffer,
    params: &wgpu::Buffer,
    grads: &wgpu::Buffer,
) -> Vec<Dispatch> {
    let dz = &forward.logits;
    let d_hidden = storage(
        device,
        "d_hidden",
        u64::from(BATCH * HIDDEN) * F32,
        wgpu::BufferUsages::empty(),
    );
    let product = |m, n, k, a, b, c_offset| Op {
        m,
        n,
        k,
        a,
        b,
        c_offset,
        ..Op::default()
    };
    let column_sums = |cols, c_offset| Op {
        m: BATCH,
        n: cols,
        a: View::matrix(0, cols),
        c_offset,
        ..Op::default()
    };
    vec![
        // dW2 = H^T dz, db2 = column sums of dz.
        Dispatch::new(
            device,
            &kernels.matmul,
            product(
                HIDDEN,
                CLASSES,
                BATCH,
                View::transposed(0, HIDDEN),
                View::matrix(0, CLASSES),
                W2,
            ),
            HIDDEN * CLASSES,
            &[(A, &forward.hidden), (B, dz), (C, grads)],
        ),
        Dispatch::new(
            device,
            &kernels.column_sums,
            column_sums(CLASSES, B2),
            CLASSES,
            &[(A, dz), (C, grads)],
        ),
        // dH = (dz W2^T) * relu'(H): W2^T is read in place from the parameter buffer.
        Dispatch::new(
            device,
            &kernels.matmul_relu_backward,
            product(
                BATCH,
                HIDDEN,
                CLASSES,
                View::matrix(0, CLASSES),
                View::transposed(W2, CLASSES),
                0,
            ),
            BATCH * HIDDEN,
            &[
                (A, dz),
                (B, params),
                (RELU_OUT, &forward.hidden),
                (C, &d_hidden),
            ],
        ),
        // dW1 = X^T dH, db1 = column sums of dH.
        Dispatch::new(
            device,
            &kernels.matmul,
            product(
                DIMS,
                HIDDEN,
                BATCH,
                View::transposed(0, DIMS),
                View::matrix(0, HIDDEN),
                W1,
            ),
            DIMS * HIDDEN,
            &[(A, x), (B, &d_hidden), (C, grads)],
        ),
        Dispatch::new(
            device,
            &kernels.column_sums,
            column_sums(HIDDEN, B1),
            HIDDEN,
            &[(A, &d_hidden), (C, grads)],
        ),
        // Every parameter at once: the gradient buffer has the parameters' layout.
        Dispatch::new(
            device,
            &kernels.sgd,
            Op {
                m: PARAMETERS,
                lr: LEARNING_RATE,
                ..Op::default()
            },
            PARAMETERS,
            &[(A, grads), (C, params)],
        ),
    ]
}

/// A whole data set evaluated at once: the forward pass, then a forward-only lsce plan (plain
/// cross-entropy, accuracy, and the per-row log-sum-exp that turns logits into probabilities).
struct Evaluation {
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
    fn new(
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

    fn run(&self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<Evaluated> {
        let mut encoder = device.create_command_encoder(&Default::default());
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
            device,
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

/// Everything on the GPU, built once: the data, the parameters, the training step's buffers and
/// dispatches, and the two evaluations.
struct Model {
    device: wgpu::Device,
    params: wgpu::Buffer,
    train_x: wgpu::Buffer,
    train_labels: wgpu::Buffer,
    /// This step's minibatch: the static bind groups read it, a copy fills it.
    batch_x: wgpu::Buffer,
    forward: Forward,
    backward: Vec<Dispatch>,
    summary: wgpu::Buffer,
    test: Evaluation,
    train_eval: Evaluation,
}

impl Model {
    fn new(device: &wgpu::Device, kernel: &LossKernel, data: &Data) -> Result<Self> {
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
        let backward = backward(device, &kernels, &forward, &batch_x, &params, &grads);
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
    fn train(
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

/// Appends copies of `sources` into one new mappable buffer, submits `encoder`, waits, and
/// returns the bytes of each source.
fn submit_and_read(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    mut encoder: wgpu::CommandEncoder,
    sources: &[&wgpu::Buffer],
) -> Result<Vec<Vec<u8>>> {
    let total = sources.iter().map(|b| b.size()).sum();
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: total,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut at = 0;
    for source in sources {
        encoder.copy_buffer_to_buffer(source, 0, &readback, at, source.size());
        at += source.size();
    }
    queue.submit([encoder.finish()]);
    let (sender, receiver) = std::sync::mpsc::channel();
    readback.map_async(wgpu::MapMode::Read, .., move |result| {
        // The receiver outlives the poll below, which runs this callback.
        let _ = sender.send(result);
    });
    device.poll(wgpu::PollType::wait_indefinitely())?;
    receiver.recv()??;
    let view = readback.get_mapped_range(..)?;
    let mut at = 0;
    Ok(sources
        .iter()
        .map(|source| {
            let bytes = view[at..at + source.size() as usize].to_vec();
            at += source.size() as usize;
            bytes
        })
        .collect())
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
struct Outcome {
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
    fn measure(
        queue: &wgpu::Queue,
        model: &Model,
        data: &Data,
        eps: f32,
        time: Duration,
    ) -> Result<Self> {
        let test = model.test.run(&model.device, queue)?;
        let test_predictions = predictions(&test);
        // Its summary counts agreement with the noisy labels; the true classes are on the host.
        let train = predictions(&model.train_eval.run(&model.device, queue)?);
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

    fn print_table(outcomes: &[Outcome]) {
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
