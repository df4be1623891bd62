//! Row windows and binding ranges: inputs larger than one storage binding are processed in
//! *windows* of whole batch items, each bound as sub-ranges of the caller's buffers small
//! enough for `max_storage_buffer_binding_size`.

use crate::batch::TargetKind;
use crate::buffers::{Region, Regions, WORD};
use crate::error::{LsceError, Result};
use crate::layout::{Indexing, Slot, CHUNK_ROWS};
use crate::problem::{Gradient, Problem};
use crate::shape::Shape;

/// Bytes of a `vec4<f32>` unit.
const VEC4: u64 = 16;

/// A contiguous range of batch items processed by one set of dispatches, small enough that
/// every binding fits `max_storage_buffer_binding_size`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub first_item: u64,
    pub items: u64,
    pub first_row: u64,
    pub rows: u32,
    /// The window's first partial slot (setup and finalize passes).
    pub chunk_base: u32,
}

impl Window {
    /// Partial slots of this window.
    pub fn chunks(&self) -> u32 {
        self.rows.div_ceil(CHUNK_ROWS)
    }
}

/// The windows of `problem` on a device with `limits`, and the partial slots of all of them.
pub(crate) fn row_windows(problem: &Problem, limits: &wgpu::Limits) -> Result<(Vec<Window>, u32)> {
    let shape = problem.shape;
    let max_binding = problem
        .max_binding_bytes
        .map_or(limits.max_storage_buffer_binding_size, |b| {
            b.min(limits.max_storage_buffer_binding_size)
        });
    let align = u64::from(limits.min_storage_buffer_offset_alignment);
    // The widest element-indexed binding decides how many batch items a window holds.
    let widest = [
        Some(problem.dtype.bytes()),
        (problem.gradient == Gradient::Separate).then(|| problem.grad_dtype().bytes()),
        (problem.targets == TargetKind::Probabilities).then_some(WORD),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(WORD);
    let elements_bytes = shape.elements() * widest;
    if elements_bytes > limits.max_buffer_size {
        return Err(LsceError::ExceedsDeviceLimit {
            limit: "max_buffer_size",
            needed: elements_bytes,
            available: limits.max_buffer_size,
        });
    }
    // One batch item (classes * spatial logits) must fit one binding, with room for the
    // alignment slack of an arbitrary offset.
    let item_bytes = u64::from(shape.classes()) * u64::from(shape.spatial()) * widest;
    let usable = max_binding.saturating_sub(align);
    if item_bytes > usable {
        return Err(LsceError::ExceedsDeviceLimit {
            limit: "max_storage_buffer_binding_size",
            needed: item_bytes + align,
            available: max_binding,
        });
    }
    let items_per_window = usable / item_bytes;
    let mut windows = Vec::new();
    let mut chunks = 0u32;
    let mut first_item = 0u64;
    let batch = u64::from(shape.batch());
    while first_item < batch {
        let items = items_per_window.min(batch - first_item);
        let window = Window {
            first_item,
            items,
            first_row: first_item * u64::from(shape.spatial()),
            rows: (items * u64::from(shape.spatial())) as u32,
            chunk_base: chunks,
        };
        chunks += window.chunks();
        windows.push(window);
        first_item += items;
    }
    Ok((windows, chunks))
}

/// A bound sub-range of a buffer and the element offset (`*_base`) of the window's data in it.
pub(crate) struct BoundRange<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
    pub base: u32,
}

/// One window's ranges, by [`Slot`].
pub(crate) struct BoundWindow<'a> {
    pub ranges: Vec<BoundRange<'a>>,
}

impl BoundWindow<'_> {
    /// The element offset of the window's data in `slot`'s range.
    pub fn base(&self, slot: Slot) -> u32 {
        self.ranges[slot as usize].base
    }
}

/// Buffers bound where a problem has no such input or output (never read or written: the
/// pipeline's switches turn them off).
pub(crate) struct Placeholders<'a> {
    pub read: &'a wgpu::Buffer,
    pub write: &'a wgpu::Buffer,
}

impl<'a> Regions<'a> {
    /// Whether the logits (and a separate gradient) can be bound as `vec4` arrays: their
    /// offsets agree modulo 16 bytes (so units line up) and each buffer extends to the next
    /// 16-byte boundary after its region (so the last unit is addressable).
    pub fn allow_wide(&self) -> bool {
        let fits = |r: &Region<'_>| {
            r.offset + (r.elems * r.elem_bytes).next_multiple_of(VEC4) <= r.buffer.size()
        };
        let Some(logits) = self.get(Slot::Logits) else {
            return false;
        };
        fits(&logits)
            && self
                .get(Slot::Grad)
                .is_none_or(|g| fits(&g) && g.offset % VEC4 == logits.offset % VEC4)
    }

    /// The ranges of window `w`: each region's part that the window reads or writes, aligned
    /// down to the device's offset alignment (`base` counts the elements in front), and whole
    /// units at the end when bound `wide`.
    pub fn bind(
        &self,
        w: &Window,
        shape: &Shape,
        limits: &wgpu::Limits,
        wide: bool,
        placeholders: &Placeholders<'a>,
    ) -> BoundWindow<'a> {
        let align = u64::from(limits.min_storage_buffer_offset_alignment);
        let k = u64::from(shape.classes());
        let per_item_rows = u64::from(shape.spatial());
        let elements = (
            w.first_item * per_item_rows * k,
            w.items * per_item_rows * k,
        );
        let ranges = Slot::ALL
            .into_iter()
            .map(|slot| {
                let indexing = slot.info().indexing;
                let Some(r) = self.get(slot) else {
                    let buffer = if slot.info().writable {
                        placeholders.write
                    } else {
                        placeholders.read
                    };
                    return BoundRange {
                        buffer,
                        offset: 0,
                        size: buffer.size(),
                        base: 0,
                    };
                };
                let (first, count) = match indexing {
                    _ if r.elems == 1 => (0, 1),
                    Indexing::Elements => elements,
                    Indexing::Rows if r.elems == u64::from(shape.rows()) => {
                        (w.first_row, u64::from(w.rows))
                    }
                    // Probability targets: indexed like the logits.
                    Indexing::Rows => elements,
                    Indexing::Whole => (0, r.elems),
                };
                let start = r.offset + first * r.elem_bytes;
                let offset = start / align * align;
                let unit = if wide && indexing == Indexing::Elements {
                    VEC4
                } else {
                    WORD
                };
                let end = (start + count * r.elem_bytes).next_multiple_of(unit);
                BoundRange {
                    buffer: r.buffer,
                    offset,
                    size: end - offset,
                    base: ((start - offset) / r.elem_bytes) as u32,
                }
            })
            .collect();
        BoundWindow { ranges }
    }
}
