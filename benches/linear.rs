//! The fused linear head's modes against its forward pass, on one device.
//!
//! ```text
//! cargo bench --all-features --bench linear -- [--quick | --full | --shapes 4096x512x32000,..]
//!     [--dtypes f32,bf16] [--repeats N] [--json FILE] [--svg FILE] [--check] [--matmul]
//! ```
//!
//! `--matmul` times only f32 matmuls: lsce's logits matmul and unfused head on the kernel's
//! default path (with subgroups where the device has them) and on the portable path
//! (`KernelConfig::use_subgroups = false`), and Burn's matmul of the same shape.
//!
//! Cases: the issue's shapes `N x D x V` = 4096 x 512 x 32000, 1024 x 1024 x 128256,
//! 256 x 2048 x 262144 and 16384 x 256 x 50257 (`--full`, the default on a GPU: on a CPU
//! adapter the logits' matmul alone takes minutes, and the unfused path's 524 MB of logits
//! pass lavapipe's 128 MiB binding), or `--quick` (the default on a CPU adapter) four shapes
//! it runs in seconds;
//! each in f32 and bf16 inputs (`H`, `W`, `b`; f32 accumulation and gradients), class labels,
//! `LossSpec::pytorch(0.1)`, mean, a bias. Each variant is one command buffer submitted alone
//! and waited for (wall clock from submit to the end of the wait); the variants run in rotation
//! `--repeats` times after a warm-up round so that a change of the machine's load hits all
//! alike; the table gives medians, and ratios within the same round:
//!
//! * **matmul**: the logits' matmul alone (`LinearPlan::bind_logits`: `z = H W^T + b` into a
//!   buffer);
//! * **forward**: `HeadGradients::None` in recompute mode: the setup, the logits' matmul with
//!   its statistics epilogue, the merge and the reduction;
//! * **recompute**: the loss, `dH`, `dW` and `db` with no logits kept (five matmul-equivalents);
//! * **chunked**: the same with 1/4 of the logits kept (at least 64 rows): three;
//! * **unfused**: the same with lsce's own kernels, unfused: the logits' matmul into a buffer,
//!   lsce's fused loss over it with the gradient in place, the two gradient products
//!   (`LinearPlan::bind_products`);
//! * **burn mm** (feature `burn`, f32): Burn's f32 matmul of the same shape (cubecl's
//!   kernels, autotuned at its full level in this run with no cache from an earlier run) on
//!   Burn's own wgpu device;
//! * **burn head** (feature `burn`, f32): Burn's `Linear` + `CrossEntropyLoss` (smoothing 0.1),
//!   forward and `backward()` on an autodiff device;
//! * **burn fused** (feature `burn`, f32): `lsce::burn::LsceLinearLoss` (smoothing 0.1, a bias,
//!   recompute mode, the gradients kept from the forward pass), forward and `backward()` on an
//!   autodiff device, timed and measured as **burn head**, on a second Burn runtime of the
//!   same kind of adapter (with the exclusive pages lsce needs; each row's pool is its own).
//!
//! **Device memory** is measured the same way for every row: wgpu's allocator report
//! (`Device::generate_allocator_report`, `total_allocated_bytes`: the bytes of the live
//! allocations) of a device that ran only that variant, read after the run. For lsce's rows
//! that is a fresh device holding the inputs, the outputs and the plan's scratch (the unfused
//! path's logits and its loss plan's scratch too), nothing being freed during a run; for Burn's,
//! its device after the timed runs (Burn's memory pool keeps the pages its peak needed).
//! `scratch` is each plan's `scratch_bytes()`, `logits` the `4 N V` bytes a materialised
//! logits buffer takes.
//!
//! `--json` writes the records, `--svg` a chart of the time ratios and the memory. Without
//! `--bench` (under `cargo test --all-targets`) a small shape runs once, as a smoke test.

mod common;

use std::time::{Duration, Instant};

use lsce::linear::{HeadGradients, LinearBuffers, LinearPlan, LinearProblem, Memory};
use lsce::{Dtype, LossKernel, LossSpec, Summary};
use wgpu::util::DeviceExt;

/// Records one variant's step into an encoder.
type Encode = Box<dyn Fn(&mut wgpu::CommandEncoder)>;

/// The issue's shapes, for a GPU.
const SHAPES: [(u32, u32, u32); 4] = [
    (4096, 512, 32000),
    (1024, 1024, 128256),
    (256, 2048, 262144),
    (16384, 256, 50257),
];

/// Shapes a CPU adapter (lavapipe on two cores) runs in seconds; the last has the largest
/// vocabulary whose 1024 rows of logits Burn can hold in one binding there (128 MiB).
const QUICK_SHAPES: [(u32, u32, u32); 4] = [
    (512, 256, 8192),
    (128, 512, 32000),
    (1024, 128, 16384),
    (1024, 128, 32000),
];

/// What the bench times, in the table's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Matmul,
    Forward,
    Recompute,
    Chunked,
    Unfused,
}

const VARIANTS: [Variant; 5] = [
    Variant::Matmul,
    Variant::Forward,
    Variant::Recompute,
    Variant::Chunked,
    Variant::Unfused,
];

/// The variants whose device memory the table reports.
const MEASURED: [Variant; 3] = [Variant::Recompute, Variant::Chunked, Variant::Unfused];

struct Args {
    smoke: bool,
    /// `None`: the issue's shapes on a GPU, the quick set on a CPU adapter.
    shapes: Option<Vec<(u32, u32, u32)>>,
    dtypes: Vec<Dtype>,
    repeats: usize,
    json: Option<String>,
    svg: Option<String>,
    /// Also the max errors of the staging call against the f64 reference.
    check: bool,
    /// Only the matmul target: lsce's logits matmul (and its unfused head) on the default
    /// and the portable path, against Burn's matmul.
    matmul: bool,
}

fn main() {
    common::main("linear", run);
}

fn parse_args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut parsed = Args {
        smoke,
        shapes: smoke.then(|| vec![(64, 32, 500)]),
        dtypes: if smoke {
            vec![Dtype::F32]
        } else {
            vec![Dtype::F32, Dtype::Bf16]
        },
        repeats: if smoke { 1 } else { 5 },
        json: None,
        svg: None,
        check: false,
        matmul: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bench" => {}
            "--quick" => parsed.shapes = Some(QUICK_SHAPES.to_vec()),
            "--full" => parsed.shapes = Some(SHAPES.to_vec()),
            "--check" => parsed.check = true,
            "--matmul" => parsed.matmul = true,
            "--repeats" => {
                parsed.repeats = value()?.parse().map_err(|e| format!("--repeats: {e}"))?;
                if parsed.repeats == 0 {
                    return Err("--repeats must be at least 1".into());
                }
            }
            "--json" => parsed.json = Some(value()?),
            "--svg" => parsed.svg = Some(value()?),
            "--dtypes" => {
                parsed.dtypes = value()?
                    .split(',')
                    .map(|s| match s {
                        "f32" => Ok(Dtype::F32),
                        "f16" => Ok(Dtype::F16),
                        "bf16" => Ok(Dtype::Bf16),
                        other => Err(format!("--dtypes: f32, f16 or bf16, not {other}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--shapes" => parsed.shapes = Some(common::shapes(&value()?)?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(parsed)
}

/// One case's measurements: medians in ms, bytes.
struct Record {
    n: u32,
    d: u32,
    v: u32,
    dtype: Dtype,
    ms: [f64; 5],
    recompute_scratch: u64,
    chunked_scratch: u64,
    chunk_budget: u64,
    /// Device memory of the recompute, chunked and unfused runs.
    device_bytes: [u64; 3],
    burn_mm: Result<f64, String>,
    burn_head: Result<(f64, u64), String>,
    burn_fused: Result<(f64, u64), String>,
    /// With `--check`: max |lsce - f64| of the loss, dH, dW and db.
    errors: Option<[f64; 4]>,
}

impl Record {
    fn logits_bytes(&self) -> u64 {
        u64::from(self.n) * u64::from(self.v) * 4
    }

    fn label(&self) -> String {
        format!(
            "{}x{}x{} {}",
            self.n,
            self.d,
            self.v,
            dtype_name(self.dtype)
        )
    }
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let (device, queue, kernel, info) = common::default_device()?;
    println!(
        "adapter: {} ({:?}); wall clock, medians of {} rounds",
        info.name, info.backend, args.repeats
    );
    println!(
        "{:>22} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "NxDxV dtype", "mm ms", "fwd ms", "recomp", "chunked", "unfused", "rec/mm", "chk/mm", "rec/unf", "chk/unf", "rec scr", "chk scr", "logits", "burn mm", "burn head", "bfused", "rec MB", "chk MB", "unf MB", "burn MB", "bfused MB"
    );
    let mut records = Vec::new();
    let cpu = info.device_type == wgpu::DeviceType::Cpu;
    let shapes = args.shapes.clone().unwrap_or_else(|| {
        if cpu {
            println!("a CPU adapter: the --quick shapes (pass --full for the issue's)");
            QUICK_SHAPES.to_vec()
        } else {
            SHAPES.to_vec()
        }
    });
    if args.matmul {
        // The kernel's paths side by side: its default (the subgroup path where the device has
        // subgroups) and the portable one (workgroup memory only), the logits matmul alone
        // and the unfused head (the matmul, the loss, the two gradient products).
        let portable = LossKernel::with_config(
            &device,
            lsce::KernelConfig {
                use_subgroups: false,
                ..lsce::KernelConfig::for_device(&device)
            },
        )
        .map_err(|e| e.to_string())?;
        println!(
            "{:>22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "NxDxV",
            "lsce mm",
            "port. mm",
            "port/lsce",
            "lsce unf",
            "port. unf",
            "port/lsce",
            "burn mm",
            "burn/lsce"
        );
        for &(n, d, v) in &shapes {
            // The four steps in rotation, round after round, so that a change of the host's
            // speed hits all alike: medians of the times and of each round's ratios.
            let case = Case::new((n, d, v), Dtype::F32)?;
            let inputs = Inputs::new(&device, (n, d, v), Dtype::F32);
            let steps = [
                (&kernel, Variant::Matmul),
                (&portable, Variant::Matmul),
                (&kernel, Variant::Unfused),
                (&portable, Variant::Unfused),
            ]
            .map(|(k, variant)| case.variant(&device, k, &inputs, variant).map(|(e, _)| e));
            let steps = steps.into_iter().collect::<Result<Vec<_>, _>>()?;
            let mut times = vec![Vec::new(); steps.len()];
            let mut ratios = [Vec::new(), Vec::new()];
            for round in 0..=args.repeats {
                let t = steps
                    .iter()
                    .map(|e| run_step(&device, &queue, e).map(|d| d.as_secs_f64() * 1e3))
                    .collect::<Result<Vec<_>, _>>()?;
                if round > 0 {
                    ratios[0].push(t[1] / t[0]);
                    ratios[1].push(t[3] / t[2]);
                    for (all, x) in times.iter_mut().zip(t) {
                        all.push(x);
                    }
                }
            }
            let [ms, portable_ms, unfused, portable_unfused] =
                [0, 1, 2, 3].map(|i| common::median(times[i].clone()));
            let [matmul_gain, unfused_gain] = ratios.map(common::median);
            let burn = burn_matmul_ms(n, d, v, args.repeats)?;
            println!(
                "{:>22} {ms:>9.1} {portable_ms:>9.1} {matmul_gain:>9.2} {unfused:>9.1} {portable_unfused:>9.1} {unfused_gain:>9.2} {burn:>9.1} {:>10.2}",
                format!("{n}x{d}x{v}"),
                burn / ms
            );
        }
        return Ok(());
    }
    for &(n, d, v) in &shapes {
        for &dtype in &args.dtypes {
            let context = |e| format!("{n}x{d}x{v} {}: {e}", dtype_name(dtype));
            let mut record = measure(&device, &queue, &kernel, (n, d, v), dtype, args.repeats)
                .map_err(context)?;
            if args.check {
                let case = Case::new((n, d, v), dtype).map_err(context)?;
                record.errors = Some(case.errors(&kernel, &queue).map_err(context)?);
            }
            print_record(&record);
            records.push(record);
        }
    }
    if let Some(path) = &args.json {
        let rows: Vec<String> = records.iter().map(json_record).collect();
        let text = format!(
            "{{\"adapter\":\"{}\",\"backend\":\"{:?}\",\"repeats\":{},\"rows\":[{}]}}\n",
            info.name,
            info.backend,
            args.repeats,
            rows.join(",")
        );
        std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg(&records, &info.name)).map_err(|e| format!("{path}: {e}"))?;
    }
    if args.smoke {
        println!("(smoke run: pass --bench for the measured cases)");
    }
    Ok(())
}

/// Times every variant of one case on `device`, then measures each one's device memory on a
/// device of its own.
fn measure(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernel: &LossKernel,
    (n, d, v): (u32, u32, u32),
    dtype: Dtype,
    repeats: usize,
) -> Result<Record, String> {
    let inputs = Inputs::new(device, (n, d, v), dtype);
    let case = Case::new((n, d, v), dtype)?;
    let mut encoders = Vec::new();
    let mut scratch = [0u64; 5];
    for (i, &variant) in VARIANTS.iter().enumerate() {
        let (encode, bytes) = case.variant(device, kernel, &inputs, variant)?;
        encoders.push(encode);
        scratch[i] = bytes;
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); encoders.len()];
    for round in 0..=repeats {
        for (i, encode) in encoders.iter().enumerate() {
            let elapsed = run_step(device, queue, encode)?;
            if round > 0 {
                times[i].push(elapsed);
            }
        }
    }
    drop(encoders);
    drop(inputs);
    let mut ms = [0.0; 5];
    for (m, t) in ms.iter_mut().zip(&mut times) {
        t.sort();
        *m = t[t.len() / 2].as_secs_f64() * 1e3;
    }
    let mut device_bytes = [0u64; 3];
    for (bytes, &variant) in device_bytes.iter_mut().zip(&MEASURED) {
        *bytes = case.device_bytes(variant)?;
    }
    let (burn_mm, burn_head, burn_fused) = if dtype == Dtype::F32 {
        (
            burn_matmul_ms(n, d, v, repeats),
            burn_head_ms(n, d, v, repeats),
            burn_fused_ms(n, d, v, repeats, device.adapter_info().device_type),
        )
    } else {
        let f32_only = "Burn's rows: f32 only".to_string();
        (Err(f32_only.clone()), Err(f32_only.clone()), Err(f32_only))
    };
    Ok(Record {
        n,
        d,
        v,
        dtype,
        ms,
        recompute_scratch: scratch[2],
        chunked_scratch: scratch[3],
        chunk_budget: case.chunk_budget(),
        device_bytes,
        burn_mm,
        burn_head,
        burn_fused,
        errors: None,
    })
}

/// Encodes one step, submits it alone and waits for it: the wall clock from submit to the end
/// of the wait.
fn run_step(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    encode: &Encode,
) -> Result<Duration, String> {
    let mut encoder = device.create_command_encoder(&Default::default());
    encode(&mut encoder);
    let start = Instant::now();
    queue.submit([encoder.finish()]);
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| e.to_string())?;
    Ok(start.elapsed())
}

/// A case's problem: its shape, its dtype, and the problems of its variants.
struct Case {
    n: u32,
    d: u32,
    v: u32,
    dtype: Dtype,
    spec: LossSpec,
    full: LinearProblem,
}

impl Case {
    fn new((n, d, v): (u32, u32, u32), dtype: Dtype) -> Result<Self, String> {
        let spec = LossSpec::pytorch(0.1);
        let full = LinearProblem::new(spec, n, d, v)
            .map_err(|e| e.to_string())?
            .with_bias(true)
            .with_dtype(dtype);
        Ok(Self {
            n,
            d,
            v,
            dtype,
            spec,
            full,
        })
    }

    fn logits_bytes(&self) -> u64 {
        u64::from(self.n) * u64::from(self.v) * 4
    }

    /// Chunked mode's budget: a quarter of the logits, at least one 64-row tile's.
    fn chunk_budget(&self) -> u64 {
        (self.logits_bytes() / 4).max(64 * u64::from(self.v) * 4)
    }

    /// The encoder of one variant over `inputs`, and the scratch bytes of its plan.
    fn variant(
        &self,
        device: &wgpu::Device,
        kernel: &LossKernel,
        inputs: &Inputs,
        variant: Variant,
    ) -> Result<(Encode, u64), String> {
        let err = |e: lsce::LsceError| e.to_string();
        let problem = match variant {
            Variant::Forward => self.full.with_gradients(HeadGradients::None),
            Variant::Chunked => self.full.with_memory(Memory::Chunked {
                budget_bytes: self.chunk_budget(),
            }),
            _ => self.full,
        };
        let plan = LinearPlan::new(kernel, &problem).map_err(err)?;
        let buffers = if problem.gradients == HeadGradients::None {
            inputs.buffers()
        } else {
            inputs.with_grads()
        };
        Ok(match variant {
            Variant::Matmul => {
                let logits = zeros(device, self.logits_bytes());
                let binding = plan.bind_logits(&buffers, logits.slice(..)).map_err(err)?;
                (Box::new(move |e| binding.encode(e)), 0)
            }
            Variant::Forward | Variant::Recompute | Variant::Chunked => {
                let binding = plan.bind(&buffers).map_err(err)?;
                (Box::new(move |e| binding.encode(e)), plan.scratch_bytes())
            }
            Variant::Unfused => {
                let logits = zeros(device, self.logits_bytes());
                let loss_plan = kernel
                    .plan(
                        &lsce::Problem::new(
                            self.spec,
                            lsce::Shape::matrix(self.n, self.v).map_err(err)?,
                        )
                        .with_gradient(lsce::Gradient::InPlace),
                    )
                    .map_err(err)?;
                let loss = loss_plan
                    .bind(&lsce::LossBuffers::new(
                        logits.slice(..),
                        inputs.labels.slice(..),
                        inputs.summary.slice(..),
                    ))
                    .map_err(err)?;
                let to_logits = plan.bind_logits(&buffers, logits.slice(..)).map_err(err)?;
                let products = plan
                    .bind_products(&buffers, logits.slice(..))
                    .map_err(err)?;
                let bytes = loss_plan.scratch_bytes();
                (
                    Box::new(move |e| {
                        to_logits.encode(e);
                        loss.encode(e);
                        products.encode(e);
                    }),
                    bytes,
                )
            }
        })
    }

    /// Max |lsce - f64| of the loss, dH, dW and db: the staging call (recompute mode) against
    /// `linear::cpu::compute` on the same host values.
    fn errors(&self, kernel: &LossKernel, queue: &wgpu::Queue) -> Result<[f64; 4], String> {
        let err = |e: lsce::LsceError| e.to_string();
        let host = HostValues::new((self.n, self.d, self.v), self.dtype);
        let batch = lsce::linear::LinearBatch::classes(
            self.d,
            host.hidden.logits(),
            host.head.logits(),
            &host.labels,
        )
        .map_err(err)?
        .with_bias(host.bias.logits());
        let options = lsce::linear::LinearOptions::default();
        let gpu = kernel
            .compute_linear(queue, &self.spec, &batch, &options)
            .map_err(err)?;
        let exact =
            lsce::linear::cpu::compute(&self.spec, &batch, HeadGradients::All).map_err(err)?;
        let max = |a: &Option<Vec<f32>>, b: &Option<Vec<f64>>| -> f64 {
            a.iter()
                .flatten()
                .zip(b.iter().flatten())
                .map(|(&x, &y)| (f64::from(x) - y).abs())
                .fold(0.0, f64::max)
        };
        Ok([
            (f64::from(gpu.loss.loss[0]) - exact.loss.loss[0]).abs(),
            max(&gpu.d_hidden, &exact.d_hidden),
            max(&gpu.d_head, &exact.d_head),
            max(&gpu.d_bias, &exact.d_bias),
        ])
    }

    /// The bytes a fresh device holds after running one variant of this case alone (wgpu's
    /// allocator report, `total_allocated_bytes`).
    fn device_bytes(&self, variant: Variant) -> Result<u64, String> {
        let (device, queue) =
            lsce::request_device(&lsce::DeviceOptions::default()).map_err(|e| e.to_string())?;
        let kernel = LossKernel::new(&device).map_err(|e| e.to_string())?;
        let inputs = Inputs::new(&device, (self.n, self.d, self.v), self.dtype);
        let (encode, _) = self.variant(&device, &kernel, &inputs, variant)?;
        run_step(&device, &queue, &encode)?;
        device
            .generate_allocator_report()
            .map(|r| r.total_allocated_bytes)
            .ok_or_else(|| "the adapter gives no allocator report".to_string())
    }
}

/// The buffers every variant of a case reads and writes: `H`, `W`, `b` in the case's dtype,
/// labels, the summary, and f32 `dH`, `dW`, `db`.
struct Inputs {
    hidden: wgpu::Buffer,
    head: wgpu::Buffer,
    bias: wgpu::Buffer,
    labels: wgpu::Buffer,
    summary: wgpu::Buffer,
    d_hidden: wgpu::Buffer,
    d_head: wgpu::Buffer,
    d_bias: wgpu::Buffer,
}

/// A case's host values: `H`, `W`, `b` in the case's dtype (f32 or 16-bit words) and the
/// labels `(7919 r) mod V`. Value `i` of seed `s` is
/// `((u32(i) * 2654435761) ^ s) % 2001 / 1000 - 1` times `D^(-1/4)` (logits of about unit
/// size), in f32, rounded once to the dtype; benches/peers/torch_linear_ce.py makes the same
/// bits.
struct HostValues {
    hidden: Elements,
    head: Elements,
    bias: Elements,
    labels: Vec<i32>,
}

enum Elements {
    F32(Vec<f32>),
    Bits(Dtype, Vec<u16>),
}

impl Elements {
    fn new(count: u64, seed: u32, d: u32, dtype: Dtype) -> Self {
        let scale = 1.0 / (d as f32).sqrt().sqrt();
        let value = |i: u64| {
            ((((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0) * scale
        };
        let round: fn(f32) -> u16 = match dtype {
            Dtype::F32 => return Self::F32((0..count).map(value).collect()),
            Dtype::F16 => lsce::half::f32_to_f16,
            Dtype::Bf16 => lsce::half::f32_to_bf16,
        };
        Self::Bits(dtype, (0..count).map(|i| round(value(i))).collect())
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice(v),
            Self::Bits(_, v) => bytemuck::cast_slice(v),
        }
    }

    fn logits(&self) -> lsce::Logits<'_> {
        match self {
            Self::F32(v) => lsce::Logits::F32(v),
            Self::Bits(Dtype::F16, v) => lsce::Logits::F16(v),
            Self::Bits(_, v) => lsce::Logits::Bf16(v),
        }
    }
}

impl HostValues {
    fn new((n, d, v): (u32, u32, u32), dtype: Dtype) -> Self {
        let (n64, d64, v64) = (u64::from(n), u64::from(d), u64::from(v));
        Self {
            hidden: Elements::new(n64 * d64, 1, d, dtype),
            head: Elements::new(v64 * d64, 2, d, dtype),
            bias: Elements::new(v64, 3, d, dtype),
            labels: (0..n).map(|r| ((r * 7919) % v) as i32).collect(),
        }
    }
}

impl Inputs {
    fn new(device: &wgpu::Device, (n, d, v): (u32, u32, u32), dtype: Dtype) -> Self {
        let host = HostValues::new((n, d, v), dtype);
        let (n64, d64, v64) = (u64::from(n), u64::from(d), u64::from(v));
        Self {
            hidden: init(device, "hidden", host.hidden.bytes()),
            head: init(device, "head", host.head.bytes()),
            bias: init(device, "bias", host.bias.bytes()),
            labels: init(device, "labels", bytemuck::cast_slice(&host.labels)),
            summary: zeros(device, Summary::SIZE),
            d_hidden: zeros(device, n64 * d64 * 4),
            d_head: zeros(device, v64 * d64 * 4),
            d_bias: zeros(device, v64 * 4),
        }
    }

    fn buffers(&self) -> LinearBuffers<'_> {
        LinearBuffers::new(
            self.hidden.slice(..),
            self.head.slice(..),
            self.labels.slice(..),
            self.summary.slice(..),
        )
        .with_bias(self.bias.slice(..))
    }

    fn with_grads(&self) -> LinearBuffers<'_> {
        self.buffers().with_grads(
            self.d_hidden.slice(..),
            Some(self.d_head.slice(..)),
            Some(self.d_bias.slice(..)),
        )
    }
}

fn init(device: &wgpu::Device, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
    })
}

fn zeros(device: &wgpu::Device, bytes: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("out"),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn print_record(r: &Record) {
    let [mm, fwd, rec, chk, unf] = r.ms;
    let or_err = |x: &Result<String, String>| x.clone().unwrap_or_else(|e| e);
    println!(
        "{:>22} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
        r.label(), mm, fwd, rec, chk, unf, rec / mm, chk / mm, rec / unf, chk / unf,
        r.recompute_scratch, r.chunked_scratch, r.logits_bytes(),
        or_err(&r.burn_mm.as_ref().map(|t| format!("{t:.1}")).map_err(|_| "-".to_string())),
        or_err(&r.burn_head.as_ref().map(|(t, _)| format!("{t:.1}")).map_err(|_| "-".to_string())),
        or_err(&r.burn_fused.as_ref().map(|(t, _)| format!("{t:.1}")).map_err(|_| "-".to_string())),
        mb(r.device_bytes[0]), mb(r.device_bytes[1]), mb(r.device_bytes[2]),
        or_err(&r.burn_head.as_ref().map(|(_, m)| mb(*m)).map_err(|_| "-".to_string())),
        or_err(&r.burn_fused.as_ref().map(|(_, m)| mb(*m)).map_err(|_| "-".to_string())),
    );
    if let Some([loss, dh, dw, db]) = r.errors {
        println!(
            "{:>22} max |lsce - f64|: loss {loss:.2e}, dH {dh:.2e}, dW {dw:.2e}, db {db:.2e}",
            ""
        );
    }
    for e in [
        r.burn_mm.as_ref().err(),
        r.burn_head.as_ref().err(),
        r.burn_fused.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    {
        if !e.ends_with("f32 only") && e != "no burn" {
            println!("{:>22} {e}", "");
        }
    }
}

fn json_record(r: &Record) -> String {
    let [mm, fwd, rec, chk, unf] = r.ms;
    let opt = |x: Option<String>| x.unwrap_or_else(|| "null".into());
    format!(
        "{{\"shape\":[{},{},{}],\"dtype\":\"{}\",\"matmul_ms\":{mm:.4},\"forward_ms\":{fwd:.4},\"recompute_ms\":{rec:.4},\"chunked_ms\":{chk:.4},\"unfused_ms\":{unf:.4},\"burn_matmul_ms\":{},\"burn_head_ms\":{},\"recompute_scratch\":{},\"chunked_scratch\":{},\"chunk_budget\":{},\"logits_bytes\":{},\"recompute_device_bytes\":{},\"chunked_device_bytes\":{},\"unfused_device_bytes\":{},\"burn_head_device_bytes\":{},\"burn_fused_ms\":{},\"burn_fused_device_bytes\":{}",
        r.n, r.d, r.v, dtype_name(r.dtype),
        opt(r.burn_mm.as_ref().ok().map(|t| format!("{t:.4}"))),
        opt(r.burn_head.as_ref().ok().map(|(t, _)| format!("{t:.4}"))),
        r.recompute_scratch, r.chunked_scratch, r.chunk_budget, r.logits_bytes(),
        r.device_bytes[0], r.device_bytes[1], r.device_bytes[2],
        opt(r.burn_head.as_ref().ok().map(|(_, m)| m.to_string())),
        opt(r.burn_fused.as_ref().ok().map(|(t, _)| format!("{t:.4}"))),
        opt(r.burn_fused.as_ref().ok().map(|(_, m)| m.to_string())),
    ) + &r.errors.map_or(String::new(), |[loss, dh, dw, db]| {
        format!(",\"max_abs_error\":{{\"loss\":{loss:e},\"d_hidden\":{dh:e},\"d_head\":{dw:e},\"d_bias\":{db:e}}}")
    }) + "}"
}

/// Two panels, one group of bars per case: the step's time in logits-matmul equivalents
/// (recompute, chunked, unfused, Burn's head, lsce's head in Burn; the targets 5.5 and 3.5 as
/// lines), and the device memory in MB on a log scale (the same five).
fn svg(records: &[Record], adapter: &str) -> String {
    const COLORS: [&str; 5] = ["#1f77b4", "#2ca02c", "#ff7f0e", "#7f7f7f", "#9467bd"];
    const NAMES: [&str; 5] = [
        "fused, recompute",
        "fused, chunked",
        "unfused (lsce kernels)",
        "Burn Linear + CrossEntropyLoss",
        "LsceLinearLoss in Burn",
    ];
    let group = 140.0;
    let (left, top, panel) = (60.0, 40.0, 220.0);
    let width = (left + group * records.len().max(1) as f64 + 220.0).max(760.0);
    let height = top + 2.0 * panel + 120.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"18\" font-size=\"13\">lsce fused linear head, forward + backward, on {adapter}</text>\n<text x=\"{left}\" y=\"{}\">time per step / the logits' matmul alone (lsce's)</text>\n<text x=\"{left}\" y=\"{}\">device memory, MB (log scale; wgpu's allocator report)</text>\n",
        top - 6.0,
        top + panel + 34.0
    );
    let times: Vec<[Option<f64>; 5]> = records
        .iter()
        .map(|r| {
            let mm = r.ms[0];
            [
                Some(r.ms[2] / mm),
                Some(r.ms[3] / mm),
                Some(r.ms[4] / mm),
                r.burn_head.as_ref().ok().map(|(t, _)| t / mm),
                r.burn_fused.as_ref().ok().map(|(t, _)| t / mm),
            ]
        })
        .collect();
    let bytes: Vec<[Option<f64>; 5]> = records
        .iter()
        .map(|r| {
            [
                Some(r.device_bytes[0] as f64 / 1e6),
                Some(r.device_bytes[1] as f64 / 1e6),
                Some(r.device_bytes[2] as f64 / 1e6),
                r.burn_head.as_ref().ok().map(|(_, m)| *m as f64 / 1e6),
                r.burn_fused.as_ref().ok().map(|(_, m)| *m as f64 / 1e6),
            ]
        })
        .collect();
    let t_max = times
        .iter()
        .flatten()
        .flatten()
        .fold(6.0f64, |a, &b| a.max(b))
        * 1.1;
    let m_max = bytes
        .iter()
        .flatten()
        .flatten()
        .fold(1.0f64, |a, &b| a.max(b))
        .log10()
        .ceil();
    // Each panel: its top, its bars' values, and their height as a fraction of the panel.
    type Panel<'a> = (f64, &'a [[Option<f64>; 5]], Box<dyn Fn(f64) -> f64>);
    let panels: [Panel; 2] = [
        (top, &times, Box::new(move |x| x / t_max)),
        (
            top + panel + 40.0,
            &bytes,
            Box::new(move |x: f64| (x.max(0.1).log10() + 1.0) / (m_max + 1.0)),
        ),
    ];
    for (y0, values, scale) in &panels {
        let base = y0 + panel;
        out += &format!(
            "<line x1=\"{left}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>\n",
            width - 200.0
        );
        for (i, case) in values.iter().enumerate() {
            for (k, value) in case.iter().enumerate() {
                if let Some(x) = value {
                    let h = scale(*x) * panel;
                    let x0 = left + group * i as f64 + 10.0 + 24.0 * k as f64;
                    out += &format!(
                        "<rect x=\"{x0}\" y=\"{:.1}\" width=\"22\" height=\"{h:.1}\" fill=\"{}\"><title>{x:.2}</title></rect>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"8\" text-anchor=\"middle\">{}</text>\n",
                        base - h, COLORS[k], x0 + 11.0, base - h - 2.0,
                        if *x >= 100.0 { format!("{x:.0}") } else { format!("{x:.1}") }
                    );
                }
            }
        }
    }
    for target in [3.5, 5.5] {
        let y = top + panel - target / t_max * panel;
        out += &format!("<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"red\" stroke-dasharray=\"4 3\"/><text x=\"{}\" y=\"{:.1}\" fill=\"red\">target {target}x</text>\n", width - 200.0, width - 196.0, y + 4.0);
    }
    for (i, r) in records.iter().enumerate() {
        let x = left + group * i as f64 + 55.0;
        let y = top + 2.0 * panel + 60.0;
        out += &format!(
            "<text x=\"{x}\" y=\"{y}\" text-anchor=\"middle\">{}</text>\n",
            r.label()
        );
    }
    for (k, name) in NAMES.iter().enumerate() {
        let y = top + panel + 60.0 + 20.0 * k as f64;
        out += &format!("<rect x=\"{}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n", width - 190.0, COLORS[k], width - 172.0, y + 10.0);
    }
    out + "</svg>\n"
}

/// Burn's f32 matmul of the logits' shape (`H [N, D]` times `W^T`, cubecl's autotuned
/// kernels on Burn's wgpu device), the median of `repeats` after a warm-up, wall clock to
/// `Device::sync`.
#[cfg(feature = "burn")]
fn burn_matmul_ms(n: u32, d: u32, v: u32, repeats: usize) -> Result<f64, String> {
    use burn::tensor::{Tensor, TensorData};
    let device = burn_device()?.0;
    let values = |count: usize| {
        (0..count)
            .map(|i| ((i % 2001) as f32 / 1000.0 - 1.0) * 0.1)
            .collect::<Vec<f32>>()
    };
    let (n, d, v) = (n as usize, d as usize, v as usize);
    let h = Tensor::<2>::from_data(TensorData::new(values(n * d), [n, d]), &device);
    let w = Tensor::<2>::from_data(TensorData::new(values(v * d), [v, d]), &device);
    let mut times = Vec::new();
    for round in 0..=repeats {
        let start = Instant::now();
        let z = h.clone().matmul(w.clone().transpose());
        device.sync().map_err(|e| e.to_string())?;
        drop(z);
        if round > 0 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

#[cfg(not(feature = "burn"))]
fn burn_matmul_ms(_: u32, _: u32, _: u32, _: usize) -> Result<f64, String> {
    Err("no burn".into())
}

/// Burn's wgpu device, made once, and its setup (for the allocator report).
#[cfg(feature = "burn")]
fn burn_device() -> Result<(burn::tensor::Device, burn::tensor::wgpu::WgpuSetup), String> {
    use std::sync::OnceLock;
    static DEVICE: OnceLock<Result<(burn::tensor::Device, burn::tensor::wgpu::WgpuSetup), String>> =
        OnceLock::new();
    DEVICE
        .get_or_init(|| {
            // Burn's kernels autotuned fully in this run, with no cache from an earlier one:
            // on lavapipe the matmul that the default level had cached (in target/environment)
            // ran 1.5x slower than the best one a full tune finds, and which one a run got
            // changed between runs. CUBECL_* variables still override this.
            use cubecl::config::{autotune::AutotuneLevel, CubeClRuntimeConfig, RuntimeConfig};
            let mut config = CubeClRuntimeConfig::default();
            config.autotune.level = AutotuneLevel::Full;
            config.autotune.disable_cache = true;
            CubeClRuntimeConfig::try_set(config.override_from_env());
            burn::tensor::Device::wgpu_options()
                .init_with_setup()
                .map_err(|e| format!("Burn's wgpu runtime: {e}"))
        })
        .clone()
}

#[cfg(not(feature = "burn"))]
fn burn_head_ms(_: u32, _: u32, _: u32, _: usize) -> Result<(f64, u64), String> {
    Err("no burn".into())
}

/// A loss of hidden states and labels in Burn (the head is the closure's).
#[cfg(feature = "burn")]
type BurnHead = Box<
    dyn Fn(
        burn::tensor::Tensor<2>,
        burn::tensor::Tensor<1, burn::tensor::Int>,
    ) -> Result<burn::tensor::Tensor<1>, String>,
>;

/// One head in Burn, forward and `backward()` on an autodiff device over `plain`: the median
/// of `repeats` after a warm-up, and the bytes `plain`'s wgpu device holds after them (wgpu's
/// allocator report, `total_allocated_bytes`, after a `memory_cleanup` before the case and
/// another after the warm-up, so that the pages of earlier cases and of the autotune's trials
/// are gone and those this case's peak needed are what Burn's pool kept); an `Err` when the
/// head fails (Burn out of memory, lsce's error).
#[cfg(feature = "burn")]
fn burn_step_ms(
    (plain, setup): (burn::tensor::Device, burn::tensor::wgpu::WgpuSetup),
    (n, d, v): (u32, u32, u32),
    repeats: usize,
    head: impl FnOnce(&burn::tensor::Device) -> Result<BurnHead, String>,
) -> Result<(f64, u64), String> {
    use burn::tensor::{Int, Tensor, TensorData};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    plain.memory_cleanup();
    let device = plain.clone().autodiff();
    let (n, d, v) = (n as usize, d as usize, v as usize);
    let values = (0..n * d)
        .map(|i| ((i % 2001) as f32 / 1000.0 - 1.0) * 0.3)
        .collect::<Vec<f32>>();
    let labels = (0..n)
        .map(|r| ((r * 7919) % v) as i64)
        .collect::<Vec<i64>>();
    let run = || -> Result<f64, String> {
        let loss_of = head(&device)?;
        let mut times = Vec::new();
        for round in 0..=repeats {
            let x = Tensor::<2>::from_data(TensorData::new(values.clone(), [n, d]), &device)
                .require_grad();
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [n]), &device);
            let start = Instant::now();
            let grads = loss_of(x, y)?.backward();
            drop(grads);
            device.sync().map_err(|e| e.to_string())?;
            if round > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            } else {
                // The warm-up round autotuned Burn's kernels, whose trial buffers the pool
                // keeps: freed here, so that the report holds what the step itself needs.
                plain.memory_cleanup();
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let t = catch_unwind(AssertUnwindSafe(run))
        .map_err(|_| "Burn failed (out of memory?)".to_string())??;
    let allocated = setup
        .device
        .generate_allocator_report()
        .map(|r| r.total_allocated_bytes)
        .ok_or("Burn's device gives no allocator report")?;
    Ok((t, allocated))
}

/// Burn's `Linear` + `CrossEntropyLoss` (smoothing 0.1), timed and measured by `burn_step_ms`
/// on Burn's default device.
#[cfg(feature = "burn")]
fn burn_head_ms(n: u32, d: u32, v: u32, repeats: usize) -> Result<(f64, u64), String> {
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::nn::LinearConfig;
    burn_step_ms(burn_device()?, (n, d, v), repeats, |device| {
        let linear = LinearConfig::new(d as usize, v as usize).init(device);
        let loss = CrossEntropyLossConfig::new()
            .with_smoothing(Some(0.1))
            .init(device);
        Ok(Box::new(move |x, y| Ok(loss.forward(linear.forward(x), y))))
    })
}

/// lsce's `LsceLinearLoss` in Burn (smoothing 0.1, a bias, recompute mode, `Keep`), timed and
/// measured by `burn_step_ms` on its own Burn runtime (of the adapter kind `kind`, with the
/// exclusive pages lsce needs).
#[cfg(feature = "burn")]
fn burn_fused_ms(
    n: u32,
    d: u32,
    v: u32,
    repeats: usize,
    kind: wgpu::DeviceType,
) -> Result<(f64, u64), String> {
    burn_step_ms(burn_fused_device(kind)?, (n, d, v), repeats, |device| {
        let head = lsce::burn::LsceLinearLossConfig::new()
            .with_smoothing(Some(0.1))
            .with_label_check(false)
            .init(d as usize, v as usize, device)
            .map_err(|e| e.to_string())?;
        Ok(Box::new(move |x, y| {
            head.try_forward(x, y).map_err(|e| e.to_string())
        }))
    })
}

/// A second Burn wgpu runtime on the kind of adapter lsce's device is, shared with lsce.
#[cfg(feature = "burn")]
fn burn_fused_device(
    kind: wgpu::DeviceType,
) -> Result<(burn::tensor::Device, burn::tensor::wgpu::WgpuSetup), String> {
    use burn::tensor::DeviceKind;
    use std::sync::OnceLock;
    static DEVICE: OnceLock<Result<(burn::tensor::Device, burn::tensor::wgpu::WgpuSetup), String>> =
        OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let kind = match kind {
                wgpu::DeviceType::Cpu => DeviceKind::Cpu,
                wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(0),
                wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(0),
                _ => DeviceKind::DiscreteGpu(0),
            };
            let (device, setup) = burn::tensor::Device::wgpu_options()
                .device_kind(kind)
                .memory_config(burn::tensor::wgpu::MemoryConfiguration::ExclusivePages)
                .init_with_setup()
                .map_err(|e| format!("Burn's wgpu runtime: {e}"))?;
            lsce::burn::register_setup(&device, &setup).map_err(|e| e.to_string())?;
            Ok((device, setup))
        })
        .clone()
}

#[cfg(not(feature = "burn"))]
fn burn_fused_ms(
    _: u32,
    _: u32,
    _: u32,
    _: usize,
    _: wgpu::DeviceType,
) -> Result<(f64, u64), String> {
    Err("no burn".into())
}
