//! The loss as a custom operation in Burn's fusion stream (Burn's default).
//!
//! With fusion on, a tensor is a lazy `FusionTensor`: operations are recorded and compiled into
//! fused kernels later. The loss is registered as an opaque `CustomOpIr`, so fusion executes
//! everything recorded before it, then calls the cube backend's launch with the resolved cube
//! tensors, then goes on with what follows. Its outputs are lazy tensors like any other.

use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, ScalarIr, StreamId, TensorIr,
};
use burn::backend::fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn::backend::ExecutionError;
use burn::tensor::{DType, Shape as BurnShape};

use super::ops::{self, LossOptions, LsceOps};
use crate::Shape;

/// The custom operation's name in fusion's IR.
const LOSS: &str = "lsce::loss";
/// The same with the gradient written.
const LOSS_GRAD: &str = "lsce::loss_grad";

/// Which optional inputs follow the logits in the IR's input list, in this order.
#[derive(Clone, Copy, Debug)]
struct Present {
    labels: bool,
    probabilities: bool,
    weights: bool,
    upstream: bool,
}

struct LossOp<B> {
    desc: CustomOpIr,
    present: Present,
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
        let mut inputs = self.desc.inputs.iter();
        let mut next = || inputs.next().expect("the IR lists every present input");
        let logits = handles.get_float_tensor::<B>(next());
        let labels = self
            .present
            .labels
            .then(|| handles.get_int_tensor::<B>(next()));
        let probabilities = self
            .present
            .probabilities
            .then(|| handles.get_float_tensor::<B>(next()));
        let weights = self
            .present
            .weights
            .then(|| handles.get_float_tensor::<B>(next()));
        let upstream = self
            .present
            .upstream
            .then(|| handles.get_float_tensor::<B>(next()));
        let outputs = &self.desc.outputs;
        if self.desc.id == LOSS {
            let (loss, summary) =
                B::lsce_loss(logits, labels, probabilities, weights, self.options);
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_int_tensor::<B>(&outputs[1].id, summary);
        } else {
            let (loss, grad, summary) =
                B::lsce_loss_grad(logits, labels, probabilities, weights, upstream, self.options);
            handles.register_float_tensor::<B>(&outputs[0].id, loss);
            handles.register_float_tensor::<B>(&outputs[1].id, grad);
            handles.register_int_tensor::<B>(&outputs[2].id, summary);
        }
        Ok(())
    }
}

impl<B: FusionBackend + LsceOps> LsceOps for Fusion<B> {
    fn lsce_loss(
        logits: FusionTensor<B::FusionRuntime>,
        labels: Option<FusionTensor<B::FusionRuntime>>,
        probabilities: Option<FusionTensor<B::FusionRuntime>>,
        weights: Option<FusionTensor<B::FusionRuntime>>,
        options: LossOptions,
    ) -> (
        FusionTensor<B::FusionRuntime>,
        FusionTensor<B::FusionRuntime>,
    ) {
        let mut out = register::<B>(
            LOSS,
            logits,
            labels,
            probabilities,
            weights,
            None,
            options,
        )
        .into_iter();
        let loss = out.next().expect("loss");
        (loss, out.next().expect("summary"))
    }

    fn lsce_loss_grad(
        logits: FusionTensor<B::FusionRuntime>,
        labels: Option<FusionTensor<B::FusionRuntime>>,
        probabilities: Option<FusionTensor<B::FusionRuntime>>,
        weights: Option<FusionTensor<B::FusionRuntime>>,
        upstream: Option<FusionTensor<B::FusionRuntime>>,
        options: LossOptions,
    ) -> (
        FusionTensor<B::FusionRuntime>,
        FusionTensor<B::FusionRuntime>,
        FusionTensor<B::FusionRuntime>,
    ) {
        let mut out = register::<B>(
            LOSS_GRAD,
            logits,
            labels,
            probabilities,
            weights,
            upstream,
            options,
        )
        .into_iter();
        let loss = out.next().expect("loss");
        let grad = out.next().expect("gradient");
        (loss, grad, out.next().expect("summary"))
    }
}

/// Records the operation; returns its lazy outputs: loss, (gradient,) summary.
fn register<B: FusionBackend + LsceOps>(
    id: &'static str,
    logits: FusionTensor<B::FusionRuntime>,
    labels: Option<FusionTensor<B::FusionRuntime>>,
    probabilities: Option<FusionTensor<B::FusionRuntime>>,
    weights: Option<FusionTensor<B::FusionRuntime>>,
    upstream: Option<FusionTensor<B::FusionRuntime>>,
    options: LossOptions,
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = logits.client.clone();
    let present = Present {
        labels: labels.is_some(),
        probabilities: probabilities.is_some(),
        weights: weights.is_some(),
        upstream: upstream.is_some(),
    };
    let dims = logits.shape.to_vec();
    let logits_dtype = logits.dtype;
    let shape = Shape::class_dim1(&dims).expect("validated before registration");

    let mut inputs: Vec<TensorIr> = vec![logits.into_ir()];
    inputs.extend(labels.map(FusionTensor::into_ir));
    inputs.extend(probabilities.map(FusionTensor::into_ir));
    inputs.extend(weights.map(FusionTensor::into_ir));
    inputs.extend(upstream.map(FusionTensor::into_ir));

    let mut output = |dims: &[usize], dtype: DType| {
        TensorIr::uninit(
            client.create_empty_handle(),
            BurnShape::from(dims.to_vec()),
            dtype,
        )
    };
    let mut outputs = vec![output(&ops::loss_dims(&options.spec, &shape), DType::F32)];
    if id == LOSS_GRAD {
        outputs.push(output(&dims, logits_dtype));
    }
    outputs.push(output(&ops::SUMMARY_DIMS, DType::I32));

    // Fusion may cache and replay graphs keyed by their IR: the options go in as a scalar so
    // that two losses that differ only in their spec never share an entry.
    let desc = CustomOpIr::with_scalars(id, &inputs, &outputs, vec![options_key(&options)]);
    client.register(
        StreamId::current(),
        OperationIr::Custom(desc.clone()),
        LossOp::<B> {
            desc,
            present,
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
