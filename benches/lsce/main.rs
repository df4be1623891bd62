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

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Instant;

use bytemuck::{Pod, Zeroable};
use lsce::{
    cpu, Batch, Dtype, Gradient, KernelConfig, Logits, LossBuffers, LossKernel, LossPlan, LossSpec,
    Problem, Shape, Summary,
};

const USAGE: &str = "\
usage: cargo bench --bench lsce -- [options]

  --backend B       vulkan, metal, dx12, gl, or all (every adapter, one after the other);
                    default: the default adapter (WGPU_BACKEND / WGPU_ADAPTER_NAME apply)
  --adapter NAME    only adapters whose name contains NAME (case-insensitive)
  --shapes LIST     ROWSxCLASSES,... (default 4096x1000,4096x32000,256x128256,64x262144,
                    16384x50257; with --quick 1024x1000,256x32000,32x128256,8x262144)
  --dtype LIST      f32, f16, bf16, comma-separated (default f32)
  --repeats N       timed runs per measurement, median reported (default 7; --quick 3)
  --warmup N        untimed runs first (default 2; --quick 1)
  --max-memory GIB  skip shapes whose rows x classes buffers (8 bytes a logit) exceed GIB
  --row-workgroup N, --row-cache N, --row-groups N|all, --row-teams N, --no-subgroups
                    override the adapter's default lsce::KernelConfig
  --quick           a small set of shapes and fewer repeats
  --json FILE       write the results as a JSON array of records
  --plot FILE       write an SVG of ratio_to_copy against classes
  --help            this text";

const DEFAULT_SHAPES: &[(u32, u32)] = &[
    (4096, 1000),
    (4096, 32000),
    (256, 128256),
    (64, 262144),
    (16384, 50257),
];
const QUICK_SHAPES: &[(u32, u32)] = &[(1024, 1000), (256, 32000), (32, 128256), (8, 262144)];
/// Query-set slots are limited to 4096, two per timed run.
const MAX_REPEATS: usize = 1000;
/// The CPU reference times at most this many logits and scales to the whole shape.
const CPU_MAX_ELEMENTS: u64 = 1 << 22;
/// Workgroup size of every kernel in bench.wgsl (`WG` there).
const WG: u32 = 256;
/// Most workgroups a streaming kernel is dispatched with; its grid-stride loop covers the rest.
/// 4M invocations are several full waves on any GPU.
const STREAM_GROUPS: u32 = 16384;

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

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Clone, Debug)]
enum BackendChoice {
    Default,
    Only(wgpu::Backends),
    All,
}

#[derive(Clone, Debug)]
struct Options {
    backend: BackendChoice,
    adapter: Option<String>,
    shapes: Vec<Shape>,
    dtypes: Vec<Dtype>,
    repeats: usize,
    warmup: usize,
    max_memory: Option<u64>,
    /// Overrides of the adapter's default `KernelConfig`.
    row_workgroup: Option<u32>,
    row_cache: Option<u32>,
    /// `Some(None)`: one row-kernel workgroup per row (`--row-groups all`).
    row_groups: Option<Option<u32>>,
    /// `KernelConfig::min_row_teams` (`--row-teams`): split rows below this many.
    row_teams: Option<u32>,
    subgroups: bool,
    json: Option<String>,
    plot: Option<String>,
    /// Run by `cargo test`: the start-up check and one small case, no files.
    smoke: bool,
}

/// `Ok(None)` for `--help`.
fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        backend: BackendChoice::Default,
        adapter: None,
        shapes: vec![shape(64, 1000)?],
        dtypes: vec![Dtype::F32],
        repeats: 1,
        warmup: 0,
        max_memory: None,
        row_workgroup: None,
        row_cache: None,
        row_groups: None,
        row_teams: None,
        subgroups: true,
        json: None,
        plot: None,
        smoke: true,
    };
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without `--bench` (and may pass libtest
        // flags, which mean nothing here): keep that run short and ignore the arguments.
        return Ok(Some(o));
    }
    o.smoke = false;
    let (mut shapes, mut repeats, mut warmup, mut quick) = (None, None, None, false);
    let mut i = 0;
    while i < args.len() {
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match args[i].split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (args[i].as_str(), None),
        };
        i += 1;
        let mut value = || -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            let v = args
                .get(i)
                .filter(|v| !v.starts_with("--"))
                .ok_or(format!("{flag} needs a value"))?;
            i += 1;
            Ok(v.clone())
        };
        match flag {
            "--bench" => {}
            "--help" | "-h" => return Ok(None),
            "--quick" => quick = true,
            "--backend" => o.backend = parse_backend(&value()?)?,
            "--adapter" => o.adapter = Some(value()?),
            "--shapes" => shapes = Some(parse_shapes(&value()?)?),
            "--dtype" => o.dtypes = parse_dtypes(&value()?)?,
            "--repeats" => repeats = Some(parse_count(flag, &value()?, 1, MAX_REPEATS)?),
            "--warmup" => warmup = Some(parse_count(flag, &value()?, 0, 100)?),
            "--max-memory" => {
                let v = value()?;
                let gib: f64 = v
                    .parse()
                    .ok()
                    .filter(|g: &f64| g.is_finite() && *g > 0.0)
                    .ok_or(format!(
                        "--max-memory: `{v}` is not a positive number of GiB"
                    ))?;
                o.max_memory = Some((gib * (1u64 << 30) as f64) as u64);
            }
            // The kernel checks the values against the device (LossKernel::with_config).
            "--row-workgroup" => {
                o.row_workgroup = Some(parse_count(flag, &value()?, 1, 1 << 16)? as u32)
            }
            "--row-cache" => o.row_cache = Some(parse_count(flag, &value()?, 1, 1 << 16)? as u32),
            "--row-teams" => o.row_teams = Some(parse_count(flag, &value()?, 1, 1 << 24)? as u32),
            "--row-groups" => {
                let v = value()?;
                o.row_groups = Some(if v == "all" {
                    None
                } else {
                    Some(parse_count(flag, &v, 1, 1 << 30)? as u32)
                });
            }
            "--no-subgroups" => o.subgroups = false,
            "--json" => o.json = Some(value()?),
            "--plot" => o.plot = Some(value()?),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    o.shapes = match shapes {
        Some(s) => s,
        None => (if quick { QUICK_SHAPES } else { DEFAULT_SHAPES })
            .iter()
            .map(|&(r, c)| shape(r, c))
            .collect::<Result<_, _>>()?,
    };
    o.repeats = repeats.unwrap_or(if quick { 3 } else { 7 });
    o.warmup = warmup.unwrap_or(if quick { 1 } else { 2 });
    Ok(Some(o))
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "all" => BackendChoice::All,
        "vulkan" => BackendChoice::Only(wgpu::Backends::VULKAN),
        "metal" => BackendChoice::Only(wgpu::Backends::METAL),
        "dx12" => BackendChoice::Only(wgpu::Backends::DX12),
        "gl" => BackendChoice::Only(wgpu::Backends::GL),
        _ => {
            return Err(format!(
                "--backend: `{s}` is not vulkan, metal, dx12, gl or all"
            ))
        }
    })
}

fn shape(rows: u32, classes: u32) -> Result<Shape, String> {
    Shape::matrix(rows, classes).map_err(|e| format!("shape {rows}x{classes}: {e}"))
}

fn parse_shapes(s: &str) -> Result<Vec<Shape>, String> {
    s.split(',')
        .map(|item| {
            let item = item.trim();
            let bad = || format!("--shapes: `{item}` is not ROWSxCLASSES (e.g. 4096x32000)");
            let (r, c) = item.split_once(['x', 'X']).ok_or_else(bad)?;
            let parse = |v: &str| v.trim().parse::<u32>().ok().filter(|&n| n > 0);
            let (r, c) = parse(r).zip(parse(c)).ok_or_else(|| {
                format!("{}: rows and classes must be integers in [1, 2^32)", bad())
            })?;
            shape(r, c)
        })
        .collect()
}

fn parse_dtypes(s: &str) -> Result<Vec<Dtype>, String> {
    s.split(',')
        .map(|d| {
            let d = d.trim().to_ascii_lowercase();
            d.parse()
                .map_err(|_| format!("--dtype: `{d}` is not f32, f16 or bf16"))
        })
        .collect()
}

fn parse_count(flag: &str, v: &str, min: usize, max: usize) -> Result<usize, String> {
    v.parse()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or(format!("{flag}: `{v}` is not an integer in [{min}, {max}]"))
}

fn problem(shape: Shape, dtype: Dtype, gradient: Gradient) -> Problem {
    Problem::new(LossSpec::pytorch(0.1), shape)
        .with_dtype(dtype)
        .with_gradient(gradient)
}

// ---------------------------------------------------------------------------------------------
// The run

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
    if options.smoke {
        // Exercise the writers too; the files themselves are for `cargo bench`.
        let (json, svg) = (to_json(&records), plot_svg(&records));
        if !json.starts_with('[') || !svg.starts_with("<svg") {
            return Err("the JSON or SVG writer produced nothing".into());
        }
    }
    if let Some(path) = &options.json {
        std::fs::write(path, to_json(&records)).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    if let Some(path) = &options.plot {
        std::fs::write(path, plot_svg(&records)).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
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

// ---------------------------------------------------------------------------------------------
// Results

/// Medians in milliseconds.
#[derive(Clone, Debug)]
struct Measures {
    copy_ms: f64,
    read_ms: f64,
    fused_ms: f64,
    forward_ms: f64,
    unfused_ms: f64,
    /// Scaled to all rows when only `cpu_rows` were timed.
    cpu_ms: f64,
    cpu_rows: u32,
    scratch_bytes: u64,
    plan_windows: usize,
}

#[derive(Clone, Debug)]
struct Record {
    backend: &'static str,
    adapter: String,
    device_type: String,
    timing: &'static str,
    rows: u32,
    classes: u32,
    dtype: Dtype,
    repeats: usize,
    config: KernelConfig,
    /// Whether the reductions used subgroup operations.
    subgroups: bool,
    /// The measures, or why the case was skipped.
    outcome: Result<Measures, String>,
}

/// Bandwidths and ratios derived from a record's times.
struct Rates {
    copy_gbps: f64,
    read_gbps: f64,
    fused_gbps: f64,
    forward_gbps: f64,
    ratio_to_copy: f64,
    forward_ratio_to_read: f64,
    speedup_vs_unfused: f64,
}

impl Record {
    /// Bytes of one `rows x classes` tensor.
    fn tensor_bytes(&self) -> f64 {
        f64::from(self.rows) * f64::from(self.classes) * self.dtype.bytes() as f64
    }

    fn rates(&self, m: &Measures) -> Rates {
        let gbps = |bytes: f64, ms: f64| bytes / (ms * 1e6);
        let t = self.tensor_bytes();
        let (copy, read) = (gbps(2.0 * t, m.copy_ms), gbps(t, m.read_ms));
        let (fused, forward) = (gbps(2.0 * t, m.fused_ms), gbps(t, m.forward_ms));
        Rates {
            copy_gbps: copy,
            read_gbps: read,
            fused_gbps: fused,
            forward_gbps: forward,
            ratio_to_copy: fused / copy,
            forward_ratio_to_read: forward / read,
            speedup_vs_unfused: m.unfused_ms / m.fused_ms,
        }
    }
}

fn print_table(gpu: &Gpu, options: &Options, records: &[Record]) {
    let info = gpu.device.adapter_info();
    println!();
    println!(
        "adapter: {} | backend: {} | type: {:?} | driver: {} {}",
        info.name,
        info.backend.to_str(),
        info.device_type,
        info.driver,
        info.driver_info
    );
    println!(
        "timing: {} | median of {} runs after {} warm-up | spec: pytorch(0.1), class labels, mean",
        gpu.timing_name(),
        options.repeats,
        options.warmup
    );
    let limits = gpu.device.limits();
    let config = gpu.kernel.config();
    println!(
        "kernel: row_workgroup {}, row_cache {}, row_groups {}, row_teams {}, subgroups {} | \
         max_buffer_size {}, max_storage_buffer_binding_size {}",
        config.row_workgroup,
        config.row_cache,
        config
            .max_row_workgroups
            .map_or("one per row".to_string(), |n| n.to_string()),
        config.min_row_teams,
        if gpu.kernel.uses_subgroups() {
            "yes"
        } else {
            "no"
        },
        human_bytes(limits.max_buffer_size),
        human_bytes(limits.max_storage_buffer_binding_size)
    );
    println!(
        "{:<14} {:<5} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6} {:>10} {:>7} {:>10} {:>9}",
        "shape",
        "dtype",
        "copy GB/s",
        "read GB/s",
        "fused ms",
        "fused GB/s",
        "/copy",
        "fwd ms",
        "fwd GB/s",
        "/read",
        "unfused ms",
        "speedup",
        "cpu ms",
        "scratch"
    );
    for r in records {
        let shape = format!("{}x{}", r.rows, r.classes);
        let m = match &r.outcome {
            Ok(m) => m,
            Err(reason) => {
                // Through a String: Dtype's Display ignores the width.
                println!("{shape:<14} {:<5} skipped: {reason}", r.dtype.to_string());
                continue;
            }
        };
        let rt = r.rates(m);
        let cpu_mark = if m.cpu_rows < r.rows { "*" } else { " " };
        println!(
            "{shape:<14} {:<5} {:>9.2} {:>9.2} {:>9.3} {:>10.2} {:>6.2} {:>9.3} {:>9.2} {:>6.2} {:>10.3} {:>6.2}x {:>9.1}{cpu_mark} {:>9}",
            r.dtype.to_string(),
            rt.copy_gbps,
            rt.read_gbps,
            m.fused_ms,
            rt.fused_gbps,
            rt.ratio_to_copy,
            m.forward_ms,
            rt.forward_gbps,
            rt.forward_ratio_to_read,
            m.unfused_ms,
            rt.speedup_vs_unfused,
            m.cpu_ms,
            human_bytes(m.scratch_bytes),
        );
    }
    if records
        .iter()
        .any(|r| r.outcome.as_ref().is_ok_and(|m| m.cpu_rows < r.rows))
    {
        println!("* cpu: the first {CPU_MAX_ELEMENTS} logits' rows timed and scaled to all rows");
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

// ---------------------------------------------------------------------------------------------
// The GPU side

/// The kernels of bench.wgsl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
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
const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

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
    const UNFUSED: &'static [Kernel] = &[
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

/// Timestamp queries around each timed pass.
struct Timer {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    period_ns: f64,
}

struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    kernel: LossKernel,
    /// Per kernel, per dtype if `Kernel::per_format`, else once (keyed `F32`).
    pipelines: Vec<(Kernel, Dtype, wgpu::ComputePipeline)>,
    timer: Option<Timer>,
    /// Set when timestamps came back unusable and a measurement fell back to the wall clock.
    fell_back: std::cell::Cell<bool>,
}

/// What one timed pass runs.
#[derive(Clone, Copy)]
enum Workload<'a> {
    Kernels(&'a [Kernel]),
    Plan(&'a LossPlan),
}

impl Gpu {
    fn new(device: wgpu::Device, queue: wgpu::Queue, options: &Options) -> Result<Self, String> {
        let defaults = KernelConfig::for_device(&device);
        let config = KernelConfig {
            row_workgroup: options.row_workgroup.unwrap_or(defaults.row_workgroup),
            row_cache: options.row_cache.unwrap_or(defaults.row_cache),
            use_subgroups: options.subgroups,
            max_row_workgroups: options.row_groups.unwrap_or(defaults.max_row_workgroups),
            min_row_teams: options.row_teams.unwrap_or(defaults.min_row_teams),
            ..defaults
        };
        let kernel = LossKernel::with_config(&device, config)
            .map_err(|e| format!("kernel configuration {config:?}: {e}"))?;
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
        let timer = device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| {
                let count = 2 * MAX_REPEATS as u32;
                Timer {
                    queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                        label: Some("lsce bench timestamps"),
                        ty: wgpu::QueryType::Timestamp,
                        count,
                    }),
                    resolve: device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("lsce bench timestamps"),
                        size: u64::from(count) * 8,
                        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    }),
                    period_ns: f64::from(queue.get_timestamp_period()),
                }
            });
        Ok(Self {
            device,
            queue,
            kernel,
            pipelines,
            timer,
            fell_back: std::cell::Cell::new(false),
        })
    }

    fn timing_name(&self) -> &'static str {
        match (&self.timer, self.fell_back.get()) {
            (Some(_), false) => "GPU timestamps",
            (Some(_), true) => "GPU timestamps, wall clock where they were unusable",
            (None, _) => "wall clock (no TIMESTAMP_QUERY)",
        }
    }

    fn pipeline(&self, k: Kernel, dtype: Dtype) -> &wgpu::ComputePipeline {
        let dtype = if k.per_format() { dtype } else { Dtype::F32 };
        self.pipelines
            .iter()
            .find(|p| p.0 == k && p.1 == dtype)
            .map(|p| &p.2)
            .expect("every kernel is compiled for every dtype it depends on")
    }

    /// Measures one case; `Err` says why it was skipped.
    fn run_case(
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

    /// Start-up check, in every dtype the crate plans on this adapter: on a small case cut into
    /// several windows, the copy must copy, and the unfused baseline and the fused plan must
    /// agree with the CPU reference on the same (decoded) logits.
    fn check(&self) -> Result<(), String> {
        let shape = shape(37, 301)?;
        let labels = labels(shape, true);
        // Small bindings force many windows, so the window arithmetic is checked too; 301
        // classes make 16-bit rows start in the middle of a word, and share words.
        let cap = 4096;
        let spec = LossSpec::pytorch(0.1);
        for dtype in DTYPES {
            let plan = match self
                .kernel
                .plan(&problem(shape, dtype, Gradient::Separate).with_max_binding_bytes(Some(cap)))
            {
                Ok(plan) => plan,
                Err(e) => {
                    eprintln!("start-up check: {dtype} skipped, the crate cannot plan it: {e}");
                    continue;
                }
            };
            let case = Case::new(self, shape, dtype, &labels, Some(cap))?;
            let bytes = elements_bytes(shape, dtype);
            case.run(Workload::Kernels(&[Kernel::Fill]))?;
            let logits = self.read(&case.logits, 0, bytes)?;
            case.run(Workload::Kernels(&[Kernel::Copy]))?;
            if self.read(&case.grad, 0, bytes)? != logits {
                return Err(format!(
                    "start-up check: the {dtype} copy kernel's output differs from its input"
                ));
            }
            let logits = HostData::new(dtype, &logits, shape.elements() as usize);
            let reference = cpu::compute(
                &spec,
                &Batch::classes(shape, logits.logits(), &labels),
                lsce::Gradient::Separate,
            )
            .map_err(|e| e.to_string())?;
            let reference = (
                reference.loss[0],
                reference.grad.as_deref().unwrap_or_default(),
            );

            case.run(Workload::Kernels(Kernel::UNFUSED))?;
            let unfused_loss: f32 = bytemuck::pod_read_unaligned(&self.read(&case.out, 0, 4)?);
            let what = format!("{dtype} unfused");
            compare(&what, dtype, unfused_loss, &case.read_grad()?, reference)?;

            // Overwrite the unfused gradient first, so that a plan writing nothing cannot pass.
            case.run(Workload::Kernels(&[Kernel::Copy]))?;
            case.run(Workload::Plan(&plan))?;
            let summary: Summary =
                bytemuck::pod_read_unaligned(&self.read(&case.summary, 0, Summary::SIZE)?);
            let what = format!("{dtype} fused");
            compare(&what, dtype, summary.loss, &case.read_grad()?, reference)?;
            eprintln!(
                "start-up check passed for {dtype}: loss {:.6} (cpu {:.6}), {} windows",
                unfused_loss,
                reference.0,
                case.windows.len()
            );
        }
        Ok(())
    }

    /// Copies `size` bytes of `buffer` from `offset` back to the host.
    fn read(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>, String> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lsce bench readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let (sender, receiver) = mpsc::channel();
        let slice = staging.slice(..);
        slice.map_async(wgpu::MapMode::Read, move |r| {
            // The receiver waits below; a failed send cannot happen while it does.
            let _ = sender.send(r);
        });
        self.wait(None)?;
        receiver
            .recv()
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("mapping a readback buffer: {e}"))?;
        let bytes = slice
            .get_mapped_range()
            .map_err(|e| e.to_string())?
            .to_vec();
        staging.unmap();
        Ok(bytes)
    }

    fn wait(&self, submission: Option<wgpu::SubmissionIndex>) -> Result<(), String> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: submission,
                timeout: None,
            })
            .map(drop)
            .map_err(|e| format!("waiting for the GPU: {e}"))
    }
}

/// Bytes of one `rows x classes` buffer: rounded up to whole vec4s for the streaming kernels.
fn tensor_buffer_bytes(shape: Shape, dtype: Dtype) -> u64 {
    (shape.elements() * dtype.bytes()).next_multiple_of(16)
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
fn elements_bytes(shape: Shape, dtype: Dtype) -> u64 {
    (shape.elements() * dtype.bytes()).next_multiple_of(4)
}

/// Elements read back from the GPU, as the host takes them.
enum HostData {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Bf16(Vec<u16>),
}

impl HostData {
    /// The first `n` elements of `dtype` in `bytes`.
    fn new(dtype: Dtype, bytes: &[u8], n: usize) -> Self {
        let take = &bytes[..n * dtype.bytes() as usize];
        match dtype {
            Dtype::F32 => HostData::F32(bytemuck::pod_collect_to_vec(take)),
            Dtype::F16 => HostData::F16(bytemuck::pod_collect_to_vec(take)),
            Dtype::Bf16 => HostData::Bf16(bytemuck::pod_collect_to_vec(take)),
        }
    }

    fn logits(&self) -> Logits<'_> {
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

/// Window start alignment: the device's storage offset alignment, and whole vec4s.
fn window_align(limits: &wgpu::Limits) -> u64 {
    u64::from(limits.min_storage_buffer_offset_alignment).max(16)
}

/// What a window's binding needs beyond its rows: the start aligned down, the end rounded up.
fn window_slack(limits: &wgpu::Limits) -> u64 {
    window_align(limits) + 16
}

/// Class labels: `(7919 r + 13) mod classes`, every 7th row ignored when `with_ignored`.
fn labels(shape: Shape, with_ignored: bool) -> Vec<i32> {
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

/// Relative spacing of `dtype`'s values (one unit in the last place): the most a conversion
/// to it may change a value, since WGSL lets `pack2x16float` round either way.
fn ulp(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 2f64.powi(-23),
        Dtype::F16 => 2f64.powi(-10),
        Dtype::Bf16 => 2f64.powi(-7),
    }
}

/// Compares a loss and a gradient (stored in `dtype`) with the reference's `(loss, grad)`.
fn compare(
    what: &str,
    dtype: Dtype,
    loss: f32,
    grad: &[f32],
    (ref_loss, ref_grad): (f64, &[f64]),
) -> Result<(), String> {
    let loss_err = (f64::from(loss) - ref_loss).abs() / ref_loss.abs().max(1e-30);
    let scale = ref_grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let grad_err = grad
        .iter()
        .zip(ref_grad)
        .map(|(g, r)| (f64::from(*g) - r).abs())
        .fold(0.0f64, f64::max);
    // The f32 arithmetic's error, plus the rounding of every gradient element to `dtype`.
    let grad_tolerance = (1e-4 + ulp(dtype)) * scale;
    if !(loss_err < 1e-4 && grad_err <= grad_tolerance && grad.len() == ref_grad.len()) {
        return Err(format!(
            "START-UP CHECK FAILED: the {what} loss disagrees with lsce::cpu: loss {loss} vs \
             {ref_loss} (relative error {loss_err:.2e}), gradient max error {grad_err:.2e} \
             (largest gradient {scale:.2e}, tolerance {grad_tolerance:.2e}); the measurements \
             would be meaningless"
        ));
    }
    Ok(())
}

/// A contiguous range of rows whose bindings fit `max_storage_buffer_binding_size`.
#[derive(Clone, Copy, Debug)]
struct Window {
    first_row: u32,
    rows: u32,
    /// Its rows in the buffers of the case's dtype: the logits and the gradient.
    data: Span,
    /// Its rows in the unfused baseline's f32 log_softmax (`data` again for f32).
    logsm: Span,
}

/// Where a window's rows lie in one buffer. The windows' aligned starts partition the buffer:
/// the streaming kernels cover `[offset, offset + stream_bytes)`, exactly up to the next
/// window's start, while the row kernels see their rows from element `base` of a binding
/// `[offset, offset + size)` that may extend past it.
#[derive(Clone, Copy, Debug)]
struct Span {
    offset: u64,
    size: u64,
    base: u32,
    stream_bytes: u64,
}

/// The buffers, windows and bind groups of one shape.
struct Case<'g> {
    gpu: &'g Gpu,
    shape: Shape,
    dtype: Dtype,
    logits: wgpu::Buffer,
    /// The fused and the unfused gradient, and the copy's destination; with f32 also the
    /// unfused log_softmax (with 16 bits that has a buffer of its own, which only the bind
    /// groups hold).
    grad: wgpu::Buffer,
    labels: wgpu::Buffer,
    out: wgpu::Buffer,
    summary: wgpu::Buffer,
    windows: Vec<Window>,
    /// Per kernel (in `Kernel::ALL` order), per window.
    bind_groups: Vec<Vec<wgpu::BindGroup>>,
}

impl<'g> Case<'g> {
    /// Allocates the buffers (an adapter out of memory gives `Err`) and the bind groups.
    /// `binding_cap` lowers the binding size limit, to test the windows.
    fn new(
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
        let bind_groups = Kernel::ALL
            .iter()
            .map(|&k| {
                let layout = gpu.pipeline(k, dtype).get_bind_group_layout(0);
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
                                        window(&logits, w.data)
                                    }
                                    Binding::Dst | Binding::Grad => window(&grad, w.data),
                                    Binding::LogSoftmax => window(logsm, w.logsm),
                                    Binding::Labels => whole(&labels),
                                    Binding::Lse => whole(&lse),
                                    Binding::RowLoss => whole(&row_loss),
                                    Binding::Out => whole(&out),
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
            windows,
            bind_groups,
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
        let limits = self.gpu.device.limits();
        let max_groups = limits.max_compute_workgroups_per_dimension;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("lsce bench"),
            timestamp_writes: timestamps,
        });
        for &k in kernels {
            pass.set_pipeline(self.gpu.pipeline(k, self.dtype));
            let groups =
                &self.bind_groups[Kernel::ALL.iter().position(|&x| x == k).expect("listed")];
            for (w, group) in self.windows.iter().zip(groups) {
                pass.set_bind_group(0, group, &[]);
                match k.grid() {
                    Grid::Stream => {
                        // As many workgroups as the loss kernel itself may use (few, long-lived
                        // ones on CPU adapters, where starting a workgroup is expensive).
                        let n = (w.data.stream_bytes / 16).div_ceil(u64::from(WG)) as u32;
                        let cap = self
                            .gpu
                            .kernel
                            .config()
                            .max_row_workgroups
                            .unwrap_or(u32::MAX);
                        pass.dispatch_workgroups(
                            n.min(STREAM_GROUPS).min(max_groups).min(cap).max(1),
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
        Ok(())
    }

    /// Runs `workload` once and waits.
    fn run(&self, workload: Workload<'_>) -> Result<(), String> {
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
    fn read_grad(&self) -> Result<Vec<f32>, String> {
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

/// Cuts the rows into windows whose bindings fit the device's (or `cap`'s) binding size.
fn windows(
    shape: Shape,
    dtype: Dtype,
    limits: &wgpu::Limits,
    cap: Option<u64>,
) -> Result<Vec<Window>, String> {
    let max_binding = cap.map_or(limits.max_storage_buffer_binding_size, |c| {
        c.min(limits.max_storage_buffer_binding_size)
    });
    let align = window_align(limits);
    // The f32 log_softmax is the widest binding in every dtype: it decides the rows per window.
    let rows_per_window = max_binding.saturating_sub(window_slack(limits))
        / (u64::from(shape.classes()) * Dtype::F32.bytes());
    if rows_per_window == 0 {
        return Err("one row exceeds the storage binding size".into());
    }
    let mut ranges = Vec::new();
    let mut first = 0u64;
    while first < u64::from(shape.rows()) {
        let rows = rows_per_window.min(u64::from(shape.rows()) - first);
        ranges.push((first, rows));
        first += rows;
    }
    // The windows' spans in a buffer of `elem` elements.
    let spans = |elem: Dtype| -> Vec<Span> {
        let row_bytes = u64::from(shape.classes()) * elem.bytes();
        let offsets: Vec<u64> = ranges
            .iter()
            .map(|&(first, _)| first * row_bytes / align * align)
            .collect();
        let total = tensor_buffer_bytes(shape, elem);
        ranges
            .iter()
            .zip(&offsets)
            .enumerate()
            .map(|(i, (&(first, rows), &offset))| {
                let next = offsets.get(i + 1).copied().unwrap_or(total);
                let end = ((first + rows) * row_bytes).next_multiple_of(16).max(next);
                Span {
                    offset,
                    size: end - offset,
                    base: ((first * row_bytes - offset) / elem.bytes()) as u32,
                    stream_bytes: next - offset,
                }
            })
            .collect()
    };
    Ok(ranges
        .iter()
        .zip(spans(dtype))
        .zip(spans(Dtype::F32))
        .map(|((&(first, rows), data), logsm)| Window {
            first_row: first as u32,
            rows: rows as u32,
            data,
            logsm,
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// JSON and SVG, written by hand (no serialisation or plotting dependency for one file each).

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number, or `null` (JSON has no NaN or infinity).
fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn to_json(records: &[Record]) -> String {
    let rows: Vec<String> = records
        .iter()
        .map(|r| {
            let mut fields = vec![
                ("backend", json_string(r.backend)),
                ("adapter", json_string(&r.adapter)),
                ("device_type", json_string(&r.device_type)),
                ("timing", json_string(r.timing)),
                ("rows", r.rows.to_string()),
                ("classes", r.classes.to_string()),
                ("dtype", json_string(&r.dtype.to_string())),
                ("repeats", r.repeats.to_string()),
                ("row_workgroup", r.config.row_workgroup.to_string()),
                ("row_cache", r.config.row_cache.to_string()),
                (
                    "row_groups",
                    r.config
                        .max_row_workgroups
                        .map_or("null".to_string(), |n| n.to_string()),
                ),
                ("row_teams", r.config.min_row_teams.to_string()),
                ("subgroups", r.subgroups.to_string()),
                (
                    "skipped",
                    r.outcome
                        .as_ref()
                        .err()
                        .map_or("null".into(), |s| json_string(s)),
                ),
            ];
            let measured: [(&str, Option<f64>); 16] = {
                let m = r.outcome.as_ref().ok();
                let rt = m.map(|m| r.rates(m));
                let f = |g: fn(&Measures) -> f64| m.map(g);
                let h = |g: fn(&Rates) -> f64| rt.as_ref().map(g);
                [
                    ("fused_ms", f(|m| m.fused_ms)),
                    ("forward_ms", f(|m| m.forward_ms)),
                    ("unfused_ms", f(|m| m.unfused_ms)),
                    ("cpu_ms", f(|m| m.cpu_ms)),
                    ("cpu_rows", f(|m| f64::from(m.cpu_rows))),
                    ("copy_ms", f(|m| m.copy_ms)),
                    ("read_ms", f(|m| m.read_ms)),
                    ("copy_gbps", h(|r| r.copy_gbps)),
                    ("read_gbps", h(|r| r.read_gbps)),
                    ("fused_gbps", h(|r| r.fused_gbps)),
                    ("forward_gbps", h(|r| r.forward_gbps)),
                    ("ratio_to_copy", h(|r| r.ratio_to_copy)),
                    ("forward_ratio_to_read", h(|r| r.forward_ratio_to_read)),
                    ("speedup_vs_unfused", h(|r| r.speedup_vs_unfused)),
                    ("scratch_bytes", f(|m| m.scratch_bytes as f64)),
                    ("plan_windows", f(|m| m.plan_windows as f64)),
                ]
            };
            fields.extend(
                measured
                    .into_iter()
                    .map(|(k, v)| (k, v.map_or("null".into(), json_number))),
            );
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}: {v}", json_string(k)))
                .collect();
            format!("  {{{}}}", body.join(", "))
        })
        .collect();
    format!("[\n{}\n]\n", rows.join(",\n"))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `1000` as `1k`, `1000000` as `1M`.
fn si(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{}M", v / 1e6),
        v if v >= 1e3 => format!("{}k", v / 1e3),
        v => format!("{v}"),
    }
}

/// ratio_to_copy against classes (log scale), one line per backend, dtype and adapter.
fn plot_svg(records: &[Record]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 520.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
    ];
    let (left, right, top, bottom) = (70.0, W - 270.0, 60.0, H - 60.0);

    // Series in first-seen order, points sorted by classes.
    type Series<'r> = ((String, &'r str), Vec<(&'r Record, f64)>);
    let mut series: Vec<Series<'_>> = Vec::new();
    for r in records {
        let Ok(m) = &r.outcome else { continue };
        let ratio = r.rates(m).ratio_to_copy;
        if !ratio.is_finite() {
            continue;
        }
        let key = (format!("{} {}", r.backend, r.dtype), r.adapter.as_str());
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, points)) => points.push((r, ratio)),
            None => series.push((key, vec![(r, ratio)])),
        }
    }
    for (_, points) in &mut series {
        points.sort_by_key(|(r, _)| (r.classes, r.rows));
    }
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let log_classes = points()
        .map(|(r, _)| f64::from(r.classes).log10())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), c| {
            (lo.min(c), hi.max(c))
        });
    // A little room around the extreme points, and at least one decade.
    let (x_lo, x_hi) = match log_classes {
        (lo, hi) if lo.is_finite() => {
            let pad = (1.0 - (hi - lo)).max(0.0) / 2.0 + 0.15;
            (lo - pad, hi + pad)
        }
        _ => (2.0, 6.0),
    };
    let y_max = points().fold(1.0f64, |a, (_, v)| a.max(*v));
    let y_step = match y_max {
        m if m <= 1.2 => 0.1,
        m if m <= 3.0 => 0.25,
        _ => 1.0,
    };
    let y_hi = (y_max * 1.08 / y_step).ceil() * y_step;
    let px = |classes: f64| left + (classes.log10() - x_lo) / (x_hi - x_lo) * (right - left);
    let py = |v: f64| bottom - v / y_hi * (bottom - top);

    let mut s = String::new();
    let mut line = |text: String| {
        s.push_str(&text);
        s.push('\n');
    };
    line(format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    ));
    line(format!(r#"<rect width="{W}" height="{H}" fill="white"/>"#));
    line(format!(
        r#"<text x="{left}" y="24" font-size="16" font-weight="bold">Fused loss + gradient: fraction of copy bandwidth</text>"#
    ));
    line(format!(
        r##"<text x="{left}" y="42" fill="#555">fused GB/s / copy GB/s, both counting 2 x rows x classes x bytes; 1.0 = as fast as a copy</text>"##
    ));
    // x grid: every decade labelled; 2..9 x decade as light lines, 2 and 5 labelled when the
    // range is short.
    let short = x_hi - x_lo < 2.0;
    for decade in x_lo.floor() as i32..=x_hi.ceil() as i32 {
        for m in 1..10 {
            let v = 10f64.powi(decade) * f64::from(m);
            if !(x_lo..=x_hi).contains(&v.log10()) {
                continue;
            }
            let x = px(v);
            let stroke = if m == 1 { "#bbb" } else { "#eee" };
            line(format!(
                r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="{stroke}"/>"#
            ));
            if m == 1 || (short && (m == 2 || m == 5)) {
                line(format!(
                    r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                    bottom + 18.0,
                    si(v)
                ));
            }
        }
    }
    for i in 0..=(y_hi / y_step).round() as u32 {
        let v = f64::from(i) * y_step;
        let y = py(v);
        line(format!(
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{v:.2}</text>"##,
            left - 6.0,
            y + 4.0
        ));
    }
    let y1 = py(1.0);
    line(format!(
        r##"<line x1="{left}" y1="{y1:.1}" x2="{right}" y2="{y1:.1}" stroke="#333" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#333">copy bandwidth</text>"##,
        right - 4.0,
        y1 - 5.0
    ));
    line(format!(
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        right - left,
        bottom - top
    ));
    line(format!(
        r#"<text x="{}" y="{}" text-anchor="middle">classes (log scale)</text>"#,
        (left + right) / 2.0,
        H - 20.0
    ));
    line(format!(
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">ratio to copy bandwidth</text>"#,
        (top + bottom) / 2.0
    ));
    if series.is_empty() {
        line(format!(
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#888">no measured cases</text>"##,
            (left + right) / 2.0,
            (top + bottom) / 2.0
        ));
    }
    // Each shape is labelled once, at its first series' point: series often overlap.
    let mut labelled: Vec<(u32, u32)> = Vec::new();
    for (i, ((name, adapter), points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let xy = |r: &Record, v: f64| (px(f64::from(r.classes)), py(v));
        let path: Vec<String> = points
            .iter()
            .map(|(r, v)| {
                let (x, y) = xy(r, *v);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        line(format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        ));
        for (r, v) in points {
            let (x, y) = xy(r, *v);
            line(format!(
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{color}"><title>{name} {}x{}: {v:.3}</title></circle>"#,
                r.rows, r.classes
            ));
            if !labelled.contains(&(r.rows, r.classes)) {
                labelled.push((r.rows, r.classes));
                line(format!(
                    r##"<text x="{x:.1}" y="{:.1}" font-size="10" fill="#555" text-anchor="middle">{}x{}</text>"##,
                    y - 8.0,
                    r.rows,
                    r.classes
                ));
            }
        }
        // Legend right of the plot: the series, then its adapter (cut if long) in grey.
        let ly = top + 10.0 + 36.0 * i as f64;
        let adapter: String = adapter.chars().take(42).collect();
        line(format!(
            r##"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><circle cx="{}" cy="{ly}" r="4" fill="{color}"/><text x="{}" y="{}">{}</text><text x="{}" y="{}" font-size="10" fill="#555">{}</text>"##,
            right + 14.0,
            right + 38.0,
            right + 26.0,
            right + 44.0,
            ly + 4.0,
            xml_escape(name),
            right + 44.0,
            ly + 18.0,
            xml_escape(&adapter)
        ));
    }
    line("</svg>".into());
    s
}
