//! Which classes each shard holds, and the problem every shard of one step agrees on.

use std::ops::Range;

use crate::error::{LsceError, Result};
use crate::{LossSpec, Reduction, Shape, Smoothing, TargetKind, TargetValues, Targets};

/// The split of `[0, classes)` into shards, in rank order: shard `p` holds the classes
/// `ranges[p]`, and the ranges tile `[0, classes)` exactly, ascending. Widths may differ and
/// may be as small as one class.
///
/// ```
/// use lsce::shards::ShardLayout;
/// let layout = ShardLayout::new(10, &[0..3, 3..4, 4..10]).unwrap();
/// assert_eq!((layout.shards(), layout.width(1), layout.shard_of(7)), (3, 1, Some(2)));
/// assert!(ShardLayout::new(10, &[0..3, 4..10]).is_err()); // a gap
/// assert!(ShardLayout::new(10, &[0..5, 4..10]).is_err()); // an overlap
/// assert_eq!(ShardLayout::even(10, 4).unwrap().range(3), 8..10); // widths 3, 3, 2, 2
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShardLayout {
    classes: u32,
    /// `bounds[p]..bounds[p + 1]` is shard `p`'s range; `bounds[0] = 0`, last = `classes`.
    bounds: Vec<u32>,
}

impl ShardLayout {
    /// The layout with the given class ranges, in rank order. A gap, an overlap, an empty
    /// range or a range past `classes` is an `Err` naming the shard.
    pub fn new(classes: u32, ranges: &[Range<u32>]) -> Result<Self> {
        if classes == 0 || ranges.is_empty() {
            return Err(LsceError::EmptyShape);
        }
        let mut bounds = vec![0];
        for (shard, range) in ranges.iter().enumerate() {
            let expected = bounds[shard];
            if range.start != expected || range.end <= range.start || range.end > classes {
                return Err(LsceError::ShardTiling {
                    shard,
                    range: range.clone(),
                    expected_start: expected,
                    classes,
                });
            }
            bounds.push(range.end);
        }
        if bounds[ranges.len()] != classes {
            return Err(LsceError::ShardTiling {
                shard: ranges.len(),
                range: classes..classes,
                expected_start: bounds[ranges.len()],
                classes,
            });
        }
        Ok(Self { classes, bounds })
    }

    /// Consecutive shards of the given widths (each at least 1).
    pub fn from_widths(widths: &[u32]) -> Result<Self> {
        let mut ranges = Vec::with_capacity(widths.len());
        let mut start = 0u32;
        for &w in widths {
            let end = start.checked_add(w).ok_or(LsceError::ShapeTooLarge {
                what: "shard widths exceed u32 classes",
            })?;
            ranges.push(start..end);
            start = end;
        }
        Self::new(start, &ranges)
    }

    /// `shards` shards as equal as possible (the first `classes % shards` one class wider),
    /// Megatron's split when `shards` divides `classes`.
    pub fn even(classes: u32, shards: usize) -> Result<Self> {
        let p = u32::try_from(shards).map_err(|_| LsceError::ShapeTooLarge {
            what: "shard count exceeds u32",
        })?;
        if p == 0 || p > classes {
            return Err(LsceError::Unsupported(
                "an even layout needs between 1 and `classes` shards",
            ));
        }
        let widths: Vec<u32> = (0..p)
            .map(|i| classes / p + u32::from(i < classes % p))
            .collect();
        Self::from_widths(&widths)
    }

    /// `shards` uneven shards, shard `p`'s width proportional to `p + 1` (`K (p + 1) / sum`,
    /// rounded down; the last takes the rest): a layout where every shard differs, as the
    /// examples and benches use.
    ///
    /// ```
    /// let layout = lsce::shards::ShardLayout::ramp(1000, 4)?;
    /// assert_eq!((0..4).map(|p| layout.width(p)).collect::<Vec<_>>(), [100, 200, 300, 400]);
    /// # Ok::<(), lsce::LsceError>(())
    /// ```
    ///
    /// Errors: no shards, or a shard that would be empty (fewer classes than the ramp needs).
    pub fn ramp(classes: u32, shards: usize) -> Result<Self> {
        if shards == 0 {
            return Err(LsceError::EmptyShape);
        }
        let total = (shards as u64) * (shards as u64 + 1) / 2;
        let mut widths: Vec<u32> = (1..=shards as u64)
            .map(|p| (u64::from(classes) * p / total) as u32)
            .collect();
        let used: u32 = widths[..shards - 1].iter().sum();
        widths[shards - 1] = classes - used;
        Self::from_widths(&widths)
    }

    /// `K`, the global class count.
    pub fn classes(&self) -> u32 {
        self.classes
    }

    /// `P`, the number of shards.
    pub fn shards(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Shard `shard`'s classes `[c0, c1)`.
    ///
    /// # Panics
    /// When `shard >= self.shards()`.
    pub fn range(&self, shard: usize) -> Range<u32> {
        self.bounds[shard]..self.bounds[shard + 1]
    }

    /// Shard `shard`'s class count `c1 - c0`.
    pub fn width(&self, shard: usize) -> u32 {
        self.bounds[shard + 1] - self.bounds[shard]
    }

    /// The shard holding class `class`, if it is one.
    pub fn shard_of(&self, class: u32) -> Option<usize> {
        (class < self.classes).then(|| self.bounds.partition_point(|&b| b <= class) - 1)
    }

    /// Checks that `shard` is a shard of this layout.
    pub(crate) fn check_shard(&self, shard: usize) -> Result<()> {
        if shard >= self.shards() {
            return Err(LsceError::RankCount {
                expected: self.shards(),
                actual: shard + 1,
            });
        }
        Ok(())
    }
}

/// Everything the shards of one step agree on: the loss, the row count, the layout and which
/// inputs exist. Its [`fingerprint`](ShardProblem::fingerprint) goes into every record, so
/// that records of another problem are rejected by the merge.
///
/// The loss is PyTorch's over the **global** class count `K`: smoothing values, the excluded
/// class and the label range are those of the unsharded `[rows, K]` problem.
///
/// ```
/// use lsce::shards::{ShardLayout, ShardProblem};
/// use lsce::LossSpec;
/// let a = ShardProblem::new(LossSpec::pytorch(0.1), 4, ShardLayout::even(100, 2).unwrap());
/// let b = ShardProblem::new(LossSpec::pytorch(0.1), 4, ShardLayout::even(100, 4).unwrap());
/// assert_ne!(a.fingerprint(), b.fingerprint());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ShardProblem {
    /// The loss over all `K` classes.
    pub spec: LossSpec,
    /// Rows of every shard: `N * spatial` (`[rows, c1 - c0]` logits each for a matrix,
    /// `[N, c1 - c0, d1, .., dk]` for PyTorch's class-dimension-1 layout).
    pub rows: u32,
    /// `d1 * .. * dk` of `[N, K, d1, .., dk]` logits split along dimension 1, 1 for a
    /// `[rows, K]` matrix: each shard's logits are `[N, c1 - c0, d1, .., dk]`, row `n * spatial
    /// + s` being position `(n, s)`, as [`Shape`] lays them out.
    pub spatial: u32,
    /// Which classes each shard holds.
    pub layout: ShardLayout,
    /// Class labels (every rank holds all `rows` global labels) or probabilities (each shard
    /// holds its `[rows, c1 - c0]` slice).
    pub targets: TargetKind,
    /// Whether class weights exist (each shard holds its `c1 - c0` slice).
    pub weighted: bool,
    /// Whether to count the rows whose argmax (the first maximum by global class) is the label
    /// (class labels only): pass 1 then also tracks each shard's argmax.
    pub accuracy: bool,
}

impl ShardProblem {
    /// `[rows, K]` logits split by class; class labels, no weights.
    pub fn new(spec: LossSpec, rows: u32, layout: ShardLayout) -> Self {
        Self {
            spec,
            rows,
            spatial: 1,
            layout,
            targets: TargetKind::Classes,
            weighted: false,
            accuracy: false,
        }
    }

    /// Logits of the global `shape` (`[rows, K]`, or `[N, K, d1, .., dk]` from
    /// [`Shape::class_dim1`]) split along the class dimension by `layout`; class labels, no
    /// weights. `Err` when the layout's class count is not the shape's.
    ///
    /// ```
    /// use lsce::shards::{ShardLayout, ShardProblem};
    /// use lsce::{LossSpec, Shape};
    /// let shape = Shape::class_dim1(&[2, 10, 3, 4])?;
    /// let layout = ShardLayout::even(10, 2)?;
    /// let problem = ShardProblem::for_shape(LossSpec::pytorch(0.1), shape, layout)?;
    /// assert_eq!(problem.shard_shape(1)?, Shape::class_dim1(&[2, 5, 3, 4])?);
    /// # Ok::<(), lsce::LsceError>(())
    /// ```
    pub fn for_shape(spec: LossSpec, shape: Shape, layout: ShardLayout) -> Result<Self> {
        if shape.classes() != layout.classes() {
            return Err(LsceError::LengthMismatch {
                what: "layout classes",
                expected: shape.classes() as usize,
                actual: layout.classes() as usize,
            });
        }
        Ok(Self {
            spatial: shape.spatial(),
            ..Self::new(spec, shape.rows(), layout)
        })
    }

    /// Shard `shard`'s part of the logits: `[N, c1 - c0, spatial]`.
    pub fn shard_shape(&self, shard: usize) -> Result<Shape> {
        self.layout.check_shard(shard)?;
        if self.spatial == 0 || !self.rows.is_multiple_of(self.spatial) {
            return Err(LsceError::InvalidParameter {
                name: "spatial",
                value: self.spatial as f32,
                expected: "a divisor of rows (rows = N * spatial)",
            });
        }
        Shape::new(
            self.rows / self.spatial,
            self.layout.width(shard),
            self.spatial,
        )
    }

    /// Sets [`ShardProblem::targets`].
    pub fn with_targets(mut self, targets: TargetKind) -> Self {
        self.targets = targets;
        self
    }

    /// Sets [`ShardProblem::accuracy`].
    pub fn with_accuracy(mut self, accuracy: bool) -> Self {
        self.accuracy = accuracy;
        self
    }

    /// Sets [`ShardProblem::weighted`].
    pub fn with_weighted(mut self, weighted: bool) -> Self {
        self.weighted = weighted;
        self
    }

    /// Checks the spec against the global class count and resolves the target values.
    pub fn validate(&self) -> Result<TargetValues> {
        if self.rows == 0 {
            return Err(LsceError::EmptyShape);
        }
        self.shard_shape(0)?;
        if self.accuracy && self.targets == TargetKind::Probabilities {
            return Err(LsceError::Unsupported("accuracy needs class-label targets"));
        }
        self.spec.resolve(self.layout.classes())
    }

    /// Checks that a rank's inputs are of the problem's kind: its targets of
    /// [`ShardProblem::targets`]' kind, its class weights given exactly when
    /// [`ShardProblem::weighted`].
    pub(crate) fn check_kinds(&self, targets: &Targets<'_>, weights: bool) -> Result<()> {
        if targets.kind() != self.targets {
            return Err(LsceError::Unsupported(
                "the shard's targets are not of the problem's target kind",
            ));
        }
        if weights != self.weighted {
            return Err(LsceError::Unsupported(
                "shard weights must be given exactly when the problem is weighted",
            ));
        }
        Ok(())
    }

    /// A 64-bit FNV-1a hash of everything that changes a record's meaning: the spec, the rows,
    /// the layout, the target kind, whether weights exist and whether accuracy is counted.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint_with(&[])
    }

    /// [`fingerprint`](Self::fingerprint) with `extra` words hashed after it: what a caller's
    /// ranks must agree on besides the records' problem (the linear head's hidden size).
    pub(crate) fn fingerprint_with(&self, extra: &[u32]) -> u64 {
        let mut h = Fnv::default();
        let s = &self.spec;
        let (kind, a, b) = match s.smoothing {
            Smoothing::Uniform(eps) => (0, eps, 0.0),
            Smoothing::OffTarget(eps) => (1, eps, 0.0),
            Smoothing::Explicit { on, off } => (2, on, off),
        };
        h.word(kind);
        h.word(a.to_bits());
        h.word(b.to_bits());
        h.word(s.ignore_index.map_or(0, |_| 1));
        h.word(s.ignore_index.unwrap_or(0) as u32);
        h.word(match s.reduction {
            Reduction::None => 0,
            Reduction::Sum => 1,
            Reduction::Mean => 2,
        });
        h.word(s.excluded_class.map_or(u32::MAX, |c| c));
        h.word(s.z_loss.to_bits());
        h.word(s.softcap.map_or(0, f32::to_bits));
        h.word(s.logit_scale.to_bits());
        h.word(self.rows);
        h.word(self.spatial);
        h.word(match self.targets {
            TargetKind::Classes => 0,
            TargetKind::Probabilities => 1,
        });
        h.word(u32::from(self.weighted));
        h.word(u32::from(self.accuracy));
        h.word(self.layout.shards() as u32);
        for &b in self.layout.bounds.iter().chain(extra) {
            h.word(b);
        }
        h.0
    }
}

/// FNV-1a, 64 bits: a fingerprint, not a defence against forgery.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn word(&mut self, w: u32) {
        for byte in w.to_le_bytes() {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
