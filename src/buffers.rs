//! The caller's buffers for one encode, and their validation against a problem.

use crate::batch::TargetKind;
use crate::error::{LsceError, Result};
use crate::layout::{SharedLayout, Slot, Summary};
use crate::problem::{Gradient, Problem};
use crate::spec::Reduction;

/// Bytes of a 32-bit word, the unit of every binding's offset and size.
pub(crate) const WORD: u64 = 4;

/// The caller's buffers for one [`LossPlan::encode`](crate::LossPlan::encode). Each is a
/// `buffer.slice(offset..)` whose offset is a multiple of 4 and whose size covers what the
/// shape needs.
///
/// | field | holds | usage |
/// |---|---|---|
/// | `logits` | `rows * classes` of the problem's dtype (16-bit: padded to a 4-byte multiple) | `STORAGE` |
/// | `targets` | `rows` i32 labels, or `rows * classes` f32 probabilities | `STORAGE` |
/// | `weights` | `classes` f32, iff the problem is weighted | `STORAGE` |
/// | `upstream` | 1 f32 (`Sum`/`Mean`) or `rows` f32 (`None`), iff the problem has one | `STORAGE` |
/// | `loss` | `rows` f32 for `None` (required); 1 f32 for `Sum`/`Mean` (optional copy) | `STORAGE` / `COPY_DST` |
/// | `lse` | `rows` f32, optional | `STORAGE` |
/// | `grad` | `rows * classes` of the gradient's dtype, iff `Gradient::Separate` | `STORAGE` |
/// | `summary` | a [`Summary`] (32 bytes) | `COPY_DST` |
#[derive(Clone, Copy, Debug)]
pub struct LossBuffers<'a> {
    /// Logits.
    pub logits: wgpu::BufferSlice<'a>,
    /// Class labels or probabilities.
    pub targets: wgpu::BufferSlice<'a>,
    /// Class weights.
    pub weights: Option<wgpu::BufferSlice<'a>>,
    /// Upstream gradient.
    pub upstream: Option<wgpu::BufferSlice<'a>>,
    /// Per-row loss (`None`) or a copy of the reduced loss.
    pub loss: Option<wgpu::BufferSlice<'a>>,
    /// Per-row log-sum-exp.
    pub lse: Option<wgpu::BufferSlice<'a>>,
    /// Gradient.
    pub grad: Option<wgpu::BufferSlice<'a>>,
    /// The summary.
    pub summary: wgpu::BufferSlice<'a>,
}

/// The setters of the loss's optional buffers (`weights`, `upstream`, `loss`, `lse`), on
/// [`LossBuffers`] and on each descriptor of buffers that has those fields (the fused linear
/// head's `LinearBuffers`), so that every loss takes them the same way.
macro_rules! loss_buffer_setters {
    ($buffers:ident) => {
        impl<'a> $buffers<'a> {
            #[doc = concat!("Sets [`", stringify!($buffers), "::weights`].")]
            pub fn with_weights(mut self, weights: wgpu::BufferSlice<'a>) -> Self {
                self.weights = Some(weights);
                self
            }

            #[doc = concat!("Sets [`", stringify!($buffers), "::upstream`].")]
            pub fn with_upstream(mut self, upstream: wgpu::BufferSlice<'a>) -> Self {
                self.upstream = Some(upstream);
                self
            }

            #[doc = concat!("Sets [`", stringify!($buffers), "::loss`].")]
            pub fn with_loss(mut self, loss: wgpu::BufferSlice<'a>) -> Self {
                self.loss = Some(loss);
                self
            }

            #[doc = concat!("Sets [`", stringify!($buffers), "::lse`].")]
            pub fn with_lse(mut self, lse: wgpu::BufferSlice<'a>) -> Self {
                self.lse = Some(lse);
                self
            }
        }
    };
}
pub(crate) use loss_buffer_setters;

loss_buffer_setters!(LossBuffers);

impl<'a> LossBuffers<'a> {
    /// The required buffers; the optional ones are added with the `with_*` methods.
    pub fn new(
        logits: wgpu::BufferSlice<'a>,
        targets: wgpu::BufferSlice<'a>,
        summary: wgpu::BufferSlice<'a>,
    ) -> Self {
        Self {
            logits,
            targets,
            weights: None,
            upstream: None,
            loss: None,
            lse: None,
            grad: None,
            summary,
        }
    }

    /// Sets [`LossBuffers::grad`].
    pub fn with_grad(mut self, grad: wgpu::BufferSlice<'a>) -> Self {
        self.grad = Some(grad);
        self
    }
}

/// A caller (or scratch) buffer region: `elems` elements of `elem_bytes` from `offset`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub elems: u64,
    pub elem_bytes: u64,
}

impl Region<'_> {
    /// Bytes the region spans, padded to whole 4-byte words (16-bit data is bound as words).
    pub fn bytes(&self) -> u64 {
        (self.elems * self.elem_bytes).next_multiple_of(WORD)
    }
}

/// The plan's own buffers, bound where the caller gives none.
pub(crate) struct Scratch<'a> {
    /// The control words (see src/layout.rs).
    pub control: &'a wgpu::Buffer,
    /// Per-row losses, for `Sum`/`Mean`.
    pub row_loss: Option<&'a wgpu::Buffer>,
    /// Per-row log-sum-exp, when the caller wants none.
    pub lse: &'a wgpu::Buffer,
}

/// The regions a plan binds, one per [`Slot`], `None` where the problem has no such input.
pub(crate) struct Regions<'a> {
    pub bound: [Option<Region<'a>>; 8],
}

impl<'a> Regions<'a> {
    /// The region of `slot`.
    pub fn get(&self, slot: Slot) -> Option<Region<'a>> {
        self.bound[slot as usize]
    }

    /// Checks the caller's buffers against `problem`: presence, usages, offsets, sizes,
    /// aliasing. Scratch stands in for the outputs the caller does not want.
    pub fn validate(problem: &Problem, b: &LossBuffers<'a>, scratch: Scratch<'a>) -> Result<Self> {
        let p = problem;
        let shape = p.shape;
        let rows = u64::from(shape.rows());
        let elements = shape.elements();
        let reduced = p.spec.reduction != Reduction::None;
        let storage = wgpu::BufferUsages::STORAGE;
        let copy_dst = wgpu::BufferUsages::COPY_DST;
        let weights = presence(Slot::Weights, b.weights, p.weighted)?;
        let upstream = presence(Slot::Upstream, b.upstream, p.upstream_grad)?;
        let grad = presence(Slot::Grad, b.grad, p.gradient == Gradient::Separate)?;
        // Per-row losses are required for `None` unless the plan has scratch for them (a
        // vocabulary shard's plans, src/shards, whose caller may not want them).
        let loss = if reduced || scratch.row_loss.is_some() {
            b.loss
        } else {
            presence(Slot::RowLoss, b.loss, true)?
        };
        let target_elems = match p.targets {
            TargetKind::Classes => rows,
            TargetKind::Probabilities => elements,
        };
        let words = |what, s, elems, usage| region(what, s, elems, WORD, usage);
        let logits = region("logits", b.logits, elements, p.dtype.bytes(), storage)?;
        let targets = words("targets", b.targets, target_elems, storage)?;
        let weights = weights
            .map(|s| words("weights", s, u64::from(shape.classes()), storage))
            .transpose()?;
        let upstream = upstream
            .map(|s| words("upstream", s, if reduced { 1 } else { rows }, storage))
            .transpose()?;
        let row_loss = match loss {
            Some(s) if reduced => {
                // A copy of the reduced loss: the kernels write per-row losses into scratch.
                words("loss", s, 1, copy_dst)?;
                None
            }
            Some(s) => Some(words("loss", s, rows, storage)?),
            None => None,
        };
        let lse = b.lse.map(|s| words("lse", s, rows, storage)).transpose()?;
        let grad = grad
            .map(|s| region("grad", s, elements, p.grad_dtype().bytes(), storage))
            .transpose()?;
        words("summary", b.summary, Summary::WORDS, copy_dst)?;

        let whole = |buffer: &'a wgpu::Buffer, elems| Region {
            buffer,
            offset: 0,
            elems,
            elem_bytes: WORD,
        };
        let row_loss = match (row_loss, scratch.row_loss) {
            (Some(r), _) => r,
            (None, Some(buffer)) => whole(buffer, rows),
            (None, None) => {
                return Err(LsceError::Device(
                    "a plan without per-row losses has no scratch for them".into(),
                ))
            }
        };
        let lse = lse.unwrap_or(whole(scratch.lse, rows));
        let control = whole(scratch.control, scratch.control.size() / WORD);
        let regions = Self {
            bound: [
                Some(logits),
                Some(targets),
                weights,
                upstream,
                Some(row_loss),
                Some(lse),
                grad,
                Some(control),
            ],
        };
        regions.check_aliasing(p.gradient == Gradient::InPlace)?;
        Ok(regions)
    }

    /// wgpu forbids a buffer bound both read-only and writable in one dispatch; two writable
    /// views of one buffer are allowed here only when they do not overlap.
    fn check_aliasing(&self, in_place: bool) -> Result<()> {
        let bound: Vec<(Slot, Region<'_>)> = Slot::ALL
            .into_iter()
            .filter_map(|s| Some((s, self.get(s)?)))
            .collect();
        for (i, &(sa, a)) in bound.iter().enumerate() {
            for &(sb, b) in &bound[i + 1..] {
                if a.buffer != b.buffer {
                    continue;
                }
                let (wa, wb) = (sa.writable(in_place), sb.writable(in_place));
                let overlap = a.offset < b.offset + b.bytes() && b.offset < a.offset + a.bytes();
                if wa != wb || (wa && overlap) {
                    return Err(LsceError::AliasedBuffers {
                        first: sa.info().arg,
                        second: sb.info().arg,
                    });
                }
            }
        }
        Ok(())
    }
}

/// `slice` if the problem wants the input of `slot` and it was given; an `Err` naming the
/// mismatch if one is given without the other.
fn presence<'a>(
    slot: Slot,
    slice: Option<wgpu::BufferSlice<'a>>,
    wanted: bool,
) -> Result<Option<wgpu::BufferSlice<'a>>> {
    match (slice, wanted) {
        (Some(s), true) => Ok(Some(s)),
        (None, false) => Ok(None),
        (None, true) => Err(LsceError::Unsupported(match slot {
            Slot::Weights => "the problem is weighted but no weights buffer was given",
            Slot::Upstream => "the problem has an upstream gradient but no buffer was given",
            Slot::Grad => "Gradient::Separate needs a grad buffer",
            _ => "Reduction::None needs a loss buffer for the per-row losses",
        })),
        (Some(_), false) => Err(LsceError::Unsupported(match slot {
            Slot::Weights => "a weights buffer was given but the problem is not weighted",
            Slot::Upstream => "an upstream buffer was given but the problem has none",
            _ => "a grad buffer was given but the problem's gradient is not Gradient::Separate",
        })),
    }
}

/// Checks one caller buffer: usage, offset alignment, size.
pub(crate) fn region<'a>(
    what: &'static str,
    s: wgpu::BufferSlice<'a>,
    elems: u64,
    elem_bytes: u64,
    usage: wgpu::BufferUsages,
) -> Result<Region<'a>> {
    if !s.buffer().usage().contains(usage) {
        return Err(LsceError::MissingUsage {
            what,
            usage: if usage == wgpu::BufferUsages::STORAGE {
                "STORAGE"
            } else {
                "COPY_DST"
            },
        });
    }
    if s.offset() % WORD != 0 {
        return Err(LsceError::MisalignedOffset {
            what,
            offset: s.offset(),
            alignment: WORD,
        });
    }
    let region = Region {
        buffer: s.buffer(),
        offset: s.offset(),
        elems,
        elem_bytes,
    };
    if s.size() < region.bytes() {
        return Err(LsceError::BufferTooSmall {
            what,
            needed: region.bytes(),
            available: s.size(),
        });
    }
    Ok(region)
}
