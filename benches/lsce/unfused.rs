//! The bench's own WGSL kernels (`bench.wgsl`, beside this file): the unfused baseline, one
//! kernel per step as PyTorch eager runs the loss, and the references the fused plan is measured
//! against (copy and read), plus the fill that generates the logits. Here: their pipelines,
//! their per-window parameters and bindings, and their dispatches.

use bytemuck::{Pod, Zeroable};
use lsce::{Dtype, LossSpec, Shape};

use crate::windows::{Span, Window};

/// The kernels of bench.wgsl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Fill,
    Copy,
    Read,
    Lse,
    LogSoftmax,
    Loss,
    Mean,
    Grad,
}

/// How a kernel is dispatched over a window.
enum Grid {
    /// Grid-stride over the window's vec4s.
    Stream,
    /// One workgroup per row of the window.
    Rows,
    /// One workgroup for the whole problem (not per window).
    Single,
}

/// The bindings of bench.wgsl (`@binding(n)`).
#[derive(Clone, Copy, Debug)]
enum Binding {
    Params = 0,
    Logits = 1,
    LogSoftmax = 2,
    Labels = 3,
    Lse = 4,
    RowLoss = 5,
    Out = 6,
    Src = 7,
    Dst = 8,
    Fill = 9,
    Grad = 10,
}

/// Every dtype, each checked at start-up.
pub const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

/// The value of the override constant `FORMAT` of bench.wgsl for `dtype` (its `F32`,
/// `F16` and `BF16`).
fn format_constant(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 0.0,
        Dtype::F16 => 1.0,
        Dtype::Bf16 => 2.0,
    }
}

impl Kernel {
    const ALL: [Kernel; 8] = [
        Kernel::Fill,
        Kernel::Copy,
        Kernel::Read,
        Kernel::Lse,
        Kernel::LogSoftmax,
        Kernel::Loss,
        Kernel::Mean,
        Kernel::Grad,
    ];
    /// The unfused loss, in execution order.
    pub const UNFUSED: &'static [Kernel] = &[
        Kernel::Lse,
        Kernel::LogSoftmax,
        Kernel::Loss,
        Kernel::Mean,
        Kernel::Grad,
    ];

    fn entry(self) -> &'static str {
        match self {
            Kernel::Fill => "fill_main",
            Kernel::Copy => "copy_main",
            Kernel::Read => "read_main",
            Kernel::Lse => "lse_main",
            Kernel::LogSoftmax => "logsm_main",
            Kernel::Loss => "loss_main",
            Kernel::Mean => "mean_main",
            Kernel::Grad => "grad_main",
        }
    }

    /// The bindings the entry point uses: its pipeline's automatic layout has exactly these.
    fn bindings(self) -> &'static [Binding] {
        use Binding::*;
        match self {
            Kernel::Fill => &[Params, Fill],
            Kernel::Copy | Kernel::Read => &[Params, Src, Dst],
            Kernel::Lse => &[Params, Logits, Lse],
            Kernel::LogSoftmax => &[Params, Logits, LogSoftmax, Lse],
            Kernel::Loss => &[Params, LogSoftmax, Labels, RowLoss],
            Kernel::Mean => &[Params, Labels, RowLoss, Out],
            // `Grad` (the 16-bit gradient) is in the layout for every FORMAT, which wgpu
            // derives before the constant is applied; with f32 it is bound and never written.
            Kernel::Grad => &[Params, LogSoftmax, Labels, Out, Grad],
        }
    }

    /// Whether the kernel looks inside the elements, so that its pipeline depends on `FORMAT`;
    /// copy and read move words.
    fn per_format(self) -> bool {
        !matches!(self, Kernel::Copy | Kernel::Read)
    }

    fn grid(self) -> Grid {
        match self {
            Kernel::Fill | Kernel::Copy | Kernel::Read => Grid::Stream,
            Kernel::Mean => Grid::Single,
            _ => Grid::Rows,
        }
    }
}

/// Per-window parameters; must match `struct Params` in bench.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    rows: u32,
    classes: u32,
    row_begin: u32,
    base: u32,
    logsm_base: u32,
    vec4s: u32,
    vec4_begin: u32,
    total_rows: u32,
    ignore_index: i32,
    on: f32,
    off: f32,
    mass: f32,
    sink: u32,
}

/// Workgroup size of every kernel in bench.wgsl (`WG` there).
const WG: u32 = 256;
/// Most workgroups a streaming kernel is dispatched with; its grid-stride loop covers the rest.
/// 4M invocations are several full waves on any GPU.
const STREAM_GROUPS: u32 = 16384;

/// The pipelines of every kernel: per dtype if `Kernel::per_format`, else once (keyed `F32`).
pub struct Pipelines(Vec<(Kernel, Dtype, wgpu::ComputePipeline)>);

impl Pipelines {
    pub fn new(device: &wgpu::Device) -> Result<Self, String> {
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("lsce bench"),
            source: wgpu::ShaderSource::Wgsl(include_str!("bench.wgsl").into()),
        });
        let pipelines = Kernel::ALL
            .iter()
            .flat_map(|&k| {
                DTYPES
                    .iter()
                    .filter(move |&&d| k.per_format() || d == Dtype::F32)
                    .map(move |&d| (k, d))
            })
            .map(|(k, d)| {
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(k.entry()),
                    layout: None,
                    module: &module,
                    entry_point: Some(k.entry()),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &[("FORMAT", format_constant(d))],
                        ..Default::default()
                    },
                    cache: None,
                });
                (k, d, pipeline)
            })
            .collect();
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("compiling bench.wgsl: {e}"));
        }
        Ok(Self(pipelines))
    }

    fn get(&self, k: Kernel, dtype: Dtype) -> &wgpu::ComputePipeline {
        let dtype = if k.per_format() { dtype } else { Dtype::F32 };
        self.0
            .iter()
            .find(|p| p.0 == k && p.1 == dtype)
            .map(|p| &p.2)
            .expect("every kernel is compiled for every dtype it depends on")
    }
}

/// The buffers of a case that the kernels bind.
pub struct Buffers<'a> {
    pub logits: &'a wgpu::Buffer,
    /// The gradient, and the copy's destination.
    pub grad: &'a wgpu::Buffer,
    /// The f32 log_softmax (the gradient's buffer with f32 logits).
    pub logsm: &'a wgpu::Buffer,
    pub labels: &'a wgpu::Buffer,
    pub lse: &'a wgpu::Buffer,
    pub row_loss: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
}

/// The kernels' bind groups for one case: per kernel (in `Kernel::ALL` order), per window, with
/// the per-window parameters they read.
pub struct Bindings {
    dtype: Dtype,
    windows: Vec<Window>,
    groups: Vec<Vec<wgpu::BindGroup>>,
}

impl Bindings {
    pub fn new(
        device: &wgpu::Device,
        pipelines: &Pipelines,
        shape: Shape,
        dtype: Dtype,
        windows: Vec<Window>,
        buffers: &Buffers<'_>,
    ) -> Result<Self, String> {
        use wgpu::util::DeviceExt;
        let limits = device.limits();
        let spec = LossSpec::pytorch(0.1);
        let q = spec.resolve(shape.classes()).map_err(|e| e.to_string())?;
        let stride = (std::mem::size_of::<Params>() as u64)
            .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment));
        let mut params = vec![0u8; (stride * windows.len() as u64) as usize];
        for (i, w) in windows.iter().enumerate() {
            let p = Params {
                rows: w.rows,
                classes: shape.classes(),
                row_begin: w.first_row,
                base: w.data.base,
                logsm_base: w.logsm.base,
                vec4s: (w.data.stream_bytes / 16) as u32,
                vec4_begin: (w.data.offset / 16) as u32,
                total_rows: shape.rows(),
                ignore_index: spec.ignore_index.unwrap_or(i32::MIN),
                on: q.on as f32,
                off: q.off as f32,
                mass: (q.on + q.off * f64::from(shape.classes() - 1)) as f32,
                // Any value: a wrapping sum of the words equals it by chance only.
                sink: 0x5eed_5eed,
            };
            let at = i * stride as usize;
            params[at..at + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&p));
        }
        let params = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("lsce bench params"),
            contents: &params,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let groups = Kernel::ALL
            .iter()
            .map(|&k| {
                let layout = pipelines.get(k, dtype).get_bind_group_layout(0);
                windows
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let window = |buffer, span: Span| (buffer, span.offset, Some(span.size));
                        let whole = |buffer| (buffer, 0, None);
                        let entries: Vec<_> = k
                            .bindings()
                            .iter()
                            .map(|&b| {
                                let (buffer, offset, size) = match b {
                                    Binding::Params => (
                                        &params,
                                        i as u64 * stride,
                                        Some(std::mem::size_of::<Params>() as u64),
                                    ),
                                    Binding::Logits | Binding::Src | Binding::Fill => {
                                        window(buffers.logits, w.data)
                                    }
                                    Binding::Dst | Binding::Grad => window(buffers.grad, w.data),
                                    Binding::LogSoftmax => window(buffers.logsm, w.logsm),
                                    Binding::Labels => whole(buffers.labels),
                                    Binding::Lse => whole(buffers.lse),
                                    Binding::RowLoss => whole(buffers.row_loss),
                                    Binding::Out => whole(buffers.out),
                                };
                                wgpu::BindGroupEntry {
                                    binding: b as u32,
                                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                        buffer,
                                        offset,
                                        size: size.and_then(wgpu::BufferSize::new),
                                    }),
                                }
                            })
                            .collect();
                        device.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some(k.entry()),
                            layout: &layout,
                            entries: &entries,
                        })
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            dtype,
            windows,
            groups,
        })
    }

    /// How many windows the rows are cut into.
    pub fn windows(&self) -> usize {
        self.windows.len()
    }

    /// Records `kernels` in `pass`, each over every window. A dispatch has at most
    /// `max_groups` workgroups in a dimension (the device's limit), a streaming kernel's at most
    /// `max_stream_groups` in all.
    pub fn record(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        pipelines: &Pipelines,
        kernels: &[Kernel],
        max_groups: u32,
        max_stream_groups: u32,
    ) {
        for &k in kernels {
            pass.set_pipeline(pipelines.get(k, self.dtype));
            let groups = &self.groups[Kernel::ALL.iter().position(|&x| x == k).expect("listed")];
            for (w, group) in self.windows.iter().zip(groups) {
                pass.set_bind_group(0, group, &[]);
                match k.grid() {
                    Grid::Stream => {
                        let n = (w.data.stream_bytes / 16).div_ceil(u64::from(WG)) as u32;
                        pass.dispatch_workgroups(
                            n.min(STREAM_GROUPS)
                                .min(max_groups)
                                .min(max_stream_groups)
                                .max(1),
                            1,
                            1,
                        );
                    }
                    // A 2D grid keeps each dimension within the limit; the shaders flatten it.
                    Grid::Rows => {
                        let x = w.rows.min(max_groups);
                        pass.dispatch_workgroups(x, w.rows.div_ceil(x), 1);
                    }
                    Grid::Single => {
                        pass.dispatch_workgroups(1, 1, 1);
                        break;
                    }
                }
            }
        }
    }
}
