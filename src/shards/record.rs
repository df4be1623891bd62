//! What a shard publishes: one fixed-size record of partial statistics per row, behind a
//! header that names the problem and the shard.
//!
//! A shard's record block is `HEADER_BYTES + rows * RECORD_BYTES` bytes: a `ShardHeader`, then
//! one `ShardRecord` per row, little-endian 32-bit words, declared once in `src/layout.rs` (the
//! Rust structs here and the word constants of `shard_stats` in `shaders/rows.wgsl` come from
//! that one declaration):
//!
//! | header word | meaning |
//! |---|---|
//! | 0 | magic `0x5343_534c` ("LSCS") |
//! | 1, 2 | the [`ShardProblem::fingerprint`], low and high half |
//! | 3 | the shard's index (rank) `p` |
//! | 4 | the shard count `P` |
//! | 5 | rows |
//! | 6 | the shard's first class `c0` |
//! | 7 | f32: the shard's part of the mean's denominator, `sum w_y` over the valid rows whose label it holds (0 for probability targets) |
//!
//! | record word | type | meaning (over the shard's classes `c0 <= c < c1`, transformed logits `z`) |
//! |---|---|---|
//! | 0 | f32 | `m`: `max_c z_c` (the most negative finite f32 when all are `-inf`) |
//! | 1 | f32 | `s`: `sum_c exp(z_c - m)` |
//! | 2 | f32 | `shifted`: `sum_c a_c (m - z_c)`, every term from the shard's own max |
//! | 3 | f32 | `mass`: `sum_c a_c` |
//! | 4 | f32 | the first largest raw logit (with [`ShardProblem::accuracy`]; else `-inf`) |
//! | 5 | u32 | its global class (`u32::MAX` without) |
//! | 6 | i32 | the row's class label (0 for probability targets) |
//! | 7 | u32 | bits 0-1: the row's [`RowKind`]; bit 2: the shard holds the label |
//!
//! 32 bytes per row and shard, whatever `K`; `P * 32` bytes per row gathered by every rank.

use crate::error::{LsceError, Result};
pub use crate::layout::RowKind;
use crate::layout::{
    ShardHeader, ShardRecord, SharedLayout, SHARD_HOLDS_LABEL, SHARD_KIND_MASK, SHARD_MAGIC,
};

use super::layout::ShardProblem;

/// Bytes of the header in front of a shard's records.
pub const HEADER_BYTES: usize = ShardHeader::WORDS as usize * 4;
/// Bytes of one row's record.
pub const RECORD_BYTES: usize = ShardRecord::WORDS as usize * 4;

/// One row's partial statistics over one shard (see the module table), in `f64` on the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartialRow {
    /// Row kind.
    pub kind: RowKind,
    /// `max_c z_c` over the shard (the most negative finite value when all are `-inf`).
    pub max: f64,
    /// `sum_c exp(z_c - max)`.
    pub sum_exp: f64,
    /// `sum_c a_c (max - z_c)`.
    pub shifted: f64,
    /// `sum_c a_c`.
    pub mass: f64,
    /// The first largest raw logit.
    pub argmax_value: f64,
    /// Its global class.
    pub argmax_class: u32,
    /// Whether this shard holds the row's class label.
    pub holds_label: bool,
    /// The row's class label (0 for probability targets).
    pub label: i32,
}

/// One shard's pass-1 output: its per-row records and its part of the mean's denominator.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardPartials {
    /// One record per row.
    pub rows: Vec<PartialRow>,
    /// `sum w_y` over the valid rows whose label this shard holds (`w = 1` without weights;
    /// 0 for probability targets, whose denominator is the row count).
    pub denominator: f64,
}

impl PartialRow {
    /// The record of an ignored or bad-label row: nothing else is read.
    pub fn unusable(kind: RowKind, label: i32) -> Self {
        Self {
            kind,
            max: f64::MIN,
            sum_exp: 0.0,
            shifted: 0.0,
            mass: 0.0,
            argmax_value: f64::NEG_INFINITY,
            argmax_class: u32::MAX,
            holds_label: false,
            label,
        }
    }
}

/// The header of shard `shard` of `problem`, with denominator 0 (pass 1 fills it in).
pub(crate) fn header(problem: &ShardProblem, shard: usize) -> ShardHeader {
    let fp = problem.fingerprint();
    ShardHeader {
        magic: SHARD_MAGIC,
        fingerprint_lo: fp as u32,
        fingerprint_hi: (fp >> 32) as u32,
        shard: shard as u32,
        shards: problem.layout.shards() as u32,
        rows: problem.rows,
        class_begin: problem.layout.range(shard).start,
        denominator: 0.0,
    }
}

/// `v` as an f32 the kernels would hold: the most negative finite f32 stands for a max of a
/// row of `-inf`, as the kernels' online max starts there.
pub(crate) fn max_f32(v: f64) -> f32 {
    if v < f64::from(f32::MIN) {
        f32::MIN
    } else {
        v as f32
    }
}

/// Shard `shard`'s record block: the header, then one record per row (narrowed to `f32`).
pub fn encode(problem: &ShardProblem, shard: usize, partials: &ShardPartials) -> Result<Vec<u8>> {
    problem.layout.check_shard(shard)?;
    let rows = &partials.rows;
    if rows.len() != problem.rows as usize {
        return Err(LsceError::LengthMismatch {
            what: "partial rows",
            expected: problem.rows as usize,
            actual: rows.len(),
        });
    }
    let mut bytes = Vec::with_capacity(HEADER_BYTES + rows.len() * RECORD_BYTES);
    let head = ShardHeader {
        denominator: partials.denominator as f32,
        ..header(problem, shard)
    };
    bytes.extend_from_slice(bytemuck::bytes_of(&head));
    for r in rows {
        let record = ShardRecord {
            max: max_f32(r.max),
            sum_exp: r.sum_exp as f32,
            shifted: r.shifted as f32,
            mass: r.mass as f32,
            argmax_value: (r.argmax_value as f32).to_bits(),
            argmax_class: r.argmax_class,
            label: r.label,
            flags: r.kind as u32 | if r.holds_label { SHARD_HOLDS_LABEL } else { 0 },
        };
        bytes.extend_from_slice(bytemuck::bytes_of(&record));
    }
    Ok(bytes)
}

/// Reads shard `shard`'s record block, checking its header against `problem`: another plan's
/// records (fingerprint), another shard's, another row count or a truncated block is an `Err`.
pub fn decode(problem: &ShardProblem, shard: usize, bytes: &[u8]) -> Result<ShardPartials> {
    problem.layout.check_shard(shard)?;
    let expected_len = HEADER_BYTES + problem.rows as usize * RECORD_BYTES;
    if bytes.len() != expected_len {
        return Err(LsceError::ForeignRecords {
            shard,
            reason: "the block's length is not header + rows * 32 bytes of this problem",
        });
    }
    let got: ShardHeader = bytemuck::pod_read_unaligned(&bytes[..HEADER_BYTES]);
    let want = header(problem, shard);
    let reason = if got.magic != want.magic {
        Some("no record magic: not a record block")
    } else if (got.fingerprint_lo, got.fingerprint_hi) != (want.fingerprint_lo, want.fingerprint_hi)
    {
        Some("the fingerprint is another problem's")
    } else if got.shard != want.shard {
        Some("the block is another shard's (rank order)")
    } else if got.shards != want.shards {
        Some("the block is from a layout with another shard count")
    } else if got.rows != want.rows {
        Some("the block has another row count")
    } else if got.class_begin != want.class_begin {
        Some("the block covers other classes")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Err(LsceError::ForeignRecords { shard, reason });
    }
    Ok(ShardPartials {
        rows: decode_rows(shard, &bytes[HEADER_BYTES..])?,
        denominator: f64::from(got.denominator),
    })
}

/// Reads the records of a block without its header (`bytes`: `rows * RECORD_BYTES`); `shard`
/// names the block in errors.
pub(crate) fn decode_rows(shard: usize, bytes: &[u8]) -> Result<Vec<PartialRow>> {
    bytes
        .chunks_exact(RECORD_BYTES)
        .map(|chunk| {
            let r: ShardRecord = bytemuck::pod_read_unaligned(chunk);
            let kind =
                RowKind::from_code(r.flags & SHARD_KIND_MASK).ok_or(LsceError::ForeignRecords {
                    shard,
                    reason: "a record has an unknown row kind",
                })?;
            Ok(PartialRow {
                kind,
                max: f64::from(r.max),
                sum_exp: f64::from(r.sum_exp),
                shifted: f64::from(r.shifted),
                mass: f64::from(r.mass),
                argmax_value: f64::from(f32::from_bits(r.argmax_value)),
                argmax_class: r.argmax_class,
                holds_label: r.flags & SHARD_HOLDS_LABEL != 0,
                label: r.label,
            })
        })
        .collect()
}
