//! What a shard publishes: one fixed-size record of partial statistics per row, behind a
//! header that names the problem and the shard.
//!
//! A shard's record block is `HEADER_BYTES + rows * RECORD_BYTES` bytes of little-endian
//! 32-bit words (what pass 1 writes on the GPU, what [`encode`] writes on the host):
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
//! | 2 | f32 | `shifted`: `sum_c a_c (m - z_c)`, every term from the shard's own max, so nothing cancels |
//! | 3 | f32 | `mass`: `sum_c a_c` |
//! | 4 | f32 | the first largest raw logit (token accuracy) |
//! | 5 | u32 | its global class index |
//! | 6 | i32 | the row's class label (0 for probability targets) |
//! | 7 | u32 | bits 0-1: the row's [`RowKind`]; bit 2: the shard holds the label |
//!
//! 32 bytes per row and shard, whatever `K`; `P * 32` bytes per row gathered by every rank.

use crate::error::{LsceError, Result};

use super::layout::ShardProblem;

/// Bytes of the header in front of a shard's records.
pub const HEADER_BYTES: usize = 32;
/// Bytes of one row's record.
pub const RECORD_BYTES: usize = 32;
/// 32-bit words of one row's record (`SHARD_RECORD_WORDS` in the shader).
pub const RECORD_WORDS: usize = RECORD_BYTES / 4;
/// The first header word.
pub const MAGIC: u32 = 0x5343_534c;

/// The header word holding the shard's part of the denominator.
const DENOMINATOR_WORD: usize = 7;
/// Bit 2 of record word 7.
const HOLDS_LABEL: u32 = 4;

/// What a row is, as every shard sees it from the replicated labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    /// Its loss and gradient are computed.
    Valid = 0,
    /// Its label is the ignore index: loss 0, gradient 0.
    Ignored = 1,
    /// Its label is outside `[0, K)`: loss and gradient NaN, reported by the merge.
    BadLabel = 2,
}

impl RowKind {
    fn from_bits(bits: u32) -> Option<Self> {
        match bits & 3 {
            0 => Some(Self::Valid),
            1 => Some(Self::Ignored),
            2 => Some(Self::BadLabel),
            _ => None,
        }
    }
}

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

/// The header words of shard `shard` of `problem`.
pub(crate) fn header(problem: &ShardProblem, shard: usize) -> [u32; HEADER_BYTES / 4] {
    let fp = problem.fingerprint();
    let range = problem.layout.range(shard);
    [
        MAGIC,
        fp as u32,
        (fp >> 32) as u32,
        shard as u32,
        problem.layout.shards() as u32,
        problem.rows,
        range.start,
        0,
    ]
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
    let mut words = Vec::with_capacity(HEADER_BYTES / 4 + rows.len() * RECORD_WORDS);
    words.extend(header(problem, shard));
    words[DENOMINATOR_WORD] = (partials.denominator as f32).to_bits();
    for r in rows {
        // The GPU's online max starts at the most negative finite f32, not -inf.
        let max = if r.max < f64::from(f32::MIN) {
            f32::MIN
        } else {
            r.max as f32
        };
        words.extend([
            max.to_bits(),
            (r.sum_exp as f32).to_bits(),
            (r.shifted as f32).to_bits(),
            (r.mass as f32).to_bits(),
            (r.argmax_value as f32).to_bits(),
            r.argmax_class,
            r.label as u32,
            r.kind as u32 | if r.holds_label { HOLDS_LABEL } else { 0 },
        ]);
    }
    Ok(bytemuck::cast_slice(&words).to_vec())
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
    let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    let expected = header(problem, shard);
    let reason = match (0..DENOMINATOR_WORD).find(|&i| word(i) != expected[i]) {
        None => None,
        Some(0) => Some("no record magic: not a record block"),
        Some(1 | 2) => Some("the fingerprint is another problem's"),
        Some(3) => Some("the block is another shard's (rank order)"),
        Some(4) => Some("the block is from a layout with another shard count"),
        Some(5) => Some("the block has another row count"),
        Some(_) => Some("the block covers other classes"),
    };
    if let Some(reason) = reason {
        return Err(LsceError::ForeignRecords { shard, reason });
    }
    let f = |i: usize| f64::from(f32::from_bits(word(i)));
    let rows = (0..problem.rows as usize)
        .map(|row| {
            let w = HEADER_BYTES / 4 + row * RECORD_WORDS;
            let flags = word(w + 7);
            let kind = RowKind::from_bits(flags).ok_or(LsceError::ForeignRecords {
                shard,
                reason: "a record has an unknown row kind",
            })?;
            Ok(PartialRow {
                kind,
                max: f(w),
                sum_exp: f(w + 1),
                shifted: f(w + 2),
                mass: f(w + 3),
                argmax_value: f(w + 4),
                argmax_class: word(w + 5),
                holds_label: flags & HOLDS_LABEL != 0,
                label: word(w + 6) as i32,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ShardPartials {
        rows,
        denominator: f(DENOMINATOR_WORD),
    })
}
