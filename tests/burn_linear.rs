//! The fused linear head inside Burn (feature `burn`): `LsceLinearLoss`'s loss and the
//! gradients Burn's autodiff gives the hidden states, the weight and the bias, held against the
//! f64 reference `lsce::linear::cpu::compute`, for f32 and f16 inputs, upstream gradients 1,
//! 1024 and 65536 (the loss multiplied by a constant before `backward`) and one per row, both
//! memory modes, both gradient modes, with and without a bias, `[batch, seq, D]` inputs, a
//! frozen head, and the options of `LossSpec`; errors; a few optimizer steps.
//!
//! # The error bounds
//!
//! The kernels' bounds are those of `tests/linear.rs` (derived in its module docs), from
//! `tests/common/linear.rs`, computed for the upstream gradient the test applies. Burn adds at
//! most two roundings ([`After`]):
//!
//! * [`GradientMode::Keep`] multiplies the kept f32 gradients by the upstream gradient in
//!   f32: one rounding of the result, `E |g|` (doubled, as every bound). The kept gradients
//!   were computed with upstream 1, and the kernels' bounds scale linearly with the upstream
//!   gradient, so the bound for upstream `s` covers `s` times the bound for 1.
//! * f16 parameters get their gradient rounded once from f32 to f16: `2^-11 |g|`, and `2^-25`
//!   below f16's normal range (half its smallest subnormal).
//!
//! f16 inputs are drawn in f32 and rounded to f16 on the host: the reference reads the same
//! values exactly.
#![cfg(feature = "burn")]

mod common;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use common::linear::{bounds, check_loss_and_grads, head_specs, After, Case, Split};
use common::{burn_device as device, Rng, E, SAFETY};
use lsce::burn::{BurnError, GradientMode, LsceLinearLoss, LsceLinearLossConfig};
use lsce::linear::{HeadGradients, Memory};
use lsce::{Dtype, LossSpec, LsceError, Reduction};

/// How one Burn run is driven.
#[derive(Clone, Copy, Debug)]
struct Run {
    mode: GradientMode,
    memory: Memory,
    /// `Some(seq)`: hidden states `[rows / seq, seq, D]` and labels `[rows / seq, seq]`.
    seq: Option<usize>,
    /// Whether the weight and bias require a gradient (false: a frozen head).
    train_head: bool,
    /// Whether the hidden states require a gradient.
    train_hidden: bool,
}

impl Run {
    fn new(mode: GradientMode, memory: Memory) -> Self {
        Self {
            mode,
            memory,
            seq: None,
            train_head: true,
            train_hidden: true,
        }
    }
}

/// What Burn returned, as f32.
struct Output {
    loss: Vec<f32>,
    d_hidden: Option<Vec<f32>>,
    d_head: Option<Vec<f32>>,
    d_bias: Option<Vec<f32>>,
}

fn f32s<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(FloatDType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

/// `values` on `device` in the case's dtype (whose values they are exactly).
fn tensor<const D: usize>(
    case: &Case,
    values: &[f32],
    dims: [usize; D],
    device: &Device,
) -> Tensor<D> {
    let t = Tensor::<D>::from_data(TensorData::new(values.to_vec(), dims), device);
    match case.dtype {
        Dtype::F32 => t,
        Dtype::F16 => t.cast(FloatDType::F16),
        Dtype::Bf16 => t.cast(FloatDType::BF16),
    }
}

fn param<const D: usize>(
    case: &Case,
    values: &[f32],
    dims: [usize; D],
    train: bool,
    device: &Device,
) -> burn::module::Param<Tensor<D>> {
    burn::module::Param::from_tensor(tensor(case, values, dims, device)).set_require_grad(train)
}

/// The case's head as an `LsceLinearLoss` on the autodiff device.
fn module(case: &Case, spec: &LossSpec, run: Run) -> LsceLinearLoss {
    let device = device().autodiff();
    let config = LsceLinearLossConfig::new()
        .with_spec(*spec)
        .with_weights(case.weights.clone())
        .with_gradient(run.mode)
        .with_memory(run.memory)
        .with_bias(case.bias.is_some());
    let mut head = config.init(case.dim, case.vocab, &device).expect("init");
    head.weight = param(
        case,
        &case.head,
        [case.vocab, case.dim],
        run.train_head,
        &device,
    );
    head.bias = case
        .bias
        .as_ref()
        .map(|b| param(case, b, [case.vocab], run.train_head, &device));
    head
}

/// Runs `head` on the case's hidden states and labels, `backward` with the case's upstream
/// gradient.
fn run_burn(case: &Case, head: &LsceLinearLoss, spec: &LossSpec, run: Run) -> Output {
    let device = device().autodiff();
    let mut x = tensor(case, &case.hidden, [case.rows, case.dim], &device);
    if run.train_hidden {
        x = x.require_grad();
    }
    let value = match run.seq {
        None => {
            let y = Tensor::<1, Int>::from_data(
                TensorData::new(case.labels.clone(), [case.rows]),
                &device,
            );
            head.try_forward(x.clone(), y).expect("try_forward")
        }
        Some(seq) => {
            let batch = case.rows / seq;
            let y = Tensor::<2, Int>::from_data(
                TensorData::new(case.labels.clone(), [batch, seq]),
                &device,
            );
            let x3 = x.clone().reshape([batch, seq, case.dim]);
            head.try_forward(x3, y).expect("try_forward")
        }
    };
    let total = match spec.reduction {
        Reduction::None => {
            let r = Tensor::<1>::from_data(
                TensorData::new(case.upstream.clone(), [case.rows]),
                &device,
            );
            (value.clone() * r).sum()
        }
        _ => value.clone() * case.upstream[0],
    };
    let grads = total.backward();
    let d_hidden = x.grad(&grads).map(f32s);
    if let Some(g) = head.weight.grad(&grads) {
        let dtype = head.weight.val().dtype();
        assert_eq!(g.dtype(), dtype, "dW comes back in the weight's dtype");
    }
    Output {
        loss: f32s(value),
        d_hidden,
        d_head: head.weight.grad(&grads).map(f32s),
        d_bias: head.bias.as_ref().and_then(|b| b.grad(&grads)).map(f32s),
    }
}

/// Checks a run against the reference and the bounds of `tests/common/linear.rs`, plus Burn's
/// roundings (see the module docs); the largest error/bound ratio of loss, dH, dW, db.
fn check(what: &str, case: &Case, spec: &LossSpec, run: Run, out: &Output) -> [f64; 4] {
    let reference = case.reference(spec, HeadGradients::All);
    let b = bounds(spec, case, Split::whole(case.vocab), &reference);
    let keep = run.mode == GradientMode::Keep && spec.reduction != Reduction::None;
    let after = After {
        products: u32::from(keep),
        rounded_to: (case.dtype != Dtype::F32).then_some(case.dtype),
    };
    let present = [
        run.train_hidden,
        run.train_head,
        run.train_head && case.bias.is_some(),
    ];
    let grads = [&out.d_hidden, &out.d_head, &out.d_bias];
    let worst = check_loss_and_grads(what, &b, &reference, &out.loss, grads, present, after)
        .map(|(_, ratio)| ratio);
    eprintln!(
        "[burn linear vs f64] {what:<52} err/bound: loss {:.3} dH {:.3} dW {:.3} db {:.3}",
        worst[0], worst[1], worst[2], worst[3]
    );
    worst
}

fn run_and_check(what: &str, case: &Case, spec: &LossSpec, run: Run) -> [f64; 4] {
    let head = module(case, spec, run);
    let out = run_burn(case, &head, spec, run);
    check(what, case, spec, run, &out)
}

const ROWS: usize = 37;
const DIM: usize = 24;
const VOCAB: usize = 150;
/// 64 rows of logits: one chunk of all rows (several chunks are `tests/linear.rs`' business).
const CHUNKED: Memory = Memory::Chunked {
    budget_bytes: 64 * VOCAB as u64 * 4,
};
const MODES: [GradientMode; 2] = [GradientMode::Keep, GradientMode::Recompute];

#[test]
fn f32_gradients_through_autodiff_match_the_reference() {
    let mut rng = Rng::new(5);
    for (i, (reduction, upstream)) in [
        (Reduction::Mean, 1024.0),
        (Reduction::Sum, 1.0),
        (Reduction::None, 0.0),
    ]
    .into_iter()
    .enumerate()
    {
        for mode in MODES {
            for (j, memory) in [Memory::Recompute, CHUNKED].into_iter().enumerate() {
                let bias = (i + j) % 2 == 0;
                let mut case = Case::new(10 + i as u64, ROWS, DIM, VOCAB, bias, true);
                case.upstream = match reduction {
                    Reduction::None => (0..ROWS).map(|_| rng.range(-1.5, 1.5) as f32).collect(),
                    _ => vec![upstream],
                };
                let spec = LossSpec::pytorch(0.1).with_reduction(reduction);
                let up = if reduction == Reduction::None {
                    "per-row".to_string()
                } else {
                    format!("x{upstream}")
                };
                let what = format!("f32 {reduction:?} {up} {mode:?} {memory:?} bias={bias}");
                run_and_check(&what, &case, &spec, Run::new(mode, memory));
            }
        }
    }
}

#[test]
fn f16_gradients_round_once_under_a_loss_scale_of_65536() {
    let mut rng = Rng::new(6);
    for (i, reduction) in [Reduction::Mean, Reduction::None].into_iter().enumerate() {
        for mode in MODES {
            let memory = if mode == GradientMode::Keep {
                Memory::Recompute
            } else {
                CHUNKED
            };
            let mut case =
                Case::new(20 + i as u64, ROWS, DIM, VOCAB, true, true).in_dtype(Dtype::F16);
            case.upstream = match reduction {
                // Per-row factors of a scaled loss.
                Reduction::None => (0..ROWS)
                    .map(|_| rng.range(-1.5, 1.5) as f32 * 1024.0)
                    .collect(),
                _ => vec![65536.0],
            };
            let spec = LossSpec::pytorch(0.1).with_reduction(reduction);
            let run = Run::new(mode, memory);
            run_and_check(
                &format!("f16 {reduction:?} {mode:?} {memory:?}"),
                &case,
                &spec,
                run,
            );
        }
    }
}

#[test]
fn every_loss_option_and_class_weights() {
    let vocab = VOCAB;
    // The options beyond PyTorch's smoothing and the reductions (tested above).
    let specs = head_specs(vocab)
        .into_iter()
        .filter(|(name, _)| !matches!(*name, "pytorch 0.1" | "eps 0" | "sum" | "none"));
    for (i, (name, spec)) in specs.enumerate() {
        let mut case = Case::new(30 + i as u64, ROWS, DIM, vocab, true, true);
        if spec.ignore_index == Some(0) {
            case.labels = case.labels.iter().map(|&l| l.max(0)).collect();
        }
        let mode = MODES[i % 2];
        run_and_check(name, &case, &spec, Run::new(mode, Memory::Recompute));
    }
    let mut case = Case::new(40, ROWS, DIM, vocab, false, true);
    case.weights = Some(Rng::new(41).weights(vocab));
    case.upstream = vec![65536.0];
    for mode in MODES {
        run_and_check(
            &format!("class weights x65536 {mode:?}"),
            &case,
            &LossSpec::pytorch(0.1),
            Run::new(mode, CHUNKED),
        );
    }
}

#[test]
fn batch_seq_inputs_a_frozen_head_and_untracked_hidden_states() {
    // [3, 11, D] hidden states, [3, 11] labels.
    let case = Case::new(50, 33, DIM, VOCAB, true, true);
    let spec = LossSpec::pytorch(0.1);
    for mode in MODES {
        let seq = Run {
            seq: Some(11),
            ..Run::new(mode, Memory::Recompute)
        };
        run_and_check(&format!("[3, 11, D] {mode:?}"), &case, &spec, seq);
        let frozen = Run {
            train_head: false,
            ..Run::new(mode, CHUNKED)
        };
        run_and_check(&format!("frozen head {mode:?}"), &case, &spec, frozen);
        let head_only = Run {
            train_hidden: false,
            ..Run::new(mode, Memory::Recompute)
        };
        run_and_check(&format!("head only {mode:?}"), &case, &spec, head_only);
    }
    // Nothing tracked: the loss alone, on the plain device.
    let head = module(
        &case,
        &spec,
        Run::new(GradientMode::Keep, Memory::Recompute),
    );
    let plain = device();
    let x = Tensor::<2>::from_data(TensorData::new(case.hidden.clone(), [33, DIM]), &plain);
    let y = Tensor::<1, Int>::from_data(TensorData::new(case.labels.clone(), [33]), &plain);
    let head = head.valid();
    let loss = f32s(head.try_forward(x, y).expect("evaluation"));
    let reference = case.reference(&spec, HeadGradients::None);
    let b = bounds(
        &spec,
        &case,
        Split::whole(VOCAB),
        &case.reference(&spec, HeadGradients::All),
    );
    common::assert_close("evaluation: loss", &loss, &reference.loss.loss, &b.loss);
}

#[test]
fn init_from_burn_linear_transposes_the_weight() {
    let device = device().autodiff();
    let linear = LinearConfig::new(DIM, VOCAB).init(&device);
    let weight = f32s(linear.weight.val()); // [D, V]
    let bias = f32s(linear.bias.as_ref().unwrap().val());
    let spec = LossSpec::pytorch(0.1);
    let head = LsceLinearLossConfig::new()
        .with_spec(spec)
        .init_from_linear(linear)
        .expect("from Linear");
    assert_eq!((head.d_model(), head.vocab()), (DIM, VOCAB));
    let mut case = Case::new(60, ROWS, DIM, VOCAB, true, true);
    case.head = (0..VOCAB * DIM)
        .map(|i| weight[(i % DIM) * VOCAB + i / DIM])
        .collect();
    case.bias = Some(bias);
    assert_eq!(
        f32s(head.weight.val()),
        case.head,
        "[V, D] = Linear's [D, V] transposed"
    );
    let run = Run::new(GradientMode::Keep, Memory::Recompute);
    let out = run_burn(&case, &head, &spec, run);
    check("from Burn's Linear", &case, &spec, run, &out);
    // The logits are Linear::forward's.
    let x = Tensor::<2>::from_data(TensorData::new(case.hidden.clone(), [ROWS, DIM]), &device);
    let z = f32s(head.logits(x));
    // f64 logits; any summation order of Burn's matmul is within (D + 2) E of the absolute sum.
    let (mut want, mut tol) = (Vec::new(), Vec::new());
    let b = case.bias.as_ref().unwrap();
    for r in 0..ROWS {
        for (v, &bv) in b.iter().enumerate() {
            let terms = (0..DIM)
                .map(|d| f64::from(case.hidden[r * DIM + d]) * f64::from(case.head[v * DIM + d]));
            let (sum, abs) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            want.push(sum + f64::from(bv));
            tol.push(SAFETY * (DIM as f64 + 2.0) * E * (abs + f64::from(bv).abs()));
        }
    }
    common::assert_close("logits", &z, &want, &tol);
}

#[test]
fn bad_input_is_a_clear_err() {
    let device = device().autodiff();
    let head = LsceLinearLossConfig::new()
        .init(DIM, VOCAB, &device)
        .unwrap();
    let x = |d: usize| Tensor::<2>::zeros([4, d], &device);
    let y = |v: i64| Tensor::<1, Int>::from_ints([0, 1, 2, v], &device);
    let err = head.try_forward(x(DIM + 1), y(3)).unwrap_err();
    assert!(
        matches!(
            err,
            BurnError::ShapeMismatch {
                what: "the hidden states",
                ..
            }
        ),
        "{err}"
    );
    let err = head
        .try_forward(x(DIM), Tensor::<1, Int>::from_ints([0, 1, 2], &device))
        .unwrap_err();
    assert!(
        matches!(
            err,
            BurnError::ShapeMismatch {
                what: "the targets",
                ..
            }
        ),
        "{err}"
    );
    let err = head.try_forward(x(DIM), y(VOCAB as i64)).unwrap_err();
    assert!(
        matches!(err, BurnError::Lsce(LsceError::LabelOutOfRange { .. })),
        "{err}"
    );
    let err = head.try_forward(x(DIM), y(-5)).unwrap_err();
    assert!(
        matches!(err, BurnError::Lsce(LsceError::LabelOutOfRange { .. })),
        "{err}"
    );
    let err = head
        .try_forward(x(DIM).cast(FloatDType::F16), y(3))
        .unwrap_err();
    assert!(matches!(err, BurnError::DtypeMismatch { .. }), "{err}");
    let weighted = LsceLinearLossConfig::new()
        .with_weights(Some(vec![1.0; VOCAB - 1]))
        .init(DIM, VOCAB, &device)
        .unwrap();
    let err = weighted.try_forward(x(DIM), y(3)).unwrap_err();
    assert!(matches!(err, BurnError::ShapeMismatch { .. }), "{err}");
    let err = LsceLinearLossConfig::new()
        .with_weights(Some(vec![-1.0; VOCAB]))
        .init(DIM, VOCAB, &device)
        .unwrap_err();
    assert!(
        matches!(err, BurnError::Lsce(LsceError::InvalidWeight { .. })),
        "{err}"
    );
    let small = LsceLinearLossConfig::new()
        .with_memory(Memory::Chunked { budget_bytes: 16 })
        .init(DIM, VOCAB, &device)
        .unwrap();
    let err = small.try_forward(x(DIM), y(3)).unwrap_err();
    assert!(
        matches!(err, BurnError::Lsce(LsceError::InvalidParameter { .. })),
        "{err}"
    );
    let err = head
        .try_forward(x(DIM), Tensor::<2, Int>::zeros([4, 1], &device))
        .unwrap_err();
    assert!(
        matches!(err, BurnError::Lsce(LsceError::Unsupported(_))),
        "{err}"
    );
    // Still usable after all that.
    head.try_forward(x(DIM), y(3))
        .expect("good input after bad");
}

#[test]
fn adam_steps_lower_the_loss() {
    let device = device().autodiff();
    let case = Case::new(70, 64, 16, 50, true, false);
    let mut head = LsceLinearLossConfig::new()
        .with_smoothing(Some(0.1))
        .init(16, 50, &device)
        .unwrap();
    let mut optim = AdamConfig::new().init();
    let x = Tensor::<2>::from_data(TensorData::new(case.hidden.clone(), [64, 16]), &device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(case.labels.clone(), [64]), &device);
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = head.try_forward(x.clone(), y.clone()).unwrap();
        losses.push(f32s(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &head);
        head = optim.step(0.05, head, grads);
    }
    assert!(
        losses[7] < 0.8 * losses[0],
        "the optimizer sees the head's parameters: {losses:?}"
    );
}
