//! The Burn rows of the bench (feature `burn`): lsce inside Burn against Burn's own
//! `CrossEntropyLoss`, forward and backward, on Burn's wgpu device, in one run.
//!
//! Per shape (class labels, `pytorch(0.1)`: Burn's `with_smoothing(Some(0.1))`), all on the
//! device Burn runs on (its default adapter), each the median of `--repeats` runs after
//! `--warmup`, timed by the wall clock from the first call to the end of `Device::sync`:
//!
//! * **Burn CE**: Burn's loss, `backward()`, on an autodiff device, fusion and autotune on
//!   (Burn's defaults), on the device `lsce::burn::init_device` sets up (one wgpu buffer per
//!   tensor);
//! * **keep** / **recompute**: [`LsceLoss`] the same way, in each [`GradientMode`] (label check
//!   off, as Burn's loss has none: the check is one 32-byte readback and a wait);
//! * **launch**: the fused loss-and-gradient launch through Burn (fusion registration, buffer
//!   hand-out, flush, bind, submit) without autodiff;
//! * **encode**: lsce's own encode path for the same fused pass on the same `wgpu::Device`
//!   and queue (buffers of its own), submit and wait. `glue` = launch / encode - 1 is what the
//!   integration costs over it.
//!
//! Effective GB/s = 2 x rows x classes x 4 bytes / time (the measure). Each loss value
//! is checked against `lsce::cpu` (f64) on the first rows' worth of the mean: `ok` within
//! 1e-3 relative, else `WRONG`. A shape is skipped where its tensors would not fit
//! `--max-memory` (Burn's loss holds about eight `rows x classes` f32 tensors, lsce three).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use burn::backend::Dispatch;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::wgpu::MemoryConfiguration;
use burn::tensor::{Device, Int, Tensor, TensorData};
use lsce::burn::{GradientMode, LossOptions, LsceLossConfig, LsceOps};
use lsce::{Gradient, LossBuffers, LossKernel, LossSpec, Problem, Shape, Summary, TargetKind};
use wgpu::util::DeviceExt;

/// One shape's Burn measurements.
pub struct BurnRecord {
    pub adapter: String,
    pub rows: u32,
    pub classes: u32,
    pub repeats: usize,
    pub outcome: Result<BurnMeasures, String>,
}

pub struct BurnMeasures {
    /// Burn's loss, or why it failed (it cannot allocate some shapes).
    pub burn_ms: Result<f64, String>,
    pub burn_correct: Option<bool>,
    pub keep_ms: f64,
    pub recompute_ms: f64,
    pub launch_ms: f64,
    pub encode_ms: f64,
    pub lsce_correct: bool,
}

/// Bytes a logit costs each loss: Burn's composite loss holds about eight f32 tensors of the
/// logits' size at its peak (log-softmax, one-hot, smoothed targets, products, gradients),
/// lsce three (logits, gradient, its scaled copy).
const BURN_BYTES_PER_LOGIT: u64 = 32;
const LSCE_BYTES_PER_LOGIT: u64 = 12;

/// The Burn device shared with lsce, and its `wgpu::Device` and queue for the encode path.
pub struct BurnBench {
    device: Device,
    wgpu: (wgpu::Device, wgpu::Queue),
    kernel: LossKernel,
    adapter: String,
}

impl BurnBench {
    pub fn new() -> Result<Self, String> {
        // As `lsce::burn::init_device` sets it up, keeping the setup for the encode path.
        let (device, setup) = Device::wgpu_options()
            .memory_config(MemoryConfiguration::ExclusivePages)
            .init_with_setup()
            .map_err(|e| format!("Burn's wgpu runtime: {e}"))?;
        lsce::burn::register_setup(&device, &setup).map_err(|e| e.to_string())?;
        let kernel = LossKernel::new(&setup.device).map_err(|e| e.to_string())?;
        let info = setup.adapter.get_info();
        Ok(Self {
            device,
            wgpu: (setup.device, setup.queue),
            kernel,
            adapter: format!("{} ({})", info.name, info.backend.to_str()),
        })
    }

    pub fn run_case(
        &self,
        shape: Shape,
        repeats: usize,
        warmup: usize,
        max_memory: Option<u64>,
    ) -> BurnRecord {
        BurnRecord {
            adapter: self.adapter.clone(),
            rows: shape.rows(),
            classes: shape.classes(),
            repeats,
            outcome: self.measure(shape, repeats, warmup, max_memory),
        }
    }

    fn measure(
        &self,
        shape: Shape,
        repeats: usize,
        warmup: usize,
        max_memory: Option<u64>,
    ) -> Result<BurnMeasures, String> {
        let elements = shape.elements();
        if let Some(max) = max_memory {
            if LSCE_BYTES_PER_LOGIT * elements > max {
                return Err(format!(
                    "lsce's tensors need {} MiB, over --max-memory",
                    (LSCE_BYTES_PER_LOGIT * elements) >> 20
                ));
            }
        }
        let (rows, classes) = (shape.rows() as usize, shape.classes() as usize);
        let logits = host_logits(elements);
        let labels: Vec<i32> = (0..rows as u64)
            .map(|r| ((7919 * r + 13) % classes as u64) as i32)
            .collect();
        let spec = LossSpec::pytorch(0.1);
        let reference = reference_loss(&spec, shape, &logits, &labels)?;
        let device = self.device.clone().autodiff();
        let x = Tensor::<2>::from_data(TensorData::new(logits.clone(), [rows, classes]), &device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [rows]), &device);
        let close = |v: f32| (f64::from(v) - reference).abs() <= 1e-3 * reference.abs();

        let time = |f: &dyn Fn() -> f32| -> Result<(f64, f32), String> {
            // A shape too large for the device fails as a panic on Burn's device thread
            // ("The bytes were never written"), which the hook would print before the row
            // reports the shape as skipped; the caught message is the report.
            let _quiet = QuietPanics::new();
            let mut times = Vec::with_capacity(repeats);
            let mut value = f32::NAN;
            for i in 0..warmup + repeats {
                let start = Instant::now();
                value = catch_unwind(AssertUnwindSafe(f)).map_err(panic_message)?;
                device.sync().map_err(|e| e.to_string())?;
                if i >= warmup {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            Ok((times[times.len() / 2], value))
        };
        let lsce = |mode: GradientMode| {
            let loss = LsceLossConfig::new()
                .with_spec(spec)
                .with_gradient(mode)
                .with_label_check(false)
                .init(&device)
                .map_err(|e| e.to_string())?;
            time(&|| {
                let x = x.clone().require_grad();
                let value = loss.try_forward(x.clone(), y.clone()).expect("validated");
                let grads = value.clone().backward();
                drop(x.grad(&grads));
                value.into_scalar::<f32>()
            })
        };
        let (keep_ms, keep_value) = lsce(GradientMode::Keep)?;
        let (recompute_ms, recompute_value) = lsce(GradientMode::Recompute)?;
        let plain = self.device.clone();
        let xp = Tensor::<2>::from_data(TensorData::new(logits.clone(), [rows, classes]), &plain);
        let yp = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [rows]), &plain);
        let options = LossOptions {
            spec,
            mode: GradientMode::Keep,
            targets: TargetKind::Classes,
            weighted: false,
            upstream_grad: false,
            grad_dtype: lsce::GradDtype::AsLogits,
        };
        // The unused inputs' placeholder, as `LsceLoss` passes it.
        let placeholder = Tensor::<1>::zeros([1], &plain);
        // Validated once, as `LsceLoss` does before it launches.
        LsceLossConfig::new()
            .with_spec(spec)
            .init(&plain)
            .and_then(|l| l.try_forward(xp.clone(), yp.clone()))
            .map_err(|e| e.to_string())?;
        let (launch_ms, _) = time(&|| {
            let (loss, grad, _) = Dispatch::lsce_loss_grad(
                xp.clone().into_dispatch(),
                yp.clone().into_dispatch(),
                placeholder.clone().into_dispatch(),
                placeholder.clone().into_dispatch(),
                placeholder.clone().into_dispatch(),
                options,
            );
            drop(Tensor::<2>::from_dispatch(grad));
            Tensor::<1>::from_dispatch(loss).into_scalar::<f32>()
        })?;
        let encode_ms = self.encode_ms(shape, &logits, &labels, repeats, warmup)?;

        let burn = || -> Result<(f64, f32), String> {
            if let Some(max) = max_memory {
                if BURN_BYTES_PER_LOGIT * elements > max {
                    return Err(format!(
                        "skipped: Burn's loss would need about {} MiB, over --max-memory",
                        (BURN_BYTES_PER_LOGIT * elements) >> 20
                    ));
                }
            }
            let loss = CrossEntropyLossConfig::new()
                .with_smoothing(Some(0.1))
                .init(&device);
            time(&|| {
                let x = x.clone().require_grad();
                let value = loss.forward(x.clone(), y.clone());
                let grads = value.clone().backward();
                drop(x.grad(&grads));
                value.into_scalar::<f32>()
            })
        };
        let (burn_ms, burn_correct) = match burn() {
            Ok((ms, value)) => (Ok(ms), Some(close(value))),
            Err(e) => (Err(e), None),
        };
        Ok(BurnMeasures {
            burn_ms,
            burn_correct,
            keep_ms,
            recompute_ms,
            launch_ms,
            encode_ms,
            lsce_correct: close(keep_value) && close(recompute_value),
        })
    }

    /// lsce's own encode path on the shared device: the fused plan on buffers of its own.
    fn encode_ms(
        &self,
        shape: Shape,
        logits: &[f32],
        labels: &[i32],
        repeats: usize,
        warmup: usize,
    ) -> Result<f64, String> {
        let (device, queue) = &self.wgpu;
        let plan = self
            .kernel
            .plan(&Problem::new(LossSpec::pytorch(0.1), shape).with_gradient(Gradient::Separate))
            .map_err(|e| e.to_string())?;
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let init = |contents: &[u8]| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents,
                usage: storage,
            })
        };
        let logits = init(bytemuck::cast_slice(logits));
        let labels = init(bytemuck::cast_slice(labels));
        let buffer = |size: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: storage,
                mapped_at_creation: false,
            })
        };
        let grad = buffer(4 * shape.elements());
        let summary = buffer(Summary::SIZE);
        let buffers = LossBuffers::new(logits.slice(..), labels.slice(..), summary.slice(..))
            .with_grad(grad.slice(..));
        let binding = plan.bind(&buffers).map_err(|e| e.to_string())?;
        let mut times = Vec::with_capacity(repeats);
        for i in 0..warmup + repeats {
            let start = Instant::now();
            let mut encoder = device.create_command_encoder(&Default::default());
            binding.encode(&mut encoder);
            queue.submit([encoder.finish()]);
            device
                .poll(wgpu::PollType::Wait {
                    submission_index: None,
                    timeout: None,
                })
                .map(drop)
                .map_err(|e| e.to_string())?;
            if i >= warmup {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// Logits uniform in [-8, 8) from a hash of the index, like the bench's `fill_main`.
fn host_logits(n: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
            h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            h ^= h >> 32;
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0
        })
        .collect()
}

/// The mean loss from `lsce::cpu` (f64), on the whole shape.
fn reference_loss(
    spec: &LossSpec,
    shape: Shape,
    logits: &[f32],
    labels: &[i32],
) -> Result<f64, String> {
    let batch = lsce::Batch::classes(shape, logits, labels);
    let out = lsce::cpu::compute(spec, &batch, Gradient::None).map_err(|e| e.to_string())?;
    Ok(out.loss[0])
}

/// Replaces the panic hook with a silent one while alive, on every thread: panics are still
/// caught (`catch_unwind`) and reported as the row's outcome, just not printed as well.
struct QuietPanics {
    previous: Option<PanicHook>,
}

/// What `std::panic::take_hook` returns.
type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

impl QuietPanics {
    fn new() -> Self {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        Self {
            previous: Some(previous),
        }
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            std::panic::set_hook(previous);
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into());
    // Burn's errors nest their cause several lines down: an allocation failure is the one a
    // shape runs into here.
    let line = message
        .lines()
        .find(|l| l.contains("allocate"))
        .or_else(|| message.lines().next())
        .unwrap_or("panicked");
    line.trim().to_string()
}

/// Effective GB/s of a fwd+bwd: the logits read and the gradient written once.
fn gbps(r: &BurnRecord, ms: f64) -> f64 {
    2.0 * f64::from(r.rows) * f64::from(r.classes) * 4.0 / (ms * 1e6)
}

pub fn print_table(records: &[BurnRecord]) {
    let Some(first) = records.first() else { return };
    println!(
        "\nlsce in Burn vs Burn's CrossEntropyLoss, forward + backward, f32, eps 0.1, on {} \
         (wall clock to Device::sync, median of {}):",
        first.adapter, first.repeats
    );
    println!(
        "| shape | Burn CE GB/s | Burn's loss | lsce keep GB/s | vs Burn | lsce recompute GB/s | lsce's loss | launch ms | encode ms | glue |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in records {
        let shape = format!("{}x{}", r.rows, r.classes);
        match &r.outcome {
            Err(e) => println!("| {shape} | skipped: {e} |||||||||"),
            Ok(m) => {
                let (burn, burn_ok, speedup) = match &m.burn_ms {
                    Ok(ms) => (
                        format!("{:.3}", gbps(r, *ms)),
                        if m.burn_correct == Some(true) {
                            "ok"
                        } else {
                            "WRONG"
                        }
                        .to_string(),
                        format!("{:.1}x", ms / m.keep_ms),
                    ),
                    Err(e) => ("-".into(), format!("fails: {e}"), "-".into()),
                };
                println!(
                    "| {shape} | {burn} | {burn_ok} | {:.3} | {speedup} | {:.3} | {} | {:.2} | {:.2} | {:+.1}% |",
                    gbps(r, m.keep_ms),
                    gbps(r, m.recompute_ms),
                    if m.lsce_correct { "ok" } else { "WRONG" },
                    m.launch_ms,
                    m.encode_ms,
                    (m.launch_ms / m.encode_ms - 1.0) * 100.0,
                );
            }
        }
    }
}

/// The records as JSON objects (`"kind": "burn"`), for the bench's JSON array.
pub fn json_objects(
    records: &[BurnRecord],
    string: fn(&str) -> String,
    number: fn(f64) -> String,
) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let mut fields = vec![
                ("kind", string("burn")),
                ("adapter", string(&r.adapter)),
                ("rows", r.rows.to_string()),
                ("classes", r.classes.to_string()),
                ("repeats", r.repeats.to_string()),
                (
                    "skipped",
                    r.outcome
                        .as_ref()
                        .err()
                        .map_or("null".into(), |e| string(e)),
                ),
            ];
            let m = r.outcome.as_ref().ok();
            let opt = |v: Option<f64>| v.map_or("null".into(), number);
            fields.extend([
                (
                    "burn_ce_ms",
                    opt(m.and_then(|m| m.burn_ms.as_ref().ok().copied())),
                ),
                (
                    "burn_ce_error",
                    m.and_then(|m| m.burn_ms.as_ref().err())
                        .map_or("null".into(), |e| string(e)),
                ),
                (
                    "burn_ce_correct",
                    m.and_then(|m| m.burn_correct)
                        .map_or("null".into(), |c| c.to_string()),
                ),
                ("lsce_keep_ms", opt(m.map(|m| m.keep_ms))),
                ("lsce_recompute_ms", opt(m.map(|m| m.recompute_ms))),
                ("lsce_launch_ms", opt(m.map(|m| m.launch_ms))),
                ("lsce_encode_ms", opt(m.map(|m| m.encode_ms))),
                (
                    "lsce_correct",
                    m.map_or("null".into(), |m| m.lsce_correct.to_string()),
                ),
                (
                    "burn_ce_gbps",
                    opt(m.and_then(|m| m.burn_ms.as_ref().ok().map(|ms| gbps(r, *ms)))),
                ),
                ("lsce_keep_gbps", opt(m.map(|m| gbps(r, m.keep_ms)))),
                (
                    "speedup_vs_burn_ce",
                    opt(m.and_then(|m| m.burn_ms.as_ref().ok().map(|ms| ms / m.keep_ms))),
                ),
                (
                    "glue_overhead",
                    opt(m.map(|m| m.launch_ms / m.encode_ms - 1.0)),
                ),
            ]);
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}: {v}", string(k)))
                .collect();
            format!("  {{{}}}", body.join(", "))
        })
        .collect()
}
