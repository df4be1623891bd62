//! The fused linear head against its f64 reference (`lsce::linear::cpu`): every option of
//! `LossSpec`, both memory modes, every gradient choice, f32/f16/bf16 inputs, odd sizes, a
//! 128256-word vocabulary, on Vulkan (lavapipe) and GL (llvmpipe); determinism; errors.
//!
//! # The error bounds
//!
//! With `E = f32::EPSILON`, the kernels' f32 arithmetic (shaders/matmul.wgsl,
//! shaders/linear.wgsl) gives, for row `r` and vocabulary entry `v`:
//!
//! * **logits**: `z = sum_d h_d w_d + b` by `D` multiply-adds in order, then the bias:
//!   `|dz| <= (D + 2) E (sum_d |h_d w_d| + |b|)` (recursive summation, a rounding of the
//!   product and of the sum per step, or one where a compiler fuses them; 16-bit inputs decode
//!   exactly). The transform adds `E |z|` for a scale and `16 E |z|` for
//!   a soft-cap (see tests/common), whose slope damps the matmul's error: `zerr_v`.
//! * **the sum of exp** `s` over `V` entries: per lane 32 terms of a block (8 tiles of 16
//!   columns in 4 lanes), then 4 lanes, 4 parts, `B` blocks merged in order, each step one
//!   rescale and one add: relative `(2 * 40 + 2 B) E`, plus each exp's `(3 + 2 |z - m|)` ulp
//!   (Vulkan's precision), weighted by its share `p_v`; plus `max zerr` for the logits'
//!   own errors. `ln s` adds 2^-21 (Vulkan's log), `lse` `E |lse|`.
//! * **the loss** `A ln s + T + z_loss lse^2`: `A` times the above, the shifted target sum
//!   `T = sum a_v (m - z_v)` with the same depth over its `S_T = sum |a_v (m - z_v)|`, and
//!   `sum |a_v| (zerr_v + max zerr)` for the logits.
//! * **G** `= (p_v P - a_v) scale slope_v`: `p_v` relative `zerr_v + max zerr + ln s's error +
//!   (4 + 3 |z_v - lse|) E`, three roundings of the product, `6 E |a_v|`, and the soft-cap
//!   slope `1 - (z/c)^2`'s error `2 |z| zerr / c^2 + 2 E`.
//! * **dH** `= sum_v G_v W_v`: 64-term fma chains per vocabulary tile added to the running
//!   value, a depth of `64 + V / 64` (two roundings a step): `(130 + V / 32) E sum_v |G_v w_vd|
//!   + sum_v Gerr_v |w_vd|`;
//!   **dW** and **db** the same over rows (`64 + N / 64`, plus one add per chunk, at most
//!   `N / 64`): `(132 + N / 16) E`.
//!
//! Every bound is doubled (`SAFETY`). The tests print the largest error and the largest
//! error/bound ratio of each output.

mod common;

use common::linear::{bounds, check_head, head_specs, report, Case, Split};
use common::{gl, vulkan, Gpu, Rng, E, SAFETY};
use lsce::linear::{
    cpu, HeadGradients, LinearBatch, LinearOptions, LinearOutput, LinearPlan, LinearProblem, Memory,
};
use lsce::{Dtype, Logits, LossKernel, LossSpec, LsceError, Reduction};

/// Runs `case` on `kernel` in `memory` and checks every output against the reference.
/// Returns the worst (error, ratio) of loss, dH, dW, db.
fn check(
    what: &str,
    g: &Gpu,
    kernel: &LossKernel,
    spec: &LossSpec,
    case: &Case,
    options: LinearOptions,
) -> [(f64, f64); 4] {
    let batch = case.batch(spec.reduction);
    let reference = cpu::compute(spec, &batch, options.gradients).expect("reference");
    let out = kernel
        .compute_linear(&g.queue, spec, &batch, &options)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let split = Split::whole(case.vocab);
    check_head(what, spec, case, split, &reference, &out, options.accuracy)
}

const MODES: [Memory; 2] = [
    Memory::Recompute,
    // 64 rows of a vocabulary of at most 1031: several chunks for the larger cases.
    Memory::Chunked {
        budget_bytes: 64 * 1031 * 4,
    },
];

fn options(memory: Memory) -> LinearOptions {
    LinearOptions {
        memory,
        ..Default::default()
    }
}

/// Every option of `LossSpec`, weights, probability targets and upstream gradients (a scalar
/// of 65536, the initial loss scale of mixed precision, and per row), in both memory modes,
/// on `g` at `rows x dim x vocab`; the worst errors.
fn every_option(g: &Gpu, rows: usize, dim: usize, vocab: usize) -> Vec<[(f64, f64); 4]> {
    let mut worst = Vec::new();
    let base = Case::new(1, rows, dim, vocab, true, true);
    let mut specs = head_specs(vocab);
    // The padding convention ignores class 0 instead of -100.
    let mut padded = Case::new(1, rows, dim, vocab, true, true);
    padded.labels = base.labels.iter().map(|&l| l.max(0)).collect();
    for (name, spec) in specs.drain(..) {
        let case = if spec.ignore_index == Some(0) {
            &padded
        } else {
            &base
        };
        for memory in MODES {
            let what = format!("{name} {memory:?}");
            let opts = LinearOptions {
                accuracy: true,
                ..options(memory)
            };
            worst.push(check(&what, g, &g.kernel, &spec, case, opts));
        }
    }
    // Weights (no bias), probability targets, a per-row upstream.
    let mut rng = Rng::new(7);
    let mut weighted = Case::new(2, rows, dim, vocab, false, true);
    weighted.weights = Some(rng.weights(vocab));
    weighted.upstream = vec![65536.0];
    let mut soft = Case::new(3, rows, dim, vocab, true, false);
    soft.probabilities = Some(rng.probabilities(rows, vocab, true));
    let mut per_row = Case::new(4, rows, dim, vocab, true, true);
    per_row.upstream = (0..rows).map(|r| (r as f32 * 0.37).sin() * 4.0).collect();
    for memory in MODES {
        worst.push(check(
            "weights x65536",
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &weighted,
            options(memory),
        ));
        worst.push(check(
            "probabilities",
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &soft,
            options(memory),
        ));
        let none = LossSpec {
            reduction: Reduction::None,
            ..LossSpec::pytorch(0.1)
        };
        worst.push(check(
            "per-row upstream",
            g,
            &g.kernel,
            &none,
            &per_row,
            options(memory),
        ));
    }
    worst
}

#[test]
fn every_option_against_the_reference() {
    // Odd sizes: D and V neither multiples of 4 nor of a tile; rows past one tile and chunk.
    report(
        "every option, Vulkan",
        &every_option(vulkan(), 150, 37, 1031),
    );
}

#[test]
fn every_option_on_gl_without_subgroups() {
    report(
        "every option, GL (llvmpipe)",
        &every_option(gl(), 70, 19, 530),
    );
}

#[test]
fn half_precision_inputs_accumulate_in_f32() {
    let g = vulkan();
    let mut worst = Vec::new();
    for dtype in [Dtype::F16, Dtype::Bf16] {
        let case = Case::new(6, 90, 45, 777, true, true).in_dtype(dtype);
        for memory in MODES {
            worst.push(check(
                &format!("{dtype:?} {memory:?}"),
                g,
                &g.kernel,
                &LossSpec::pytorch(0.1),
                &case,
                options(memory),
            ));
        }
    }
    report("f16/bf16 inputs", &worst);
}

#[test]
fn edge_sizes_one_row_all_ignored_and_a_128k_vocabulary() {
    let g = vulkan();
    let mut worst = Vec::new();
    let one = Case::new(8, 1, 3, 5, true, false);
    let mut ignored = Case::new(9, 20, 8, 70, true, false);
    ignored.labels = vec![-100; 20];
    let large = Case::new(10, 3, 16, 128_256, true, false);
    for memory in [
        Memory::Recompute,
        Memory::Chunked {
            budget_bytes: 64 * 128_256 * 4,
        },
    ] {
        worst.push(check(
            "N = 1",
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &one,
            options(memory),
        ));
        let out = check(
            "all ignored (sum)",
            g,
            &g.kernel,
            &LossSpec {
                reduction: Reduction::Sum,
                ..LossSpec::pytorch(0.1)
            },
            &ignored,
            options(memory),
        );
        assert_eq!(
            out[2].0, 0.0,
            "every gradient of an all-ignored batch is exactly 0"
        );
        worst.push(check(
            "V = 128256",
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &large,
            options(memory),
        ));
    }
    // The mean over no row is NaN (PyTorch's 0/0), the gradients 0.
    let batch = ignored.batch(Reduction::Mean);
    let out = g
        .kernel
        .compute_linear(
            &g.queue,
            &LossSpec::pytorch(0.1),
            &batch,
            &options(Memory::Recompute),
        )
        .unwrap();
    assert!(out.loss.loss[0].is_nan());
    assert!(out.d_head.unwrap().iter().all(|&v| v == 0.0));
    report("edge sizes", &worst);
}

#[test]
fn a_head_past_one_binding_is_bound_in_windows() {
    let g = vulkan();
    let mut worst = Vec::new();
    // Windows of two 512-entry blocks (W and dW in f32), the last one short; the cap still
    // holds a chunk of 64 rows.
    let case = Case::new(13, 100, 200, 2600, true, true);
    for memory in MODES_WIDE {
        let opts = LinearOptions {
            max_binding_bytes: Some(2 * 512 * 200 * 4),
            ..options(memory)
        };
        worst.push(check(
            &format!("windows {memory:?}"),
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &case,
            opts,
        ));
        let problem = LinearProblem::new(LossSpec::pytorch(0.1), 100, 200, 2600)
            .unwrap()
            .with_memory(memory)
            .with_loss(
                lsce::Problem::new(
                    LossSpec::pytorch(0.1),
                    lsce::Shape::matrix(100, 2600).unwrap(),
                )
                .with_max_binding_bytes(opts.max_binding_bytes),
            );
        assert_eq!(LinearPlan::new(&g.kernel, &problem).unwrap().windows(), 3);
    }
    report("vocabulary windows", &worst);
}

const MODES_WIDE: [Memory; 2] = [
    Memory::Recompute,
    Memory::Chunked {
        budget_bytes: 64 * 2600 * 4,
    },
];

#[test]
fn long_walks_are_cut_into_segments() {
    // D = 512: a gradient walk of more than 17 tiles would pass lavapipe's loop limiter, so
    // dH's walk over 313 vocabulary tiles and dW's over the rows are cut into segments.
    let g = vulkan();
    let case = Case::new(14, 70, 512, 20000, true, true);
    let worst = vec![check(
        "segments",
        g,
        &g.kernel,
        &LossSpec::pytorch(0.1),
        &case,
        options(Memory::Recompute),
    )];
    report("segmented walks", &worst);
}

#[test]
fn frozen_head_and_evaluation_write_only_what_they_are_asked() {
    let g = vulkan();
    let case = Case::new(11, 100, 24, 600, true, true);
    let spec = LossSpec::pytorch(0.1);
    let batch = case.batch(spec.reduction);
    let full = g
        .kernel
        .compute_linear(&g.queue, &spec, &batch, &LinearOptions::default())
        .unwrap();
    for (gradients, memory) in [
        (HeadGradients::Hidden, Memory::Recompute),
        (HeadGradients::None, Memory::Recompute),
        (HeadGradients::Hidden, MODES[1]),
    ] {
        let opts = LinearOptions {
            gradients,
            memory,
            ..Default::default()
        };
        check(
            &format!("{gradients:?} {memory:?}"),
            g,
            &g.kernel,
            &spec,
            &case,
            opts,
        );
        let out = g
            .kernel
            .compute_linear(&g.queue, &spec, &batch, &opts)
            .unwrap();
        assert!(out.d_head.is_none() && out.d_bias.is_none());
        assert_eq!(out.d_hidden.is_some(), gradients == HeadGradients::Hidden);
        // The same loss bits as with every gradient, in the same mode.
        if memory == Memory::Recompute {
            assert_eq!(common::bits(&out.loss.loss), common::bits(&full.loss.loss));
            if let Some(dh) = &out.d_hidden {
                assert_eq!(
                    common::bits(dh),
                    common::bits(full.d_hidden.as_ref().unwrap())
                );
            }
        }
    }
}

#[test]
fn twenty_runs_are_bitwise_identical_in_both_modes() {
    let g = vulkan();
    let mut case = Case::new(12, 200, 40, 900, true, true);
    case.upstream = vec![3.0];
    let spec = LossSpec {
        z_loss: 1e-4,
        ..LossSpec::pytorch(0.1)
    };
    let batch = case.batch(spec.reduction);
    for memory in MODES {
        let first = g
            .kernel
            .compute_linear(&g.queue, &spec, &batch, &options(memory))
            .unwrap();
        for _ in 1..20 {
            let again = g
                .kernel
                .compute_linear(&g.queue, &spec, &batch, &options(memory))
                .unwrap();
            let what = format!("{memory:?}");
            assert_eq!(
                common::bits(&again.loss.loss),
                common::bits(&first.loss.loss),
                "{what}"
            );
            assert_same_rows_and_gradients(&again, &first, &what);
        }
    }
}

/// Every row's lse, the accuracy count, dH, dW and db of `a` and `b` are the same bits.
fn assert_same_rows_and_gradients(a: &LinearOutput<f32>, b: &LinearOutput<f32>, what: &str) {
    assert_eq!(
        common::bits(&a.loss.lse),
        common::bits(&b.loss.lse),
        "lse {what}"
    );
    assert_eq!(a.loss.correct, b.loss.correct, "correct {what}");
    for (name, x, y) in [
        ("dH", &a.d_hidden, &b.d_hidden),
        ("dW", &a.d_head, &b.d_head),
        ("db", &a.d_bias, &b.d_bias),
    ] {
        assert_eq!(
            common::bits(x.as_ref().unwrap()),
            common::bits(y.as_ref().unwrap()),
            "{name} {what}"
        );
    }
}

/// The subgroup path (shaders/matmul_subgroups.wgsl: the rows of H in the logits matmul and of
/// G in the gradient products by subgroupBroadcast) adds the same products in the same order as
/// the portable path: the same bits for every row's lse and for dH, dW and db, in both modes
/// and every input type, on the same device. (The reduced loss is not compared bit for bit: each kernel sums the rows with
/// its own team reduction, subgroup or workgroup memory, in another order.)
#[test]
fn the_subgroup_matmul_gives_the_portable_matmuls_bits() {
    let g = vulkan();
    assert!(g.kernel.uses_subgroups() && !g.fallback.uses_subgroups());
    let spec = LossSpec {
        z_loss: 1e-4,
        ..LossSpec::pytorch(0.1)
    };
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        // Rows past one tile, D and V off the tile and the depth step.
        let case = Case::new(13, 150, 37, 1031, true, true).in_dtype(dtype);
        let batch = case.batch(spec.reduction);
        for memory in MODES {
            let run = |kernel: &LossKernel| {
                kernel
                    .compute_linear(&g.queue, &spec, &batch, &options(memory))
                    .unwrap()
            };
            let (sub, portable) = (run(&g.kernel), run(&g.fallback));
            assert_same_rows_and_gradients(&sub, &portable, &format!("{dtype:?} {memory:?}"));
        }
    }
}

/// The subgroup loop runs only where each workgroup finds its 64 invocations in 8-lane
/// subgroups with lane = local_invocation_index mod 8 (WGSL promises neither; the shader
/// checks and otherwise takes the portable loop, which gives the same bits, so the test above
/// alone could not tell). This probe makes the same two scans in a 64-invocation workgroup on
/// lavapipe: it must find the layout, or CI would not be running the subgroup loop at all.
#[test]
fn lavapipe_lays_out_subgroups_as_the_subgroup_matmul_needs() {
    let g = vulkan();
    let source = "
        @group(0) @binding(0) var<storage, read_write> out: array<u32>;
        @compute @workgroup_size(64)
        fn probe(@builtin(local_invocation_index) lid: u32) {
            out[2u * lid] = subgroupExclusiveAdd(1u);
            out[2u * lid + 1u] = subgroupAdd(1u);
        }";
    let module = g.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("subgroup layout probe"),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = g
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("subgroup layout probe"),
            layout: None,
            module: &module,
            entry_point: Some("probe"),
            compilation_options: Default::default(),
            cache: None,
        });
    let bytes = 2 * 64 * 4;
    let out = g.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let group = g.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: out.as_entire_binding(),
        }],
    });
    let mut encoder = g.device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
    g.queue.submit([encoder.finish()]);
    let words: Vec<u32> = read_f32(g, &out, bytes)
        .iter()
        .map(|x| x.to_bits())
        .collect();
    for lid in 0..64 {
        assert_eq!(
            (words[2 * lid], words[2 * lid + 1]),
            ((lid % 8) as u32, 8),
            "{}: invocation {lid}'s (lane, subgroup size)",
            g.name
        );
    }
}

#[test]
fn bad_input_is_a_clear_err() {
    let g = vulkan();
    let k = &g.kernel;
    let spec = LossSpec::pytorch(0.1);
    let (hidden, head) = (vec![0.5f32; 4 * 3], vec![0.25f32; 5 * 3]);
    // H's length is not a multiple of D: the rows it implies do not cover it.
    let short = LinearBatch::classes(3, &hidden[..11], &head, &[0, 1, 2]).unwrap();
    assert!(matches!(
        k.compute_linear(&g.queue, &spec, &short, &LinearOptions::default()),
        Err(LsceError::LengthMismatch { .. })
    ));
    // Labels for another row count.
    let wrong_rows = LinearBatch::classes(3, &hidden, &head, &[0, 1, 2]).unwrap();
    assert!(matches!(
        k.compute_linear(&g.queue, &spec, &wrong_rows, &LinearOptions::default()),
        Err(LsceError::LengthMismatch { .. })
    ));
    // A bias of the wrong length, of another dtype.
    let labels = [0, 1, 2, 4];
    let ok = LinearBatch::classes(3, &hidden, &head, &labels).unwrap();
    assert!(matches!(
        k.compute_linear(
            &g.queue,
            &spec,
            &ok.with_bias(&[0.0f32; 4]),
            &LinearOptions::default()
        ),
        Err(LsceError::LengthMismatch { .. })
    ));
    let bits = [0u16; 5];
    assert!(matches!(
        k.compute_linear(
            &g.queue,
            &spec,
            &ok.with_bias(Logits::F16(&bits)),
            &LinearOptions::default()
        ),
        Err(LsceError::Unsupported(_))
    ));
    // Zero-sized input.
    assert!(matches!(
        LinearBatch::classes(0, &hidden, &head, &labels),
        Err(LsceError::EmptyShape)
    ));
    assert!(matches!(
        LinearBatch::classes(3, &hidden[..0], &head, &[]),
        Err(LsceError::EmptyShape)
    ));
    assert!(matches!(
        LinearProblem::new(spec, 4, 0, 5),
        Err(LsceError::EmptyShape)
    ));
    // A label out of range, found by the GPU.
    let bad = LinearBatch::classes(3, &hidden, &head, &[0, 1, 5, 2]).unwrap();
    assert!(matches!(
        k.compute_linear(&g.queue, &spec, &bad, &LinearOptions::default()),
        Err(LsceError::LabelOutOfRange {
            row: 2,
            label: 5,
            classes: 5
        })
    ));
    // A chunk budget below 64 rows.
    let tiny = LinearOptions {
        memory: Memory::Chunked { budget_bytes: 1000 },
        ..Default::default()
    };
    assert!(matches!(
        k.compute_linear(&g.queue, &spec, &ok, &tiny),
        Err(LsceError::InvalidParameter {
            name: "budget_bytes",
            ..
        })
    ));
    // A hidden size so large that one block of the head (at least 64 rows) exceeds one
    // storage binding.
    let limits = g.device.limits();
    let dim = (limits.max_storage_buffer_binding_size / (64 * 4) + 1) as u32;
    let huge = LinearProblem::new(spec, 8, dim, 1000).unwrap();
    assert!(matches!(
        LinearPlan::new(k, &huge),
        Err(LsceError::ExceedsDeviceLimit { .. })
    ));
    // Buffers the problem needs, or does not use.
    let problem = LinearProblem::new(spec, 4, 3, 5).unwrap().with_bias(true);
    let plan = LinearPlan::new(k, &problem).unwrap();
    let buffer = |size| {
        g.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (h, w, t, s, dh, dw) = (
        buffer(48),
        buffer(60),
        buffer(16),
        buffer(32),
        buffer(48),
        buffer(60),
    );
    let buffers =
        lsce::linear::LinearBuffers::new(h.slice(..), w.slice(..), t.slice(..), s.slice(..))
            .with_grads(dh.slice(..), Some(dw.slice(..)), None);
    assert!(matches!(
        plan.bind(&buffers),
        Err(LsceError::MissingBuffer("bias"))
    ));
    let frozen = LinearPlan::new(
        k,
        &problem
            .with_bias(false)
            .with_gradients(HeadGradients::Hidden),
    )
    .unwrap();
    assert!(matches!(
        frozen.bind(&buffers),
        Err(LsceError::UnexpectedBuffer("d_head"))
    ));
}

#[test]
fn recompute_scratch_is_a_small_fraction_of_the_logits() {
    let g = vulkan();
    // The bench shapes; the heads of the middle two exceed one storage binding of lavapipe
    // (128 MiB) and are bound in vocabulary windows.
    for (rows, dim, vocab) in [
        (4096u32, 512u32, 32000u32),
        (1024, 1024, 128_256),
        (256, 2048, 262_144),
        (16384, 256, 50257),
    ] {
        let problem = LinearProblem::new(LossSpec::pytorch(0.1), rows, dim, vocab).unwrap();
        let plan = LinearPlan::new(&g.kernel, &problem).unwrap();
        let logits = u64::from(rows) * u64::from(vocab) * 4;
        assert!(
            plan.scratch_bytes() * 32 <= logits,
            "{rows}x{dim}x{vocab}: {} scratch bytes",
            plan.scratch_bytes()
        );
        let budget = 256 << 20;
        let chunked = LinearPlan::new(
            &g.kernel,
            &problem.with_memory(Memory::Chunked {
                budget_bytes: budget,
            }),
        )
        .unwrap();
        assert!(chunked.scratch_bytes() - plan.scratch_bytes() <= budget);
    }
}

/// Reads `bytes` bytes of `buffer` (COPY_SRC) as f32.
fn read_f32(g: &Gpu, buffer: &wgpu::Buffer, bytes: u64) -> Vec<f32> {
    let staging = g.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = g.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    g.queue.submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.unwrap());
    g.device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let view = staging.slice(..).get_mapped_range().unwrap();
    bytemuck::cast_slice(&view).to_vec()
}

#[test]
fn the_unfused_ops_give_the_logits_and_the_same_gradients() {
    use wgpu::util::DeviceExt;
    let g = vulkan();
    let case = Case::new(15, 90, 40, 1100, true, true);
    let spec = LossSpec::pytorch(0.1);
    let (rows, dim, vocab) = (case.rows as u32, case.dim as u32, case.vocab as u32);
    let batch = case.batch(spec.reduction);
    let reference = cpu::compute(&spec, &batch, HeadGradients::All).unwrap();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let init = |bytes: &[u8]| {
        g.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytes,
                usage,
            })
    };
    let zeros = |n: u64| init(&vec![0u8; n as usize]);
    let (h, w, b) = (
        init(bytemuck::cast_slice(&case.hidden)),
        init(bytemuck::cast_slice(&case.head)),
        init(bytemuck::cast_slice(case.bias.as_ref().unwrap())),
    );
    let t = init(bytemuck::cast_slice(&case.labels));
    let summary = zeros(32);
    let logits = zeros(u64::from(rows * vocab) * 4);
    let (dh, dw, db) = (
        zeros(u64::from(rows * dim) * 4),
        zeros(u64::from(vocab * dim) * 4),
        zeros(u64::from(vocab) * 4),
    );
    let problem = LinearProblem::new(spec, rows, dim, vocab)
        .unwrap()
        .with_bias(true);
    let plan = LinearPlan::new(&g.kernel, &problem).unwrap();
    let buffers =
        lsce::linear::LinearBuffers::new(h.slice(..), w.slice(..), t.slice(..), summary.slice(..))
            .with_bias(b.slice(..))
            .with_grads(dh.slice(..), Some(dw.slice(..)), Some(db.slice(..)));
    // 1. The logits, against H W^T + b in f64 (the bound of the module docs' first item).
    let mut encoder = g.device.create_command_encoder(&Default::default());
    plan.bind_logits(&buffers, logits.slice(..))
        .unwrap()
        .encode(&mut encoder);
    g.queue.submit([encoder.finish()]);
    let z = read_f32(g, &logits, u64::from(rows * vocab) * 4);
    for r in 0..case.rows {
        for v in 0..case.vocab {
            let (mut exact, mut abs) = (f64::from(case.bias.as_ref().unwrap()[v]), 0.0);
            for d in 0..case.dim {
                let p = f64::from(case.hidden[r * case.dim + d])
                    * f64::from(case.head[v * case.dim + d]);
                exact += p;
                abs += p.abs();
            }
            let bound = SAFETY * (case.dim as f64 + 2.0) * E * (abs + exact.abs());
            assert!(
                (f64::from(z[r * case.vocab + v]) - exact).abs() <= bound,
                "z[{r}, {v}]"
            );
        }
    }
    // 2. lsce's fused loss over them, the gradient in place; 3. the products.
    let loss_plan = g
        .kernel
        .plan(
            &lsce::Problem::new(spec, lsce::Shape::matrix(rows, vocab).unwrap())
                .with_gradient(lsce::Gradient::InPlace),
        )
        .unwrap();
    let mut encoder = g.device.create_command_encoder(&Default::default());
    loss_plan
        .encode(
            &mut encoder,
            &lsce::LossBuffers::new(logits.slice(..), t.slice(..), summary.slice(..)),
        )
        .unwrap();
    plan.bind_products(&buffers, logits.slice(..))
        .unwrap()
        .encode(&mut encoder);
    g.queue.submit([encoder.finish()]);
    let fused = g
        .kernel
        .compute_linear(&g.queue, &spec, &batch, &LinearOptions::default())
        .unwrap();
    let b = bounds(&spec, &case, Split::whole(case.vocab), &reference);
    let outputs = [
        (
            read_f32(g, &dh, u64::from(rows * dim) * 4),
            reference.d_hidden.as_ref().unwrap(),
            &b.d_hidden,
            "dH",
        ),
        (
            read_f32(g, &dw, u64::from(vocab * dim) * 4),
            reference.d_head.as_ref().unwrap(),
            &b.d_head,
            "dW",
        ),
        (
            read_f32(g, &db, u64::from(vocab) * 4),
            reference.d_bias.as_ref().unwrap(),
            &b.d_bias,
            "db",
        ),
    ];
    for (gpu, cpu, tol, name) in &outputs {
        common::assert_close(&format!("unfused {name}"), gpu, cpu, tol);
    }
    // The fused head's dH and the unfused one: each within its bound of the reference, so
    // within twice the bound of each other.
    let dh_unfused = &outputs[0].0;
    let mut diff = 0.0f32;
    for ((a, b), t) in fused
        .d_hidden
        .unwrap()
        .iter()
        .zip(dh_unfused)
        .zip(&b.d_hidden)
    {
        assert!(
            f64::from((a - b).abs()) <= 2.0 * t,
            "fused dH {a} vs unfused {b}"
        );
        diff = diff.max((a - b).abs());
    }
    eprintln!("[unfused] max |fused dH - unfused dH| = {diff:e}");
}
