//! Determinism, threads, and device failures.

mod common;

use std::sync::Arc;

use common::*;
use lsce::{
    Batch, Gradient, LossBuffers, LossKernel, LossSpec, LsceError, Problem, Reduction, Shape,
    Smoothing, StagingOptions, Summary,
};
use wgpu::util::DeviceExt;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn kernel_and_plan_are_send_and_sync() {
    assert_send_sync::<LossKernel>();
    assert_send_sync::<lsce::LossPlan>();
}

#[test]
fn twenty_runs_are_bitwise_identical() {
    // Both row paths (registers and streaming), the mean's tree and the weighted denominator.
    for (rows, classes) in [(300u32, 1000u32), (6, 40000)] {
        let shape = Shape::matrix(rows, classes).unwrap();
        let x = logits(shape.elements(), 4.0, 40);
        let y = labels(rows, classes, 7, 41);
        let mut rng = Rng::new(42);
        let w: Vec<f32> = (0..classes).map(|_| (rng.uniform() as f32) + 0.5).collect();
        let spec = LossSpec::pytorch(0.1).with_z_loss(1e-4);
        let batch = Batch::classes(shape, &x, &y).with_weights(&w);
        let g = gpu();
        let first = g
            .kernel
            .compute(&g.queue, &spec, &batch, &StagingOptions::default())
            .unwrap();
        for run in 1..20 {
            let again = g
                .kernel
                .compute(&g.queue, &spec, &batch, &StagingOptions::default())
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&again.loss), bits(&first.loss), "run {run}: loss");
            assert_eq!(bits(&again.lse), bits(&first.lse), "run {run}: lse");
            assert_eq!(
                bits(again.grad.as_ref().unwrap()),
                bits(first.grad.as_ref().unwrap()),
                "run {run}: grad"
            );
        }
    }
}

#[test]
fn four_threads_share_one_kernel() {
    // `check` runs the staging API on the binary's one shared kernel.
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            scope.spawn(move || {
                let shape = Shape::matrix(64 + t as u32, 500 + 100 * t as u32).unwrap();
                let x = logits(shape.elements(), 3.0, 50 + t);
                let y = labels(shape.rows(), shape.classes(), 5, 60 + t);
                let spec = LossSpec::default().with_smoothing(Smoothing::OffTarget(0.1 * t as f32));
                for _ in 0..5 {
                    check_every_path(
                        &format!("thread {t}"),
                        &spec,
                        &Batch::classes(shape, &x, &y),
                        StagingOptions::default(),
                    );
                }
            });
        }
    });
}

#[test]
fn four_threads_encode_one_plan() {
    // One plan, encoded and submitted from four threads at once into their own buffers: the
    // plan's scratch is shared, and command buffers execute in submission order.
    let g = gpu();
    let shape = Shape::matrix(40, 300).unwrap();
    let spec = LossSpec::pytorch(0.1).with_reduction(Reduction::Sum);
    let plan = Arc::new(g.kernel.plan(&Problem::new(spec, shape)).unwrap());
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let plan = Arc::clone(&plan);
            scope.spawn(move || {
                let x = logits(shape.elements(), 2.0, 70 + t);
                let y = labels(shape.rows(), shape.classes(), 0, 80 + t);
                let batch = Batch::classes(shape, &x, &y);
                let want = reference(&spec, &batch, lsce::Gradient::Separate, g.kernel.config());
                for _ in 0..5 {
                    let got = run_plan(&plan, shape, &x, &y);
                    assert_close(
                        "threaded plan: loss",
                        &[got.loss],
                        &want.out.loss,
                        &want.loss_tol,
                    );
                }
            });
        }
    });
}

fn run_plan(plan: &lsce::LossPlan, shape: Shape, x: &[f32], y: &[i32]) -> Summary {
    let g = gpu();
    let d = &g.device;
    let storage = wgpu::BufferUsages::STORAGE;
    let init = |contents: &[u8], usage| {
        d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents,
            usage,
        })
    };
    let logits = init(bytemuck::cast_slice(x), storage);
    let targets = init(bytemuck::cast_slice(y), storage);
    let grad = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: shape.elements() * 4,
        usage: storage,
        mapped_at_creation: false,
    });
    let summary = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: Summary::SIZE,
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let readback = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: Summary::SIZE,
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        mapped_at_creation: false,
    });
    let mut encoder = d.create_command_encoder(&Default::default());
    plan.encode(
        &mut encoder,
        &LossBuffers::new(logits.slice(..), targets.slice(..), summary.slice(..))
            .with_grad(grad.slice(..)),
    )
    .unwrap();
    encoder.copy_buffer_to_buffer(&summary, 0, &readback, 0, Summary::SIZE);
    let index = g.queue.submit([encoder.finish()]);
    readback
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    d.poll(wgpu::PollType::Wait {
        submission_index: Some(index),
        timeout: None,
    })
    .unwrap();
    let s = Summary::from_bytes(&readback.slice(..).get_mapped_range().unwrap());
    readback.unmap();
    s
}

#[test]
fn a_lost_device_gives_err_not_panic() {
    let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())
        .expect("no wgpu adapter: install mesa-vulkan-drivers");
    let kernel = LossKernel::new(&device).unwrap();
    let shape = Shape::matrix(8, 100).unwrap();
    let x = logits(shape.elements(), 1.0, 90);
    let y = labels(8, 100, 0, 91);
    let batch = Batch::classes(shape, &x, &y);
    // Warm the pipeline cache, then lose the device.
    kernel
        .compute(
            &queue,
            &LossSpec::default(),
            &batch,
            &StagingOptions::default(),
        )
        .unwrap();
    device.destroy();
    let err = kernel
        .compute(
            &queue,
            &LossSpec::default(),
            &batch,
            &StagingOptions::default(),
        )
        .unwrap_err();
    assert!(
        matches!(err, LsceError::Device(_) | LsceError::Readback(_)),
        "{err:?}"
    );
    // Planning with pipelines not compiled yet does not panic either. WebGPU reports nothing for
    // objects made on a lost device (they are silently invalid); what matters is that the
    // staging call on top of it fails cleanly.
    let _ = kernel.plan(&Problem::new(LossSpec::default(), shape).with_gradient(Gradient::InPlace));
    let options = StagingOptions {
        gradient: Gradient::InPlace,
        ..Default::default()
    };
    let err = kernel
        .compute(&queue, &LossSpec::default(), &batch, &options)
        .unwrap_err();
    assert!(
        matches!(err, LsceError::Device(_) | LsceError::Readback(_)),
        "{err:?}"
    );
}

#[test]
fn a_buffer_of_another_device_is_an_err() {
    // Two devices of one adapter (one wgpu instance): wgpu's validation sees the mismatch and
    // binding returns it as an Err instead of reaching the uncaptured-error handler.
    let adapter = lsce::adapters(wgpu::Backends::all())
        .into_iter()
        .next()
        .expect("no wgpu adapter: install mesa-vulkan-drivers");
    let (device, _queue) = lsce::device_for_adapter(&adapter).unwrap();
    let (other, _other_queue) = lsce::device_for_adapter(&adapter).unwrap();
    let kernel = LossKernel::new(&device).unwrap();
    let shape = Shape::matrix(4, 10).unwrap();
    let plan = kernel
        .plan(&Problem::new(LossSpec::default(), shape))
        .unwrap();
    let buffer = |d: &wgpu::Device, size| {
        d.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (logits, targets) = (buffer(&other, 160), buffer(&device, 16));
    let (grad, summary) = (buffer(&device, 160), buffer(&device, 32));
    let buffers = LossBuffers::new(logits.slice(..), targets.slice(..), summary.slice(..))
        .with_grad(grad.slice(..));
    let err = plan.bind(&buffers).unwrap_err();
    assert!(
        matches!(&err, LsceError::Device(msg) if msg.contains("Device")),
        "{err:?}"
    );
}
