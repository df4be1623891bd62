//! The launch on Burn's cube backend: lsce's encode API on the tensors' own wgpu buffers.
//!
//! No byte is copied. cubecl's `ComputeClient::get_resource` hands out the `wgpu::Buffer` and
//! byte offset of each tensor (cubecl sub-allocates: offsets are not 0), after executing and
//! submitting the streams that write them; `flush` submits what else this stream has pending.
//! lsce then records into its own encoder and submits on the same queue, so Burn's earlier work
//! runs before it and everything Burn records later runs after it. Outputs are tensors Burn
//! allocated (`client.empty`), handed back as ordinary cube tensors.
//!
//! Bytes moved per launch are those of lsce's passes (see the crate docs); the glue adds a
//! bind (one small parameter upload, a few bind groups) and one submission.

use std::sync::Arc;

use burn::tensor::{DType, Shape as BurnShape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::server::Handle;
use cubecl::wgpu::{AutoCompiler, WgpuResource, WgpuServer};

use super::ops::{self, LossOptions, LsceOps};
use super::registry::{self, Shared};
use crate::{LossBuffers, Summary, TargetKind};

/// The server type Burn's wgpu runtime runs, which `get_resource` downcasts to.
pub(super) type Server = WgpuServer<AutoCompiler>;

impl LsceOps for CubeBackend {
    fn lsce_loss(
        logits: CubeTensor,
        labels: CubeTensor,
        probabilities: CubeTensor,
        weights: CubeTensor,
        options: LossOptions,
    ) -> (CubeTensor, CubeTensor) {
        let inputs = Inputs::new(labels, probabilities, weights, None, &options);
        let out = launch(logits, inputs, options, false);
        (out.loss, out.summary)
    }

    fn lsce_loss_grad(
        logits: CubeTensor,
        labels: CubeTensor,
        probabilities: CubeTensor,
        weights: CubeTensor,
        upstream: CubeTensor,
        options: LossOptions,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let inputs = Inputs::new(labels, probabilities, weights, Some(upstream), &options);
        let out = launch(logits, inputs, options, true);
        let grad = out.grad.expect("a gradient launch writes the gradient");
        (out.loss, grad, out.summary)
    }
}

/// The inputs a launch binds besides the logits; placeholders dropped.
struct Inputs {
    targets: CubeTensor,
    weights: Option<CubeTensor>,
    upstream: Option<CubeTensor>,
}

impl Inputs {
    fn new(
        labels: CubeTensor,
        probabilities: CubeTensor,
        weights: CubeTensor,
        upstream: Option<CubeTensor>,
        options: &LossOptions,
    ) -> Self {
        Self {
            targets: match options.targets {
                TargetKind::Classes => labels,
                // Row-major like the logits.
                TargetKind::Probabilities => into_contiguous(probabilities),
            },
            weights: options.weighted.then_some(weights),
            upstream: upstream.filter(|_| options.upstream_grad),
        }
    }
}

struct Launched {
    loss: CubeTensor,
    grad: Option<CubeTensor>,
    summary: CubeTensor,
}

/// Panics name lsce and the cause: inputs were validated and planned before they got here
/// (possibly deferred by fusion, where an error can no longer be returned), so a failure here
/// is an internal one, or a device lost mid-run.
fn launch(logits: CubeTensor, inputs: Inputs, options: LossOptions, gradient: bool) -> Launched {
    let shared = shared_with(&logits);

    // The kernel reads row-major data; views Burn made without copying (a transpose, a slice)
    // are made contiguous by Burn's own kernel, a copy only for those.
    let logits = into_contiguous(logits);
    let dims = logits.meta.shape().to_vec();
    let dtype = ops::lsce_dtype("logits", logits.dtype).unwrap_or_else(|e| fail("logits", &e));
    let problem = ops::problem(&options, &dims, dtype, gradient)
        .unwrap_or_else(|e| fail("describing the launch", &e));
    let plan = shared
        .plan(&problem)
        .unwrap_or_else(|e| fail("planning the launch", &e));
    let shape = problem.shape;

    let client = logits.client.clone();
    let loss_dims = ops::loss_dims(&options.spec, &shape);
    let loss = client.empty(4 * loss_dims[0]);
    let grad_bytes = shape.elements() * problem.grad_dtype().bytes();
    let grad = gradient.then(|| client.empty(round4(grad_bytes) as usize));
    let summary = client.empty(Summary::SIZE as usize);

    // Handing out a buffer executes and submits the streams that write it.
    let resource = |handle: &Handle, what: &str| {
        client
            .get_resource::<Server>(handle.clone())
            .unwrap_or_else(|e| fail(what, &e))
    };
    let logits_res = resource(&logits.handle, "the logits' buffer");
    let targets_res = resource(&inputs.targets.handle, "the targets' buffer");
    let weights_res = inputs
        .weights
        .as_ref()
        .map(|w| resource(&w.handle, "the weights' buffer"));
    let upstream_res = inputs
        .upstream
        .as_ref()
        .map(|u| resource(&u.handle, "the upstream gradient's buffer"));
    let loss_res = resource(&loss, "the loss buffer");
    let grad_res = grad.as_ref().map(|g| resource(g, "the gradient buffer"));
    let summary_res = resource(&summary, "the summary buffer");
    // Whatever else this thread's stream has recorded goes to the queue before lsce's work.
    client
        .flush()
        .unwrap_or_else(|e| fail("flushing Burn's pending work", &e));

    let rows = u64::from(shape.rows());
    let target_bytes = match options.targets {
        TargetKind::Classes => 4 * rows,
        TargetKind::Probabilities => 4 * shape.elements(),
    };
    let loss_bytes = 4 * loss_dims[0] as u64;
    let mut buffers = LossBuffers::new(
        slice(logits_res.resource(), shape.elements() * dtype.bytes()),
        slice(targets_res.resource(), target_bytes),
        slice(summary_res.resource(), Summary::SIZE),
    )
    .with_loss(slice(loss_res.resource(), loss_bytes));
    if let Some(w) = &weights_res {
        buffers = buffers.with_weights(slice(w.resource(), 4 * u64::from(shape.classes())));
    }
    if let Some(u) = &upstream_res {
        buffers = buffers.with_upstream(slice(u.resource(), loss_bytes));
    }
    if let Some(g) = &grad_res {
        buffers = buffers.with_grad(slice(g.resource(), grad_bytes));
    }
    let binding = plan.bind(&buffers).unwrap_or_else(|e| fail(BIND, &e));
    submit(&shared, "lsce in Burn", |encoder| binding.encode(encoder));
    // The resources may be released now: cubecl records any later use of their memory after
    // this submission, on the same queue.
    drop((logits_res, targets_res, weights_res, upstream_res));
    drop((loss_res, grad_res, summary_res));

    let tensor =
        |handle: Handle, dims: &[usize], dtype: DType| output(&logits, handle, dims, dtype);
    Launched {
        loss: tensor(loss, &loss_dims, DType::F32),
        grad: grad.map(|g| tensor(g, &dims, ops::grad_burn_dtype(&options, logits.dtype))),
        summary: tensor(summary, &ops::SUMMARY_DIMS, DType::I32),
    }
}

/// The lsce device `tensor`'s device is shared with.
pub(super) fn shared_with(tensor: &CubeTensor) -> Arc<Shared> {
    registry::shared_for_cube(&tensor.device)
        .unwrap_or_else(|| panic!("lsce: device {:?} is not shared with lsce", tensor.device))
}

/// A launch's failure, as a panic naming lsce, `what` failed and the cause.
pub(super) fn fail(what: &str, err: &dyn std::fmt::Display) -> ! {
    panic!("lsce: {what}: {err}")
}

/// What a failed bind says.
pub(super) const BIND: &str = "binding Burn's buffers (a device shared through \
    lsce::burn::register_setup needs MemoryConfiguration::ExclusivePages)";

/// Records what `encode` records into a new encoder and submits it on lsce's queue (Burn's).
pub(super) fn submit(shared: &Shared, label: &str, encode: impl FnOnce(&mut wgpu::CommandEncoder)) {
    let mut encoder = shared
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
    encode(&mut encoder);
    shared.queue.submit([encoder.finish()]);
}

/// The contiguous output tensor of `dims` and `dtype` on `handle`, on `like`'s client and
/// device.
pub(super) fn output(
    like: &CubeTensor,
    handle: Handle,
    dims: &[usize],
    dtype: DType,
) -> CubeTensor {
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        BurnShape::from(dims.to_vec()),
        handle,
        dtype,
    )
}

/// `bytes` from the resource's offset, rounded up to whole 32-bit words (16-bit logits of odd
/// count): cubecl aligns every allocation to the storage offset alignment, so the padding is
/// inside the buffer and owned by the same allocation.
pub(super) fn slice(r: &WgpuResource, bytes: u64) -> wgpu::BufferSlice<'_> {
    let end = (r.offset + round4(bytes)).min(r.buffer.size());
    r.buffer.slice(r.offset..end)
}

fn round4(bytes: u64) -> u64 {
    bytes.div_ceil(4) * 4
}
