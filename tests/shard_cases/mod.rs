//! Sharded test cases: a global `[rows, K]` (or `[N, K, spatial]`) problem, cut into shard
//! slices by a layout along the class dimension, with the unsharded CPU result to hold every
//! sharded use against.
#![allow(dead_code)]

use lsce::shards::{ShardBatch, ShardLayout, ShardProblem};
use lsce::{
    cpu, Batch, LossOutput, LossSpec, Reduction, Shape, Smoothing, TargetKind, UpstreamGrad,
};

#[path = "../common/mod.rs"]
pub mod common;
pub use common::Rng;

/// One global problem and its data.
pub struct Case {
    pub name: String,
    pub spec: LossSpec,
    /// `N * spatial`.
    pub rows: u32,
    pub classes: u32,
    /// Positions per sample of `[N, K, spatial]` logits; 1 for `[rows, K]`.
    pub spatial: u32,
    pub logits: Vec<f32>,
    pub labels: Vec<i32>,
    pub probs: Option<Vec<f32>>,
    pub weights: Option<Vec<f32>>,
    pub upstream: Vec<f32>,
}

impl Case {
    /// The global shape.
    pub fn shape(&self) -> Shape {
        Shape::new(self.rows / self.spatial, self.classes, self.spatial).unwrap()
    }

    /// The same problem on `[N, K, spatial]` logits: every `[rows, K]` row's values move to
    /// where the class-dimension-1 layout puts that row (labels, probabilities and upstream
    /// stay by row), so the unsharded result is the same row by row.
    pub fn with_spatial(mut self, spatial: u32) -> Self {
        assert_eq!(self.spatial, 1);
        assert_eq!(self.rows % spatial, 0);
        let matrix = self.shape();
        self.spatial = spatial;
        let strided = self.shape();
        self.logits = relayout(&self.logits, matrix, strided);
        self.probs = self.probs.as_deref().map(|p| relayout(p, matrix, strided));
        self.name = format!("{} [N, K, {spatial}]", self.name);
        self
    }

    /// The unsharded batch.
    pub fn batch(&self) -> Batch<'_> {
        let shape = self.shape();
        let mut b = match &self.probs {
            Some(p) => Batch::probabilities(shape, &self.logits, p),
            None => Batch::classes(shape, &self.logits, &self.labels),
        };
        if let Some(w) = &self.weights {
            b = b.with_weights(w);
        }
        b.with_upstream(self.upstream())
    }

    pub fn upstream(&self) -> UpstreamGrad<'_> {
        match self.spec.reduction {
            Reduction::None => UpstreamGrad::PerRow(&self.upstream),
            _ => UpstreamGrad::Scalar(self.upstream[0]),
        }
    }

    /// The unsharded f64 result, with the gradient.
    pub fn reference(&self) -> LossOutput<f64> {
        cpu::compute(&self.spec, &self.batch(), lsce::Gradient::Separate)
            .expect("unsharded reference")
    }

    pub fn problem(&self, layout: &ShardLayout) -> ShardProblem {
        ShardProblem::for_shape(self.spec, self.shape(), layout.clone())
            .expect("the layout tiles the case's classes")
            .with_targets(if self.probs.is_some() {
                TargetKind::Probabilities
            } else {
                TargetKind::Classes
            })
            .with_weighted(self.weights.is_some())
            .with_accuracy(self.probs.is_none())
    }

    /// Shard `p`'s slices: logits, probabilities and weights, in the shard's shape.
    pub fn slices(&self, layout: &ShardLayout, p: usize) -> ShardData {
        let r = layout.range(p);
        let global = self.shape();
        let shape = Shape::new(self.rows / self.spatial, r.end - r.start, self.spatial).unwrap();
        let cols = |v: &[f32]| -> Vec<f32> {
            let mut out = vec![0.0; shape.elements() as usize];
            for row in 0..self.rows {
                for c in 0..shape.classes() {
                    out[shape.index(row, c) as usize] = v[global.index(row, r.start + c) as usize];
                }
            }
            out
        };
        ShardData {
            shard: p,
            shape,
            logits: cols(&self.logits),
            probs: self.probs.as_deref().map(cols),
            weights: self
                .weights
                .as_ref()
                .map(|w| w[r.start as usize..r.end as usize].to_vec()),
        }
    }

    /// Gathers per-shard gradients (each in its shard's shape) into the global layout.
    pub fn gather<T: Copy + Default>(&self, layout: &ShardLayout, parts: &[Vec<T>]) -> Vec<T> {
        let global = self.shape();
        let mut out = vec![T::default(); global.elements() as usize];
        for (p, g) in parts.iter().enumerate() {
            let r = layout.range(p);
            let shape =
                Shape::new(self.rows / self.spatial, r.end - r.start, self.spatial).unwrap();
            for row in 0..self.rows {
                for c in 0..shape.classes() {
                    out[global.index(row, r.start + c) as usize] = g[shape.index(row, c) as usize];
                }
            }
        }
        out
    }
}

/// `v`, laid out as `from`, laid out as `to` (the same rows and classes).
fn relayout(v: &[f32], from: Shape, to: Shape) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for row in 0..from.rows() {
        for c in 0..from.classes() {
            out[to.index(row, c) as usize] = v[from.index(row, c) as usize];
        }
    }
    out
}

/// One shard's owned slices.
pub struct ShardData {
    pub shard: usize,
    pub shape: Shape,
    pub logits: Vec<f32>,
    pub probs: Option<Vec<f32>>,
    pub weights: Option<Vec<f32>>,
}

impl ShardData {
    pub fn batch<'a>(&'a self, case: &'a Case) -> ShardBatch<'a> {
        let mut b = match &self.probs {
            Some(p) => Batch::probabilities(self.shape, &self.logits, p),
            None => Batch::classes(self.shape, &self.logits, &case.labels),
        };
        if let Some(w) = &self.weights {
            b = b.with_weights(w);
        }
        ShardBatch::new(self.shard, b.with_upstream(case.upstream()))
    }
}

/// A class-label case: rows of N(0, std^2) logits, every 5th row ignored.
pub fn case(name: &str, spec: LossSpec, rows: u32, classes: u32, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let logits = rng.logits((rows * classes) as usize, 3.0);
    let ignore = spec.ignore_index.unwrap_or(-100);
    let labels = (0..rows)
        .map(|r| {
            if r % 5 == 3 && spec.ignore_index.is_some() {
                ignore
            } else {
                rng.below(classes) as i32
            }
        })
        .collect();
    let upstream = (0..rows).map(|_| rng.range(0.5, 2.0) as f32).collect();
    Case {
        name: name.into(),
        spec,
        rows,
        classes,
        spatial: 1,
        logits,
        labels,
        probs: None,
        weights: None,
        upstream,
    }
}

/// Every convention and feature that makes sense across shards, at `classes` classes. The
/// excluded class sits in the first, a middle and the last shard of most layouts.
pub fn cases(rows: u32, classes: u32) -> Vec<Case> {
    let k = classes;
    let base = LossSpec::default();
    let mut v = vec![
        case("plain mean", base, rows, k, 1),
        case("pytorch 0.1", LossSpec::pytorch(0.1), rows, k, 2),
        case(
            "off_target 0.2 sum",
            base.with_smoothing(Smoothing::OffTarget(0.2))
                .with_reduction(Reduction::Sum),
            rows,
            k,
            3,
        ),
        case(
            "explicit + excluded 0, none",
            base.with_smoothing(Smoothing::Explicit { on: 0.7, off: 0.01 })
                .with_excluded_class(Some(0))
                .with_reduction(Reduction::None),
            rows,
            k,
            4,
        ),
        case(
            "uniform + excluded middle + z-loss",
            LossSpec::pytorch(0.3)
                .with_excluded_class(Some(k / 2))
                .with_z_loss(1e-3),
            rows,
            k,
            5,
        ),
        case(
            "off_target + excluded last + softcap + scale",
            base.with_smoothing(Smoothing::OffTarget(0.1))
                .with_excluded_class(Some(k - 1))
                .with_softcap(Some(5.0))
                .with_logit_scale(0.7),
            rows,
            k,
            6,
        ),
    ];
    let mut weighted = case("weighted pytorch 0.2", LossSpec::pytorch(0.2), rows, k, 7);
    weighted.weights = Some(Rng::new(8).weights(k as usize));
    v.push(weighted);
    let mut probs = case(
        "probabilities uniform 0.1 + weights",
        LossSpec::pytorch(0.1),
        rows,
        k,
        9,
    );
    probs.probs = Some(Rng::new(10).probabilities(rows as usize, k as usize, false));
    probs.weights = Some(Rng::new(11).weights(k as usize));
    v.push(probs);
    v
}

/// Uneven layouts of `classes` for P = 1..=8, each with a one-class shard from P = 2 on.
pub fn layouts(classes: u32) -> Vec<ShardLayout> {
    (1..=8usize)
        .map(|p| {
            if p == 1 {
                return ShardLayout::from_widths(&[classes]).unwrap();
            }
            // One class, then growing widths, the rest in the last shard.
            let mut widths = vec![1u32];
            let mut used = 1;
            for i in 1..p - 1 {
                let w = ((classes - used) / (p - i) as u32).max(1) + i as u32 % 3;
                let w = w.min(classes - used - (p - 1 - i) as u32);
                widths.push(w);
                used += w;
            }
            widths.push(classes - used);
            // Rotate so that the one-class shard is not always first.
            widths.rotate_left(p / 2);
            ShardLayout::from_widths(&widths).unwrap()
        })
        .collect()
}

/// `|a - b| <= tol` elementwise, NaN matching NaN and infinities equal; returns the largest
/// `|a - b| / tol`.
pub fn close(what: &str, got: &[f64], want: &[f64], tol: impl Fn(usize) -> f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() || w.is_nan() || g.is_infinite() || w.is_infinite() {
            assert!(
                (g.is_nan() && w.is_nan()) || g == w,
                "{what}[{i}]: {g} vs {w}"
            );
            continue;
        }
        let t = tol(i);
        if g == w {
            continue;
        }
        let ratio = (g - w).abs() / t;
        assert!(ratio <= 1.0, "{what}[{i}]: {g} vs {w} (tolerance {t:e})");
        worst = worst.max(ratio);
    }
    worst
}
