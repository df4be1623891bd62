//! The fused linear head's launch on Burn's cube backend: lsce's linear encode API on the
//! tensors' own wgpu buffers (see `cube.rs` for how buffers are handed out and ordered).

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::server::Handle;

use super::cube::{fail, output, shared_with, slice, submit, Server, BIND};
use super::head::{self, HeadOptions, LsceHeadOps};
use super::ops;
use crate::linear::{HeadGradients, LinearBuffers};
use crate::Summary;

impl LsceHeadOps for CubeBackend {
    fn lsce_head(
        hidden: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        labels: CubeTensor,
        weights: CubeTensor,
        options: HeadOptions,
    ) -> (CubeTensor, CubeTensor) {
        let options = HeadOptions {
            gradients: HeadGradients::None,
            upstream_grad: false,
            ..options
        };
        let out = launch(hidden, weight, bias, labels, weights, None, options);
        (out.loss, out.summary)
    }

    fn lsce_head_grad(
        hidden: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        labels: CubeTensor,
        weights: CubeTensor,
        upstream: CubeTensor,
        options: HeadOptions,
    ) -> head::HeadGradOutput<Self> {
        // A gradient launch writes at least dH.
        let options = HeadOptions {
            gradients: match options.gradients {
                HeadGradients::None => HeadGradients::Hidden,
                g => g,
            },
            ..options
        };
        let out = launch(
            hidden,
            weight,
            bias,
            labels,
            weights,
            Some(upstream),
            options,
        );
        let [dh, dw, db] = out.grads.expect("a gradient launch writes the gradients");
        (out.loss, dh, dw, db, out.summary)
    }
}

struct Launched {
    loss: CubeTensor,
    grads: Option<[CubeTensor; 3]>,
    summary: CubeTensor,
}

/// Panics name lsce and the cause: inputs were validated and planned before they got here
/// (possibly deferred by fusion, where an error can no longer be returned).
fn launch(
    hidden: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    labels: CubeTensor,
    weights: CubeTensor,
    upstream: Option<CubeTensor>,
    options: HeadOptions,
) -> Launched {
    let shared = shared_with(&hidden);

    // Row-major operands; a view Burn made without copying (the transpose of a Burn
    // `Linear`'s weight, a slice) is made contiguous by Burn's own kernel.
    let hidden = into_contiguous(hidden);
    let weight = into_contiguous(weight);
    let bias = options.bias.then(|| into_contiguous(bias));
    let weights = options.weighted.then_some(weights);
    let upstream = upstream.filter(|_| options.upstream_grad);
    let (rows, dim) = (hidden.meta.shape()[0], hidden.meta.shape()[1]);
    let vocab = weight.meta.shape()[0];
    let sizes = [rows, dim, vocab];
    let dtype = ops::lsce_dtype("hidden", hidden.dtype).unwrap_or_else(|e| fail("hidden", &e));
    let gradients = options.gradients;
    let problem = head::problem(&options, sizes, dtype, gradients)
        .unwrap_or_else(|e| fail("describing the launch", &e));
    let plan = shared
        .linear_plan(&problem)
        .unwrap_or_else(|e| fail("planning the launch", &e));

    let client = hidden.client.clone();
    let loss_dims = head::loss_dims(&options.spec, rows);
    let loss = client.empty(4 * loss_dims[0]);
    let summary = client.empty(Summary::SIZE as usize);
    let with_grads = gradients != HeadGradients::None;
    let dims = head::grad_dims(
        &HeadOptions {
            gradients,
            ..options
        },
        sizes,
    );
    let grads = with_grads.then(|| {
        dims.clone()
            .map(|d| client.empty(4 * d.iter().product::<usize>()))
    });

    let resource = |handle: &Handle, what: &str| {
        client
            .get_resource::<Server>(handle.clone())
            .unwrap_or_else(|e| fail(what, &e))
    };
    let hidden_res = resource(&hidden.handle, "the hidden states' buffer");
    let weight_res = resource(&weight.handle, "the weight's buffer");
    let bias_res = bias
        .as_ref()
        .map(|b| resource(&b.handle, "the bias' buffer"));
    let labels_res = resource(&labels.handle, "the labels' buffer");
    let weights_res = weights
        .as_ref()
        .map(|w| resource(&w.handle, "the class weights' buffer"));
    let upstream_res = upstream
        .as_ref()
        .map(|u| resource(&u.handle, "the upstream gradient's buffer"));
    let loss_res = resource(&loss, "the loss buffer");
    let summary_res = resource(&summary, "the summary buffer");
    let grad_res = grads.as_ref().map(|g| {
        [
            resource(&g[0], "the hidden states' gradient buffer"),
            resource(&g[1], "the weight's gradient buffer"),
            resource(&g[2], "the bias' gradient buffer"),
        ]
    });
    client
        .flush()
        .unwrap_or_else(|e| fail("flushing Burn's pending work", &e));

    let element = dtype.bytes();
    let (n, d, v) = (rows as u64, dim as u64, vocab as u64);
    let loss_bytes = 4 * loss_dims[0] as u64;
    let mut buffers = LinearBuffers::new(
        slice(hidden_res.resource(), n * d * element),
        slice(weight_res.resource(), v * d * element),
        slice(labels_res.resource(), 4 * n),
        slice(summary_res.resource(), Summary::SIZE),
    )
    .with_loss(slice(loss_res.resource(), loss_bytes));
    if let Some(b) = &bias_res {
        buffers = buffers.with_bias(slice(b.resource(), v * element));
    }
    if let Some(w) = &weights_res {
        buffers = buffers.with_weights(slice(w.resource(), 4 * v));
    }
    if let Some(u) = &upstream_res {
        buffers = buffers.with_upstream(slice(u.resource(), loss_bytes));
    }
    if let Some([dh, dw, db]) = &grad_res {
        let all = gradients == HeadGradients::All;
        buffers = buffers.with_grads(
            slice(dh.resource(), 4 * n * d),
            all.then(|| slice(dw.resource(), 4 * v * d)),
            (all && options.bias).then(|| slice(db.resource(), 4 * v)),
        );
    }
    let binding = plan.bind(&buffers).unwrap_or_else(|e| fail(BIND, &e));
    submit(&shared, "lsce linear head in Burn", |encoder| {
        binding.encode(encoder)
    });
    drop((hidden_res, weight_res, bias_res, labels_res, weights_res));
    drop((upstream_res, loss_res, summary_res, grad_res));

    let tensor =
        |handle: Handle, dims: &[usize], dtype: DType| output(&hidden, handle, dims, dtype);
    Launched {
        loss: tensor(loss, &loss_dims, DType::F32),
        grads: grads.map(|[dh, dw, db]| {
            [
                tensor(dh, &dims[0], DType::F32),
                tensor(dw, &dims[1], DType::F32),
                tensor(db, &dims[2], DType::F32),
            ]
        }),
        summary: tensor(summary, &ops::SUMMARY_DIMS, DType::I32),
    }
}
