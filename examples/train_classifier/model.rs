//! The model: a one-hidden-layer MLP written in the example's own WGSL (`classifier.wgsl`,
//! beside this file): its parameter layout and initialisation, its kernels, and the dispatches
//! of its forward pass and of its backward pass from the gradient lsce writes over the logits.

use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use crate::data::{Rng, CLASSES, DIMS};
use crate::gpu::{storage, F32};

pub const HIDDEN: u32 = 64;

// The flat parameter buffer (and the gradient buffer, laid out identically), in f32 elements:
// W1 [DIMS x HIDDEN], b1 [HIDDEN], W2 [HIDDEN x CLASSES], b2 [CLASSES], all row-major.
const W1: u32 = 0;
const B1: u32 = W1 + DIMS * HIDDEN;
const W2: u32 = B1 + HIDDEN;
const B2: u32 = W2 + HIDDEN * CLASSES;
pub const PARAMETERS: u32 = B2 + CLASSES;

/// PyTorch's default `nn.Linear` initialisation: weights and biases uniform in
/// `±1/sqrt(fan_in)`.
pub fn initial_parameters(rng: &mut Rng) -> Vec<f32> {
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

/// The uniform of every kernel in `classifier.wgsl` (which spells the two
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
pub struct Kernels {
    matmul: wgpu::ComputePipeline,
    linear: wgpu::ComputePipeline,
    linear_relu: wgpu::ComputePipeline,
    matmul_relu_backward: wgpu::ComputePipeline,
    column_sums: wgpu::ComputePipeline,
    sgd: wgpu::ComputePipeline,
}

impl Kernels {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("example_classifier"),
            source: wgpu::ShaderSource::Wgsl(include_str!("classifier.wgsl").into()),
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
pub struct Dispatch {
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
pub fn record(encoder: &mut wgpu::CommandEncoder, label: &str, dispatches: &[Dispatch]) {
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

// Shader bindings (see classifier.wgsl).
const A: u32 = 1;
const B: u32 = 2;
const RELU_OUT: u32 = 3;
const C: u32 = 4;

/// The buffers of one forward pass over `rows` points, and its two dispatches.
pub struct Forward {
    hidden: wgpu::Buffer,
    /// The logits of the `rows` points, `[rows, CLASSES]`; lsce writes the gradient over them
    /// during training.
    pub logits: wgpu::Buffer,
    rows: u32,
    pub dispatches: Vec<Dispatch>,
}

impl Forward {
    /// `hidden = relu(x W1 + b1)`, `logits = hidden W2 + b2`.
    pub fn new(
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
            rows,
            dispatches,
        }
    }
}

/// The backward pass from `dz = dL/dlogits` (which lsce wrote over the logits of `forward`) to
/// the gradient of every parameter, then one SGD step of size `learning_rate`.
pub fn backward(
    device: &wgpu::Device,
    kernels: &Kernels,
    forward: &Forward,
    x: &wgpu::Buffer,
    params: &wgpu::Buffer,
    grads: &wgpu::Buffer,
    learning_rate: f32,
) -> Vec<Dispatch> {
    let dz = &forward.logits;
    let rows = forward.rows;
    let d_hidden = storage(
        device,
        "d_hidden",
        u64::from(rows * HIDDEN) * F32,
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
        m: rows,
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
                rows,
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
                rows,
                HIDDEN,
                CLASSES,
                View::matrix(0, CLASSES),
                View::transposed(W2, CLASSES),
                0,
            ),
            rows * HIDDEN,
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
                rows,
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
                lr: learning_rate,
                ..Op::default()
            },
            PARAMETERS,
            &[(A, grads), (C, params)],
        ),
    ]
}
