//! The fused linear head as a custom operation in Burn's fusion stream (see `fusion.rs`).

use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use burn::backend::ExecutionError;
use burn::tensor::{DType, Shape as BurnShape};
use burn_fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, ScalarIr, StreamId, TensorIr,
};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};

use super::head::{self, HeadOptions, LsceHeadOps};
use super::ops;

/// The custom operation's name in fusion's IR.
const HEAD: &str = "lsce::linear_head";
/// The same with the gradients written.
const HEAD_GRAD: &str = "lsce::linear_head_grad";

struct HeadOp<B> {
    desc: CustomOpIr,
    options: HeadOptions,
    _backend: PhantomData<B>,
}

impl<B> std::fmt::Debug for HeadOp<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadOp")
            .field("desc", &self.desc)
            .field("options", &self.options)
            .finish()
    }
}

impl<B: FusionBackend + LsceHeadOps> Operation<B::FusionRuntime> for HeadOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) -> Result<(), ExecutionError> {
        // Inputs in the order `register` listed them: hidden, weight, bias, labels, weights
        // (, upstream).
        let inputs = &self.desc.inputs;
        let hidden = handles.get_float_tensor::<B>(&inputs[0]);
        let weight = handles.get_float_tensor::<B>(&inputs[1]);
        let bias = handles.get_float_tensor::<B>(&inputs[2]);
        let labels = handles.get_int_tensor::<B>(&inputs[3]);
        let weights = handles.get_float_tensor::<B>(&inputs[4]);
        let outputs = &self.desc.outputs;
        if self.desc.id == HEAD {
            let (loss, summary) = B::lsce_head(hidden, weight, bias, labels, weights, self.options);
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_int_tensor::<B>(&outputs[1].id, summary);
        } else {
            let upstream = handles.get_float_tensor::<B>(&inputs[5]);
            let (loss, dh, dw, db, summary) = B::lsce_head_grad(
                hidden,
                weight,
                bias,
                labels,
                weights,
                upstream,
                self.options,
            );
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_float_tensor::<B>(&outputs[1].id, dh);
            handles.register_float_tensor::<B>(&outputs[2].id, dw);
            handles.register_float_tensor::<B>(&outputs[3].id, db);
            handles.register_int_tensor::<B>(&outputs[4].id, summary);
        }
        Ok(())
    }
}

type Tensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

impl<B: FusionBackend + LsceHeadOps> LsceHeadOps for Fusion<B> {
    fn lsce_head(
        hidden: Tensor<B>,
        weight: Tensor<B>,
        bias: Tensor<B>,
        labels: Tensor<B>,
        weights: Tensor<B>,
        options: HeadOptions,
    ) -> (Tensor<B>, Tensor<B>) {
        let inputs = vec![hidden, weight, bias, labels, weights];
        let [loss, summary]: [Tensor<B>; 2] = register::<B>(HEAD, inputs, options)
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
    ) -> (Tensor<B>, Tensor<B>, Tensor<B>, Tensor<B>, Tensor<B>) {
        let inputs = vec![hidden, weight, bias, labels, weights, upstream];
        let [loss, dh, dw, db, summary]: [Tensor<B>; 5] = register::<B>(HEAD_GRAD, inputs, options)
            .try_into()
            .expect("five outputs");
        (loss, dh, dw, db, summary)
    }
}

/// Records the operation on `inputs` (hidden states first, then the weight); returns its lazy
/// outputs: loss, (dH, dW, db,) summary.
fn register<B: FusionBackend + LsceHeadOps>(
    id: &'static str,
    inputs: Vec<Tensor<B>>,
    options: HeadOptions,
) -> Vec<Tensor<B>> {
    let client = inputs[0].client.clone();
    let sizes = [inputs[0].shape[0], inputs[0].shape[1], inputs[1].shape[0]];
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();

    let output = |dims: &[usize], dtype: DType| {
        TensorIr::uninit(
            client.create_empty_handle(),
            BurnShape::from(dims.to_vec()),
            dtype,
        )
    };
    let mut outputs = vec![output(
        &head::loss_dims(&options.spec, sizes[0]),
        DType::F32,
    )];
    if id == HEAD_GRAD {
        for dims in head::grad_dims(&options, sizes) {
            outputs.push(output(&dims, DType::F32));
        }
    }
    outputs.push(output(&ops::SUMMARY_DIMS, DType::I32));

    // Keyed by every option, so that two calls that differ only in them never share a
    // cached graph.
    let desc = CustomOpIr::with_scalars(id, &inputs, &outputs, vec![options_key(&options)]);
    client.register(
        StreamId::current(),
        OperationIr::Custom(desc.clone()),
        HeadOp::<B> {
            desc,
            options,
            _backend: PhantomData,
        },
    )
}

fn options_key(options: &HeadOptions) -> ScalarIr {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    format!("{options:?}").hash(&mut hasher);
    ScalarIr::UInt(hasher.finish())
}
