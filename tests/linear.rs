//! The fused linear head against its f64 reference (`lsce::linear::cpu`): every option of
//! `LossSpec`, both memory modes, every gradient choice, f32/f16/bf16 inputs, odd sizes, a
//! 128256-word vocabulary, on Vulkan (lavapipe) and GL (llvmpipe); determinism; errors.
//!
//! # The error bounds
//!
//! With `E = f32::EPSILON`, the kernels' f32 arithmetic (shaders/matmul.wgsl,
//! shaders/linear.wgsl) gives, for row `r` and vocabulary entry `v`:
//!
//! * **logits**: `z = sum_d h_d w_d + b` by `D` multiply-adds in order, then the bias:
//!   `|dz| <= (D + 2) E (sum_d |h_d w_d| + |b|)` (recursive summation, a rounding of the
//!   product and of the sum per step, or one where a compiler fuses them; 16-bit inputs decode
//!   exactly). The transform adds `E |z|` for a scale and `16 E |z|` for
//!   a soft-cap (see tests/common), whose slope damps the matmul's error: `zerr_v`.
//! * **the sum of exp** `s` over `V` entries: per lane 32 terms of a block (8 tiles of 16
//!   columns in 4 lanes), then 4 lanes, 4 parts, `B` blocks merged in order, each step one
//!   rescale and one add: relative `(2 * 40 + 2 B) E`, plus each exp's `(3 + 2 |z - m|)` ulp
//!   (Vulkan's precision), weighted by its share `p_v`; plus `max zerr` for the logits'
//!   own errors. `ln s` adds 2^-21 (Vulkan's log), `lse` `E |lse|`.
//! * **the loss** `A ln s + T + z_loss lse^2`: `A` times the above, the shifted target sum
//!   `T = sum a_v (m - z_v)` with the same depth over its `S_T = sum |a_v (m - z_v)|`, and
//!   `sum |a_v| (zerr_v + max zerr)` for the logits.
//! * **G** `= (p_v P - a_v) scale slope_v`: `p_v` relative `zerr_v + max zerr + ln s's error +
//!   (4 + 3 |z_v - lse|) E`, three roundings of the product, `6 E |a_v|`, and the soft-cap
//!   slope `1 - (z/c)^2`'s error `2 |z| zerr / c^2 + 2 E`.
//! * **dH** `= sum_v G_v W_v`: 64-term fma chains per vocabulary tile added to the running
//!   value, a depth of `64 + V / 64` (two roundings a step): `(130 + V / 32) E sum_v |G_v w_vd|
//!   + sum_v Gerr_v |w_vd|`;
//!   **dW** and **db** the same over rows (`64 + N / 64`, plus one add per chunk, at most
//!   `N / 64`): `(132 + N / 16) E`.
//!
//! Every bound is doubled (`SAFETY`). The tests print the largest error and the largest
//! error/bound ratio of each output.

mod common;

use common::{gl, vulkan, Gpu, Rng, E, SAFETY};
use lsce::linear::{
    cpu, HeadGradients, LinearBatch, LinearOptions, LinearOutput, LinearPlan, LinearProblem, Memory,
};
use lsce::{Dtype, Logits, LossKernel, LossSpec, LsceError, Reduction, Smoothing, UpstreamGrad};

/// Host data of one case: inputs as f32 (the exact values of `dtype`) and their raw form.
struct Case {
    rows: usize,
    dim: usize,
    vocab: usize,
    hidden: Vec<f32>,
    head: Vec<f32>,
    bias: Option<Vec<f32>>,
    labels: Vec<i32>,
    probabilities: Option<Vec<f32>>,
    weights: Option<Vec<f32>>,
    upstream: Vec<f32>,
    dtype: Dtype,
    hidden16: Vec<u16>,
    head16: Vec<u16>,
    bias16: Option<Vec<u16>>,
}

fn encode16(dtype: Dtype, v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| match dtype {
            Dtype::F16 => lsce::half::f32_to_f16(x),
            _ => lsce::half::f32_to_bf16(x),
        })
        .collect()
}

fn decode16(dtype: Dtype, v: &[u16]) -> Vec<f32> {
    v.iter()
        .map(|&b| match dtype {
            Dtype::F16 => lsce::half::f16_to_f32(b),
            _ => lsce::half::bf16_to_f32(b),
        })
        .collect()
}

impl Case {
    /// `H` and `W` of standard deviation 1 / D^(1/4), so that the logits have about unit
    /// scale; labels with every 7th row ignored (-100) when `ignore`.
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
            dtype: Dtype::F32,
            hidden16: Vec::new(),
            head16: Vec::new(),
            bias16: None,
        }
    }

    /// The same case with 16-bit inputs (the f32 values become the rounded ones).
    fn in_dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self.hidden16 = encode16(dtype, &self.hidden);
        self.head16 = encode16(dtype, &self.head);
        self.bias16 = self.bias.as_ref().map(|b| encode16(dtype, b));
        self.hidden = decode16(dtype, &self.hidden16);
        self.head = decode16(dtype, &self.head16);
        self.bias = self.bias16.as_ref().map(|b| decode16(dtype, b));
        self
    }

    fn values<'a>(&self, f32s: &'a [f32], bits: &'a [u16]) -> Logits<'a> {
        match self.dtype {
            Dtype::F32 => Logits::F32(f32s),
            Dtype::F16 => Logits::F16(bits),
            Dtype::Bf16 => Logits::Bf16(bits),
        }
    }

    fn batch(&self, reduction: Reduction) -> LinearBatch<'_> {
        let hidden = self.values(&self.hidden, &self.hidden16);
        let head = self.values(&self.head, &self.head16);
        let mut b = match &self.probabilities {
            Some(p) => LinearBatch::probabilities(self.dim as u32, hidden, head, p),
            None => LinearBatch::classes(self.dim as u32, hidden, head, &self.labels),
        }
        .unwrap();
        if let Some(bias) = &self.bias {
            b = b.with_bias(self.values(bias, self.bias16.as_deref().unwrap_or(&[])));
        }
        if let Some(w) = &self.weights {
            b = b.with_weights(w);
        }
        b.with_upstream(match reduction {
            Reduction::None if self.upstream.len() == self.rows => {
                UpstreamGrad::PerRow(&self.upstream)
            }
            Reduction::None => UpstreamGrad::One,
            _ if self.upstream[0] == 1.0 => UpstreamGrad::One,
            _ => UpstreamGrad::Scalar(self.upstream[0]),
        })
    }
}

/// The bounds of the module docs, from the reference's logits in f64.
struct Bounds {
    loss: Vec<f64>,
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

/// Largest error and error/bound ratio of one output.
fn compare(what: &str, gpu: &[f32], cpu: &[f64], tol: &[f64]) -> (f64, f64) {
    common::assert_close(what, gpu, cpu, tol)
}

/// Runs `case` on `kernel` in `memory` and checks every output against the reference.
/// Returns the worst (error, ratio) of loss, dH, dW, db.
fn check(
    what: &str,
    g: &Gpu,
    kernel: &LossKernel,
    spec: &LossSpec,
    case: &Case,
    options: LinearOptions,
) -> [(f64, f64); 4] {
    let batch = case.batch(spec.reduction);
    let reference = cpu::compute(spec, &batch, options.gradients).expect("reference");
    let out = kernel
        .compute_linear(&g.queue, spec, &batch, &options)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let b = bounds(spec, case, &reference);
    let loss = compare(
        &format!("{what}: loss"),
        &out.loss.loss,
        &reference.loss.loss,
        &b.loss,
    );
    let lse_tol: Vec<f64> = b.lse.clone();
    compare(
        &format!("{what}: lse"),
        &out.loss.lse,
        &reference.loss.lse,
        &lse_tol,
    );
    // The denominator: a count (exact) or a sum of the labels' f32 weights, summed by the
    // setup pass in f32 in a fixed tree: within (rows + 16) E of the sum.
    let denominator = reference.loss.denominator;
    assert!(
        (f64::from(out.loss.denominator) - denominator).abs()
            <= (case.rows as f64 + 16.0) * E * denominator.abs(),
        "{what}: denominator {} vs {denominator}",
        out.loss.denominator
    );
    if options.accuracy {
        assert_eq!(out.loss.correct, reference.loss.correct, "{what}: accuracy");
    }
    let mut worst = [loss, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)];
    let outputs = [
        (&out.d_hidden, &reference.d_hidden, &b.d_hidden, "dH"),
        (&out.d_head, &reference.d_head, &b.d_head, "dW"),
        (&out.d_bias, &reference.d_bias, &b.d_bias, "db"),
    ];
    for (i, (gpu, cpu, tol, name)) in outputs.into_iter().enumerate() {
        assert_eq!(gpu.is_some(), cpu.is_some(), "{what}: {name} presence");
        if let (Some(gv), Some(cv)) = (gpu, cpu) {
            worst[i + 1] = compare(&format!("{what}: {name}"), gv, cv, tol);
        }
    }
    worst
}

fn report(family: &str, worst: &[[(f64, f64); 4]]) {
    let mut m = [(0.0f64, 0.0f64); 4];
    for w in worst {
        for i in 0..4 {
            m[i].0 = m[i].0.max(w[i].0);
            m[i].1 = m[i].1.max(w[i].1);
        }
    }
    eprintln!(
        "[{family}] max |GPU - f64|: loss {:.2e} (ratio {:.3}), dH {:.2e} ({:.3}), dW {:.2e} ({:.3}), db {:.2e} ({:.3})",
        m[0].0, m[0].1, m[1].0, m[1].1, m[2].0, m[2].1, m[3].0, m[3].1
    );
}

const MODES: [Memory; 2] = [
    Memory::Recompute,
    // 64 rows of a vocabulary of at most 1031: several chunks for the larger cases.
    Memory::Chunked {
        budget_bytes: 64 * 1031 * 4,
    },
];

fn options(memory: Memory) -> LinearOptions {
    LinearOptions {
        memory,
        ..Default::default()
    }
}

/// Every option of `LossSpec`, weights, probability targets and upstream gradients (a scalar
/// of 65536, the initial loss scale of mixed precision, and per row), in both memory modes,
/// on `g` at `rows x dim x vocab`; the worst errors.
fn every_option(g: &Gpu, rows: usize, dim: usize, vocab: usize) -> Vec<[(f64, f64); 4]> {
    let mut worst = Vec::new();
    let base = Case::new(1, rows, dim, vocab, true, true);
    let mut specs: Vec<(&str, LossSpec)> = vec![
        ("pytorch 0.1", LossSpec::pytorch(0.1)),
        ("eps 0", LossSpec::pytorch(0.0)),
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
        (
            "sum",
            LossSpec {
                reduction: Reduction::Sum,
                ..LossSpec::pytorch(0.1)
            },
        ),
        (
            "none",
            LossSpec {
                reduction: Reduction::None,
                ..LossSpec::pytorch(0.1)
            },
        ),
    ];
    // The padding convention ignores class 0 instead of -100.
    let mut padded = Case::new(1, rows, dim, vocab, true, true);
    padded.labels = base.labels.iter().map(|&l| l.max(0)).collect();
    for (name, spec) in specs.drain(..) {
        let case = if spec.ignore_index == Some(0) {
            &padded
        } else {
            &base
        };
        for memory in MODES {
            let what = format!("{name} {memory:?}");
            let opts = LinearOptions {
                accuracy: true,
                ..options(memory)
            };
            worst.push(check(&what, g, &g.kernel, &spec, case, opts));
        }
    }
    // Weights (no bias), probability targets, a per-row upstream.
    let mut rng = Rng::new(7);
    let mut weighted = Case::new(2, rows, dim, vocab, false, true);
    weighted.weights = Some(rng.weights(vocab));
    weighted.upstream = vec![65536.0];
    let mut soft = Case::new(3, rows, dim, vocab, true, false);
    soft.probabilities = Some(rng.probabilities(rows, vocab, true));
    let mut per_row = Case::new(4, rows, dim, vocab, true, true);
    per_row.upstream = (0..rows).map(|r| (r as f32 * 0.37).sin() * 4.0).collect();
    for memory in MODES {
        worst.push(check(
            "weights x65536",
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &weighted,
            options(memory),
        ));
        worst.push(check(
            "probabilities",
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &soft,
            options(memory),
        ));
        let none = LossSpec {
            reduction: Reduction::None,
            ..LossSpec::pytorch(0.1)
        };
        worst.push(check(
            "per-row upstream",
            g,
            &g.kernel,
            &none,
            &per_row,
            options(memory),
        ));
    }
    worst
}

#[test]
fn every_option_against_the_reference() {
    // Odd sizes: D and V neither multiples of 4 nor of a tile; rows past one tile and chunk.
    report(
        "every option, Vulkan",
        &every_option(vulkan(), 150, 37, 1031),
    );
}

#[test]
fn every_option_on_gl_without_subgroups() {
    report(
        "every option, GL (llvmpipe)",
        &every_option(gl(), 70, 19, 530),
    );
}

#[test]
fn half_precision_inputs_accumulate_in_f32() {
    let g = vulkan();
    let mut worst = Vec::new();
    for dtype in [Dtype::F16, Dtype::Bf16] {
        let case = Case::new(6, 90, 45, 777, true, true).in_dtype(dtype);
        for memory in MODES {
            worst.push(check(
                &format!("{dtype:?} {memory:?}"),
                g,
                &g.kernel,
                &LossSpec::pytorch(0.1),
                &case,
                options(memory),
            ));
        }
    }
    report("f16/bf16 inputs", &worst);
}

#[test]
fn edge_sizes_one_row_all_ignored_and_a_128k_vocabulary() {
    let g = vulkan();
    let mut worst = Vec::new();
    let one = Case::new(8, 1, 3, 5, true, false);
    let mut ignored = Case::new(9, 20, 8, 70, true, false);
    ignored.labels = vec![-100; 20];
    let large = Case::new(10, 3, 16, 128_256, true, false);
    for memory in [
        Memory::Recompute,
        Memory::Chunked {
            budget_bytes: 64 * 128_256 * 4,
        },
    ] {
        worst.push(check(
            "N = 1",
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &one,
            options(memory),
        ));
        let out = check(
            "all ignored (sum)",
            g,
            &g.kernel,
            &LossSpec {
                reduction: Reduction::Sum,
                ..LossSpec::pytorch(0.1)
            },
            &ignored,
            options(memory),
        );
        assert_eq!(
            out[2].0, 0.0,
            "every gradient of an all-ignored batch is exactly 0"
        );
        worst.push(check(
            "V = 128256",
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &large,
            options(memory),
        ));
    }
    // The mean over no row is NaN (PyTorch's 0/0), the gradients 0.
    let batch = ignored.batch(Reduction::Mean);
    let out = g
        .kernel
        .compute_linear(
            &g.queue,
            &LossSpec::pytorch(0.1),
            &batch,
            &options(Memory::Recompute),
        )
        .unwrap();
    assert!(out.loss.loss[0].is_nan());
    assert!(out.d_head.unwrap().iter().all(|&v| v == 0.0));
    report("edge sizes", &worst);
}

#[test]
fn a_head_past_one_binding_is_bound_in_windows() {
    let g = vulkan();
    let mut worst = Vec::new();
    // Windows of two 512-entry blocks (W and dW in f32), the last one short; the cap still
    // holds a chunk of 64 rows.
    let case = Case::new(13, 100, 200, 2600, true, true);
    for memory in MODES_WIDE {
        let opts = LinearOptions {
            max_binding_bytes: Some(2 * 512 * 200 * 4),
            ..options(memory)
        };
        worst.push(check(
            &format!("windows {memory:?}"),
            g,
            &g.kernel,
            &LossSpec::pytorch(0.1),
            &case,
            opts,
        ));
        let problem = LinearProblem::new(LossSpec::pytorch(0.1), 100, 200, 2600)
            .unwrap()
            .with_memory(memory)
            .with_loss(
                lsce::Problem::new(
                    LossSpec::pytorch(0.1),
                    lsce::Shape::matrix(100, 2600).unwrap(),
                )
                .with_max_binding_bytes(opts.max_binding_bytes),
            );
        assert_eq!(LinearPlan::new(&g.kernel, &problem).unwrap().windows(), 3);
    }
    report("vocabulary windows", &worst);
}

const MODES_WIDE: [Memory; 2] = [
    Memory::Recompute,
    Memory::Chunked {
        budget_bytes: 64 * 2600 * 4,
    },
];

#[test]
fn long_walks_are_cut_into_segments() {
    // D = 512: a gradient walk of more than 17 tiles would pass lavapipe's loop limiter, so
    // dH's walk over 313 vocabulary tiles and dW's over the rows are cut into segments.
    let g = vulkan();
    let case = Case::new(14, 70, 512, 20000, true, true);
    let worst = vec![check(
        "segments",
        g,
        &g.kernel,
        &LossSpec::pytorch(0.1),
        &case,
        options(Memory::Recompute),
    )];
    report("segmented walks", &worst);
}

#[test]
fn frozen_head_and_evaluation_write_only_what_they_are_asked() {
    let g = vulkan();
    let case = Case::new(11, 100, 24, 600, true, true);
    let spec = LossSpec::pytorch(0.1);
    let batch = case.batch(spec.reduction);
    let full = g
        .kernel
        .compute_linear(&g.queue, &spec, &batch, &LinearOptions::default())
        .unwrap();
    for (gradients, memory) in [
        (HeadGradients::Hidden, Memory::Recompute),
        (HeadGradients::None, Memory::Recompute),
        (HeadGradients::Hidden, MODES[1]),
    ] {
        let opts = LinearOptions {
            gradients,
            memory,
            ..Default::default()
        };
        check(
            &format!("{gradients:?} {memory:?}"),
            g,
            &g.kernel,
            &spec,
            &case,
            opts,
        );
        let out = g
            .kernel
            .compute_linear(&g.queue, &spec, &batch, &opts)
            .unwrap();
        assert!(out.d_head.is_none() && out.d_bias.is_none());
        assert_eq!(out.d_hidden.is_some(), gradients == HeadGradients::Hidden);
        // The same loss bits as with every gradient, in the same mode.
        if memory == Memory::Recompute {
            assert_eq!(common::bits(&out.loss.loss), common::bits(&full.loss.loss));
            if let Some(dh) = &out.d_hidden {
                assert_eq!(
                    common::bits(dh),
                    common::bits(full.d_hidden.as_ref().unwrap())
                );
            }
        }
    }
}

#[test]
fn twenty_runs_are_bitwise_identical_in_both_modes() {
    let g = vulkan();
    let mut case = Case::new(12, 200, 40, 900, true, true);
    case.upstream = vec![3.0];
    let spec = LossSpec {
        z_loss: 1e-4,
        ..LossSpec::pytorch(0.1)
    };
    let batch = case.batch(spec.reduction);
    for memory in MODES {
        let first = g
            .kernel
            .compute_linear(&g.queue, &spec, &batch, &options(memory))
            .unwrap();
        for _ in 1..20 {
            let again = g
                .kernel
                .compute_linear(&g.queue, &spec, &batch, &options(memory))
                .unwrap();
            assert_eq!(
                common::bits(&again.loss.loss),
                common::bits(&first.loss.loss)
            );
            for (a, b) in [
                (&again.d_hidden, &first.d_hidden),
                (&again.d_head, &first.d_head),
                (&again.d_bias, &first.d_bias),
            ] {
                assert_eq!(
                    common::bits(a.as_ref().unwrap()),
                    common::bits(b.as_ref().unwrap()),
                    "{memory:?}"
                );
            }
        }
    }
}

#[test]
fn bad_input_is_a_clear_err() {
    let g = vulkan();
    let k = &g.kernel;
    let spec = LossSpec::pytorch(0.1);
    let (hidden, head) = (vec![0.5f32; 4 * 3], vec![0.25f32; 5 * 3]);
    // H's length is not a multiple of D: the rows it implies do not cover it.
    let short = LinearBatch::classes(3, &hidden[..11], &head, &[0, 1, 2]).unwrap();
    assert!(matches!(
        k.compute_linear(&g.queue, &spec, &short, &LinearOptions::default()),
        Err(LsceError::LengthMismatch { .. })
    ));
    // Labels for another row count.
    let wrong_rows = LinearBatch::classes(3, &hidden, &head, &[0, 1, 2]).unwrap();
    assert!(matches!(
        k.compute_linear(&g.queue, &spec, &wrong_rows, &LinearOptions::default()),
        Err(LsceError::LengthMismatch { .. })
    ));
    // A bias of the wrong length, of another dtype.
    let labels = [0, 1, 2, 4];
    let ok = LinearBatch::classes(3, &hidden, &head, &labels).unwrap();
    assert!(matches!(
        k.compute_linear(
            &g.queue,
            &spec,
            &ok.with_bias(&[0.0f32; 4]),
            &LinearOptions::default()
        ),
        Err(LsceError::LengthMismatch { .. })
    ));
    let bits = [0u16; 5];
    assert!(matches!(
        k.compute_linear(
            &g.queue,
            &spec,
            &ok.with_bias(Logits::F16(&bits)),
            &LinearOptions::default()
        ),
        Err(LsceError::Unsupported(_))
    ));
    // Zero-sized input.
    assert!(matches!(
        LinearBatch::classes(0, &hidden, &head, &labels),
        Err(LsceError::EmptyShape)
    ));
    assert!(matches!(
        LinearBatch::classes(3, &hidden[..0], &head, &[]),
        Err(LsceError::EmptyShape)
    ));
    assert!(matches!(
        LinearProblem::new(spec, 4, 0, 5),
        Err(LsceError::EmptyShape)
    ));
    // A label out of range, found by the GPU.
    let bad = LinearBatch::classes(3, &hidden, &head, &[0, 1, 5, 2]).unwrap();
    assert!(matches!(
        k.compute_linear(&g.queue, &spec, &bad, &LinearOptions::default()),
        Err(LsceError::LabelOutOfRange {
            row: 2,
            label: 5,
            classes: 5
        })
    ));
    // A chunk budget below 64 rows.
    let tiny = LinearOptions {
        memory: Memory::Chunked { budget_bytes: 1000 },
        ..Default::default()
    };
    assert!(matches!(
        k.compute_linear(&g.queue, &spec, &ok, &tiny),
        Err(LsceError::InvalidParameter {
            name: "budget_bytes",
            ..
        })
    ));
    // A hidden size so large that one block of the head (at least 64 rows) exceeds one
    // storage binding.
    let limits = g.device.limits();
    let dim = (limits.max_storage_buffer_binding_size / (64 * 4) + 1) as u32;
    let huge = LinearProblem::new(spec, 8, dim, 1000).unwrap();
    assert!(matches!(
        LinearPlan::new(k, &huge),
        Err(LsceError::ExceedsDeviceLimit { .. })
    ));
    // Buffers the problem needs, or does not use.
    let problem = LinearProblem::new(spec, 4, 3, 5).unwrap().with_bias(true);
    let plan = LinearPlan::new(k, &problem).unwrap();
    let buffer = |size| {
        g.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (h, w, t, s, dh, dw) = (
        buffer(48),
        buffer(60),
        buffer(16),
        buffer(32),
        buffer(48),
        buffer(60),
    );
    let buffers =
        lsce::linear::LinearBuffers::new(h.slice(..), w.slice(..), t.slice(..), s.slice(..))
            .with_grads(dh.slice(..), Some(dw.slice(..)), None);
    assert!(matches!(
        plan.bind(&buffers),
        Err(LsceError::MissingBuffer("bias"))
    ));
    let frozen = LinearPlan::new(
        k,
        &problem
            .with_bias(false)
            .with_gradients(HeadGradients::Hidden),
    )
    .unwrap();
    assert!(matches!(
        frozen.bind(&buffers),
        Err(LsceError::UnexpectedBuffer("d_head"))
    ));
}

#[test]
fn recompute_scratch_is_a_small_fraction_of_the_logits() {
    let g = vulkan();
    // The bench shapes; the heads of the middle two exceed one storage binding of lavapipe
    // (128 MiB) and are bound in vocabulary windows.
    for (rows, dim, vocab) in [
        (4096u32, 512u32, 32000u32),
        (1024, 1024, 128_256),
        (256, 2048, 262_144),
        (16384, 256, 50257),
    ] {
        let problem = LinearProblem::new(LossSpec::pytorch(0.1), rows, dim, vocab).unwrap();
        let plan = LinearPlan::new(&g.kernel, &problem).unwrap();
        let logits = u64::from(rows) * u64::from(vocab) * 4;
        assert!(
            plan.scratch_bytes() * 32 <= logits,
            "{rows}x{dim}x{vocab}: {} scratch bytes",
            plan.scratch_bytes()
        );
        let budget = 256 << 20;
        let chunked = LinearPlan::new(
            &g.kernel,
            &problem.with_memory(Memory::Chunked {
                budget_bytes: budget,
            }),
        )
        .unwrap();
        assert!(chunked.scratch_bytes() - plan.scratch_bytes() <= budget);
    }
}

/// Reads `bytes` bytes of `buffer` (COPY_SRC) as f32.
fn read_f32(g: &Gpu, buffer: &wgpu::Buffer, bytes: u64) -> Vec<f32> {
    let staging = g.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = g.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    g.queue.submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.unwrap());
    g.device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let view = staging.slice(..).get_mapped_range().unwrap();
    bytemuck::cast_slice(&view).to_vec()
}

#[test]
fn the_unfused_ops_give_the_logits_and_the_same_gradients() {
    use wgpu::util::DeviceExt;
    let g = vulkan();
    let case = Case::new(15, 90, 40, 1100, true, true);
    let spec = LossSpec::pytorch(0.1);
    let (rows, dim, vocab) = (case.rows as u32, case.dim as u32, case.vocab as u32);
    let batch = case.batch(spec.reduction);
    let reference = cpu::compute(&spec, &batch, HeadGradients::All).unwrap();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let init = |bytes: &[u8]| {
        g.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytes,
                usage,
            })
    };
    let zeros = |n: u64| init(&vec![0u8; n as usize]);
    let (h, w, b) = (
        init(bytemuck::cast_slice(&case.hidden)),
        init(bytemuck::cast_slice(&case.head)),
        init(bytemuck::cast_slice(case.bias.as_ref().unwrap())),
    );
    let t = init(bytemuck::cast_slice(&case.labels));
    let summary = zeros(32);
    let logits = zeros(u64::from(rows * vocab) * 4);
    let (dh, dw, db) = (
        zeros(u64::from(rows * dim) * 4),
        zeros(u64::from(vocab * dim) * 4),
        zeros(u64::from(vocab) * 4),
    );
    let problem = LinearProblem::new(spec, rows, dim, vocab)
        .unwrap()
        .with_bias(true);
    let plan = LinearPlan::new(&g.kernel, &problem).unwrap();
    let buffers =
        lsce::linear::LinearBuffers::new(h.slice(..), w.slice(..), t.slice(..), summary.slice(..))
            .with_bias(b.slice(..))
            .with_grads(dh.slice(..), Some(dw.slice(..)), Some(db.slice(..)));
    // 1. The logits, against H W^T + b in f64 (the bound of the module docs' first item).
    let mut encoder = g.device.create_command_encoder(&Default::default());
    plan.bind_logits(&buffers, logits.slice(..))
        .unwrap()
        .encode(&mut encoder);
    g.queue.submit([encoder.finish()]);
    let z = read_f32(g, &logits, u64::from(rows * vocab) * 4);
    for r in 0..case.rows {
        for v in 0..case.vocab {
            let (mut exact, mut abs) = (f64::from(case.bias.as_ref().unwrap()[v]), 0.0);
            for d in 0..case.dim {
                let p = f64::from(case.hidden[r * case.dim + d])
                    * f64::from(case.head[v * case.dim + d]);
                exact += p;
                abs += p.abs();
            }
            let bound = SAFETY * (case.dim as f64 + 2.0) * E * (abs + exact.abs());
            assert!(
                (f64::from(z[r * case.vocab + v]) - exact).abs() <= bound,
                "z[{r}, {v}]"
            );
        }
    }
    // 2. lsce's fused loss over them, the gradient in place; 3. the products.
    let loss_plan = g
        .kernel
        .plan(
            &lsce::Problem::new(spec, lsce::Shape::matrix(rows, vocab).unwrap())
                .with_gradient(lsce::Gradient::InPlace),
        )
        .unwrap();
    let mut encoder = g.device.create_command_encoder(&Default::default());
    loss_plan
        .encode(
            &mut encoder,
            &lsce::LossBuffers::new(logits.slice(..), t.slice(..), summary.slice(..)),
        )
        .unwrap();
    plan.bind_products(&buffers, logits.slice(..))
        .unwrap()
        .encode(&mut encoder);
    g.queue.submit([encoder.finish()]);
    let fused = g
        .kernel
        .compute_linear(&g.queue, &spec, &batch, &LinearOptions::default())
        .unwrap();
    let b = bounds(&spec, &case, &reference);
    let outputs = [
        (
            read_f32(g, &dh, u64::from(rows * dim) * 4),
            reference.d_hidden.as_ref().unwrap(),
            &b.d_hidden,
            "dH",
        ),
        (
            read_f32(g, &dw, u64::from(vocab * dim) * 4),
            reference.d_head.as_ref().unwrap(),
            &b.d_head,
            "dW",
        ),
        (
            read_f32(g, &db, u64::from(vocab) * 4),
            reference.d_bias.as_ref().unwrap(),
            &b.d_bias,
            "db",
        ),
    ];
    for (gpu, cpu, tol, name) in &outputs {
        compare(&format!("unfused {name}"), gpu, cpu, tol);
    }
    // The fused head's dH and the unfused one: each within its bound of the reference, so
    // within twice the bound of each other.
    let dh_unfused = &outputs[0].0;
    let mut diff = 0.0f32;
    for ((a, b), t) in fused
        .d_hidden
        .unwrap()
        .iter()
        .zip(dh_unfused)
        .zip(&b.d_hidden)
    {
        assert!(
            f64::from((a - b).abs()) <= 2.0 * t,
            "fused dH {a} vs unfused {b}"
        );
        diff = diff.max((a - b).abs());
    }
    eprintln!("[unfused] max |fused dH - unfused dH| = {diff:e}");
}
