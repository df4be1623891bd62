//! The logits' shape.

use crate::error::{LsceError, Result};

/// The shape of the logits: `[batch, classes, spatial]`, class dimension 1, row-major.
///
/// A plain `[rows, classes]` matrix has `spatial = 1`. PyTorch's `[N, C, d1, .., dk]` has
/// `batch = N`, `spatial = d1 * .. * dk`; element `(n, c, s)` is at `(n * C + c) * spatial + s`.
/// A *row* is one `(n, s)` position, flattened as `n * spatial + s`; targets, per-row losses and
/// the log-sum-exp are indexed by row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    batch: u32,
    classes: u32,
    spatial: u32,
}

impl Shape {
    /// A `[rows, classes]` matrix.
    ///
    /// ```
    /// let s = lsce::Shape::matrix(3, 5).unwrap();
    /// assert_eq!((s.rows(), s.classes(), s.elements()), (3, 5, 15));
    /// ```
    pub fn matrix(rows: u32, classes: u32) -> Result<Self> {
        Self::new(rows, classes, 1)
    }

    /// PyTorch's `[N, C, d1, .., dk]` layout with the classes in dimension 1.
    ///
    /// ```
    /// let s = lsce::Shape::class_dim1(&[2, 21, 4, 4]).unwrap();
    /// assert_eq!((s.rows(), s.classes(), s.spatial()), (32, 21, 16));
    /// ```
    pub fn class_dim1(dims: &[usize]) -> Result<Self> {
        if dims.len() < 2 {
            return Err(LsceError::Unsupported(
                "a logits shape needs at least two dimensions [N, C, ..]",
            ));
        }
        let to_u32 =
            |v: usize, what| u32::try_from(v).map_err(|_| LsceError::ShapeTooLarge { what });
        let mut spatial: u64 = 1;
        for &d in &dims[2..] {
            spatial = spatial.saturating_mul(d as u64);
        }
        let spatial = u32::try_from(spatial).map_err(|_| LsceError::ShapeTooLarge {
            what: "product of the extra dimensions exceeds u32",
        })?;
        Self::new(
            to_u32(dims[0], "batch exceeds u32")?,
            to_u32(dims[1], "classes exceed u32")?,
            spatial,
        )
    }

    /// `[batch, classes, spatial]` directly.
    pub fn new(batch: u32, classes: u32, spatial: u32) -> Result<Self> {
        if batch == 0 || classes == 0 || spatial == 0 {
            return Err(LsceError::EmptyShape);
        }
        let rows = u64::from(batch) * u64::from(spatial);
        if rows > u64::from(u32::MAX) {
            return Err(LsceError::ShapeTooLarge {
                what: "rows (batch * spatial) exceed u32",
            });
        }
        Ok(Self {
            batch,
            classes,
            spatial,
        })
    }

    /// `N`.
    pub fn batch(&self) -> u32 {
        self.batch
    }

    /// `C`, also called `K`.
    pub fn classes(&self) -> u32 {
        self.classes
    }

    /// `d1 * .. * dk`, 1 for a matrix.
    pub fn spatial(&self) -> u32 {
        self.spatial
    }

    /// `batch * spatial`: the number of (sample, position) rows.
    pub fn rows(&self) -> u32 {
        self.batch * self.spatial
    }

    /// `rows * classes`.
    pub fn elements(&self) -> u64 {
        u64::from(self.rows()) * u64::from(self.classes)
    }

    /// Index of logit `(row, class)` in the flat buffer.
    pub fn index(&self, row: u32, class: u32) -> u64 {
        let (n, s) = (row / self.spatial, row % self.spatial);
        (u64::from(n) * u64::from(self.classes) + u64::from(class)) * u64::from(self.spatial)
            + u64::from(s)
    }
}
