//! The bench's own row windows: its unfused kernels bind the rows of a large input in windows
//! that fit `max_storage_buffer_binding_size`, as the crate does for its own kernels (whose
//! windows are internal to it). The widest binding, the unfused baseline's f32 log_softmax,
//! decides how many rows a window holds in every dtype.

use lsce::{Dtype, Shape};

/// A contiguous range of rows whose bindings fit `max_storage_buffer_binding_size`.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub first_row: u32,
    pub rows: u32,
    /// Its rows in the buffers of the case's dtype: the logits and the gradient.
    pub data: Span,
    /// Its rows in the unfused baseline's f32 log_softmax (`data` again for f32).
    pub logsm: Span,
}

/// Where a window's rows lie in one buffer. The windows' aligned starts partition the buffer:
/// the streaming kernels cover `[offset, offset + stream_bytes)`, exactly up to the next
/// window's start, while the row kernels see their rows from element `base` of a binding
/// `[offset, offset + size)` that may extend past it.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub offset: u64,
    pub size: u64,
    pub base: u32,
    pub stream_bytes: u64,
}

/// Cuts the rows into windows whose bindings fit the device's (or `cap`'s) binding size.
pub fn windows(
    shape: Shape,
    dtype: Dtype,
    limits: &wgpu::Limits,
    cap: Option<u64>,
) -> Result<Vec<Window>, String> {
    let max_binding = cap.map_or(limits.max_storage_buffer_binding_size, |c| {
        c.min(limits.max_storage_buffer_binding_size)
    });
    let align = window_align(limits);
    // The f32 log_softmax is the widest binding in every dtype: it decides the rows per window.
    let rows_per_window = max_binding.saturating_sub(window_slack(limits))
        / (u64::from(shape.classes()) * Dtype::F32.bytes());
    if rows_per_window == 0 {
        return Err("one row exceeds the storage binding size".into());
    }
    let mut ranges = Vec::new();
    let mut first = 0u64;
    while first < u64::from(shape.rows()) {
        let rows = rows_per_window.min(u64::from(shape.rows()) - first);
        ranges.push((first, rows));
        first += rows;
    }
    // The windows' spans in a buffer of `elem` elements.
    let spans = |elem: Dtype| -> Vec<Span> {
        let row_bytes = u64::from(shape.classes()) * elem.bytes();
        let offsets: Vec<u64> = ranges
            .iter()
            .map(|&(first, _)| first * row_bytes / align * align)
            .collect();
        let total = tensor_buffer_bytes(shape, elem);
        ranges
            .iter()
            .zip(&offsets)
            .enumerate()
            .map(|(i, (&(first, rows), &offset))| {
                let next = offsets.get(i + 1).copied().unwrap_or(total);
                let end = ((first + rows) * row_bytes).next_multiple_of(16).max(next);
                Span {
                    offset,
                    size: end - offset,
                    base: ((first * row_bytes - offset) / elem.bytes()) as u32,
                    stream_bytes: next - offset,
                }
            })
            .collect()
    };
    Ok(ranges
        .iter()
        .zip(spans(dtype))
        .zip(spans(Dtype::F32))
        .map(|((&(first, rows), data), logsm)| Window {
            first_row: first as u32,
            rows: rows as u32,
            data,
            logsm,
        })
        .collect())
}

/// Window start alignment: the device's storage offset alignment, and whole vec4s.
fn window_align(limits: &wgpu::Limits) -> u64 {
    u64::from(limits.min_storage_buffer_offset_alignment).max(16)
}

/// What a window's binding needs beyond its rows: the start aligned down, the end rounded up.
pub fn window_slack(limits: &wgpu::Limits) -> u64 {
    window_align(limits) + 16
}

/// Bytes of one `rows x classes` buffer: rounded up to whole vec4s for the streaming kernels.
pub fn tensor_buffer_bytes(shape: Shape, dtype: Dtype) -> u64 {
    (shape.elements() * dtype.bytes()).next_multiple_of(16)
}
