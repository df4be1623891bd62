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

/// One of lsce's operations in fusion's stream: what it launches on the cube backend once
/// fusion resolved its inputs (the loss's [`LossOptions`], the head's `HeadOptions`).
pub(super) trait Launch<B: FusionBackend>:
    Copy + std::fmt::Debug + Send + Sync + 'static
{
    /// Launches the operation `desc` (its inputs in the order `register` got them) and
    /// registers its outputs in `handles`.
    fn launch(
        &self,
        desc: &CustomOpIr,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    );
}

struct CustomOp<B, O> {
    desc: CustomOpIr,
    options: O,
    _backend: PhantomData<B>,
}

impl<B, O: std::fmt::Debug> std::fmt::Debug for CustomOp<B, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomOp")
            .field("desc", &self.desc)
            .field("options", &self.options)
            .finish()
    }
}

impl<B: FusionBackend, O: Launch<B>> Operation<B::FusionRuntime> for CustomOp<B, O> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) -> Result<(), ExecutionError> {
        self.options.launch(&self.desc, handles);
        Ok(())
    }
}

pub(super) type Tensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

/// Records the operation `id` on `inputs`; returns its lazy outputs, of the dims and dtypes
/// `outputs` lists.
pub(super) fn register<B: FusionBackend, O: Launch<B>>(
    id: &'static str,
    inputs: Vec<Tensor<B>>,
    outputs: &[(Vec<usize>, DType)],
    options: O,
) -> Vec<Tensor<B>> {
    let client = inputs[0].client.clone();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let outputs: Vec<TensorIr> = outputs
        .iter()
        .map(|(dims, dtype)| {
            TensorIr::uninit(
                client.create_empty_handle(),
                BurnShape::from(dims.clone()),
                *dtype,
            )
        })
        .collect();
    // Fusion may cache and replay graphs keyed by their IR: the options go in as a scalar so
    // that two operations that differ only in their options never share an entry.
    let desc = CustomOpIr::with_scalars(id, &inputs, &outputs, vec![options_key(&options)]);
    client.register(
        StreamId::current(),
        OperationIr::Custom(desc.clone()),
        CustomOp::<B, O> {
            desc,
            options,
            _backend: PhantomData,
        },
    )
}

/// A hash of everything in the options, as an IR scalar.
fn options_key(options: &impl std::fmt::Debug) -> ScalarIr {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    format!("{options:?}").hash(&mut hasher);
    ScalarIr::UInt(hasher.finish())
}

impl<B: FusionBackend + LsceOps> Launch<B> for LossOptions {
    fn launch(
        &self,
        desc: &CustomOpIr,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        // Inputs in the order `register` got them: logits, labels, probabilities, weights
        // (, upstream).
        let inputs = &desc.inputs;
        let logits = handles.get_float_tensor::<B>(&inputs[0]);
        let labels = handles.get_int_tensor::<B>(&inputs[1]);
        let probabilities = handles.get_float_tensor::<B>(&inputs[2]);
        let weights = handles.get_float_tensor::<B>(&inputs[3]);
        let outputs = &desc.outputs;
        if desc.id == LOSS {
            let (loss, summary) = B::lsce_loss(logits, labels, probabilities, weights, *self);
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_int_tensor::<B>(&outputs[1].id, summary);
        } else {
            let upstream = handles.get_float_tensor::<B>(&inputs[4]);
            let (loss, grad, summary) =
                B::lsce_loss_grad(logits, labels, probabilities, weights, upstream, *self);
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_float_tensor::<B>(&outputs[1].id, grad);
            handles.register_int_tensor::<B>(&outputs[2].id, summary);
        }
    }
}

impl<B: FusionBackend + LsceOps> LsceOps for Fusion<B> {
    fn lsce_loss(
        logits: Tensor<B>,
        labels: Tensor<B>,
        probabilities: Tensor<B>,
        weights: Tensor<B>,
        options: LossOptions,
    ) -> (Tensor<B>, Tensor<B>) {
        let outputs = loss_outputs::<B>(&logits, &options, false);
        let inputs = vec![logits, labels, probabilities, weights];
        let [loss, summary]: [Tensor<B>; 2] = register::<B, _>(LOSS, inputs, &outputs, options)
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
        let outputs = loss_outputs::<B>(&logits, &options, true);
        let inputs = vec![logits, labels, probabilities, weights, upstream];
        let [loss, grad, summary]: [Tensor<B>; 3] =
            register::<B, _>(LOSS_GRAD, inputs, &outputs, options)
                .try_into()
                .expect("three outputs");
        (loss, grad, summary)
    }
}

/// The loss's outputs for `logits`: loss, (gradient,) summary.
fn loss_outputs<B: FusionBackend>(
    logits: &Tensor<B>,
    options: &LossOptions,
    gradient: bool,
) -> Vec<(Vec<usize>, DType)> {
    let dims = logits.shape.to_vec();
    let shape = Shape::class_dim1(&dims).expect("validated before registration");
    let mut outputs = vec![(ops::loss_dims(&options.spec, &shape).to_vec(), DType::F32)];
    if gradient {
        outputs.push((dims, ops::grad_burn_dtype(options, logits.dtype)));
    }
    outputs.push((ops::SUMMARY_DIMS.to_vec(), DType::I32));
    outputs
}
