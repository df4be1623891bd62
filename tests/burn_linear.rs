//! The fused linear head inside Burn (feature `burn`): `LsceLinearLoss`'s loss and the
//! gradients Burn's autodiff gives the hidden states, the weight and the bias, held against the
//! f64 reference `lsce::linear::cpu::compute`, for f32 and f16 inputs, upstream gradients 1,
//! 1024 and 65536 (the loss multiplied by a constant before `backward`) and one per row, both
//! memory modes, both gradient modes, with and without a bias, `[batch, seq, D]` inputs, a
//! frozen head, and the options of `LossSpec`; errors; a few optimizer steps.
//!
//! # The error bounds
//!
//! The kernels' bounds are those of `tests/linear.rs` (derived in its module docs; the
//! function `bounds` below is a copy of its own, so that the two test files stay independent),
//! computed for the upstream gradient the test applies. Burn adds at most two roundings:
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

use std::sync::OnceLock;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};
use common::{Rng, E, SAFETY};
use lsce::burn::{BurnError, GradientMode, LsceLinearLoss, LsceLinearLossConfig};
use lsce::linear::{cpu, HeadGradients, LinearBatch, LinearOutput, Memory};
use lsce::{LossSpec, LsceError, Reduction, Smoothing, UpstreamGrad};

/// Burn's wgpu device shared with lsce, once per test binary; a clear panic without adapter.
fn device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            lsce::burn::init_device().unwrap_or_else(|e| {
                panic!(
                    "{e}\n  no wgpu adapter for Burn: install a software Vulkan driver (Debian: \
                     `apt-get install -y mesa-vulkan-drivers`) or run on a machine with a GPU"
                )
            })
        })
        .clone()
}

/// Host data of one case, as f32 (for f16 cases the values f16 holds exactly).
struct Case {
    rows: usize,
    dim: usize,
    vocab: usize,
    hidden: Vec<f32>,
    head: Vec<f32>,
    bias: Option<Vec<f32>>,
    labels: Vec<i32>,
    /// Never set: the Burn module takes class labels (kept for the shared `bounds`).
    probabilities: Option<Vec<f32>>,
    weights: Option<Vec<f32>>,
    /// `[s]`, or one per row for `Reduction::None`.
    upstream: Vec<f32>,
}

fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| lsce::half::f16_to_f32(lsce::half::f32_to_f16(x)))
        .collect()
}

impl Case {
    /// `H` and `W` of standard deviation `1 / D^(1/4)` (logits of about unit scale); every
    /// 7th label ignored (-100) when `ignore`.
    fn new(seed: u64, rows: usize, dim: usize, vocab: usize, bias: bool, ignore: bool) -> Self {
        let mut rng = Rng::new(seed);
        let std = 1.0 / (dim as f64).powf(0.25);
        let hidden = rng.logits(rows * dim, std);
        let head = rng.logits(vocab * dim, std);
        let bias = bias.then(|| rng.logits(vocab, 0.5));
        let labels = (0..rows)
            .map(|r| {
                if ignore && r % 7 == 3 {
                    -100
                } else {
                    rng.below(vocab as u32) as i32
                }
            })
            .collect();
        Self {
            rows,
            dim,
            vocab,
            hidden,
            head,
            bias,
            labels,
            probabilities: None,
            weights: None,
            upstream: vec![1.0],
        }
    }

    fn f16(mut self) -> Self {
        self.hidden = round_f16(&self.hidden);
        self.head = round_f16(&self.head);
        self.bias = self.bias.as_deref().map(round_f16);
        self
    }

    fn reference(&self, spec: &LossSpec, gradients: HeadGradients) -> LinearOutput<f64> {
        let mut batch = LinearBatch::classes(
            self.dim as u32,
            &self.hidden[..],
            &self.head[..],
            &self.labels,
        )
        .unwrap();
        if let Some(b) = &self.bias {
            batch = batch.with_bias(&b[..]);
        }
        if let Some(w) = &self.weights {
            batch = batch.with_weights(w);
        }
        batch = batch.with_upstream(match spec.reduction {
            Reduction::None => UpstreamGrad::PerRow(&self.upstream),
            _ => UpstreamGrad::Scalar(self.upstream[0]),
        });
        cpu::compute(spec, &batch, gradients).expect("reference")
    }
}

/// The bounds of `tests/linear.rs` (a copy of its `bounds`), from the reference's logits in f64.
struct Bounds {
    loss: Vec<f64>,
    #[allow(dead_code)] // the Burn module returns no lse
    lse: Vec<f64>,
    d_hidden: Vec<f64>,
    d_head: Vec<f64>,
    d_bias: Vec<f64>,
}

fn bounds(spec: &LossSpec, case: &Case, reference: &LinearOutput<f64>) -> Bounds {
    let (rows, dim, vocab) = (case.rows, case.dim, case.vocab);
    let blocks = vocab.div_ceil(512) as f64;
    let scale = f64::from(spec.logit_scale);
    let cap = spec.softcap.map(f64::from);
    let values = spec.resolve(vocab as u32).unwrap();
    let mut loss = vec![0.0; rows];
    let mut lse = vec![0.0; rows];
    // |G| and its error per (row, entry), row-major.
    let mut g_abs = vec![0.0; rows * vocab];
    let mut g_err = vec![0.0; rows * vocab];
    let upstream_scale = |r: usize| match spec.reduction {
        Reduction::None if case.upstream.len() == rows => f64::from(case.upstream[r]).abs(),
        Reduction::None => 1.0,
        Reduction::Sum => f64::from(case.upstream[0]).abs(),
        Reduction::Mean => {
            f64::from(case.upstream[0]).abs() / reference.loss.denominator.abs().max(1e-300)
        }
    };
    for r in 0..rows {
        let label = case.labels[r];
        if case.probabilities.is_none() && Some(label) == spec.ignore_index {
            continue;
        }
        let mut x = vec![0.0; vocab];
        let mut zerr = vec![0.0; vocab];
        let mut z = vec![0.0; vocab];
        let mut slope = vec![1.0; vocab];
        for v in 0..vocab {
            let mut dot = 0.0;
            let mut abs = 0.0;
            for d in 0..dim {
                let p = f64::from(case.hidden[r * dim + d]) * f64::from(case.head[v * dim + d]);
                dot += p;
                abs += p.abs();
            }
            let b = case.bias.as_ref().map_or(0.0, |b| f64::from(b[v]));
            x[v] = dot + b;
            let xerr = (dim as f64 + 2.0) * E * (abs + b.abs()) + 2.0 * E * x[v].abs();
            let u = scale * x[v];
            (z[v], zerr[v]) = match cap {
                Some(c) => {
                    let t = (u / c).tanh();
                    slope[v] = 1.0 - t * t;
                    (c * t, slope[v] * scale * xerr + 17.0 * E * (c * t).abs())
                }
                None => (u, scale * xerr + E * u.abs()),
            };
        }
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let s: f64 = z.iter().map(|&zv| (zv - m).exp()).sum();
        let lse_r = m + s.ln();
        let zmax = zerr.iter().cloned().fold(0.0, f64::max);
        let p: Vec<f64> = z.iter().map(|&zv| (zv - m).exp() / s).collect();
        let exp_err: f64 = p
            .iter()
            .zip(&z)
            .map(|(pv, zv)| pv * (3.0 + 2.0 * (zv - m).abs()) * E)
            .sum();
        let s_rel = (80.0 + 2.0 * blocks) * E + exp_err + zmax;
        let ls_err = s_rel + 2f64.powi(-21) + zmax;
        let lse_err = ls_err + E * lse_r.abs();
        // The target coefficients a_v.
        let mut a = vec![0.0; vocab];
        let weight = |v: usize| case.weights.as_ref().map_or(1.0, |w| f64::from(w[v]));
        for (v, av) in a.iter_mut().enumerate() {
            let off = if Some(v as u32) == spec.excluded_class {
                0.0
            } else {
                values.off
            };
            *av = weight(v)
                * match &case.probabilities {
                    Some(t) => off + (values.on - off) * f64::from(t[r * vocab + v]),
                    None if v as i32 == label => values.on,
                    None => off,
                };
        }
        let mass: f64 = a.iter().sum();
        let s_t: f64 = a.iter().zip(&z).map(|(av, zv)| (av * (m - zv)).abs()).sum();
        let a_z: f64 = a
            .iter()
            .zip(&zerr)
            .map(|(av, ze)| av.abs() * (ze + zmax))
            .sum();
        let zl = f64::from(spec.z_loss);
        let depth = 2.0 * 40.0 + 3.0 * blocks + 60.0;
        loss[r] = SAFETY
            * (mass * ls_err
                + s.ln().abs() * 4.0 * E * mass
                + depth * E * s_t
                + a_z
                + zl * (2.0 * lse_r.abs() * lse_err + 3.0 * E * lse_r * lse_r)
                + 3.0 * E * ((mass * s.ln()).abs() + s_t + zl * lse_r * lse_r));
        lse[r] = SAFETY * lse_err;
        let big_p = mass + 2.0 * zl * lse_r;
        let k = upstream_scale(r) * scale;
        for v in 0..vocab {
            let core = p[v] * big_p - a[v];
            let rho = zerr[v] + zmax + ls_err + (4.0 + 3.0 * (z[v] - lse_r).abs()) * E;
            let core_err = big_p.abs() * p[v] * rho
                + p[v] * 2.0 * zl * lse_err
                + 6.0 * E * a[v].abs()
                + 3.0 * E * p[v] * big_p.abs();
            let slope_err = match cap {
                Some(c) => 2.0 * z[v].abs() * zerr[v] / (c * c) + 2.0 * E,
                None => 0.0,
            };
            let g = core * k * slope[v];
            g_abs[r * vocab + v] = g.abs();
            g_err[r * vocab + v] =
                k * (slope[v].abs() * core_err + core.abs() * slope_err) + g.abs() * 3.0 * E;
        }
    }
    let mut d_hidden = vec![0.0; rows * dim];
    let hidden_depth = (130 + vocab / 32) as f64 * E;
    for r in 0..rows {
        for v in 0..vocab {
            let (ga, ge) = (g_abs[r * vocab + v], g_err[r * vocab + v]);
            if ga == 0.0 && ge == 0.0 {
                continue;
            }
            for d in 0..dim {
                let w = f64::from(case.head[v * dim + d]).abs();
                d_hidden[r * dim + d] += hidden_depth * ga * w + ge * w;
            }
        }
    }
    let row_depth = (132 + rows / 16) as f64 * E;
    let mut d_head = vec![0.0; vocab * dim];
    let mut d_bias = vec![0.0; vocab];
    for r in 0..rows {
        for v in 0..vocab {
            let (ga, ge) = (g_abs[r * vocab + v], g_err[r * vocab + v]);
            d_bias[v] += row_depth * ga + ge;
            for d in 0..dim {
                let h = f64::from(case.hidden[r * dim + d]).abs();
                d_head[v * dim + d] += row_depth * ga * h + ge * h;
            }
        }
    }
    let safety = |v: Vec<f64>| v.into_iter().map(|x| SAFETY * x).collect();
    Bounds {
        loss: if spec.reduction == Reduction::None {
            loss
        } else {
            let total: f64 =
                loss.iter().sum::<f64>() + 3.0 * E * rows as f64 * reference.loss.loss[0].abs();
            let scale = match spec.reduction {
                Reduction::Mean => 1.0 / reference.loss.denominator.abs().max(1e-300),
                _ => 1.0,
            };
            vec![total * scale]
        },
        lse,
        d_hidden: safety(d_hidden),
        d_head: safety(d_head),
        d_bias: safety(d_bias),
    }
}

/// How one Burn run is driven.
#[derive(Clone, Copy, Debug)]
struct Run {
    mode: GradientMode,
    memory: Memory,
    half: bool,
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
            half: false,
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

fn param<const D: usize>(
    values: &[f32],
    dims: [usize; D],
    half: bool,
    train: bool,
    device: &Device,
) -> burn::module::Param<Tensor<D>> {
    let mut t = Tensor::<D>::from_data(TensorData::new(values.to_vec(), dims), device);
    if half {
        t = t.cast(FloatDType::F16);
    }
    burn::module::Param::from_tensor(t).set_require_grad(train)
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
        &case.head,
        [case.vocab, case.dim],
        run.half,
        run.train_head,
        &device,
    );
    head.bias = case
        .bias
        .as_ref()
        .map(|b| param(b, [case.vocab], run.half, run.train_head, &device));
    head
}

/// Runs `head` on the case's hidden states and labels, `backward` with the case's upstream
/// gradient.
fn run_burn(case: &Case, head: &LsceLinearLoss, spec: &LossSpec, run: Run) -> Output {
    let device = device().autodiff();
    let mut x = Tensor::<2>::from_data(
        TensorData::new(case.hidden.clone(), [case.rows, case.dim]),
        &device,
    );
    if run.half {
        x = x.cast(FloatDType::F16);
    }
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
    if run.half {
        if let Some(g) = head.weight.grad(&grads) {
            assert_eq!(g.dtype(), DType::F16, "dW comes back in the weight's dtype");
        }
    }
    Output {
        loss: f32s(value),
        d_hidden,
        d_head: head.weight.grad(&grads).map(f32s),
        d_bias: head.bias.as_ref().and_then(|b| b.grad(&grads)).map(f32s),
    }
}

/// Checks a run against the reference and the bounds (plus Burn's roundings: see the module
/// docs); the largest error/bound ratio of loss, dH, dW, db.
fn check(what: &str, case: &Case, spec: &LossSpec, run: Run, out: &Output) -> [f64; 4] {
    let reference = case.reference(spec, HeadGradients::All);
    let b = bounds(spec, case, &reference);
    let keep = run.mode == GradientMode::Keep && spec.reduction != Reduction::None;
    let widen = |tol: &[f64], want: &[f64]| -> Vec<f64> {
        tol.iter()
            .zip(want)
            .map(|(t, w)| {
                let mut t = *t;
                if keep {
                    t += SAFETY * E * w.abs();
                }
                if run.half {
                    t += 2f64.powi(-11) * w.abs() + 2f64.powi(-25);
                }
                t
            })
            .collect()
    };
    let mut worst = [0.0; 4];
    worst[0] = common::assert_close(
        &format!("{what}: loss"),
        &out.loss,
        &reference.loss.loss,
        &b.loss,
    )
    .1;
    let outputs = [
        (
            &out.d_hidden,
            &reference.d_hidden,
            &b.d_hidden,
            run.train_hidden,
            "dH",
        ),
        (
            &out.d_head,
            &reference.d_head,
            &b.d_head,
            run.train_head,
            "dW",
        ),
        (
            &out.d_bias,
            &reference.d_bias,
            &b.d_bias,
            run.train_head && case.bias.is_some(),
            "db",
        ),
    ];
    for (i, (got, want, tol, expected, name)) in outputs.into_iter().enumerate() {
        assert_eq!(got.is_some(), expected, "{what}: {name} presence");
        if let Some(got) = got {
            let want = want.as_ref().expect("reference gradient");
            let tol = widen(tol, want);
            worst[i + 1] = common::assert_close(&format!("{what}: {name}"), got, want, &tol).1;
        }
    }
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
            let mut case = Case::new(20 + i as u64, ROWS, DIM, VOCAB, true, true).f16();
            case.upstream = match reduction {
                // Per-row factors of a scaled loss.
                Reduction::None => (0..ROWS)
                    .map(|_| rng.range(-1.5, 1.5) as f32 * 1024.0)
                    .collect(),
                _ => vec![65536.0],
            };
            let spec = LossSpec::pytorch(0.1).with_reduction(reduction);
            let run = Run {
                half: true,
                ..Run::new(mode, memory)
            };
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
    let specs = [
        (
            "off-target",
            LossSpec {
                smoothing: Smoothing::OffTarget(0.2),
                ..LossSpec::pytorch(0.0)
            },
        ),
        (
            "explicit",
            LossSpec {
                smoothing: Smoothing::Explicit {
                    on: 0.85,
                    off: 0.1 / vocab as f32,
                },
                ..LossSpec::pytorch(0.0)
            },
        ),
        (
            "excluded pad",
            LossSpec {
                smoothing: Smoothing::OffTarget(0.1),
                excluded_class: Some(0),
                ignore_index: Some(0),
                ..LossSpec::pytorch(0.0)
            },
        ),
        (
            "z-loss softcap scale",
            LossSpec {
                z_loss: 1e-3,
                softcap: Some(3.0),
                logit_scale: 1.7,
                ..LossSpec::pytorch(0.1)
            },
        ),
    ];
    for (i, (name, spec)) in specs.into_iter().enumerate() {
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
    let b = bounds(&spec, &case, &case.reference(&spec, HeadGradients::All));
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
