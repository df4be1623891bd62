//! Shared test helpers: one device per test binary, a fixed-seed PRNG, input builders, an
//! independent restatement of the target coefficients, and the GPU-vs-CPU comparison with
//! error bounds derived from the f32 arithmetic the kernels do.
//!
//! # The error bounds
//!
//! The CPU reference ([`lsce::cpu::compute`]) accumulates in f64 from the same f32 logits, so
//! its own error (~1e-16 relative) is negligible; what a comparison must allow for is the f32
//! arithmetic of the kernels. With `E = f32::EPSILON` (2^-23, at least one ulp relative of any
//! normal f32) the bounds below follow the kernels' operation order (see `shaders/rows.wgsl`):
//!
//! * **sums** of `n` terms in f32 err by at most `(n - 1) E sum |term|` (recursive summation).
//!   A row of `K` classes is summed by a team of `W` invocations (a subgroup, `W >= 4`, or a
//!   workgroup, `W >= 32`), each holding at most `n1 = ceil(K / W)` terms (fewer: each keeps up
//!   to four lane accumulators), then combined by a subgroup/tree reduction of `log2 W <= 10`
//!   levels plus a sequential pass over at most `W / 8` subgroup results; the depth is bounded
//!   by `D = n1 + 16` for the cached path and `3 n1 + 20` for the streaming path (whose online
//!   sum rescales its running value once per element).
//! * **exp** and **log**: Vulkan's precision rules (which lavapipe and llvmpipe follow) allow
//!   `exp(x)` a relative error of `(3 + 2|x|)` ulp, and `log` an absolute error of 2^-21 on
//!   [0.5, 2] and 3 ulp elsewhere.
//! * **the transform** `z = softcap(scale * x)`: exact when `scale = 1` and there is no cap;
//!   otherwise `E |z|` for the product, plus `16 E |z|` for the cap: its tanh is a Taylor
//!   series below |u| = 1/4 (a few ulp) and `1 - 2 / (exp(2|u|) + 1)` above, whose absolute
//!   error of ~4 ulp of 1 (the exp's `(3 + 4|u|)` ulp damped by `2e/(e+1)^2`, two roundings) is
//!   at most 16 ulp relative since |tanh u| >= tanh(1/4) = 0.245 there.
//!
//! * **the shifted target sum** `T = sum_c a_c (m - z_c)` (`add_target` in
//!   `shaders/common.wgsl`): every term is a difference to the max `m`, of the sign of `a_c`,
//!   so its errors are relative to `S_T = sum |terms as the kernel adds them|` (class labels:
//!   `off sum_receiving w_c (m - z_c) + |w_y (on - off_y)| (m - z_y)`), which does not change
//!   when a constant is added to the row. Where the max is not known yet (online sweeps, split
//!   parts, team merges) a partial sum is kept relative to a running max and lifted by its
//!   mass `W` (an f32 sum, relative error `n1 E`) times the rise of the max; the lifts of a
//!   term add up to its final `m - z_c`. Per invocation: two additions per element (its lift,
//!   its term), `n1` for the masses inside the lifts, two roundings of each product: `3 n1 + 2`.
//!   Each merge (three of lanes, at most 16 levels of the team as for the sums above) lifts
//!   both sides and adds them: three roundings a level, `57`. Split rows have `P <= n1 / 16`
//!   parts of `n1 / P` elements merged in sequence (`3 (n1 / P) + 3 P <= 3 n1`). Depth
//!   `D_T = 3 n1 + 60` for every path.
//!
//! From these, per row (`A = sum a_c` the target mass, `s = sum exp(z_c - m)`, `zerr_c` the
//! transform error):
//!
//! ```text
//! ls_err   = max_c zerr_c + D_exp E + 2^-21 + 3 E ln K          (ln s)
//! lse_err  = ls_err + E |lse|                                    (lse = m + ln s)
//! loss_err = A ls_err + |ln s| (D + 1) E A + D_T E S_T + sum_c |a_c| (zerr_c + max zerr)
//!            + z_loss (2 |lse| lse_err + 3 E lse^2) + 3 E (|A ln s| + S_T + z_loss lse^2)
//! p_c      = exp(z_c - m) / s, relative error (no larger than exp(z_c - lse)'s)
//!            rho_c = zerr_c + max zerr + ls_err + (4 + 3 |z_c - lse| + 2 ln K) E + D_exp E
//! grad_err = |s| (|dz_c| core_err + |core| slope_err) + |g| (s_rel + 3 E)
//!   core = p_c P - a_c with P = A + 2 z_loss lse, core_err = |P| p_c rho_c + p_c P_err
//!          + 6 E |a_c terms| + 3 E p_c |P| (p_c P is exp(z_c - m) (P (1 / s)): three roundings;
//!          a_c's error is relative to the terms it is formed from, which may cancel),  slope_err the soft-cap slope's error (0 without a cap)
//! ```
//!
//! The loss is formed as `A ln s + T + z_loss lse^2` (`finish_row`), never as `A lse - B` with
//! `B = sum a_c z_c`: both of those are of the size of the logits and would cancel, an error
//! of `E A |lse|` that grows with a constant added to the row. Without z-loss and with an exact
//! transform (`logit_scale` 1, no cap) nothing above depends on such a constant: neither
//! `ln s`, `m - z_c`, `S_T` nor `p_c` (computed from `exp(z_c - m)`, never from the rounded
//! `lse`) changes, and `tests/offsets.rs` holds the kernels to that up to `|c| = 1e30`.
//!
//! `s` is the row's gradient scale (upstream, over the denominator for the mean; `s_rel` its
//! relative error: 2E for one division, more for a weighted denominator, which is an f32 sum).
//! Reduced losses add the per-row bounds plus `(20 + chunks / 256) E sum |loss_r|` for the
//! deterministic chunked reduction, and the division's error for the mean.
//!
//! Every bound is then doubled (`SAFETY`): the ulp constants above are the worst cases the
//! specification allows, not measurements, and doubling absorbs the handful of roundings
//! (products of already-rounded factors) the formulas fold into their constants. The tests print
//! the largest `error / bound` they saw: on lavapipe it stays far below 1, so the bounds are not
//! what makes a test pass.
#![allow(dead_code)]

pub mod linear;

use std::sync::OnceLock;

use lsce::{
    cpu, Batch, DeviceOptions, KernelConfig, LossKernel, LossOutput, LossSpec, Reduction,
    Smoothing, StagingOptions, Targets, UpstreamGrad,
};

/// `f32::EPSILON` as f64: one ulp relative (upper bound) of an f32.
pub const E: f64 = f32::EPSILON as f64;
/// Doubles every derived bound (see the module docs).
pub const SAFETY: f64 = 2.0;

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

/// A device with the kernels the tests use.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// The default kernel: subgroup reductions where the device has them.
    pub kernel: LossKernel,
    /// The same device with `use_subgroups: false`: the workgroup-memory fallback.
    pub fallback: LossKernel,
    /// With subgroups: a subgroup per row for every row length, and a workgroup reducing with
    /// subgroup operations for every row length (the default picks by row length and adapter).
    pub subgroup_teams: Option<(LossKernel, LossKernel)>,
    /// The default configuration with long rows split into parts whenever there are fewer than
    /// 256 rows (the default does so only on GPUs).
    pub split: LossKernel,
    pub name: String,
}

impl Gpu {
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let kernel = LossKernel::new(&device).expect("LossKernel::new");
        let fallback = LossKernel::with_config(
            &device,
            KernelConfig {
                use_subgroups: false,
                ..KernelConfig::for_device(&device)
            },
        )
        .expect("LossKernel::with_config(use_subgroups: false)");
        assert!(!fallback.uses_subgroups());
        let with_rows_max = |classes| {
            LossKernel::with_config(
                &device,
                KernelConfig {
                    subgroup_rows_max_classes: classes,
                    ..KernelConfig::for_device(&device)
                },
            )
            .expect("LossKernel::with_config")
        };
        let subgroup_teams = kernel
            .uses_subgroups()
            .then(|| (with_rows_max(u32::MAX), with_rows_max(0)));
        let split = LossKernel::with_config(
            &device,
            KernelConfig {
                min_row_teams: 256,
                ..KernelConfig::for_device(&device)
            },
        )
        .expect("LossKernel::with_config(min_row_teams: 256)");
        let info = device.adapter_info();
        let name = format!("{} ({:?})", info.name, info.backend);
        Self {
            device,
            queue,
            kernel,
            fallback,
            subgroup_teams,
            split,
            name,
        }
    }

    /// Every reduction path of this device, named: a subgroup per row, a workgroup with
    /// subgroup operations, a workgroup through workgroup memory, and split rows.
    pub fn kernels(&self) -> Vec<(&'static str, &LossKernel)> {
        let mut v = Vec::new();
        if let Some((per_row, workgroup)) = &self.subgroup_teams {
            v.push(("subgroup per row", per_row));
            v.push(("workgroup + subgroup ops", workgroup));
        }
        v.push(("workgroup", &self.fallback));
        v.push(("split rows", &self.split));
        v
    }
}

/// The device of this test binary (`WGPU_BACKEND` / `WGPU_ADAPTER_NAME` pick it). Panics with
/// a clear message when there is none: a GPU test never passes without running.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let (device, queue) = lsce::request_device(&DeviceOptions::default()).unwrap_or_else(|e| {
            panic!(
                "no wgpu adapter: {e}\n  install a software Vulkan driver (Debian: \
                 `apt-get install -y mesa-vulkan-drivers`, or run `.ci/setup`, which installs \
                 every driver the tests use) or run on a machine with a GPU"
            )
        });
        let gpu = Gpu::from_device(device, queue);
        eprintln!("[device] {}", gpu.name);
        gpu
    })
}

/// Burn's wgpu device shared with lsce (`lsce::burn::init_device`), once per test binary; a
/// clear panic without adapter.
#[cfg(feature = "burn")]
pub fn burn_device() -> burn::tensor::Device {
    static DEVICE: OnceLock<burn::tensor::Device> = OnceLock::new();
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

/// Vulkan's first adapter (lavapipe in CI, with `Features::SUBGROUP`), once per test binary.
#[allow(dead_code)] // not every test binary picks a backend
pub fn vulkan() -> &'static Gpu {
    static VK: OnceLock<Gpu> = OnceLock::new();
    VK.get_or_init(|| {
        let g = device_for_backend(wgpu::Backends::VULKAN, "`mesa-vulkan-drivers` (lavapipe)");
        eprintln!("[device] {}", g.name);
        g
    })
}

/// GL's first adapter (llvmpipe through EGL in CI, no subgroups), once per test binary.
#[allow(dead_code)]
pub fn gl() -> &'static Gpu {
    static GL: OnceLock<Gpu> = OnceLock::new();
    GL.get_or_init(|| {
        let g = device_for_backend(
            wgpu::Backends::GL,
            "`libegl1 libegl-mesa0 libgl1-mesa-dri` (Mesa's llvmpipe through EGL)",
        );
        eprintln!("[device] {}", g.name);
        g
    })
}

/// The first adapter of `backend`, or a panic that says what to install.
pub fn device_for_backend(backend: wgpu::Backends, install: &str) -> Gpu {
    let adapters = lsce::adapters(backend);
    let adapter = adapters.into_iter().next().unwrap_or_else(|| {
        panic!(
            "no wgpu adapter for {backend:?}: this test needs one; on Debian install {install} \
             (`.ci/setup` installs every driver the tests use)"
        )
    });
    let (device, queue) = lsce::device_for_adapter(&adapter)
        .unwrap_or_else(|e| panic!("requesting a {backend:?} device failed: {e}"));
    Gpu::from_device(device, queue)
}

// ---------------------------------------------------------------------------------------------
// Random data
// ---------------------------------------------------------------------------------------------

/// SplitMix64: a tiny fixed-seed generator (no crate), good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` logits ~ N(0, std^2).
    pub fn logits(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }

    /// `rows` labels in [0, classes); each row is `ignore` with probability `ignore_frac`.
    pub fn labels(&mut self, rows: usize, classes: u32, ignore: i32, ignore_frac: f64) -> Vec<i32> {
        (0..rows)
            .map(|_| {
                if self.uniform() < ignore_frac {
                    ignore
                } else {
                    self.below(classes) as i32
                }
            })
            .collect()
    }

    /// `classes` weights in [0, 2), some exactly 0 and some exactly 1.
    pub fn weights(&mut self, classes: usize) -> Vec<f32> {
        (0..classes)
            .map(|c| match c % 7 {
                3 => 0.0,
                5 => 1.0,
                _ => self.range(0.0, 2.0) as f32,
            })
            .collect()
    }

    /// Probability targets: each row a random distribution (normalised when `normalised`, else
    /// scaled by a factor in [0.5, 1.5), as PyTorch accepts).
    pub fn probabilities(&mut self, rows: usize, classes: usize, normalised: bool) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * classes);
        for _ in 0..rows {
            let raw: Vec<f64> = (0..classes).map(|_| self.uniform().powi(3)).collect();
            let total: f64 = raw.iter().sum::<f64>().max(1e-30);
            let factor = if normalised {
                1.0
            } else {
                self.range(0.5, 1.5)
            };
            out.extend(raw.iter().map(|v| (v / total * factor) as f32));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Independent target coefficients
// ---------------------------------------------------------------------------------------------

/// `(on, off)` for a smoothing and `m` receiving classes, restated from the table in
/// `src/spec.rs` (not through `Smoothing::target_values`, so that a slip there shows).
pub fn on_off(smoothing: Smoothing, m: u32) -> (f64, f64) {
    let m = f64::from(m);
    match smoothing {
        Smoothing::Uniform(eps) => {
            let eps = f64::from(eps);
            (1.0 - eps * (m - 1.0) / m, eps / m)
        }
        Smoothing::OffTarget(eps) => {
            let eps = f64::from(eps);
            (1.0 - eps, if m > 1.0 { eps / (m - 1.0) } else { 0.0 })
        }
        Smoothing::Explicit { on, off } => (f64::from(on), f64::from(off)),
    }
}

/// The row's target coefficients `a_c = w_c q_c`, `q` built explicitly as a distribution.
pub fn coefficients(
    spec: &LossSpec,
    weights: Option<&[f32]>,
    target: RowTarget<'_>,
    k: usize,
) -> Vec<f64> {
    let m = k as u32 - u32::from(spec.excluded_class.is_some());
    let (on, off) = on_off(spec.smoothing, m.max(1));
    (0..k)
        .map(|c| {
            let w = weights.map_or(1.0, |w| f64::from(w[c]));
            let excluded = spec.excluded_class == Some(c as u32);
            let q = match target {
                RowTarget::Class(y) if y as usize == c => on,
                RowTarget::Class(_) if excluded => 0.0,
                RowTarget::Class(_) => off,
                RowTarget::Soft(t) => {
                    let off_c = if excluded { 0.0 } else { off };
                    off_c + (on - off_c) * f64::from(t[c])
                }
            };
            w * q
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
pub enum RowTarget<'a> {
    Class(i32),
    Soft(&'a [f32]),
}

// ---------------------------------------------------------------------------------------------
// Reference with bounds
// ---------------------------------------------------------------------------------------------

/// The CPU reference of a batch together with the bound each GPU value must meet.
pub struct Reference {
    pub out: LossOutput<f64>,
    pub loss_tol: Vec<f64>,
    pub z_loss_tol: Vec<f64>,
    pub lse_tol: Vec<f64>,
    pub grad_tol: Option<Vec<f64>>,
    pub denominator_tol: f64,
}

/// Computes `cpu::compute` and the bounds of the module docs for a GPU run with `config`.
pub fn reference(
    spec: &LossSpec,
    batch: &Batch<'_>,
    gradient: lsce::Gradient,
    config: KernelConfig,
) -> Reference {
    let out = cpu::compute(spec, batch, gradient).expect("cpu::compute");
    reference_for(spec, batch, out, config, None)
}

/// [`reference`] with an already computed CPU output; `denominator` overrides the mean's
/// denominator (for a sub-batch of a larger batch).
pub fn reference_for(
    spec: &LossSpec,
    batch: &Batch<'_>,
    out: LossOutput<f64>,
    config: KernelConfig,
    denominator: Option<f64>,
) -> Reference {
    let shape = batch.shape;
    let (rows, k) = (shape.rows() as usize, shape.classes() as usize);
    let weighted = batch.weights.is_some();
    let chunks = (rows as f64 / 1024.0).ceil();
    // The fewest invocations a row's sums can be split over: one subgroup (at least 4 lanes on
    // any adapter) for a subgroup team, else the smallest workgroup the kernel picks (32).
    // The strided [N, C, d..] kernel is one invocation (four lanes) per row.
    let team = if shape.spatial() > 1
        || (config.use_subgroups && k as u32 <= config.subgroup_rows_max_classes)
    {
        4.0
    } else {
        32.0
    };
    let n1 = (k as f64 / team).ceil();
    let d_cached = n1 + 16.0;
    let d_exp = 3.0 * n1 + 20.0; // covers the streaming path's rescaling too
    let d_shifted = 3.0 * n1 + 60.0; // the shifted target sum, lifted as its max rises
    let ln_k = (k as f64).ln();
    let scale = f64::from(spec.logit_scale);
    let cap = spec.softcap.map(f64::from);
    let exact_transform = spec.logit_scale == 1.0 && cap.is_none();
    let z_coef = f64::from(spec.z_loss);
    let denominator = denominator.unwrap_or(out.denominator);
    // Relative error of the mean's denominator: exact integer counts without weights, an f32
    // sum over rows (4 per invocation, a tree, then the chunks) with them.
    let d_rel = if weighted && matches!(batch.targets, Targets::Classes(_)) {
        (24.0 + chunks / 256.0) * E
    } else {
        0.0
    };
    let scalar_upstream = match batch.upstream {
        UpstreamGrad::Scalar(g) => f64::from(g),
        _ => 1.0,
    };

    let mut loss_tol = vec![0.0; rows];
    let mut row_loss_abs = vec![0.0; rows];
    let mut row_z_abs = vec![0.0; rows];
    let mut z_tol = vec![0.0; rows];
    let mut lse_tol = vec![0.0; rows];
    let mut grad_tol = out.grad.as_ref().map(|g| vec![0.0; g.len()]);
    let (mut z, mut dz, mut zerr) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
    let mut t_row = vec![0.0f32; k];
    for row in 0..rows {
        let target = match batch.targets {
            Targets::Classes(labels) => {
                if Some(labels[row]) == spec.ignore_index {
                    continue; // exact zeros expected: tolerance 0
                }
                RowTarget::Class(labels[row])
            }
            // Laid out like the logits: strided by `spatial` for [N, C, d..].
            Targets::Probabilities(p) => {
                for (c, t) in t_row.iter_mut().enumerate() {
                    *t = p[shape.index(row as u32, c as u32) as usize];
                }
                RowTarget::Soft(&t_row)
            }
        };
        for c in 0..k {
            let x = batch.logits.get(shape.index(row as u32, c as u32) as usize);
            (z[c], dz[c]) = cpu::transform(x, spec);
            zerr[c] = if exact_transform || !z[c].is_finite() {
                0.0
            } else {
                E * z[c].abs() + cap.map_or(0.0, |_| 16.0 * E * z[c].abs())
            };
        }
        let stats = cpu::row_statistics(&z);
        let lse = stats.lse;
        let a = coefficients(spec, batch.weights, target, k);
        // The size of the terms each a_c is formed from in f32 (it may cancel, e.g. off (1 - t)
        // for probability targets): what its rounding is relative to.
        let a_terms: Vec<f64> = match target {
            RowTarget::Soft(t) => {
                let m = k as u32 - u32::from(spec.excluded_class.is_some());
                let (on, off) = on_off(spec.smoothing, m.max(1));
                (0..k)
                    .map(|c| {
                        let w = batch.weights.map_or(1.0, |w| f64::from(w[c]));
                        w.abs() * (off.abs() + (on - off).abs() * f64::from(t[c]).abs())
                    })
                    .collect()
            }
            RowTarget::Class(_) => a.iter().map(|v| v.abs()).collect(),
        };
        let mass: f64 = a.iter().sum();
        let m = stats.max;
        // S_T: the terms of T = sum a_c (m - z_c) as the kernel adds them (cpu::compute's
        // `shifted`, in absolute value).
        let term = |b: f64, z: f64| {
            if b == 0.0 && z >= f64::from(f32::MIN) {
                0.0
            } else {
                (b * (m - z)).abs()
            }
        };
        let s_t = match target {
            RowTarget::Soft(_) => (0..k).map(|c| term(a[c], z[c])).sum::<f64>(),
            RowTarget::Class(y) => {
                let y = y as usize;
                let w = |c: usize| batch.weights.map_or(1.0, |w| f64::from(w[c]));
                let m_receiving = k as u32 - u32::from(spec.excluded_class.is_some());
                let (on, off) = on_off(spec.smoothing, m_receiving.max(1));
                let off_y = if spec.excluded_class == Some(y as u32) {
                    0.0
                } else {
                    off
                };
                let off_sum: f64 = if off == 0.0 {
                    0.0
                } else {
                    off * (0..k)
                        .filter(|&c| spec.excluded_class != Some(c as u32))
                        .map(|c| term(w(c), z[c]))
                        .sum::<f64>()
                };
                off_sum + term(w(y) * (on - off_y), z[y])
            }
        };
        let ln_s = stats.sum_exp.ln();
        let zmax_err = zerr.iter().cloned().fold(0.0, f64::max);
        let ls_err = zmax_err + d_exp * E + 2f64.powi(-21) + 3.0 * E * ln_k;
        let lse_err = ls_err + E * lse.abs();
        let mass_err = d_cached * E * mass.abs() + E * mass.abs();
        let t_err = d_shifted * E * s_t
            + (0..k)
                .map(|c| a[c].abs() * (zerr[c] + zmax_err))
                .sum::<f64>();
        let loss_err = mass.abs() * ls_err
            + ln_s.abs() * mass_err
            + t_err
            + z_coef * (2.0 * lse.abs() * lse_err + 3.0 * E * lse * lse)
            + 3.0 * E * ((mass * ln_s).abs() + s_t + z_coef * lse * lse);
        loss_tol[row] = SAFETY * loss_err;
        row_loss_abs[row] = (mass * ln_s).abs() + s_t + z_coef * lse * lse;
        row_z_abs[row] = z_coef * lse * lse;
        z_tol[row] = SAFETY * z_coef * (2.0 * lse.abs() * lse_err + 3.0 * E * lse * lse);
        lse_tol[row] = SAFETY * lse_err;

        if let Some(gt) = grad_tol.as_mut() {
            let (s, s_rel) = match (spec.reduction, batch.upstream) {
                (Reduction::None, UpstreamGrad::PerRow(g)) => (f64::from(g[row]), 0.0),
                (Reduction::Mean, _) => (scalar_upstream / denominator, d_rel + 2.0 * E),
                _ => (scalar_upstream, 0.0),
            };
            let p_coef = mass + 2.0 * z_coef * lse;
            let p_err = mass_err + 2.0 * z_coef * (lse_err + E * lse.abs()) + E * p_coef.abs();
            for c in 0..k {
                let p = if z[c] == f64::NEG_INFINITY {
                    0.0
                } else {
                    (z[c] - lse).exp()
                };
                let rho = if p == 0.0 {
                    0.0
                } else {
                    zerr[c]
                        + zmax_err
                        + ls_err
                        + (4.0 + 3.0 * (z[c] - lse).abs() + 2.0 * ln_k) * E
                        + d_exp * E
                };
                let core = p * p_coef - a[c];
                // p P is formed as exp(z - m) * (P * (1 / s)): three roundings.
                let core_err = p_coef.abs() * p * rho
                    + p * p_err
                    + 6.0 * E * a_terms[c]
                    + 3.0 * E * p * p_coef.abs();
                let slope_err = match cap {
                    Some(cap) if z[c].is_finite() => {
                        let t = z[c] / cap;
                        scale * (2.0 * t.abs() * zerr[c] / cap + 4.0 * E)
                    }
                    _ => 0.0,
                };
                let g = core * s * dz[c];
                // Subnormal results may be flushed to zero by the GPU.
                let floor = 4.0
                    * f64::from(f32::MIN_POSITIVE)
                    * s.abs()
                    * (dz[c].abs() + 1.0)
                    * (p_coef.abs() + a[c].abs() + 1.0);
                let err = s.abs() * (dz[c].abs() * core_err + core.abs() * slope_err)
                    + g.abs() * (s_rel + 3.0 * E)
                    + floor;
                gt[shape.index(row as u32, c as u32) as usize] = SAFETY * err;
            }
        }
    }

    let reduce = |tol: &[f64], values_abs: f64| -> Vec<f64> {
        let sum_tol: f64 = tol.iter().sum::<f64>() + (20.0 + chunks / 256.0) * E * values_abs;
        match spec.reduction {
            Reduction::None => tol.to_vec(),
            Reduction::Sum => vec![SAFETY * sum_tol],
            Reduction::Mean => {
                let mean = values_abs / denominator;
                vec![SAFETY * (sum_tol / denominator + mean * (d_rel + 2.0 * E))]
            }
        }
    };
    let (loss_abs, z_abs) = (
        row_loss_abs.iter().sum::<f64>(),
        row_z_abs.iter().sum::<f64>(),
    );
    Reference {
        loss_tol: reduce(&loss_tol, loss_abs),
        z_loss_tol: reduce(&z_tol, z_abs),
        lse_tol,
        grad_tol,
        denominator_tol: d_rel * denominator,
        out,
    }
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

/// The largest errors of one comparison.
#[derive(Clone, Copy, Debug, Default)]
pub struct Errors {
    pub loss: f64,
    pub lse: f64,
    pub grad: f64,
    /// The largest `error / bound` over every compared value.
    pub ratio: f64,
    pub compared: usize,
}

impl Errors {
    pub fn merge(&mut self, o: Errors) {
        self.loss = self.loss.max(o.loss);
        self.lse = self.lse.max(o.lse);
        self.grad = self.grad.max(o.grad);
        self.ratio = self.ratio.max(o.ratio);
        self.compared += o.compared;
    }

    /// Prints the family's maxima (run with `--nocapture` to see them).
    pub fn report(&self, family: &str) {
        eprintln!(
            "[max |GPU-CPU|] {family:<40} loss {:.3e}  lse {:.3e}  grad {:.3e}  worst err/bound {:.3}  ({} values)",
            self.loss, self.lse, self.grad, self.ratio, self.compared
        );
    }
}

/// Asserts `gpu[i]` against `cpu[i] +- tol[i]`: NaN where the CPU has NaN, the same infinity
/// where it has one, finite and within the bound elsewhere. Returns (max error, max ratio).
pub fn assert_close(what: &str, gpu: &[f32], cpu: &[f64], tol: &[f64]) -> (f64, f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: GPU and CPU lengths differ");
    assert_eq!(tol.len(), cpu.len(), "{what}: tolerance length");
    let (mut max_err, mut max_ratio) = (0.0f64, 0.0f64);
    for (i, ((&g, &c), &t)) in gpu.iter().zip(cpu).zip(tol).enumerate() {
        let g = f64::from(g);
        if c.is_nan() {
            assert!(
                g.is_nan(),
                "{what}[{i}]: GPU {g} but the CPU reference is NaN"
            );
            continue;
        }
        if c.is_infinite() {
            assert_eq!(g, c, "{what}[{i}]: GPU {g} but the CPU reference is {c}");
            continue;
        }
        assert!(
            g.is_finite(),
            "{what}[{i}]: GPU {g} but the CPU reference is finite ({c})"
        );
        let err = (g - c).abs();
        assert!(
            approx::abs_diff_eq!(g, c, epsilon = t),
            "{what}[{i}]: GPU {g:e} vs CPU {c:e}: |diff| {err:e} exceeds the bound {t:e}"
        );
        max_err = max_err.max(err);
        if t > 0.0 {
            max_ratio = max_ratio.max(err / t);
        }
    }
    (max_err, max_ratio)
}

/// Compares every output of a GPU run against the reference.
pub fn compare_outputs(what: &str, gpu: &LossOutput<f32>, r: &Reference) -> Errors {
    let cpu = &r.out;
    let mut e = Errors::default();
    let (l, lr) = assert_close(&format!("{what}: loss"), &gpu.loss, &cpu.loss, &r.loss_tol);
    let (_, zr) = assert_close(
        &format!("{what}: z_loss"),
        &gpu.z_loss,
        &cpu.z_loss,
        &r.z_loss_tol,
    );
    let (s, sr) = assert_close(&format!("{what}: lse"), &gpu.lse, &cpu.lse, &r.lse_tol);
    e.loss = l;
    e.lse = s;
    e.ratio = lr.max(zr).max(sr);
    e.compared = gpu.loss.len() + gpu.lse.len();
    match (&gpu.grad, &cpu.grad, &r.grad_tol) {
        (Some(g), Some(c), Some(t)) => {
            let (ge, gr) = assert_close(&format!("{what}: grad"), g, c, t);
            e.grad = ge;
            e.ratio = e.ratio.max(gr);
            e.compared += g.len();
        }
        (None, None, _) => {}
        (g, c, _) => panic!(
            "{what}: gradient presence differs: GPU {} CPU {}",
            g.is_some(),
            c.is_some()
        ),
    }
    let (gd, cd) = (f64::from(gpu.denominator), cpu.denominator);
    assert!(
        (gd - cd).abs() <= r.denominator_tol,
        "{what}: denominator GPU {gd} vs CPU {cd} (bound {})",
        r.denominator_tol
    );
    // Accuracy compares the label with the argmax of the raw logits, the same f32 values on
    // both sides: the counts agree exactly.
    if let Some(correct) = gpu.correct {
        assert_eq!(
            Some(correct),
            cpu.correct,
            "{what}: correct-prediction count"
        );
    }
    e
}

/// Runs a batch on the GPU through the staging API and checks it against the CPU reference.
pub fn check(
    what: &str,
    gpu: &Gpu,
    kernel: &LossKernel,
    spec: &LossSpec,
    batch: &Batch<'_>,
    options: &StagingOptions,
) -> Errors {
    let gpu_out = kernel
        .compute(&gpu.queue, spec, batch, options)
        .unwrap_or_else(|e| panic!("{what}: GPU compute failed on {}: {e}", gpu.name));
    let r = reference(spec, batch, options.gradient, kernel.config());
    compare_outputs(&format!("{what} [{}]", gpu.name), &gpu_out, &r)
}

/// Runs a batch through every reduction path of the device ([`Gpu::kernels`]) and checks each
/// against the CPU reference ([`check_paths`]). Returns the first path's output.
pub fn check_every_path(
    what: &str,
    spec: &LossSpec,
    batch: &Batch<'_>,
    options: StagingOptions,
) -> LossOutput<f32> {
    let g = gpu();
    check_paths(what, &g.kernels(), spec, batch, &options)
        .into_iter()
        .next()
        .expect("every device has a workgroup path")
        .0
}

/// Runs a batch through each of `kernels` and checks it against the CPU reference with the
/// bounds of the module docs, plus the rounding of a half-precision gradient to its type (half
/// an ulp of each value: 2^-11 relative for f16, with 2^-25 absolute below its normal range,
/// 2^-8 for bf16). Returns each path's output, reference and largest errors.
pub fn check_paths(
    what: &str,
    kernels: &[(&'static str, &LossKernel)],
    spec: &LossSpec,
    batch: &Batch<'_>,
    options: &StagingOptions,
) -> Vec<(LossOutput<f32>, Reference, Errors)> {
    let g = gpu();
    let grad_dtype = match options.gradient {
        lsce::Gradient::InPlace => batch.logits.dtype(),
        _ => options.grad_dtype.resolve(batch.logits.dtype()),
    };
    kernels
        .iter()
        .map(|&(path, kernel)| {
            let out = kernel
                .compute(&g.queue, spec, batch, options)
                .unwrap_or_else(|e| panic!("{what} [{path}]: {e}"));
            let mut r = reference(spec, batch, options.gradient, kernel.config());
            if let (Some(tol), Some(want)) = (r.grad_tol.as_mut(), r.out.grad.as_ref()) {
                let (relative, absolute) = match grad_dtype {
                    lsce::Dtype::F32 => (0.0, 0.0),
                    lsce::Dtype::F16 => (2f64.powi(-11), 2f64.powi(-25)),
                    lsce::Dtype::Bf16 => (2f64.powi(-8), 0.0),
                };
                for (t, w) in tol.iter_mut().zip(want) {
                    *t += relative * w.abs() + absolute;
                }
            }
            let errors = compare_outputs(&format!("{what} [{path}]"), &out, &r);
            (out, r, errors)
        })
        .collect()
}

/// `n` logits drawn from N(0, std^2) with a fixed seed.
pub fn logits(n: u64, std: f32, seed: u64) -> Vec<f32> {
    Rng::new(seed).logits(n as usize, f64::from(std))
}

/// `rows` labels in `[0, classes)` with a fixed seed; every `ignore_every`-th row (when
/// nonzero) is ignored (-100).
pub fn labels(rows: u32, classes: u32, ignore_every: u32, seed: u64) -> Vec<i32> {
    let mut rng = Rng::new(seed);
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

/// Bit patterns of a slice, for bitwise comparisons.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// Caller-owned buffers (the encode API)
// ---------------------------------------------------------------------------------------------

/// Fills every byte of a test buffer that its data does not cover: a write outside the
/// regions handed to the plan shows up as a changed sentinel.
pub const SENTINEL: u32 = 0xdead_beef;
/// Sentinel words after each region.
pub const TAIL_WORDS: usize = 5;

/// A buffer of sentinels with `data` at byte `offset` (a multiple of 4), followed by
/// [`TAIL_WORDS`] sentinels.
pub fn buffer_at(
    g: &Gpu,
    label: &str,
    data: &[u32],
    offset: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    assert_eq!(offset % 4, 0);
    let lead = (offset / 4) as usize;
    let mut words = vec![SENTINEL; lead + data.len() + TAIL_WORDS];
    words[lead..lead + data.len()].copy_from_slice(data);
    let buffer = g.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (words.len() * 4) as u64,
        usage,
        mapped_at_creation: true,
    });
    buffer
        .slice(..)
        .get_mapped_range_mut()
        .expect("mapped at creation")
        .copy_from_slice(bytemuck::cast_slice(&words));
    buffer.unmap();
    buffer
}

/// Reads a whole buffer back (it needs COPY_SRC) after everything submitted so far.
pub fn read_words(g: &Gpu, buffer: &wgpu::Buffer) -> Vec<u32> {
    let size = buffer.size();
    let readback = g.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = g.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &readback, 0, size);
    let index = g.queue.submit([encoder.finish()]);
    let slice = readback.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    g.device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        })
        .expect("poll");
    rx.recv().expect("map callback").expect("map");
    let view = slice.get_mapped_range().expect("mapped range");
    let words = view
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    drop(view);
    readback.unmap();
    words
}

/// The `n` words at byte `offset` of a buffer read back with [`read_words`], after checking
/// that every word outside them is still the sentinel (for buffers made by [`buffer_at`]
/// whose whole data region is `n` words).
pub fn region(what: &str, words: &[u32], offset: u64, n: usize) -> Vec<u32> {
    let lead = (offset / 4) as usize;
    assert_eq!(words.len(), lead + n + TAIL_WORDS, "{what}: buffer size");
    for (i, &w) in words[..lead].iter().chain(&words[lead + n..]).enumerate() {
        assert_eq!(
            w, SENTINEL,
            "{what}: a word outside the region changed (#{i})"
        );
    }
    words[lead..lead + n].to_vec()
}

pub fn as_f32(words: &[u32]) -> Vec<f32> {
    words.iter().map(|&w| f32::from_bits(w)).collect()
}

pub fn f32_words(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn i32_words(v: &[i32]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

/// Every smoothing convention, with and without an excluded class, at `eps` for `k >= 2`
/// classes.
pub fn conventions(eps: f32, k: u32) -> Vec<(&'static str, LossSpec)> {
    let base = LossSpec::default();
    vec![
        ("uniform", base.with_smoothing(Smoothing::Uniform(eps))),
        ("off_target", base.with_smoothing(Smoothing::OffTarget(eps))),
        (
            "explicit",
            base.with_smoothing(Smoothing::Explicit {
                on: 1.0 - eps,
                off: eps / 3.0,
            }),
        ),
        (
            "uniform+excluded",
            base.with_smoothing(Smoothing::Uniform(eps))
                .with_excluded_class(Some(0)),
        ),
        (
            "off_target+excluded",
            base.with_smoothing(Smoothing::OffTarget(eps))
                .with_excluded_class(Some(k - 1)),
        ),
        (
            "explicit+excluded",
            base.with_smoothing(Smoothing::Explicit {
                on: 0.8,
                off: eps / 5.0,
            })
            .with_excluded_class(Some(k / 2)),
        ),
    ]
}
