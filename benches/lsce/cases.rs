//! The cases: for one shape and dtype, the buffers, the fused and forward plans, the bench's
//! own kernels, and their timing (GPU timestamps or the wall clock, median of repeats), beside
//! the CPU reference's time.

use std::time::Instant;

use lsce::{
    cpu, Batch, Dtype, Gradient, Logits, LossBuffers, LossPlan, LossSpec, Problem, Shape, Summary,
};

use crate::cli::{Options, CPU_MAX_ELEMENTS};
use crate::gpu::Gpu;
use crate::report::{human_bytes, Measures};
use crate::unfused::{Bindings, Buffers, Kernel};
use crate::windows::{tensor_buffer_bytes, window_slack, windows};

/// The bench's problem: `LossSpec::pytorch(0.1)` on class labels, logits and gradient in `dtype`.
pub fn problem(shape: Shape, dtype: Dtype, gradient: Gradient) -> Problem {
    Problem::new(LossSpec::pytorch(0.1), shape)
        .with_dtype(dtype)
        .with_gradient(gradient)
}

/// What one timed pass runs.
#[derive(Clone, Copy)]
pub enum Workload<'a> {
    Kernels(&'a [Kernel]),
    Plan(&'a LossPlan),
}

impl Gpu {
    /// Measures one case; `Err` says why it was skipped.
    pub fn run_case(
        &self,
        shape: Shape,
        dtype: Dtype,
        max_memory: Option<u64>,
        options: &Options,
        tag: &str,
    ) -> Result<Measures, String> {
        self.fits(shape, dtype, max_memory)?;
        let plan = |gradient| {
            self.kernel
                .plan(&problem(shape, dtype, gradient))
                .map_err(|e| format!("the crate cannot plan it: {e}"))
        };
        let (fused, forward) = (plan(Gradient::Separate)?, plan(Gradient::None)?);
        let labels = labels(shape, false);
        let case = Case::new(self, shape, dtype, &labels, None)?;
        case.run(Workload::Kernels(&[Kernel::Fill]))?;
        let time = |name: &str, w| -> Result<f64, String> {
            let (ms, wall_ms) = case.time(w, options.warmup, options.repeats)?;
            eprintln!("{tag}: {name:<8} {ms:10.3} ms (wall clock {wall_ms:.3} ms)");
            Ok(ms)
        };
        let copy_ms = time("copy", Workload::Kernels(&[Kernel::Copy]))?;
        let read_ms = time("read", Workload::Kernels(&[Kernel::Read]))?;
        let fused_ms = time("fused", Workload::Plan(&fused))?;
        let forward_ms = time("forward", Workload::Plan(&forward))?;
        let unfused_ms = time("unfused", Workload::Kernels(Kernel::UNFUSED))?;
        let (cpu_ms, cpu_rows) = case.cpu_time(&labels, options.repeats.min(3))?;
        eprintln!("{tag}: cpu      {cpu_ms:10.3} ms ({cpu_rows} rows timed)");
        Ok(Measures {
            copy_ms,
            read_ms,
            fused_ms,
            forward_ms,
            unfused_ms,
            cpu_ms,
            cpu_rows,
            scratch_bytes: fused.scratch_bytes(),
            plan_windows: fused.windows(),
        })
    }

    /// Whether a shape fits the adapter: buffer and binding limits, and the memory budget.
    fn fits(&self, shape: Shape, dtype: Dtype, max_memory: Option<u64>) -> Result<(), String> {
        let limits = self.device.limits();
        // The largest buffer and the widest row binding are f32 in every dtype: the logits', or
        // with 16 bits the unfused baseline's log_softmax.
        let largest = tensor_buffer_bytes(shape, Dtype::F32);
        if largest > limits.max_buffer_size {
            return Err(format!(
                "a {} f32 logits or log_softmax buffer exceeds max_buffer_size ({})",
                human_bytes(largest),
                human_bytes(limits.max_buffer_size)
            ));
        }
        let row_bytes = u64::from(shape.classes()) * Dtype::F32.bytes();
        if row_bytes + window_slack(&limits) > limits.max_storage_buffer_binding_size {
            return Err(format!(
                "one f32 row ({}) exceeds max_storage_buffer_binding_size ({})",
                human_bytes(row_bytes),
                human_bytes(limits.max_storage_buffer_binding_size)
            ));
        }
        if u64::from(shape.rows()) * 4 > limits.max_storage_buffer_binding_size {
            return Err("the per-row buffers exceed max_storage_buffer_binding_size".into());
        }
        let bytes = case_bytes(shape, dtype);
        if let Some(budget) = max_memory.filter(|&m| bytes > m) {
            return Err(format!(
                "the rows x classes buffers ({}) exceed the memory budget of {} (--max-memory)",
                human_bytes(bytes),
                human_bytes(budget)
            ));
        }
        Ok(())
    }
}

/// Bytes of a case's `rows x classes` buffers: logits and gradient, and with 16 bits the
/// unfused baseline's f32 log_softmax (with f32 it shares the gradient's buffer).
fn case_bytes(shape: Shape, dtype: Dtype) -> u64 {
    let logsm = if dtype == Dtype::F32 {
        0
    } else {
        tensor_buffer_bytes(shape, Dtype::F32)
    };
    2 * tensor_buffer_bytes(shape, dtype) + logsm
}

/// Bytes of `shape`'s elements of `dtype`, rounded up to the 4 that a buffer copy needs.
pub fn elements_bytes(shape: Shape, dtype: Dtype) -> u64 {
    (shape.elements() * dtype.bytes()).next_multiple_of(4)
}

/// Elements read back from the GPU, as the host takes them.
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Bf16(Vec<u16>),
}

impl HostData {
    /// The first `n` elements of `dtype` in `bytes`.
    pub fn new(dtype: Dtype, bytes: &[u8], n: usize) -> Self {
        let take = &bytes[..n * dtype.bytes() as usize];
        match dtype {
            Dtype::F32 => HostData::F32(bytemuck::pod_collect_to_vec(take)),
            Dtype::F16 => HostData::F16(bytemuck::pod_collect_to_vec(take)),
            Dtype::Bf16 => HostData::Bf16(bytemuck::pod_collect_to_vec(take)),
        }
    }

    pub fn logits(&self) -> Logits<'_> {
        match self {
            HostData::F32(v) => Logits::F32(v),
            HostData::F16(v) => Logits::F16(v),
            HostData::Bf16(v) => Logits::Bf16(v),
        }
    }

    /// The values, decoded exactly (through `Logits::get`, as `lsce::cpu` decodes logits).
    fn to_f32(&self) -> Vec<f32> {
        let v = self.logits();
        (0..v.len()).map(|i| v.get(i) as f32).collect()
    }
}

/// Class labels: `(7919 r + 13) mod classes`, every 7th row ignored when `with_ignored`.
pub fn labels(shape: Shape, with_ignored: bool) -> Vec<i32> {
    (0..u64::from(shape.rows()))
        .map(|r| {
            if with_ignored && r % 7 == 6 {
                -100
            } else {
                ((r * 7919 + 13) % u64::from(shape.classes())) as i32
            }
        })
        .collect()
}

/// The buffers of one shape and dtype, and the bench's own kernels' bindings over its windows.
pub struct Case<'g> {
    gpu: &'g Gpu,
    shape: Shape,
    dtype: Dtype,
    pub logits: wgpu::Buffer,
    /// The fused and the unfused gradient, and the copy's destination; with f32 also the
    /// unfused log_softmax (with 16 bits that has a buffer of its own, which only the bind
    /// groups hold).
    pub grad: wgpu::Buffer,
    labels: wgpu::Buffer,
    pub out: wgpu::Buffer,
    pub summary: wgpu::Buffer,
    /// The bench's own kernels' bindings, over the case's row windows.
    pub unfused: Bindings,
}

impl<'g> Case<'g> {
    /// Allocates the buffers (an adapter out of memory gives `Err`) and the bind groups.
    /// `binding_cap` lowers the binding size limit, to test the windows.
    pub fn new(
        gpu: &'g Gpu,
        shape: Shape,
        dtype: Dtype,
        labels: &[i32],
        binding_cap: Option<u64>,
    ) -> Result<Self, String> {
        use wgpu::util::DeviceExt;
        let device = &gpu.device;
        let limits = device.limits();
        let windows = windows(shape, dtype, &limits, binding_cap)?;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let buffer = |label, size| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: storage,
                mapped_at_creation: false,
            })
        };
        let bytes = tensor_buffer_bytes(shape, dtype);
        let rows_bytes = u64::from(shape.rows()) * 4;
        let logits = buffer("lsce bench logits", bytes);
        let grad = buffer("lsce bench grad", bytes);
        let separate_logsm = (dtype != Dtype::F32).then(|| {
            buffer(
                "lsce bench log_softmax",
                tensor_buffer_bytes(shape, Dtype::F32),
            )
        });
        let logsm = separate_logsm.as_ref().unwrap_or(&grad);
        let lse = buffer("lsce bench lse", rows_bytes);
        let row_loss = buffer("lsce bench row loss", rows_bytes);
        let out = buffer("lsce bench out", 16);
        let summary = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lsce bench summary"),
            size: Summary::SIZE,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let labels = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("lsce bench labels"),
            contents: bytemuck::cast_slice(labels),
            usage: storage,
        });

        let unfused = Bindings::new(
            device,
            &gpu.unfused,
            shape,
            dtype,
            windows,
            &Buffers {
                logits: &logits,
                grad: &grad,
                logsm,
                labels: &labels,
                lse: &lse,
                row_loss: &row_loss,
                out: &out,
            },
        )?;
        if let Some(e) = pollster::block_on(validation.pop()) {
            return Err(format!("setting up the buffers: {e}"));
        }
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(format!("the adapter is out of memory: {e}"));
        }
        Ok(Self {
            gpu,
            shape,
            dtype,
            logits,
            grad,
            labels,
            out,
            summary,
            unfused,
        })
    }

    /// Records `workload` as one compute pass (a plan also copies its summary afterwards).
    fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workload: Workload<'_>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<(), String> {
        let kernels = match workload {
            Workload::Plan(plan) => {
                let separate = plan.problem().gradient == Gradient::Separate;
                let buffers = LossBuffers {
                    logits: self.logits.slice(..),
                    targets: self.labels.slice(..),
                    weights: None,
                    upstream: None,
                    loss: None,
                    lse: None,
                    grad: separate.then(|| self.grad.slice(..)),
                    summary: self.summary.slice(..),
                };
                return plan
                    .encode_with_timestamps(encoder, &buffers, timestamps)
                    .map_err(|e| e.to_string());
            }
            Workload::Kernels(kernels) => kernels,
        };
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("lsce bench"),
            timestamp_writes: timestamps,
        });
        // Streaming kernels get as many workgroups as the loss kernel itself may use (few,
        // long-lived ones on CPU adapters, where starting a workgroup is expensive).
        let max_stream_groups = self
            .gpu
            .kernel
            .config()
            .max_row_workgroups
            .unwrap_or(u32::MAX);
        self.unfused.record(
            &mut pass,
            &self.gpu.unfused,
            kernels,
            self.gpu
                .device
                .limits()
                .max_compute_workgroups_per_dimension,
            max_stream_groups,
        );
        Ok(())
    }

    /// Runs `workload` once and waits.
    pub fn run(&self, workload: Workload<'_>) -> Result<(), String> {
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        self.encode(&mut encoder, workload, None)?;
        let index = self.gpu.queue.submit([encoder.finish()]);
        self.gpu.wait(Some(index))
    }

    /// The median time of `repeats` runs after `warmup` runs, in milliseconds, and the median
    /// wall-clock time of the same runs.
    fn time(
        &self,
        workload: Workload<'_>,
        warmup: usize,
        repeats: usize,
    ) -> Result<(f64, f64), String> {
        let gpu = self.gpu;
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        for _ in 0..warmup {
            self.run(workload)?;
        }
        let mut wall = Vec::with_capacity(repeats);
        for i in 0..repeats as u32 {
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            let timestamps = gpu
                .timer
                .as_ref()
                .map(|t| wgpu::ComputePassTimestampWrites {
                    query_set: &t.queries,
                    beginning_of_pass_write_index: Some(2 * i),
                    end_of_pass_write_index: Some(2 * i + 1),
                });
            self.encode(&mut encoder, workload, timestamps)?;
            let command_buffer = encoder.finish();
            let start = Instant::now();
            let index = gpu.queue.submit([command_buffer]);
            gpu.wait(Some(index))?;
            wall.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let times = match &gpu.timer {
            Some(timer) => {
                let bytes = 16 * repeats as u64;
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                encoder.resolve_query_set(&timer.queries, 0..2 * repeats as u32, &timer.resolve, 0);
                gpu.queue.submit([encoder.finish()]);
                let ticks: Vec<u64> =
                    bytemuck::pod_collect_to_vec(&gpu.read(&timer.resolve, 0, bytes)?);
                let gpu_ms: Vec<f64> = ticks
                    .chunks(2)
                    .map(|t| t[1].wrapping_sub(t[0]) as f64 * timer.period_ns / 1e6)
                    .collect();
                // A timestamp pair that goes backwards or is implausibly long (wrapped) or zero
                // is unusable; fall back to the wall clock rather than report nonsense.
                if ticks.chunks(2).all(|t| t[1] > t[0])
                    && gpu_ms.iter().zip(&wall).all(|(g, w)| g <= &(w * 1.5 + 1.0))
                {
                    gpu_ms
                } else {
                    gpu.fell_back.set(true);
                    eprintln!("warning: unusable GPU timestamps {ticks:?}; using the wall clock");
                    wall.clone()
                }
            }
            None => wall.clone(),
        };
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("device error while timing: {e}"));
        }
        Ok((median(times), median(wall)))
    }

    /// The gradient buffer, decoded.
    pub fn read_grad(&self) -> Result<Vec<f32>, String> {
        let bytes = self
            .gpu
            .read(&self.grad, 0, elements_bytes(self.shape, self.dtype))?;
        Ok(HostData::new(self.dtype, &bytes, self.shape.elements() as usize).to_f32())
    }

    /// Times `lsce::cpu::compute` with the gradient on (at most) `CPU_MAX_ELEMENTS` logits read
    /// back from the GPU; returns the median scaled to all rows, and the rows timed.
    fn cpu_time(&self, labels: &[i32], runs: usize) -> Result<(f64, u32), String> {
        let (rows, classes) = (self.shape.rows(), self.shape.classes());
        let cpu_rows = rows.min((CPU_MAX_ELEMENTS / u64::from(classes)).max(1) as u32);
        let shape = Shape::matrix(cpu_rows, classes).map_err(|e| e.to_string())?;
        let bytes = self
            .gpu
            .read(&self.logits, 0, elements_bytes(shape, self.dtype))?;
        let logits = HostData::new(self.dtype, &bytes, shape.elements() as usize);
        let batch = Batch::classes(shape, logits.logits(), &labels[..cpu_rows as usize]);
        let spec = LossSpec::pytorch(0.1);
        let times = (0..runs.max(1))
            .map(|_| {
                let start = Instant::now();
                cpu::compute(&spec, &batch, lsce::Gradient::Separate).map_err(|e| e.to_string())?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<Vec<f64>, String>>()?;
        Ok((
            median(times) * f64::from(rows) / f64::from(cpu_rows),
            cpu_rows,
        ))
    }
}

/// The median of a non-empty list (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
