//! The vocabulary-parallel fused linear head (`lsce::linear::LinearShardPlan`): the overhead of
//! a step at `P` ranks over one rank, and the bytes each rank sends per step.
//!
//! ```text
//! cargo bench --bench linear_parallel -- [--shapes 256x256x8192,..] [--ranks 2,4] [--repeats N] [--json FILE]
//! ```
//!
//! For each `rows x dim x vocab` shape (class labels, `LossSpec::pytorch(0.1)`, mean, f32, a
//! bias, every gradient, recompute mode), `P` ranks run as threads of this process over
//! `ThreadCollective`, each with its own plan for its slice (uneven widths `V (p + 1) / sum`)
//! on the **one** default adapter: the ranks share its cores, so the total work is one rank's,
//! and the time of a step at `P` over the time at `P = 1` is what splitting the vocabulary adds
//! on one machine: each rank's setup pass, upload of `H` and readbacks, the record merge, the
//! second status round and the partial `dH` all-gather and sum in rank order (no network: on a
//! cluster the `4 N D` bytes of `dH` per rank add their transfer time). A step is
//! `LinearShardPlan::step` from host slices to host results (uploads, passes, readbacks,
//! exchanges), planned once beforehand. The configurations run in turn, `--repeats` rounds
//! after one warm-up round; the table gives the medians and `overhead` = the median of the
//! rounds' ratios `T_P / T_1 - 1`. `staging` is one `compute_linear` of the whole head (no
//! collective) for scale. Without `--bench` (as under `cargo test --all-targets`) a small case
//! runs once, as a smoke test.

mod common;

use std::sync::Arc;
use std::time::Instant;

use lsce::linear::{LinearBatch, LinearOptions, LinearShardPlan};
use lsce::shards::{Collective, ShardLayout, ShardProblem, ThreadCollective};
use lsce::{LossKernel, LossSpec};

struct Options {
    shapes: Vec<(u32, u32, u32)>,
    ranks: Vec<usize>,
    repeats: usize,
    json: Option<String>,
}

fn parse() -> Result<Options, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut o = Options {
        shapes: if smoke {
            vec![(64, 32, 1500)]
        } else {
            vec![(256, 256, 8192)]
        },
        ranks: vec![2, 4],
        repeats: if smoke { 1 } else { 7 },
        json: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bench" => {}
            "--shapes" => o.shapes = common::shapes(&value()?)?,
            "--ranks" => {
                o.ranks = value()?
                    .split(',')
                    .map(|p| p.parse().map_err(|_| format!("bad rank count {p}")))
                    .collect::<Result<_, String>>()?
            }
            "--repeats" => o.repeats = value()?.parse().map_err(|_| "bad --repeats")?,
            "--json" => o.json = Some(value()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5)
        .map(|x| x * scale)
        .collect()
}

struct Data {
    rows: u32,
    dim: u32,
    hidden: Vec<f32>,
    head: Vec<f32>,
    bias: Vec<f32>,
    labels: Vec<i32>,
}

/// `P` ranks, planned: each thread's step as a closure over its plan.
struct Ranks {
    layout: ShardLayout,
    plans: Vec<LinearShardPlan>,
    bytes_sent: u64,
}

fn plan_ranks(kernel: &LossKernel, data: &Data, ranks: usize) -> Result<Ranks, String> {
    let layout =
        ShardLayout::ramp(data.head.len() as u32 / data.dim, ranks).map_err(|e| e.to_string())?;
    let problem = ShardProblem::new(LossSpec::pytorch(0.1), data.rows, layout.clone());
    let plans = (0..ranks)
        .map(|p| {
            let (head, bias) = slice(data, &layout, p);
            let batch = LinearBatch::classes(data.dim, &data.hidden[..], head, &data.labels)?
                .with_bias(bias);
            LinearShardPlan::new(kernel, &problem, p, &batch, &LinearOptions::default())
        })
        .collect::<lsce::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let bytes_sent = plans[0].bytes_sent();
    Ok(Ranks {
        layout,
        plans,
        bytes_sent,
    })
}

fn slice<'a>(data: &'a Data, layout: &ShardLayout, p: usize) -> (&'a [f32], &'a [f32]) {
    let r = layout.range(p);
    let (c0, c1) = (r.start as usize, r.end as usize);
    let d = data.dim as usize;
    (&data.head[c0 * d..c1 * d], &data.bias[c0..c1])
}

/// One step of every rank on its own thread; the wall time until all are done.
fn step(queue: &wgpu::Queue, data: &Data, ranks: &Ranks) -> Result<f64, String> {
    let start = Instant::now();
    let results: Vec<lsce::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadCollective::group(ranks.plans.len())
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let p = c.rank();
                    let (head, bias) = slice(data, &ranks.layout, p);
                    let batch =
                        LinearBatch::classes(data.dim, &data.hidden[..], head, &data.labels)?
                            .with_bias(bias);
                    ranks.plans[p].step(queue, &batch, &mut c).map(|_| ())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    });
    let ms = start.elapsed().as_secs_f64() * 1e3;
    results
        .into_iter()
        .collect::<lsce::Result<()>>()
        .map_err(|e| e.to_string())?;
    Ok(ms)
}

fn main() {
    common::main("linear_parallel", run);
}

fn run() -> Result<(), String> {
    let o = parse()?;
    let (_device, queue, kernel, info) = common::default_device()?;
    println!(
        "adapter: {} ({:?}); P ranks as threads on this one adapter; medians of {} rounds",
        info.name, info.backend, o.repeats
    );
    println!(
        "{:>16} {:>3} {:>10} {:>10} {:>9} {:>12} {:>11}",
        "shape", "P", "step ms", "P=1 ms", "overhead", "sent/rank B", "staging ms"
    );
    let mut rows_json = Vec::new();
    for &(rows, dim, vocab) in &o.shapes {
        let std = 1.0 / (dim as f32).sqrt().sqrt();
        let data = Arc::new(Data {
            rows,
            dim,
            hidden: values((rows * dim) as usize, 1, 2.0 * std),
            head: values((vocab * dim) as usize, 7, 2.0 * std),
            bias: values(vocab as usize, 3, 0.5),
            labels: (0..rows).map(|r| ((r * 7919) % vocab) as i32).collect(),
        });
        let mut configs = vec![plan_ranks(&kernel, &data, 1)?];
        for &p in &o.ranks {
            configs.push(plan_ranks(&kernel, &data, p)?);
        }
        let whole = LinearBatch::classes(dim, &data.hidden[..], &data.head[..], &data.labels)
            .map_err(|e| e.to_string())?
            .with_bias(&data.bias[..]);
        let spec = LossSpec::pytorch(0.1);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut staging = Vec::new();
        for round in 0..=o.repeats {
            for (i, c) in configs.iter().enumerate() {
                let ms = step(&queue, &data, c)?;
                if round > 0 {
                    times[i].push(ms);
                }
            }
            let start = Instant::now();
            kernel
                .compute_linear(&queue, &spec, &whole, &LinearOptions::default())
                .map_err(|e| e.to_string())?;
            if round > 0 {
                staging.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        let one = common::median(times[0].clone());
        let staging = common::median(staging);
        let shape = format!("{rows}x{dim}x{vocab}");
        for (i, c) in configs.iter().enumerate() {
            let ratios: Vec<f64> = times[i].iter().zip(&times[0]).map(|(t, b)| t / b).collect();
            let overhead = common::median(ratios) - 1.0;
            let p = c.plans.len();
            println!(
                "{shape:>16} {p:>3} {:>10.1} {one:>10.1} {:>8.1}% {:>12} {staging:>11.1}",
                common::median(times[i].clone()),
                overhead * 100.0,
                c.bytes_sent,
            );
            rows_json.push(format!(
                "{{\"shape\":[{rows},{dim},{vocab}],\"ranks\":{p},\"step_ms\":{:.4},\"one_rank_ms\":{one:.4},\"overhead\":{overhead:.4},\"bytes_sent_per_rank\":{},\"record_bytes\":{},\"d_hidden_bytes\":{},\"staging_ms\":{staging:.4}}}",
                common::median(times[i].clone()),
                c.bytes_sent,
                32 + 32 * u64::from(rows),
                4 * u64::from(rows) * u64::from(dim),
            ));
        }
    }
    if let Some(path) = o.json {
        let text = format!(
            "{{\"adapter\":{:?},\"backend\":\"{:?}\",\"rows\":[{}]}}\n",
            info.name,
            info.backend,
            rows_json.join(",")
        );
        std::fs::write(&path, text).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}
