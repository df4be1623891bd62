//! The row kernel's vocabulary, shared by the kernel object (which shapes and compiles it) and
//! the planner (which picks it for a problem): its shape, which kernel runs, and its passes.
//! It lives below both so that neither imports the other for it.

use crate::compose::{Family, Team};
use crate::problem::Gradient;

/// The row kernel's shape for one plan (see `KernelInner::row_shape`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RowShape {
    pub team: Team,
    pub workgroup: u32,
    pub rows_per_workgroup: u32,
    /// `CACHE_N`: register slots per invocation.
    pub cache: u32,
    /// Invocations in one team (the adapter's smallest subgroup, or the workgroup).
    pub team_size: u32,
    /// Units per row.
    pub units: u32,
}

impl RowShape {
    /// Parts to split each of `rows` rows into (see
    /// [`KernelConfig::min_row_teams`](crate::KernelConfig::min_row_teams)): enough for about
    /// `min_teams` teams, while every invocation keeps at least 16 units per part.
    pub fn split_parts(&self, rows: u32, min_teams: u32) -> u32 {
        const MIN_UNITS_PER_INVOCATION: u32 = 16;
        let most = self.units / (self.team_size * MIN_UNITS_PER_INVOCATION);
        min_teams.div_ceil(rows).min(most).max(1)
    }
}

/// Which row kernel a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowKernel {
    /// rows.wgsl: one team per row, or per part when `split_parts > 1`.
    Teams { shape: RowShape, split_parts: u32 },
    /// strided.wgsl: `[N, C, d..]` logits, one invocation per row.
    Strided,
}

/// One dispatch of the row kernel (per window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowPass {
    /// `rows_main`: the whole row (loss, lse, gradient) per team.
    Main,
    /// `split_stats`: each part's statistics into its [`SplitRecord`](crate::layout::SplitRecord).
    SplitStats,
    /// `split_finish`: per row, the parts' records merged in order.
    SplitFinish,
    /// `split_grad`: each part's gradient.
    SplitGrad,
    /// `strided_main`: the whole row per invocation.
    Strided,
    /// A vocabulary shard's pass 1 (src/shards).
    ShardStats,
    /// A vocabulary shard's pass 2 from host-merged rows.
    ShardGrad,
    /// A vocabulary shard's pass 2 merging all shards' records on the device.
    ShardMergeGrad,
    /// [`RowPass::ShardStats`] of `[N, C, d..]` logits (strided.wgsl).
    StridedShardStats,
    /// [`RowPass::ShardGrad`] of `[N, C, d..]` logits.
    StridedShardGrad,
    /// [`RowPass::ShardMergeGrad`] of `[N, C, d..]` logits.
    StridedShardMergeGrad,
}

impl RowPass {
    pub fn entry(self) -> &'static str {
        match self {
            RowPass::Main => "rows_main",
            RowPass::SplitStats => "split_stats",
            RowPass::SplitFinish => "split_finish",
            RowPass::SplitGrad => "split_grad",
            RowPass::Strided => "strided_main",
            RowPass::ShardStats => "shard_stats",
            RowPass::ShardGrad => "shard_grad",
            RowPass::ShardMergeGrad => "shard_merge_grad",
            RowPass::StridedShardStats => "strided_shard_stats",
            RowPass::StridedShardGrad => "strided_shard_grad",
            RowPass::StridedShardMergeGrad => "strided_shard_merge_grad",
        }
    }

    pub fn family(self) -> Family {
        match self {
            RowPass::Strided
            | RowPass::StridedShardStats
            | RowPass::StridedShardGrad
            | RowPass::StridedShardMergeGrad => Family::Strided,
            _ => Family::Rows,
        }
    }

    /// Whether it runs one team per part of a row rather than one per row.
    pub fn per_part(self) -> bool {
        matches!(self, RowPass::SplitStats | RowPass::SplitGrad)
    }
}

impl RowKernel {
    /// The row passes in dispatch order.
    pub fn passes(self, gradient: Gradient) -> Vec<RowPass> {
        match self {
            RowKernel::Strided => vec![RowPass::Strided],
            RowKernel::Teams { split_parts: 1, .. } => vec![RowPass::Main],
            RowKernel::Teams { .. } => {
                let mut passes = vec![RowPass::SplitStats, RowPass::SplitFinish];
                if gradient.is_some() {
                    passes.push(RowPass::SplitGrad);
                }
                passes
            }
        }
    }

    /// Parts per row.
    pub fn split_parts(self) -> u32 {
        match self {
            RowKernel::Teams { split_parts, .. } => split_parts,
            RowKernel::Strided => 1,
        }
    }
}
