//! Shared by the GPU test binaries: one device per binary, deterministic data, and the
//! GPU-against-CPU comparison with its justified tolerances.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::OnceLock;

use lsce::{
    cpu, Batch, Dtype, Gradient, LossKernel, LossOutput, LossSpec, Reduction, Shape,
    StagingOptions, UpstreamGrad,
};

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// The default kernel: subgroup reductions where the device has them.
    pub kernel: LossKernel,
    /// Every row-kernel team on this device, for the tests that cover them all: a subgroup per
    /// row, a workgroup reducing with subgroup operations, and a workgroup reducing through
    /// workgroup memory (the fallback for devices without subgroups).
    pub teams: Vec<(&'static str, LossKernel)>,
}

pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let (device, queue) = lsce::request_device(&lsce::DeviceOptions::default())
            .expect("no wgpu adapter: install mesa-vulkan-drivers (lavapipe) or run on a GPU");
        let kernel = LossKernel::new(&device).expect("kernel");
        let config = kernel.config();
        let with = |config| LossKernel::with_config(&device, config).expect("kernel");
        let mut teams = vec![(
            "workgroup memory",
            with(lsce::KernelConfig {
                use_subgroups: false,
                ..config
            }),
        )];
        if kernel.uses_subgroups() {
            teams.push((
                "subgroup per row",
                with(lsce::KernelConfig {
                    subgroup_rows_max_classes: u32::MAX,
                    ..config
                }),
            ));
            teams.push((
                "workgroup with subgroup operations",
                with(lsce::KernelConfig {
                    subgroup_rows_max_classes: 0,
                    ..config
                }),
            ));
        }
        Gpu {
            device,
            queue,
            kernel,
            teams,
        }
    })
}

/// Deterministic data: a 64-bit LCG.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }
    pub fn normal(&mut self, scale: f32) -> f32 {
        (self.next() + self.next() + self.next() - 1.5) * 2.0 * scale
    }
    pub fn below(&mut self, n: u32) -> u32 {
        ((self.next() * n as f32) as u32).min(n - 1)
    }
}

pub fn logits(n: u64, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n).map(|_| rng.normal(scale)).collect()
}

pub fn labels(rows: u32, classes: u32, ignore_every: u32, seed: u64) -> Vec<i32> {
    let mut rng = Rng(seed);
    (0..rows)
        .map(|r| {
            if ignore_every > 0 && r % ignore_every == ignore_every - 1 {
                -100
            } else {
                rng.below(classes) as i32
            }
        })
        .collect()
}

/// The tolerance model. f32 has a unit roundoff u = 2^-24 = 6e-8.
///
/// - A sum of n terms t_i accumulated in f32 errs by at most ~n u sum |t_i|; the kernels add at
///   most a few hundred terms per invocation and then combine in a tree, so `RTOL` = 1e-5 (~170 u)
///   of the sum of magnitudes bounds every sum they form.
/// - A row loss A lse - sum a_c z_c is such a sum, of magnitude at most
///   A (|lse| + max |z|): the loss is compared against RTOL times that, not against the (possibly
///   cancelled) result. Reduced losses add the rows' bounds (divided by D for the mean).
/// - A gradient element (p A - a) * scale: p = exp(z - lse) inherits the absolute rounding of
///   z - lse, u (|z| + |lse|), as a relative error, so the element errs by at most
///   |scale| A (4 u (|z| + |lse|) + RTOL).
/// - The lse = m + log(s) errs by u |m| plus the sum's error: RTOL (|lse| + 1); the z-loss
///   term z lse^2 inherits it as z (2 |lse| e + e^2).
pub const RTOL: f64 = 1e-5;
const U: f64 = 1.0 / 16_777_216.0;

/// Per-row magnitudes behind the tolerances: an upper bound of the target mass A (with the
/// z-loss term), the largest finite |z|, and |scale| (upstream / D) times the logit scale.
pub struct RowBounds {
    pub mass: f64,
    pub z_max: f64,
    pub scale: f64,
}

pub fn row_bounds(spec: &LossSpec, batch: &Batch<'_>, want: &LossOutput<f64>) -> Vec<RowBounds> {
    let shape = batch.shape;
    let k = shape.classes() as usize;
    let values = spec.resolve(shape.classes()).unwrap();
    let w = |c: usize| batch.weights.map_or(1.0, |w| f64::from(w[c]));
    let w_sum: f64 = (0..k).map(w).sum();
    let w_max = (0..k).map(w).fold(0.0, f64::max);
    (0..shape.rows())
        .map(|row| {
            let target_mass = match batch.targets {
                lsce::Targets::Classes(_) => 1.0,
                lsce::Targets::Probabilities(t) => (0..k as u32)
                    .map(|c| f64::from(t[shape.index(row, c) as usize]).abs())
                    .sum(),
            };
            let lse = want.lse[row as usize].abs();
            let mass = values.off * w_sum
                + values.on * w_max * target_mass
                + 2.0 * f64::from(spec.z_loss) * if lse.is_finite() { lse } else { 0.0 };
            let z_max = (0..k as u32)
                .map(|c| {
                    cpu::transform(batch.logits.get(shape.index(row, c) as usize), spec)
                        .0
                        .abs()
                })
                .filter(|z| z.is_finite())
                .fold(0.0, f64::max);
            let scale = match (spec.reduction, batch.upstream) {
                (_, UpstreamGrad::PerRow(g)) => f64::from(g[row as usize]),
                (Reduction::Mean, UpstreamGrad::Scalar(g)) => f64::from(g) / want.denominator,
                (Reduction::Mean, _) => 1.0 / want.denominator,
                (_, UpstreamGrad::Scalar(g)) => f64::from(g),
                _ => 1.0,
            };
            // D = 0 (every row ignored or weightless): gradients are exactly 0 or NaN.
            let scale = if scale.is_finite() { scale.abs() } else { 0.0 };
            RowBounds {
                mass,
                z_max,
                scale: scale * f64::from(spec.logit_scale),
            }
        })
        .collect()
}

pub fn compare(
    what: &str,
    spec: &LossSpec,
    got: &LossOutput<f32>,
    want: &LossOutput<f64>,
    shape: Shape,
    grad_rtol: f64,
    bounds: &[RowBounds],
) {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let row_loss_tol: Vec<f64> = bounds
        .iter()
        .zip(&want.lse)
        .map(|(b, &lse)| {
            let lse = finite(lse.abs());
            RTOL * (b.mass * (lse + b.z_max) + f64::from(spec.z_loss) * lse * lse + 1e-6)
        })
        .collect();
    assert_eq!(got.loss.len(), want.loss.len(), "{what}: loss length");
    let reduced_tol = match spec.reduction {
        Reduction::None => None,
        Reduction::Sum => Some(row_loss_tol.iter().sum::<f64>()),
        Reduction::Mean => Some(row_loss_tol.iter().sum::<f64>() / want.denominator.abs()),
    };
    for (i, (&g, &w)) in got.loss.iter().zip(&want.loss).enumerate() {
        close(
            what,
            "loss",
            i,
            f64::from(g),
            w,
            reduced_tol.unwrap_or_else(|| row_loss_tol[i]),
        );
    }
    // z lse^2 inherits the lse's absolute error e: z (2 |lse| e + e^2).
    let z_coef = f64::from(spec.z_loss);
    let row_z_tol: Vec<f64> = want
        .lse
        .iter()
        .map(|&lse| {
            let (lse, e) = (finite(lse.abs()), RTOL * (finite(lse.abs()) + 1.0));
            z_coef * (2.0 * lse * e + e * e) + RTOL * z_coef * lse * lse
        })
        .collect();
    let reduced_z_tol = match spec.reduction {
        Reduction::None => None,
        Reduction::Sum => Some(row_z_tol.iter().sum::<f64>()),
        Reduction::Mean => Some(row_z_tol.iter().sum::<f64>() / want.denominator.abs()),
    };
    for (i, (&g, &w)) in got.z_loss.iter().zip(&want.z_loss).enumerate() {
        close(
            what,
            "z_loss",
            i,
            f64::from(g),
            w,
            reduced_z_tol.unwrap_or_else(|| row_z_tol[i]),
        );
    }
    for (i, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
        close(what, "lse", i, f64::from(g), w, RTOL * (w.abs() + 1.0));
    }
    close(
        what,
        "denominator",
        0,
        f64::from(got.denominator),
        want.denominator,
        RTOL * want.denominator.abs(),
    );
    if got.correct.is_some() {
        assert_eq!(got.correct, want.correct, "{what}: correct");
    }
    if let (Some(g), Some(w)) = (&got.grad, &want.grad) {
        let k = shape.classes();
        for row in 0..shape.rows() {
            let idx = |c: u32| shape.index(row, c) as usize;
            let row_max = (0..k).map(|c| finite(w[idx(c)].abs())).fold(0.0, f64::max);
            let b = &bounds[row as usize];
            let lse = finite(want.lse[row as usize].abs());
            let tol =
                grad_rtol * row_max + b.scale * b.mass * (4.0 * U * (b.z_max + lse) + RTOL) + 1e-30;
            for c in 0..k {
                let i = idx(c);
                close(what, "grad", i, f64::from(g[i]), w[i], tol);
            }
        }
    } else {
        assert_eq!(
            got.grad.is_some(),
            want.grad.is_some(),
            "{what}: grad presence"
        );
    }
}

pub fn close(what: &str, field: &str, i: usize, got: f64, want: f64, tol: f64) {
    if want.is_nan() || got.is_nan() {
        assert!(
            want.is_nan() && got.is_nan(),
            "{what}: {field}[{i}] gpu {got} cpu {want}"
        );
    } else if want.is_infinite() || got.is_infinite() {
        assert_eq!(got, want, "{what}: {field}[{i}]");
    } else {
        assert!(
            (got - want).abs() <= tol,
            "{what}: {field}[{i}] gpu {got} cpu {want} |diff| {} > {tol}",
            (got - want).abs()
        );
    }
}

pub fn check(
    what: &str,
    spec: &LossSpec,
    batch: &Batch<'_>,
    options: StagingOptions,
) -> LossOutput<f32> {
    let g = gpu();
    let want = cpu::compute(spec, batch, options.gradient != Gradient::None).unwrap();
    let bounds = row_bounds(spec, batch, &want);
    let grad_rtol = match options.grad_dtype.unwrap_or(batch.logits.dtype()) {
        Dtype::F32 => 0.0,
        // The gradient is rounded once to the output type: half an ulp relative to each value,
        // at most half an ulp of the row's largest value: 2^-11 (f16), 2^-8 (bf16).
        Dtype::F16 => 2f64.powi(-11),
        Dtype::Bf16 => 2f64.powi(-8),
    };
    // Every reduction path the device offers.
    let mut outputs = g
        .teams
        .iter()
        .map(|(team, kernel)| {
            let got = kernel
                .compute(&g.queue, spec, batch, &options)
                .unwrap_or_else(|e| panic!("{what} [{team}]: {e}"));
            compare(
                &format!("{what} [{team}]"),
                spec,
                &got,
                &want,
                batch.shape,
                grad_rtol,
                &bounds,
            );
            got
        })
        .collect::<Vec<_>>();
    outputs.swap_remove(0)
}
