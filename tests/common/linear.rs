//! The fused linear head's test case, its derived error bounds and the comparison against the
//! f64 reference, shared by tests/linear.rs (one device), tests/linear_mpi.rs (the vocabulary
//! split over ranks) and tests/burn_linear.rs (the head in Burn). tests/linear.rs's module docs
//! derive the bounds; tests/linear_mpi.rs's say what a split adds ([`Split`]),
//! tests/burn_linear.rs's what Burn's autodiff adds ([`After`]).

use lsce::linear::{cpu, HeadGradients, LinearBatch, LinearOutput};
use lsce::shards::ShardLayout;
use lsce::{Dtype, Logits, LossSpec, Reduction, Smoothing, UpstreamGrad};

use super::{assert_close, Rng, E, SAFETY};

/// Host data of one case: inputs as f32 (the exact values of `dtype`) and their raw form.
pub struct Case {
    pub rows: usize,
    pub dim: usize,
    pub vocab: usize,
    pub hidden: Vec<f32>,
    pub head: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub labels: Vec<i32>,
    pub probabilities: Option<Vec<f32>>,
    pub weights: Option<Vec<f32>>,
    pub upstream: Vec<f32>,
    pub dtype: Dtype,
    pub hidden16: Vec<u16>,
    pub head16: Vec<u16>,
    pub bias16: Option<Vec<u16>>,
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

/// A head batch from its parts: class labels unless `probabilities`, then the bias, the
/// weights and the upstream gradient.
#[allow(clippy::too_many_arguments)]
pub fn linear_batch<'a>(
    dim: usize,
    hidden: Logits<'a>,
    head: Logits<'a>,
    bias: Option<Logits<'a>>,
    labels: &'a [i32],
    probabilities: Option<&'a [f32]>,
    weights: Option<&'a [f32]>,
    upstream: UpstreamGrad<'a>,
) -> LinearBatch<'a> {
    let mut b = match probabilities {
        Some(p) => LinearBatch::probabilities(dim as u32, hidden, head, p),
        None => LinearBatch::classes(dim as u32, hidden, head, labels),
    }
    .unwrap();
    if let Some(bias) = bias {
        b = b.with_bias(bias);
    }
    if let Some(w) = weights {
        b = b.with_weights(w);
    }
    b.with_upstream(upstream)
}

impl Case {
    /// `H` and `W` of standard deviation 1 / D^(1/4), so that the logits have about unit
    /// scale; labels with every 7th row ignored (-100) when `ignore`.
    pub fn new(seed: u64, rows: usize, dim: usize, vocab: usize, bias: bool, ignore: bool) -> Self {
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
    pub fn in_dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self.hidden16 = encode16(dtype, &self.hidden);
        self.head16 = encode16(dtype, &self.head);
        self.bias16 = self.bias.as_ref().map(|b| encode16(dtype, b));
        self.hidden = decode16(dtype, &self.hidden16);
        self.head = decode16(dtype, &self.head16);
        self.bias = self.bias16.as_ref().map(|b| decode16(dtype, b));
        self
    }

    pub fn values<'a>(&self, f32s: &'a [f32], bits: &'a [u16]) -> Logits<'a> {
        match self.dtype {
            Dtype::F32 => Logits::F32(f32s),
            Dtype::F16 => Logits::F16(bits),
            Dtype::Bf16 => Logits::Bf16(bits),
        }
    }

    /// The case's upstream gradient under `reduction`: per row where it has one value a row.
    pub fn upstream(&self, reduction: Reduction) -> UpstreamGrad<'_> {
        match reduction {
            Reduction::None if self.upstream.len() == self.rows => {
                UpstreamGrad::PerRow(&self.upstream)
            }
            Reduction::None => UpstreamGrad::One,
            _ if self.upstream[0] == 1.0 => UpstreamGrad::One,
            _ => UpstreamGrad::Scalar(self.upstream[0]),
        }
    }

    /// The f64 reference of the whole head's batch, with `gradients`.
    pub fn reference(&self, spec: &LossSpec, gradients: HeadGradients) -> LinearOutput<f64> {
        cpu::compute(spec, &self.batch(spec.reduction), gradients).expect("reference")
    }

    /// The whole head's batch.
    pub fn batch(&self, reduction: Reduction) -> LinearBatch<'_> {
        linear_batch(
            self.dim,
            self.values(&self.hidden, &self.hidden16),
            self.values(&self.head, &self.head16),
            self.bias
                .as_ref()
                .map(|b| self.values(b, self.bias16.as_deref().unwrap_or(&[]))),
            &self.labels,
            self.probabilities.as_deref(),
            self.weights.as_deref(),
            self.upstream(reduction),
        )
    }
}

/// The options of `LossSpec` every head test runs (over a vocabulary of `vocab`): PyTorch's
/// smoothing and none, off-target and explicit smoothing, the padding convention (class 0
/// excluded and ignored), z-loss with a soft-cap and a logit scale, and the reductions.
pub fn head_specs(vocab: usize) -> Vec<(&'static str, LossSpec)> {
    vec![
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
    ]
}

/// How the vocabulary is walked, for the bounds: `blocks` 512-entry blocks whose records are
/// merged in order, over `ranks` slices whose records are merged on the host in f64 (the loss
/// then narrowed to f32) and whose partial `dH`s are added in rank order; `ranks = 0` for one
/// device's whole head (no host merge).
#[derive(Clone, Copy, Debug)]
pub struct Split {
    pub blocks: usize,
    pub ranks: usize,
}

impl Split {
    /// One device's head over `vocab` entries.
    pub fn whole(vocab: usize) -> Self {
        Self {
            blocks: vocab.div_ceil(512),
            ranks: 0,
        }
    }

    /// The slices of `layout`, each walked in its own blocks.
    pub fn layout(layout: &ShardLayout) -> Self {
        Self {
            blocks: (0..layout.shards())
                .map(|p| layout.width(p).div_ceil(512) as usize)
                .sum(),
            ranks: layout.shards(),
        }
    }
}

/// The bounds of the module docs, from the reference's logits in f64.
pub struct Bounds {
    pub loss: Vec<f64>,
    pub lse: Vec<f64>,
    pub d_hidden: Vec<f64>,
    pub d_head: Vec<f64>,
    pub d_bias: Vec<f64>,
}

pub fn bounds(spec: &LossSpec, case: &Case, split: Split, reference: &LinearOutput<f64>) -> Bounds {
    let (rows, dim, vocab) = (case.rows, case.dim, case.vocab);
    let blocks = split.blocks as f64;
    // What the ranks add: two roundings per rank of the host merge's depth, and the merged
    // loss narrowed to f32 (one E |loss|).
    let ranks = 2.0 * split.ranks as f64;
    let narrowed = if split.ranks > 0 { 1.0 } else { 0.0 };
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
        let s_rel = (80.0 + 2.0 * blocks + ranks) * E + exp_err + zmax;
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
        let depth = 2.0 * 40.0 + 3.0 * blocks + 60.0 + ranks;
        loss[r] = SAFETY
            * (mass * ls_err
                + s.ln().abs() * 4.0 * E * mass
                + depth * E * s_t
                + a_z
                + zl * (2.0 * lse_r.abs() * lse_err + 3.0 * E * lse_r * lse_r)
                + (3.0 + narrowed) * E * ((mass * s.ln()).abs() + s_t + zl * lse_r * lse_r));
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
    // Each rank's walk over its slice, then P - 1 additions in rank order.
    let hidden_depth = ((130 + vocab / 32) as f64 + ranks) * E;
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

/// What happens to the gradients after the kernels, before they are compared (Burn's autodiff
/// node): each adds its roundings to the gradients' bounds.
#[derive(Clone, Copy, Debug, Default)]
pub struct After {
    /// f32 products of the gradient (`GradientMode::Keep`'s multiply by the upstream gradient):
    /// one rounding each, `E |g|`, doubled as every bound. The kernels' bounds scale linearly
    /// with the upstream gradient, so the bound for upstream `s` covers `s` times that for 1.
    pub products: u32,
    /// The gradient's one rounding from f32 to a 16-bit type: half an ulp relative (`2^-11
    /// |g|` for f16, `2^-8 |g|` for bf16), and half the smallest subnormal below the normal
    /// range (`2^-25` for f16, `2^-134` for bf16).
    pub rounded_to: Option<Dtype>,
}

impl After {
    /// `tol` (the kernels' bounds of the gradient `want`) with these roundings added.
    pub fn widen(&self, tol: &[f64], want: &[f64]) -> Vec<f64> {
        let (unit, floor) = match self.rounded_to {
            Some(Dtype::F16) => (2f64.powi(-11), 2f64.powi(-25)),
            Some(Dtype::Bf16) => (2f64.powi(-8), 2f64.powi(-134)),
            Some(Dtype::F32) | None => (0.0, 0.0),
        };
        tol.iter()
            .zip(want)
            .map(|(t, w)| {
                let mut t = *t;
                if self.products > 0 {
                    t += f64::from(self.products) * SAFETY * E * w.abs();
                }
                if unit > 0.0 {
                    t += unit * w.abs() + floor;
                }
                t
            })
            .collect()
    }
}

/// Checks a loss and the gradients `grads` (`dH`, `dW`, `db`) against `reference` within the
/// bounds `b`, the gradients' widened by `after`; `present` says which gradients must be there
/// (the reference has them all). Returns the worst (error, ratio) of loss, dH, dW, db.
pub fn check_loss_and_grads(
    what: &str,
    b: &Bounds,
    reference: &LinearOutput<f64>,
    loss: &[f32],
    grads: [&Option<Vec<f32>>; 3],
    present: [bool; 3],
    after: After,
) -> [(f64, f64); 4] {
    let loss = assert_close(
        &format!("{what}: loss"),
        loss,
        &reference.loss.loss,
        &b.loss,
    );
    let mut worst = [loss, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)];
    let wanted = [
        (&reference.d_hidden, &b.d_hidden, "dH"),
        (&reference.d_head, &b.d_head, "dW"),
        (&reference.d_bias, &b.d_bias, "db"),
    ];
    for (i, (got, (want, tol, name))) in grads.into_iter().zip(wanted).enumerate() {
        assert_eq!(got.is_some(), present[i], "{what}: {name} presence");
        if let Some(got) = got {
            let want = want.as_ref().expect("reference gradient");
            let tol = after.widen(tol, want);
            worst[i + 1] = assert_close(&format!("{what}: {name}"), got, want, &tol);
        }
    }
    worst
}

/// Checks `out` (one device's head, or the ranks' loss and summed `dH` with their `dW` and
/// `db` slices concatenated in rank order) against `reference` within the bounds of `split`;
/// returns the worst (error, ratio) of loss, dH, dW, db.
pub fn check_head(
    what: &str,
    spec: &LossSpec,
    case: &Case,
    split: Split,
    reference: &LinearOutput<f64>,
    out: &LinearOutput<f32>,
    accuracy: bool,
) -> [(f64, f64); 4] {
    let b = bounds(spec, case, split, reference);
    let present = [
        reference.d_hidden.is_some(),
        reference.d_head.is_some(),
        reference.d_bias.is_some(),
    ];
    let worst = check_loss_and_grads(
        what,
        &b,
        reference,
        &out.loss.loss,
        [&out.d_hidden, &out.d_head, &out.d_bias],
        present,
        After::default(),
    );
    assert_close(
        &format!("{what}: lse"),
        &out.loss.lse,
        &reference.loss.lse,
        &b.lse,
    );
    // The denominator: a count (exact) or a sum of the labels' f32 weights, summed by the
    // setup pass in f32 in a fixed tree: within (rows + 16) E of the sum, and two roundings
    // per rank of the host merge.
    let denominator = reference.loss.denominator;
    assert!(
        (f64::from(out.loss.denominator) - denominator).abs()
            <= (case.rows as f64 + 16.0 + 2.0 * split.ranks as f64) * E * denominator.abs(),
        "{what}: denominator {} vs {denominator}",
        out.loss.denominator
    );
    if accuracy {
        assert_eq!(out.loss.correct, reference.loss.correct, "{what}: accuracy");
    }
    worst
}

/// Prints the largest error and error/bound ratio of each output over `worst`.
pub fn report(family: &str, worst: &[[(f64, f64); 4]]) {
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
