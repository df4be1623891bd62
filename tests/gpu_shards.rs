//! Vocabulary shards on wgpu devices, each use against the unsharded result:
//! - one device, P separate buffers (P = 1..8, uneven widths, a one-class shard), merged on
//!   the host;
//! - two devices (two lavapipe devices here), one thread each, merged through the host by the
//!   thread [`Collective`].
//!
//! The third use, MPI processes, is `tests/mpi_shards.rs` running `examples/vocab_parallel.rs`.
//!
//! Bound: the unsharded GPU-vs-CPU bound of `tests/common` (its model of the f32 kernel) for the
//! loosest team (a subgroup of 4 lanes per row, the deepest sums): a shard's sums are a subset
//! of the row's, over at most as many terms per invocation, and the host merges the f32 records
//! in f64, whose own error (`record_bound` of `tests/shards.rs`) is below E per record field,
//! which the doubling of that bound covers.

mod shard_cases;

use lsce::shards::{
    compute_on_device, exchange, merge_records, Collective, MergeOn, ShardBatch, ShardLayout,
    ShardOptions, ShardPlan, ThreadCollective,
};
use lsce::{Batch, Dtype, KernelConfig, LossKernel, LossOutput, LossSpec, StagingOptions};
use shard_cases::common::{self, compare_outputs, reference_for, Errors};
use shard_cases::{cases, layouts, Case};

/// Default options with the merge on the device.
fn device_merge() -> ShardOptions {
    ShardOptions {
        merge: MergeOn::Device,
        ..Default::default()
    }
}

/// The loosest bound: a subgroup of 4 lanes per row.
fn loosest(kernel: &LossKernel) -> KernelConfig {
    KernelConfig {
        use_subgroups: true,
        subgroup_rows_max_classes: u32::MAX,
        ..kernel.config()
    }
}

/// Runs every shard of `c` over `layout` on one device and returns the step's output with the
/// gathered gradient: P plans and buffers merged on the host ([`MergeOn::Host`]), or in one
/// submission merged on the device ([`compute_on_device`], [`MergeOn::Device`]).
fn run_on_one_device(
    kernel: &LossKernel,
    queue: &wgpu::Queue,
    c: &Case,
    layout: &ShardLayout,
    options: ShardOptions,
) -> LossOutput<f32> {
    let problem = c.problem(layout);
    let data: Vec<_> = (0..layout.shards()).map(|p| c.slices(layout, p)).collect();
    if options.merge == MergeOn::Device {
        let batches: Vec<_> = data.iter().map(|d| d.batch(c)).collect();
        return compute_on_device(kernel, queue, &problem, &batches, options)
            .unwrap_or_else(|e| panic!("{} P={}: {e}", c.name, layout.shards()));
    }
    let plans: Vec<_> = (0..layout.shards())
        .map(|p| ShardPlan::new(kernel, &problem, p, options).expect("shard plan"))
        .collect();
    let blocks: Vec<Vec<u8>> = plans
        .iter()
        .zip(&data)
        .map(|(plan, d)| plan.compute_records(queue, &d.batch(c)).expect("pass 1"))
        .collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    let merged = merge_records(&problem, &refs, c.upstream()).expect("merge");
    let grads: Vec<Vec<f32>> = plans
        .iter()
        .zip(&data)
        .map(|(plan, d)| {
            plan.compute_gradient(queue, &d.batch(c), &merged)
                .expect("pass 2")
        })
        .collect();
    to_f32(&merged.output, c.gather(layout, &grads))
}

fn to_f32(out: &LossOutput<f64>, grad: Vec<f32>) -> LossOutput<f32> {
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    LossOutput {
        loss: f(&out.loss),
        z_loss: f(&out.z_loss),
        lse: f(&out.lse),
        grad: Some(grad),
        denominator: out.denominator as f32,
        correct: out.correct,
    }
}

fn check(what: &str, kernel: &LossKernel, c: &Case, got: &LossOutput<f32>) -> Errors {
    let batch = c.batch();
    let r = reference_for(&c.spec, &batch, c.reference(), loosest(kernel), None);
    compare_outputs(what, got, &r)
}

#[test]
fn one_device_p_buffers_match_unsharded() {
    let g = common::gpu();
    for classes in [37u32, 700] {
        let mut errors = Errors::default();
        for c in cases(10, classes) {
            for layout in layouts(classes) {
                let what = format!("{} K={classes} P={}", c.name, layout.shards());
                let got = run_on_one_device(&g.kernel, &g.queue, &c, &layout, Default::default());
                errors.merge(check(&what, &g.kernel, &c, &got));
            }
        }
        errors.report(&format!("shards one device K={classes}"));
    }
}

#[test]
fn one_device_merged_on_the_device_matches_unsharded() {
    let g = common::gpu();
    for classes in [37u32, 700] {
        let mut errors = Errors::default();
        for c in cases(10, classes) {
            for layout in layouts(classes) {
                let what = format!("{} K={classes} P={} device merge", c.name, layout.shards());
                let got = run_on_one_device(&g.kernel, &g.queue, &c, &layout, device_merge());
                errors.merge(check(&what, &g.kernel, &c, &got));
            }
        }
        errors.report(&format!("shards device merge K={classes}"));
    }
}

/// Issue 14, item 3: PyTorch's `[N, K, d1..dk]` logits split along dimension 1, each shard's
/// part `[N, c1 - c0, d..]` read in place by the strided shard passes, with both merges, P = 1..8
/// uneven shards, against the unsharded result and its bound (the strided kernel's: one
/// invocation of four lanes per row, `tests/common`).
#[test]
fn class_dim1_logits_split_along_dim_1_match_unsharded() {
    let g = common::gpu();
    for (rows, classes, spatial) in [(12u32, 37u32, 4u32), (6, 300, 3)] {
        let mut errors = Errors::default();
        for c in cases(rows, classes) {
            let c = c.with_spatial(spatial);
            for layout in layouts(classes) {
                let what = format!("{} K={classes} P={}", c.name, layout.shards());
                let got = run_on_one_device(&g.kernel, &g.queue, &c, &layout, Default::default());
                errors.merge(check(&format!("{what} host merge"), &g.kernel, &c, &got));
                let got = run_on_one_device(&g.kernel, &g.queue, &c, &layout, device_merge());
                errors.merge(check(&format!("{what} device merge"), &g.kernel, &c, &got));
            }
        }
        errors.report(&format!("shards [N, {classes}, {spatial}]"));
    }
}

#[test]
fn row_windows_and_in_place_gradients() {
    // Bindings capped so that every shard is processed in several row windows, with both
    // merges; and the gradient written over each shard's logits.
    let g = common::gpu();
    let layout = ShardLayout::from_widths(&[70, 1, 229]).unwrap();
    for c in cases(40, 300).into_iter().step_by(2) {
        let problem = c.problem(&layout);
        let windowed = ShardOptions::default().with_staging(StagingOptions {
            max_binding_bytes: Some(4096),
            ..Default::default()
        });
        let plans: Vec<_> = (0..3)
            .map(|p| ShardPlan::new(&g.kernel, &problem, p, windowed).unwrap())
            .collect();
        assert!(
            plans[2].windows() > 1,
            "the cap must cut the shard into row windows"
        );
        let got = run_on_one_device(&g.kernel, &g.queue, &c, &layout, windowed);
        check(
            &format!("{} windows, host merge", c.name),
            &g.kernel,
            &c,
            &got,
        );
        let device_merge = ShardOptions {
            merge: MergeOn::Device,
            ..windowed
        };
        let got = run_on_one_device(&g.kernel, &g.queue, &c, &layout, device_merge);
        check(
            &format!("{} windows, device merge", c.name),
            &g.kernel,
            &c,
            &got,
        );
        let in_place = ShardOptions::default().with_staging(StagingOptions {
            gradient: lsce::Gradient::InPlace,
            ..Default::default()
        });
        let got = run_on_one_device(&g.kernel, &g.queue, &c, &layout, in_place);
        check(&format!("{} in place", c.name), &g.kernel, &c, &got);
    }
}

#[test]
fn one_device_every_reduction_path() {
    let g = common::gpu();
    let c = &cases(6, 300)[4];
    let layout = ShardLayout::from_widths(&[120, 1, 179]).unwrap();
    for (path, kernel) in g.kernels() {
        let got = run_on_one_device(kernel, &g.queue, c, &layout, Default::default());
        check(&format!("{} [{path}]", c.name), kernel, c, &got).report(path);
    }
}

#[test]
fn half_precision_logits() {
    let g = common::gpu();
    for (dtype, relative, absolute) in [
        (Dtype::F16, 2f64.powi(-11), 2f64.powi(-25)),
        (Dtype::Bf16, 2f64.powi(-8), 0.0),
    ] {
        let mut c = cases(7, 101).swap_remove(1);
        type Convert = (fn(f32) -> u16, fn(u16) -> f32);
        let (to_bits, from_bits): Convert = match dtype {
            Dtype::F16 => (lsce::half::f32_to_f16, lsce::half::f16_to_f32),
            _ => (lsce::half::f32_to_bf16, lsce::half::bf16_to_f32),
        };
        // The reference sees exactly the values the device reads.
        for v in &mut c.logits {
            *v = from_bits(to_bits(*v));
        }
        let layout = ShardLayout::from_widths(&[33, 1, 67]).unwrap();
        let problem = c.problem(&layout);
        let options = ShardOptions::default().with_dtype(dtype);
        let mut blocks = Vec::new();
        let mut plans = Vec::new();
        let mut bits = Vec::new();
        for p in 0..3 {
            let d = c.slices(&layout, p);
            bits.push(d.logits.iter().map(|&v| to_bits(v)).collect::<Vec<u16>>());
            plans.push(ShardPlan::new(&g.kernel, &problem, p, options).unwrap());
        }
        let batch = |p: usize| {
            let logits = match dtype {
                Dtype::F16 => lsce::Logits::F16(&bits[p]),
                _ => lsce::Logits::Bf16(&bits[p]),
            };
            let shape = problem.shard_shape(p).unwrap();
            ShardBatch::new(
                p,
                Batch::classes(shape, logits, &c.labels).with_upstream(c.upstream()),
            )
        };
        for (p, plan) in plans.iter().enumerate() {
            blocks.push(plan.compute_records(&g.queue, &batch(p)).unwrap());
        }
        let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
        let merged = merge_records(&problem, &refs, c.upstream()).unwrap();
        let grads: Vec<Vec<f32>> = (0..3)
            .map(|p| {
                plans[p]
                    .compute_gradient(&g.queue, &batch(p), &merged)
                    .unwrap()
            })
            .collect();
        let got = to_f32(&merged.output, c.gather(&layout, &grads));
        let mut r = reference_for(&c.spec, &c.batch(), c.reference(), loosest(&g.kernel), None);
        // Plus the rounding of the gradient to its type (half an ulp).
        let want = r.out.grad.clone().unwrap();
        for (t, w) in r.grad_tol.as_mut().unwrap().iter_mut().zip(&want) {
            *t += relative * w.abs() + absolute;
        }
        compare_outputs(&format!("{} {dtype}", c.name), &got, &r)
            .report(&format!("shards {dtype}"));
    }
}

#[test]
fn two_devices_on_two_threads_merge_through_the_host() {
    // Two devices of the default adapter (two lavapipe devices here), each in its own thread
    // with its own kernel, exchanging records once per step through the thread transport.
    let devices: Vec<_> = (0..2)
        .map(|_| {
            lsce::request_device(&lsce::DeviceOptions::default())
                .unwrap_or_else(|e| panic!("no wgpu adapter for a second device: {e}"))
        })
        .collect();
    let mut errors = Errors::default();
    let kernel0 = LossKernel::new(&devices[0].0).unwrap();
    for c in cases(9, 211) {
        let layout = ShardLayout::from_widths(&[1, 210]).unwrap();
        let problem = c.problem(&layout);
        let ranks = ThreadCollective::group(2);
        let results: Vec<(lsce::shards::Merged, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .zip(&devices)
                .map(|(mut col, (device, queue))| {
                    let (problem, layout, c) = (&problem, &layout, &c);
                    s.spawn(move || {
                        let kernel = LossKernel::new(device).unwrap();
                        let p = col.rank();
                        let plan = ShardPlan::new(&kernel, problem, p, Default::default()).unwrap();
                        let d = c.slices(layout, p);
                        let block = plan.compute_records(queue, &d.batch(c)).unwrap();
                        let merged =
                            exchange(problem, &mut col, Ok(block.as_slice()), c.upstream())
                                .unwrap();
                        let grad = plan.compute_gradient(queue, &d.batch(c), &merged).unwrap();
                        (merged, grad)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            results[0].0, results[1].0,
            "both ranks merge bitwise the same"
        );
        let grads: Vec<Vec<f32>> = results.iter().map(|r| r.1.clone()).collect();
        let got = to_f32(&results[0].0.output, c.gather(&layout, &grads));
        errors.merge(check(
            &format!("{} two devices", c.name),
            &kernel0,
            &c,
            &got,
        ));
    }
    errors.report("shards two devices");
}

#[test]
fn plan_errors() {
    let g = common::gpu();
    let layout = ShardLayout::even(20, 2).unwrap();
    let problem = lsce::shards::ShardProblem::new(LossSpec::pytorch(0.1), 4, layout);
    assert!(ShardPlan::new(&g.kernel, &problem, 2, Default::default()).is_err());
    let plan = ShardPlan::new(&g.kernel, &problem, 0, Default::default()).unwrap();
    let logits = vec![0.0f32; 40];
    let labels = [1, 2, 3, 4];
    // Another shard's batch, and a batch of another row count.
    let shape = problem.shard_shape(0).unwrap();
    let other = ShardBatch::new(1, Batch::classes(shape, &logits, &labels));
    assert!(plan.compute_records(&g.queue, &other).is_err());
    let short = ShardBatch::new(0, Batch::classes(shape, &logits[..30], &labels));
    assert!(matches!(
        plan.compute_records(&g.queue, &short),
        Err(lsce::LsceError::LengthMismatch { .. })
    ));
    // A label outside [0, K) (K = 20, not the shard's 10 classes): an Err on the host.
    let bad = [1, 2, 20, 4];
    assert_eq!(
        plan.compute_records(
            &g.queue,
            &ShardBatch::new(0, Batch::classes(shape, &logits, &bad))
        ),
        Err(lsce::LsceError::LabelOutOfRange {
            row: 2,
            label: 20,
            classes: 20
        })
    );
}
