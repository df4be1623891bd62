//! Vocabulary shards against the unsharded fused plan on one device.
//!
//! ```text
//! cargo bench --bench sharded -- [--shapes 4096x32000,256x128256] [--shards 2,4,8] [--repeats N]
//! ```
//!
//! For each `rows x classes` shape (class labels, `LossSpec::pytorch(0.1)`, mean, f32) and each
//! `P`, one step is timed two ways on the default adapter, each one command buffer submitted
//! alone and waited for (wall clock from submit to the end of the wait). The two are run in
//! alternation, `--repeats` pairs after one warm-up pair, so that a change of the machine's load
//! hits both alike; the table gives the median of each and the median of the pairs' ratios:
//!
//! * **unsharded**: the fused plan (`LossKernel::plan`) over the `[rows, K]` logits, with the
//!   gradient;
//! * **sharded**: `P` shard plans over `P` buffers of uneven widths (`K * (p + 1) / sum` each),
//!   pass 1 of every shard into one record buffer, then every shard's pass 2 with the merge on
//!   the device (`MergeOn::Device`): what a one-device engine runs when its vocabulary is split.
//!
//! `overhead` = the median of sharded / unsharded - 1 over the pairs: the merge and the extra
//! pass as a fraction of the unsharded fused time; `min ovh` the same from the fastest run of
//! each (the least disturbed by other work on a shared machine). `sent/row` is what one rank sends per row in the one collective call
//! of a multi-device step (its 32-byte record; plus a 32-byte header per step), `recv/row` what
//! every rank receives (`32 P`). Without `--bench` (as under `cargo test --all-targets`) only a
//! small case runs, as a smoke test.

mod common;

use std::time::{Duration, Instant};

use lsce::shards::{MergeOn, ShardLayout, ShardOptions, ShardPlan, ShardProblem, RECORD_BYTES};
use lsce::{LossBuffers, LossKernel, LossSpec, Problem, Shape, Summary};
use wgpu::util::DeviceExt;

struct Options {
    shapes: Vec<(u32, u32)>,
    shards: Vec<usize>,
    repeats: usize,
}

fn parse() -> Result<Options, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut o = Options {
        shapes: if smoke {
            vec![(64, 3000)]
        } else {
            vec![(4096, 32000), (256, 128256)]
        },
        shards: vec![2, 4, 8],
        repeats: if smoke { 1 } else { 9 },
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bench" => {}
            "--shapes" => {
                o.shapes = value()?
                    .split(',')
                    .map(|s| {
                        let (r, c) = s.split_once('x').ok_or(format!("bad shape {s}"))?;
                        Ok((
                            r.parse().map_err(|_| format!("bad rows in {s}"))?,
                            c.parse().map_err(|_| format!("bad classes in {s}"))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?
            }
            "--shards" => {
                o.shards = value()?
                    .split(',')
                    .map(|p| p.parse().map_err(|_| format!("bad shard count {p}")))
                    .collect::<Result<_, String>>()?
            }
            "--repeats" => o.repeats = value()?.parse().map_err(|_| "bad --repeats")?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    kernel: LossKernel,
}

impl Gpu {
    fn buffer(&self, contents: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents,
                usage,
            })
    }

    fn empty(&self, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: size.max(4),
            usage,
            mapped_at_creation: false,
        })
    }

    /// The wall time of `encode` submitted alone and waited for.
    fn time(&self, encode: &Encode<'_>) -> Result<Duration, String> {
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encode(&mut encoder).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let index = self.queue.submit([encoder.finish()]);
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })
            .map_err(|e| e.to_string())?;
        Ok(start.elapsed())
    }

    /// `repeats` alternating runs of `a` and `b` after one warm-up pair: the medians of each,
    /// of the pairs' ratios b / a, and the ratio of the fastest runs.
    fn pairs(&self, repeats: usize, a: &Encode<'_>, b: &Encode<'_>) -> Result<[f64; 4], String> {
        let (mut ta, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=repeats {
            let (x, y) = (self.time(a)?.as_secs_f64(), self.time(b)?.as_secs_f64());
            if i > 0 {
                ta.push(x * 1e3);
                tb.push(y * 1e3);
                ratio.push(y / x);
            }
        }
        let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let min_ratio = fastest(&tb) / fastest(&ta);
        Ok([
            common::median(ta),
            common::median(tb),
            common::median(ratio),
            min_ratio,
        ])
    }
}

type Encode<'a> = dyn Fn(&mut wgpu::CommandEncoder) -> lsce::Result<()> + 'a;

fn main() {
    common::main("shards", run);
}

fn run() -> Result<(), String> {
    let o = parse()?;
    let (device, queue, kernel, info) = common::default_device()?;
    let gpu = Gpu {
        device,
        queue,
        kernel,
    };
    println!(
        "adapter: {} ({:?}); wall clock, medians of {} alternating pairs",
        info.name, info.backend, o.repeats
    );
    println!(
        "{:>13} {:>3} {:>14} {:>12} {:>9} {:>9} {:>9} {:>9}",
        "shape", "P", "unsharded ms", "sharded ms", "overhead", "min ovh", "sent/row", "recv/row"
    );
    let storage = wgpu::BufferUsages::STORAGE;
    let copy = wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    let spec = LossSpec::pytorch(0.1);
    for &(rows, classes) in &o.shapes {
        let shape = Shape::matrix(rows, classes).map_err(|e| e.to_string())?;
        let host = logits(rows as usize * classes as usize, 7);
        let labels: Vec<i32> = (0..rows).map(|r| ((r * 7919) % classes) as i32).collect();
        let summary = gpu.empty(Summary::SIZE, copy);
        let label_buf = gpu.buffer(bytemuck::cast_slice(&labels), storage);
        let x = gpu.buffer(bytemuck::cast_slice(&host), storage);
        let grad = gpu.empty(u64::from(rows) * u64::from(classes) * 4, storage);
        let plan = gpu
            .kernel
            .plan(&Problem::new(spec, shape))
            .map_err(|e| e.to_string())?;
        let binding = plan
            .bind(
                &LossBuffers::new(x.slice(..), label_buf.slice(..), summary.slice(..))
                    .with_grad(grad.slice(..)),
            )
            .map_err(|e| e.to_string())?;
        let unsharded = |e: &mut wgpu::CommandEncoder| {
            binding.encode(e);
            Ok(())
        };
        for &shards in &o.shards {
            let layout = ShardLayout::ramp(classes, shards).map_err(|e| e.to_string())?;
            let problem = ShardProblem::new(spec, rows, layout.clone());
            let options = ShardOptions {
                merge: MergeOn::Device,
                ..Default::default()
            };
            let plans: Vec<ShardPlan> = (0..shards)
                .map(|p| ShardPlan::new(&gpu.kernel, &problem, p, options))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let k = classes as usize;
            let xs: Vec<wgpu::Buffer> = (0..shards)
                .map(|p| {
                    let r = layout.range(p);
                    let cols: Vec<f32> = (0..rows as usize)
                        .flat_map(|row| {
                            host[row * k + r.start as usize..row * k + r.end as usize]
                                .iter()
                                .copied()
                        })
                        .collect();
                    gpu.buffer(bytemuck::cast_slice(&cols), storage)
                })
                .collect();
            let grads: Vec<wgpu::Buffer> = (0..shards)
                .map(|p| gpu.empty(u64::from(rows) * u64::from(layout.width(p)) * 4, storage))
                .collect();
            let block = plans[0].block_bytes();
            let records = gpu.empty(block * shards as u64, copy);
            let summaries: Vec<wgpu::Buffer> = (0..shards)
                .map(|_| gpu.empty(Summary::SIZE, copy))
                .collect();
            let sharded = |e: &mut wgpu::CommandEncoder| {
                for (p, plan) in plans.iter().enumerate() {
                    let buffers = lsce::shards::ShardBuffers {
                        logits: xs[p].slice(..),
                        targets: label_buf.slice(..),
                        weights: None,
                    };
                    let at = p as u64 * block;
                    plan.encode_records(e, &buffers, records.slice(at..at + block))?;
                }
                for (p, plan) in plans.iter().enumerate() {
                    let buffers = LossBuffers::new(
                        xs[p].slice(..),
                        label_buf.slice(..),
                        summaries[p].slice(..),
                    )
                    .with_grad(grads[p].slice(..));
                    plan.encode_merged_gradient(e, &buffers, records.slice(..))?;
                }
                Ok(())
            };
            let [unsharded_ms, sharded_ms, ratio, min_ratio] =
                gpu.pairs(o.repeats, &unsharded, &sharded)?;
            println!(
                "{:>13} {:>3} {:>14.2} {:>12.2} {:>8.1}% {:>8.1}% {:>9} {:>9}",
                format!("{rows}x{classes}"),
                shards,
                unsharded_ms,
                sharded_ms,
                (ratio - 1.0) * 100.0,
                (min_ratio - 1.0) * 100.0,
                RECORD_BYTES,
                RECORD_BYTES * shards,
            );
        }
    }
    Ok(())
}
