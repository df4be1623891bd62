//! Benchmark of the fused label-smoothed cross-entropy: how close the fused forward+backward
//! comes to the memory-bandwidth limit, and what it saves over the unfused computation, on any
//! adapter wgpu offers.
//!
//! ```text
//! cargo bench --bench lsce -- [--backend vulkan|metal|dx12|gl|all] [--shapes 4096x32000,..]
//!                              [--dtype f32|f16|bf16] [--quick] [--json FILE] [--plot FILE] ..
//! ```
//! (`--help` lists every option.)
//!
//! # What is measured
//!
//! Every case is a `rows x classes` shape with class labels and `LossSpec::pytorch(0.1)`
//! (uniform smoothing 0.1, ignore index -100, mean), in one `--dtype`: f32 logits, or f16 or
//! bf16 logits packed two per 32-bit word as the crate reads them. The gradient has the
//! logits' dtype (`Problem::with_dtype`). On one adapter, in one run:
//!
//! * **copy**: `copy_main` of `bench.wgsl` copies the logits into a second buffer of the
//!   same size (vec4 loads and stores, grid-stride loop). `copy GB/s` counts the bytes read and
//!   written (`2 * rows * classes * bytes`, 2 bytes an element for f16 and bf16): the practical
//!   limit of any kernel that reads the logits and writes a gradient of the same size.
//! * **read**: `read_main` sums the logits' words; `read GB/s` is the limit of a kernel that
//!   only reads.
//! * **fused**: the crate's plan with `Gradient::Separate` (loss, gradient and mean in one compute
//!   pass). `fused GB/s` counts the minimal traffic, the logits read once and the gradient written
//!   once (`bytes` each an element), so `/copy` (`ratio_to_copy`) = fused GB/s / copy GB/s =
//!   copy time / fused time: 1.0 means as fast as a copy, whatever the kernel does internally.
//! * **forward**: the plan with `Gradient::None`; `fwd GB/s` counts the logits read once and
//!   `/read` compares it with the read kernel.
//! * **unfused**: the same loss computed the way composite frameworks (PyTorch eager) do it, one
//!   kernel per step, written in `bench.wgsl`: log-sum-exp, log_softmax materialised,
//!   the smoothed loss per row, the mean, the gradient from the saved log_softmax.
//!   The intermediates are f32 whatever the dtype, as PyTorch's mixed precision (autocast) runs
//!   cross_entropy in f32; 16-bit logits are decoded where they are read (log-sum-exp and
//!   log_softmax) rather than by a separate cast kernel, and the gradient is written in the
//!   logits' dtype, like the fused plan's, by the last kernel rather than by a cast. Per
//!   logit, with `b` bytes an element: log-sum-exp reads `2b` (two sweeps), log_softmax reads
//!   `b` and writes 4, the row loss reads 4, the gradient reads 4 and writes `b`. With f32 the
//!   gradient is written over the log_softmax (the same traffic as a separate buffer, one
//!   `rows x classes` allocation less); with 16 bits into the gradient buffer the fused plan
//!   uses, beside an f32 log_softmax buffer. `speedup` = unfused ms / fused ms. At start-up the
//!   baseline, the copy and the fused plan are checked against `lsce::cpu` in every dtype the
//!   crate plans on the adapter, on a small case cut into several binding windows (the 16-bit
//!   gradients within their rounding); the run aborts if any disagrees.
//! * **cpu**: `lsce::cpu::compute` with the gradient: the crate's f64 reference on one thread,
//!   not a tuned CPU kernel; 16-bit logits are passed as `Logits::F16`/`Logits::Bf16` and
//!   decoded by it. Shapes over `CPU_MAX_ELEMENTS` logits time only their first rows and scale
//!   the time to all rows (marked `*` in the table, `cpu_rows` in the JSON).
//!
//! # How
//!
//! Each GPU measurement is one compute pass (the plan's own pass; the copy's and the unfused
//! steps' dispatches in one pass, where wgpu puts a barrier between dispatches), submitted alone
//! and waited for: `--warmup` runs, then `--repeats` runs whose median is reported. With
//! `TIMESTAMP_QUERY` the time is the difference of the GPU timestamps written at the pass's
//! beginning and end (times `Queue::get_timestamp_period`); without it, the wall clock from
//! submit to the end of the wait, which includes the submission latency. The table's heading
//! says which was used.
//!
//! The logits are generated on the GPU by `fill_main` (a hash of the index, uniform in
//! [-8, 8), rounded to the dtype), so no host copy of large inputs is made; labels are
//! `(7919 r + 13) mod classes`. Inputs larger than `max_storage_buffer_binding_size` are
//! processed in row windows, as the crate does. A shape is skipped (and the reason printed) when
//! the crate cannot plan it, when an f32 `rows x classes` buffer (the logits', or the unfused
//! log_softmax) exceeds `max_buffer_size`, when the `rows x classes` buffers (logits and
//! gradient, and the f32 log_softmax for 16 bits: 8 bytes a logit in every dtype) exceed
//! `--max-memory` (by default 80% of the available RAM for CPU adapters, unlimited otherwise),
//! or when the adapter runs out of memory allocating them.
//!
//! Without the `--bench` flag that `cargo bench` passes (for example under
//! `cargo test --all-targets`) the binary only runs the start-up check and one small case.
//!
//! # Files
//!
//! `cli.rs` (options), `gpu.rs` (the device, the crate's kernel as configured, timestamps),
//! `cases.rs` (a shape's buffers and plans, timed), `check.rs` (the start-up check),
//! `unfused.rs` with `bench.wgsl` (the bench's own kernels: the unfused baseline, copy, read,
//! fill), `windows.rs` (their row windows), `report.rs` (table, JSON, SVG).

mod cases;
mod check;
mod cli;
mod gpu;
#[cfg(feature = "burn")]
mod in_burn;
mod report;
mod unfused;
mod windows;

use std::process::ExitCode;

use lsce::{Dtype, Shape};

use cli::{parse_args, BackendChoice, Options, USAGE};
use gpu::Gpu;
use report::{plot_svg, print_table, to_json, Record};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> Result<(), String> {
    if options.smoke {
        eprintln!(
            "lsce bench: no --bench flag (run by cargo test?): start-up check and one small \
             case only; use `cargo bench --bench lsce` to measure"
        );
    }
    let mut records = Vec::new();
    for (device, queue) in open_devices(options)? {
        let gpu = Gpu::new(device, queue, options)?;
        let info = gpu.device.adapter_info();
        eprintln!(
            "adapter: {} ({}, {:?}); start-up check of the unfused baseline, copy and fused plan",
            info.name,
            info.backend.to_str(),
            info.device_type
        );
        gpu.check()?;
        let max_memory = options.max_memory.or_else(|| {
            (info.device_type == wgpu::DeviceType::Cpu)
                .then(available_ram)
                .flatten()
                .map(|bytes| bytes / 5 * 4)
        });
        let first = records.len();
        let cases: Vec<(Shape, Dtype)> = options
            .shapes
            .iter()
            .flat_map(|&s| options.dtypes.iter().map(move |&d| (s, d)))
            .collect();
        for (n, &(shape, dtype)) in cases.iter().enumerate() {
            let tag = format!(
                "[{}/{}] {} {}x{} {dtype}",
                n + 1,
                cases.len(),
                info.backend.to_str(),
                shape.rows(),
                shape.classes(),
            );
            let outcome = gpu.run_case(shape, dtype, max_memory, options, &tag);
            if let Err(reason) = &outcome {
                eprintln!("{tag}: skipped: {reason}");
            }
            records.push(Record {
                backend: info.backend.to_str(),
                adapter: info.name.clone(),
                device_type: format!("{:?}", info.device_type),
                timing: gpu.timing_name(),
                rows: shape.rows(),
                classes: shape.classes(),
                dtype,
                repeats: options.repeats,
                config: gpu.kernel.config(),
                subgroups: gpu.kernel.uses_subgroups(),
                outcome,
            });
        }
        print_table(&gpu, options, &records[first..]);
    }
    // Objects appended to the JSON array after the records: the Burn rows with feature `burn`.
    #[cfg_attr(not(feature = "burn"), allow(unused_mut))]
    let mut extra_json: Vec<String> = Vec::new();
    #[cfg(feature = "burn")]
    extra_json.extend(in_burn::json_objects(
        &burn_rows(options)?,
        report::json_string,
        report::json_number,
    ));
    if options.smoke {
        // Exercise the writers too; the files themselves are for `cargo bench`.
        let (json, svg) = (to_json(&records, &extra_json), plot_svg(&records));
        if !json.starts_with('[') || !svg.starts_with("<svg") {
            return Err("the JSON or SVG writer produced nothing".into());
        }
    }
    if let Some(path) = &options.json {
        std::fs::write(path, to_json(&records, &extra_json))
            .map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    if let Some(path) = &options.plot {
        std::fs::write(path, plot_svg(&records)).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// The Burn rows (feature `burn`, see `in_burn`): lsce in Burn against Burn's own loss, on
/// Burn's default adapter, at the same shapes; at most 3 repeats (Burn's loss is slow).
#[cfg(feature = "burn")]
fn burn_rows(options: &Options) -> Result<Vec<in_burn::BurnRecord>, String> {
    let bench = in_burn::BurnBench::new()?;
    let max_memory = options
        .max_memory
        .or_else(|| available_ram().map(|bytes| bytes / 5 * 4));
    let repeats = options.repeats.min(3);
    let records: Vec<_> = options
        .shapes
        .iter()
        .enumerate()
        .map(|(n, &shape)| {
            eprintln!(
                "[burn {}/{}] {}x{}",
                n + 1,
                options.shapes.len(),
                shape.rows(),
                shape.classes()
            );
            bench.run_case(shape, repeats, options.warmup.min(1), max_memory)
        })
        .collect();
    in_burn::print_table(&records);
    Ok(records)
}

fn open_devices(options: &Options) -> Result<Vec<(wgpu::Device, wgpu::Queue)>, String> {
    let mut device_options = lsce::DeviceOptions::default();
    if let Some(name) = &options.adapter {
        device_options.adapter_name = Some(name.clone());
    }
    let backends = match options.backend {
        BackendChoice::Default => return single_device(&device_options),
        BackendChoice::Only(backends) => {
            device_options.backends = backends;
            return single_device(&device_options);
        }
        BackendChoice::All => wgpu::Backends::all(),
    };
    let name = device_options.adapter_name.map(|n| n.to_lowercase());
    let mut devices = Vec::new();
    for adapter in lsce::adapters(backends) {
        let info = adapter.get_info();
        if name
            .as_ref()
            .is_some_and(|n| !info.name.to_lowercase().contains(n))
        {
            continue;
        }
        match lsce::device_for_adapter(&adapter) {
            Ok(d) => devices.push(d),
            Err(e) => eprintln!("skipping {} ({}): {e}", info.name, info.backend.to_str()),
        }
    }
    if devices.is_empty() {
        return Err("no usable adapter found".into());
    }
    Ok(devices)
}

fn single_device(
    options: &lsce::DeviceOptions,
) -> Result<Vec<(wgpu::Device, wgpu::Queue)>, String> {
    lsce::request_device(options)
        .map(|d| vec![d])
        .map_err(|e| e.to_string())
}

/// `MemAvailable` of /proc/meminfo: what a CPU adapter's buffers can use.
fn available_ram() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
