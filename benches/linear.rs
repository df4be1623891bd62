//! The fused linear head's modes against its forward pass, on one device.
//!
//! ```text
//! cargo bench --bench linear -- [--shapes 1024x256x8192,..] [--repeats N] [--json FILE]
//! ```
//!
//! For each `rows x dim x vocab` shape (f32, class labels, `LossSpec::pytorch(0.1)`, mean, a
//! bias), each variant is one command buffer submitted alone and waited for (wall clock from
//! submit to the end of the wait), the variants run in rotation `--repeats` times after a
//! warm-up round so that a change of the machine's load hits all alike; the table gives
//! medians, and ratios to the forward pass of the same round:
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
//! * **burn mm** (feature `burn`): Burn's f32 matmul of the same shape (cubecl's autotuned
//!   kernels) on Burn's own wgpu device;
//! * **burn head** (feature `burn`): Burn's `Linear` + `CrossEntropyLoss` (smoothing 0.1),
//!   forward and `backward()` on an autodiff device, and its peak device memory: wgpu's
//!   allocator report of Burn's device (`total_reserved_bytes`, Burn's pool after the runs);
//! * **burn fused** (feature `burn`): `lsce::burn::LsceLinearLoss` (smoothing 0.1, a bias,
//!   recompute mode, the gradients kept from the forward pass) in Burn, forward and
//!   `backward()` on an autodiff device, timed and measured as **burn head**, on a second Burn
//!   runtime of the same kind of adapter (Burn's default device does not run with the
//!   exclusive pages lsce needs, and each row's pool is then its own).
//!
//! The lsce rows' device memory is the sum of the buffers the run allocates (inputs, outputs,
//! and the plan's scratch; the unfused path's logits too): `mem` columns, in MB.
//!
//! `scratch` is each plan's `scratch_bytes()`, `logits` the `4 N V` bytes a materialised
//! logits buffer takes (which the unfused path holds, plus its loss plan's scratch). Without `--bench` (under `cargo test --all-targets`) a small
//! shape runs once, as a smoke test.

use std::time::{Duration, Instant};

use lsce::linear::{HeadGradients, LinearBuffers, LinearPlan, LinearProblem, Memory};
use lsce::{LossKernel, LossSpec, Summary};
use wgpu::util::DeviceExt;

/// Records one variant's step into an encoder.
type Encode = Box<dyn Fn(&mut wgpu::CommandEncoder)>;

fn main() {
    if let Err(e) = run() {
        eprintln!("linear bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut shapes: Vec<(u32, u32, u32)> = if smoke {
        vec![(64, 32, 500)]
    } else {
        // The --quick set of a CPU adapter: the issue's shapes (4096x512x32000 and up) take
        // minutes per matmul on lavapipe; pass them with --shapes on a GPU.
        vec![(512, 256, 8192), (128, 512, 32000), (1024, 128, 16384)]
    };
    let mut repeats = if smoke { 1 } else { 5 };
    let mut json = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bench" => {}
            "--repeats" => repeats = value()?.parse().map_err(|e| format!("--repeats: {e}"))?,
            "--json" => json = Some(value()?),
            "--shapes" => {
                shapes = value()?
                    .split(',')
                    .map(|s| {
                        let v: Vec<u32> = s
                            .split('x')
                            .map(|x| x.parse().map_err(|e| format!("{s}: {e}")))
                            .collect::<Result<_, _>>()?;
                        match v[..] {
                            [n, d, v] => Ok((n, d, v)),
                            _ => Err(format!("a shape is NxDxV, not {s}")),
                        }
                    })
                    .collect::<Result<_, String>>()?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let (device, queue) =
        lsce::request_device(&lsce::DeviceOptions::default()).map_err(|e| e.to_string())?;
    let kernel = LossKernel::new(&device).map_err(|e| e.to_string())?;
    let info = device.adapter_info();
    println!(
        "adapter: {} ({:?}); wall clock, medians of {repeats} rounds",
        info.name, info.backend
    );
    println!(
        "{:>16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "NxDxV", "mm ms", "fwd ms", "recomp", "chunked", "unfused", "rec/mm", "chk/mm", "rec/unf", "chk/unf", "rec scr", "chk scr", "logits", "burn mm", "burn head", "rec mem", "unf mem", "burn mem", "bfused", "bfus mem"
    );
    let mut rows_json = Vec::new();
    for &(n, d, v) in &shapes {
        let spec = LossSpec::pytorch(0.1);
        let base = LinearProblem::new(spec, n, d, v)
            .map_err(|e| e.to_string())?
            .with_bias(true);
        let logits_bytes = u64::from(n) * u64::from(v) * 4;
        let budget = (logits_bytes / 4).max(64 * u64::from(v) * 4);
        let variants = [
            base.with_gradients(HeadGradients::None),
            base,
            base.with_memory(Memory::Chunked {
                budget_bytes: budget,
            }),
        ];
        let init = |label, bytes: Vec<u8>| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            })
        };
        let floats = |count: u64, seed: u32| -> Vec<u8> {
            let scale = 1.0 / (d as f32).sqrt().sqrt();
            (0..count)
                .flat_map(|i| {
                    ((((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                        .mul_add(scale, 0.0)
                        .to_le_bytes()
                })
                .collect()
        };
        let hidden = init("hidden", floats(u64::from(n) * u64::from(d), 1));
        let head = init("head", floats(u64::from(v) * u64::from(d), 2));
        let bias = init("bias", floats(u64::from(v), 3));
        let labels = init(
            "labels",
            (0..n)
                .flat_map(|r| ((r * 7919) % v).to_le_bytes())
                .collect(),
        );
        let zeros = |bytes: u64| init("out", vec![0u8; bytes as usize]);
        let summary = zeros(Summary::SIZE);
        let (dh, dw, db) = (
            zeros(u64::from(n) * u64::from(d) * 4),
            zeros(u64::from(v) * u64::from(d) * 4),
            zeros(u64::from(v) * 4),
        );
        let base_buffers = || {
            LinearBuffers::new(
                hidden.slice(..),
                head.slice(..),
                labels.slice(..),
                summary.slice(..),
            )
            .with_bias(bias.slice(..))
        };
        let with_grads =
            || base_buffers().with_grads(dh.slice(..), Some(dw.slice(..)), Some(db.slice(..)));
        // Encoders of each variant, in the table's order.
        let mut variants_encode: Vec<Encode> = Vec::new();
        let mut scratch = Vec::new();
        let full =
            LinearPlan::new(&kernel, &variants[1]).map_err(|e| format!("{n}x{d}x{v}: {e}"))?;
        let logits = zeros(logits_bytes);
        let matmul = full
            .bind_logits(&with_grads(), logits.slice(..))
            .map_err(|e| e.to_string())?;
        variants_encode.push(Box::new(move |e| matmul.encode(e)));
        for problem in &variants {
            let plan =
                LinearPlan::new(&kernel, problem).map_err(|e| format!("{n}x{d}x{v}: {e}"))?;
            let buffers = if problem.gradients == HeadGradients::All {
                with_grads()
            } else {
                base_buffers()
            };
            let binding = plan.bind(&buffers).map_err(|e| e.to_string())?;
            scratch.push(plan.scratch_bytes());
            variants_encode.push(Box::new(move |e| binding.encode(e)));
        }
        let loss_plan = kernel
            .plan(
                &lsce::Problem::new(spec, lsce::Shape::matrix(n, v).map_err(|e| e.to_string())?)
                    .with_gradient(lsce::Gradient::InPlace),
            )
            .map_err(|e| e.to_string())?;
        let loss_scratch_bytes = loss_plan.scratch_bytes();
        let loss_binding = loss_plan
            .bind(&lsce::LossBuffers::new(
                logits.slice(..),
                labels.slice(..),
                summary.slice(..),
            ))
            .map_err(|e| e.to_string())?;
        let to_logits = full
            .bind_logits(&with_grads(), logits.slice(..))
            .map_err(|e| e.to_string())?;
        let products = full
            .bind_products(&with_grads(), logits.slice(..))
            .map_err(|e| e.to_string())?;
        variants_encode.push(Box::new(move |e| {
            to_logits.encode(e);
            loss_binding.encode(e);
            products.encode(e);
        }));
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); variants_encode.len()];
        for round in 0..=repeats {
            for (i, encode) in variants_encode.iter().enumerate() {
                let mut encoder = device.create_command_encoder(&Default::default());
                encode(&mut encoder);
                let start = Instant::now();
                queue.submit([encoder.finish()]);
                device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| e.to_string())?;
                if round > 0 {
                    times[i].push(start.elapsed());
                }
            }
        }
        let median = |t: &mut Vec<Duration>| {
            t.sort();
            t[t.len() / 2].as_secs_f64() * 1e3
        };
        let ms: Vec<f64> = times.iter_mut().map(median).collect();
        let burn = burn_matmul_ms(n, d, v, repeats);
        let burn_head = burn_head_ms(n, d, v, repeats);
        let burn_fused = burn_fused_ms(n, d, v, repeats, info.device_type);
        let [mm, fwd, rec, chk, unf] = [ms[0], ms[1], ms[2], ms[3], ms[4]];
        // Inputs (H, W, b, labels, summary) and outputs (dH, dW, db) every variant holds.
        let io = (u64::from(n) * u64::from(d) + u64::from(v) * u64::from(d) + u64::from(v)) * 4 * 2
            + u64::from(n) * 4
            + Summary::SIZE;
        let loss_scratch = loss_scratch_bytes;
        let rec_mem = io + scratch[1];
        let unf_mem = io + logits_bytes + loss_scratch + scratch[1];
        let mb = |b: u64| format!("{:.1}", b as f64 / 1e6);
        println!(
            "{:>16} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9}",
            format!("{n}x{d}x{v}"), mm, fwd, rec, chk, unf, rec / mm, chk / mm, rec / unf, chk / unf, scratch[1], scratch[2], logits_bytes,
            burn.as_ref().map_or_else(|e| e.clone(), |t| format!("{t:.1}")),
            burn_head.as_ref().map_or_else(|e| e.clone(), |(t, _)| format!("{t:.1}")),
            mb(rec_mem), mb(unf_mem),
            burn_head.as_ref().map_or_else(|e| e.clone(), |(_, m)| mb(*m)),
            burn_fused.as_ref().map_or_else(|e| e.clone(), |(t, _)| format!("{t:.1}")),
            burn_fused.as_ref().map_or_else(|e| e.clone(), |(_, m)| mb(*m)),
        );
        rows_json.push(format!(
            "{{\"shape\":[{n},{d},{v}],\"matmul_ms\":{mm:.4},\"forward_ms\":{fwd:.4},\"recompute_ms\":{rec:.4},\"chunked_ms\":{chk:.4},\"unfused_ms\":{unf:.4},\"burn_matmul_ms\":{},\"recompute_scratch\":{},\"chunked_scratch\":{},\"chunk_budget\":{budget},\"logits_bytes\":{logits_bytes}}}",
            burn.map_or("null".to_string(), |t| format!("{t:.4}")), scratch[1], scratch[2]
        ));
        let last = rows_json.pop().unwrap_or_default();
        rows_json.push(format!(
            "{},\"recompute_device_bytes\":{rec_mem},\"unfused_device_bytes\":{unf_mem},\"burn_head_ms\":{},\"burn_head_device_bytes\":{},\"burn_fused_ms\":{},\"burn_fused_device_bytes\":{}}}",
            &last[..last.len() - 1],
            burn_head.as_ref().map_or("null".to_string(), |(t, _)| format!("{t:.4}")),
            burn_head.as_ref().map_or("null".to_string(), |(_, m)| m.to_string()),
            burn_fused.as_ref().map_or("null".to_string(), |(t, _)| format!("{t:.4}")),
            burn_fused.as_ref().map_or("null".to_string(), |(_, m)| m.to_string()),
        ));
    }
    if let Some(path) = json {
        let text = format!(
            "{{\"adapter\":\"{}\",\"backend\":\"{:?}\",\"rows\":[{}]}}\n",
            info.name,
            info.backend,
            rows_json.join(",")
        );
        std::fs::write(&path, text).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
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

/// Burn's `Linear` + `CrossEntropyLoss` (smoothing 0.1), forward and backward on an autodiff
/// device: the median of `repeats` after a warm-up, and the reserved bytes of Burn's device
/// (wgpu's allocator report) after them; an `Err` when Burn fails (out of memory).
#[cfg(feature = "burn")]
fn burn_head_ms(n: u32, d: u32, v: u32, repeats: usize) -> Result<(f64, u64), String> {
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::nn::LinearConfig;
    use burn::tensor::{Int, Tensor, TensorData};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let (plain, setup) = burn_device()?;
    let device = plain.clone().autodiff();
    let (n, d, v) = (n as usize, d as usize, v as usize);
    let values = (0..n * d)
        .map(|i| ((i % 2001) as f32 / 1000.0 - 1.0) * 0.3)
        .collect::<Vec<f32>>();
    let labels = (0..n)
        .map(|r| ((r * 7919) % v) as i64)
        .collect::<Vec<i64>>();
    let run = || -> Result<f64, String> {
        let linear = LinearConfig::new(d, v).init(&device);
        let loss_fn = CrossEntropyLossConfig::new()
            .with_smoothing(Some(0.1))
            .init(&device);
        let mut times = Vec::new();
        for round in 0..=repeats {
            let x = Tensor::<2>::from_data(TensorData::new(values.clone(), [n, d]), &device)
                .require_grad();
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [n]), &device);
            let start = Instant::now();
            let loss = loss_fn.forward(linear.forward(x), y);
            let grads = loss.backward();
            drop(grads);
            device.sync().map_err(|e| e.to_string())?;
            if round > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let t = catch_unwind(AssertUnwindSafe(run))
        .map_err(|_| "Burn failed (out of memory?)".to_string())??;
    let reserved = setup
        .device
        .generate_allocator_report()
        .map_or(0, |r| r.total_reserved_bytes);
    Ok((t, reserved))
}

/// Burn's wgpu device, made once, and its setup (for the allocator report).
#[cfg(feature = "burn")]
fn burn_device() -> Result<(burn::tensor::Device, burn::tensor::wgpu::WgpuSetup), String> {
    use std::sync::OnceLock;
    static DEVICE: OnceLock<Result<(burn::tensor::Device, burn::tensor::wgpu::WgpuSetup), String>> =
        OnceLock::new();
    DEVICE
        .get_or_init(|| {
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

/// lsce's `LsceLinearLoss` in Burn (smoothing 0.1, a bias, recompute mode, `Keep`), forward
/// and backward on an autodiff device, measured as `burn_head_ms` on its own Burn runtime (of
/// the adapter kind `kind`, with the exclusive pages lsce needs); an `Err` when it fails.
#[cfg(feature = "burn")]
fn burn_fused_ms(
    n: u32,
    d: u32,
    v: u32,
    repeats: usize,
    kind: wgpu::DeviceType,
) -> Result<(f64, u64), String> {
    use burn::tensor::{Int, Tensor, TensorData};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let (plain, setup) = burn_fused_device(kind)?;
    let device = plain.clone().autodiff();
    let (n, d, v) = (n as usize, d as usize, v as usize);
    let values = (0..n * d)
        .map(|i| ((i % 2001) as f32 / 1000.0 - 1.0) * 0.3)
        .collect::<Vec<f32>>();
    let labels = (0..n)
        .map(|r| ((r * 7919) % v) as i64)
        .collect::<Vec<i64>>();
    let run = || -> Result<f64, String> {
        let head = lsce::burn::LsceLinearLossConfig::new()
            .with_smoothing(Some(0.1))
            .with_label_check(false)
            .init(d, v, &device)
            .map_err(|e| e.to_string())?;
        let mut times = Vec::new();
        for round in 0..=repeats {
            let x = Tensor::<2>::from_data(TensorData::new(values.clone(), [n, d]), &device)
                .require_grad();
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [n]), &device);
            let start = Instant::now();
            let loss = head.try_forward(x, y).map_err(|e| e.to_string())?;
            let grads = loss.backward();
            drop(grads);
            device.sync().map_err(|e| e.to_string())?;
            if round > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let t =
        catch_unwind(AssertUnwindSafe(run)).map_err(|_| "lsce in Burn failed".to_string())??;
    let reserved = setup
        .device
        .generate_allocator_report()
        .map_or(0, |r| r.total_reserved_bytes);
    Ok((t, reserved))
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
