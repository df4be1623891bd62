//! The loss as a custom operation in Burn's fusion stream (Burn's default).
//!
//! With fusion on, a tensor is a lazy `FusionTensor`: operations are recorded and compiled into
//! fused kernels later. The loss is registered as an opaque `CustomOpIr`, so fusion executes
//! everything recorded before it, then calls the cube backend's launch with the resolved cube
//! tensors, then goes on with what follows. Its outputs are lazy tensors like any other.

use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use burn::backend::ExecutionError;
use burn::tensor::{DType, Shape as BurnShape};
use burn_fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, ScalarIr, StreamId, TensorIr,
};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};

use super::ops::{self, LossOptions, LsceOps};
use crate::Shape;

/// The custom operation's name in fusion's IR.
const LOSS: &str = "lsce::loss";
/// The same with the gradient written.
const LOSS_GRAD: &str = "lsce::loss_grad";

struct LossOp<B> {
    desc: CustomOpIr,
    options: LossOptions,
    _backend: PhantomData<B>,
}

impl<B> std::fmt::Debug for LossOp<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossOp")
            .field("desc", &self.desc)
            .field("options", &self.options)
            .finish()
    }
}

impl<B: FusionBackend + LsceOps> Operation<B::FusionRuntime> for LossOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) -> Result<(), ExecutionError> {
        // Inputs in the order `register` listed them: logits, labels, probabilities, weights
        // (, upstream).
        let inputs = &self.desc.inputs;
        let logits = handles.get_float_tensor::<B>(&inputs[0]);
        let labels = handles.get_int_tensor::<B>(&inputs[1]);
        let probabilities = handles.get_float_tensor::<B>(&inputs[2]);
        let weights = handles.get_float_tensor::<B>(&inputs[3]);
        let outputs = &self.desc.outputs;
        if self.desc.id == LOSS {
            let (loss, summary) =
                B::lsce_loss(logits, labels, probabilities, weights, self.options);
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_int_tensor::<B>(&outputs[1].id, summary);
        } else {
            let upstream = handles.get_float_tensor::<B>(&inputs[4]);
            let (loss, grad, summary) = B::lsce_loss_grad(
                logits,
                labels,
                probabilities,
                weights,
                upstream,
                self.options,
            );
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_float_tensor::<B>(&outputs[1].id, grad);
            handles.register_int_tensor::<B>(&outputs[2].id, summary);
        }
        Ok(())
    }
}

type Tensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

impl<B: FusionBackend + LsceOps> LsceOps for Fusion<B> {
    fn lsce_loss(
        logits: Tensor<B>,
        labels: Tensor<B>,
        probabilities: Tensor<B>,
        weights: Tensor<B>,
        options: LossOptions,
    ) -> (Tensor<B>, Tensor<B>) {
        let [loss, summary]: [Tensor<B>; 2] =
            register::<B>(LOSS, vec![logits, labels, probabilities, weights], options)
                .try_into()
                .expect("two outputs");
        (loss, summary)
    }

    fn lsce_loss_grad(
        logits: Tensor<B>,
        labels: Tensor<B>,
        probabilities: Tensor<B>,
        weights: Tensor<B>,
        upstream: Tensor<B>,
        options: LossOptions,
    ) -> (Tensor<B>, Tensor<B>, Tensor<B>) {
        let inputs = vec![logits, labels, probabilities, weights, upstream];
        let [loss, grad, summary]: [Tensor<B>; 3] = register::<B>(LOSS_GRAD, inputs, options)
            .try_into()
            .expect("three outputs");
        (loss, grad, summary)
    }
}

/// Records the operation on `inputs` (logits first); returns its lazy outputs: loss,
/// (gradient,) summary.
fn register<B: FusionBackend + LsceOps>(
    id: &'static str,
    inputs: Vec<Tensor<B>>,
    options: LossOptions,
) -> Vec<Tensor<B>> {
    let client = inputs[0].client.clone();
    let dims = inputs[0].shape.to_vec();
    let logits_dtype = inputs[0].dtype;
    let shape = Shape::class_dim1(&dims).expect("validated before registration");
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();

    let output = |dims: &[usize], dtype: DType| {
        TensorIr::uninit(
            client.create_empty_handle(),
            BurnShape::from(dims.to_vec()),
            dtype,
        )
    };
    let mut outputs = vec![output(&ops::loss_dims(&options.spec, &shape), DType::F32)];
    if id == LOSS_GRAD {
        outputs.push(output(&dims, ops::grad_burn_dtype(&options, logits_dtype)));
    }
    outputs.push(output(&ops::SUMMARY_DIMS, DType::I32));

    // Fusion may cache and replay graphs keyed by their IR: the options go in as a scalar so
    // that two losses that differ only in their options never share an entry.
    let desc = CustomOpIr::with_scalars(id, &inputs, &outputs, vec![options_key(&options)]);
    client.register(
        StreamId::current(),
        OperationIr::Custom(desc.clone()),
        LossOp::<B> {
            desc,
            options,
            _backend: PhantomData,
        },
    )
}

/// A hash of everything in the options, as an IR scalar.
fn options_key(options: &LossOptions) -> ScalarIr {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    format!("{options:?}").hash(&mut hasher);
    ScalarIr::UInt(hasher.finish())
}
