//! The fused linear head as a custom operation in Burn's fusion stream (see `fusion.rs`).

use burn::tensor::DType;
use burn_fusion::custom::{CustomOpIr, HandleContainer};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};

use super::fusion::{register, Launch, Tensor};
use super::head::{self, HeadOptions, LsceHeadOps};
use super::ops;

/// The custom operation's name in fusion's IR.
const HEAD: &str = "lsce::linear_head";
/// The same with the gradients written.
const HEAD_GRAD: &str = "lsce::linear_head_grad";

impl<B: FusionBackend + LsceHeadOps> Launch<B> for HeadOptions {
    fn launch(
        &self,
        desc: &CustomOpIr,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        // Inputs in the order `register` got them: hidden, weight, bias, labels, weights
        // (, upstream).
        let inputs = &desc.inputs;
        let hidden = handles.get_float_tensor::<B>(&inputs[0]);
        let weight = handles.get_float_tensor::<B>(&inputs[1]);
        let bias = handles.get_float_tensor::<B>(&inputs[2]);
        let labels = handles.get_int_tensor::<B>(&inputs[3]);
        let weights = handles.get_float_tensor::<B>(&inputs[4]);
        let outputs = &desc.outputs;
        if desc.id == HEAD {
            let (loss, summary) = B::lsce_head(hidden, weight, bias, labels, weights, *self);
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_int_tensor::<B>(&outputs[1].id, summary);
        } else {
            let upstream = handles.get_float_tensor::<B>(&inputs[5]);
            let (loss, dh, dw, db, summary) =
                B::lsce_head_grad(hidden, weight, bias, labels, weights, upstream, *self);
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_float_tensor::<B>(&outputs[1].id, dh);
            handles.register_float_tensor::<B>(&outputs[2].id, dw);
            handles.register_float_tensor::<B>(&outputs[3].id, db);
            handles.register_int_tensor::<B>(&outputs[4].id, summary);
        }
    }
}

impl<B: FusionBackend + LsceHeadOps> LsceHeadOps for Fusion<B> {
    fn lsce_head(
        hidden: Tensor<B>,
        weight: Tensor<B>,
        bias: Tensor<B>,
        labels: Tensor<B>,
        weights: Tensor<B>,
        options: HeadOptions,
    ) -> (Tensor<B>, Tensor<B>) {
        let outputs = head_outputs::<B>(&hidden, &weight, &options, false);
        let inputs = vec![hidden, weight, bias, labels, weights];
        let [loss, summary]: [Tensor<B>; 2] = register::<B, _>(HEAD, inputs, &outputs, options)
            .try_into()
            .expect("two outputs");
        (loss, summary)
    }

    fn lsce_head_grad(
        hidden: Tensor<B>,
        weight: Tensor<B>,
        bias: Tensor<B>,
        labels: Tensor<B>,
        weights: Tensor<B>,
        upstream: Tensor<B>,
        options: HeadOptions,
    ) -> head::HeadGradOutput<Self> {
        let outputs = head_outputs::<B>(&hidden, &weight, &options, true);
        let inputs = vec![hidden, weight, bias, labels, weights, upstream];
        let [loss, dh, dw, db, summary]: [Tensor<B>; 5] =
            register::<B, _>(HEAD_GRAD, inputs, &outputs, options)
                .try_into()
                .expect("five outputs");
        (loss, dh, dw, db, summary)
    }
}

/// The head's outputs for `hidden` and `weight`: loss, (dH, dW, db,) summary.
fn head_outputs<B: FusionBackend>(
    hidden: &Tensor<B>,
    weight: &Tensor<B>,
    options: &HeadOptions,
    gradients: bool,
) -> Vec<(Vec<usize>, DType)> {
    let sizes = [hidden.shape[0], hidden.shape[1], weight.shape[0]];
    let mut outputs = vec![(
        head::loss_dims(&options.spec, sizes[0]).to_vec(),
        DType::F32,
    )];
    if gradients {
        outputs.extend(head::grad_dims(options, sizes).map(|dims| (dims, DType::F32)));
    }
    outputs.push((ops::SUMMARY_DIMS.to_vec(), DType::I32));
    outputs
}
