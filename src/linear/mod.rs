//! # The fused linear head: `H W^T + b` and its label-smoothed loss without the logits
//!
//! For a language model the logits of `N` tokens over a `V`-word vocabulary are `N x V` floats
//! (8192 x 128256 in f32: 4.2 GB, the same again for their gradient) that the loss reads once.
//! This module computes what lsce computes from logits `z = H W^T + b` (`H [N, D]` hidden
//! states, `W [V, D]` in nn.Linear's layout, optional `b [V]`) — the loss, lse, summary, and the
//! gradients `dH [N, D]`, `dW [V, D]`, `db [V]` — with no `N x V` buffer, following PyTorch's
//! `F.linear_cross_entropy(input, linear_weight, target, linear_bias=, ..)` and every option
//! of [`LossSpec`](crate::LossSpec) (every smoothing convention, class weights, ignore_index,
//! z-loss, soft-cap, logit scale, reductions, upstream gradients, class labels and probability
//! targets, token accuracy).
//!
//! ```text
//! problem ─ LinearProblem::new(spec, N, D, V).with_bias(..).with_memory(..)
//! plan    ─ LinearPlan::new(&kernel, &problem)        pipelines, scratch (scratch_bytes())
//! bind    ─ plan.bind(&LinearBuffers::new(h, w, targets, summary).with_grads(dh, dw, db))
//! encode  ─ binding.encode(&mut encoder)              every step, no allocation
//! staging ─ kernel.compute_linear(&queue, &spec, &LinearBatch, &LinearOptions)
//! f64     ─ linear::cpu::compute(&spec, &LinearBatch, HeadGradients::All)
//! ```
//!
//! ## Passes, and what each moves (f32 inputs; `B = ceil(V / 512)` vocabulary blocks)
//!
//! | pass | owns | reads | writes | flops |
//! |---|---|---|---|---|
//! | setup (the loss's) | | labels, `4N` | denominator, label check | |
//! | `linear_stats` | a 64-row tile x a block | `H`, `W` tiles (each element `V/64` resp. `N/64` times, mostly cache) | one 32-byte record per row and block: `32 N B` (chunked: + the chunk's logits, `4 N V`) | `2 N V D` |
//! | `linear_merge` | a row | `32 B` per row | loss, lse, the row's 16-byte constants | |
//! | finalize (the loss's) | | `8N` | summary | |
//! | `linear_logit_grad` (chunked) | 4 logits | `4 N V` | `4 N V` (in place) | |
//! | `linear_grad_hidden` | a 64-row tile of `dH` (with `G` in memory: a 64 x 64 tile) | `H`, `W` (+ the chunk's `G`) | `dH`, once per vocabulary tile | `2 N V D` (+ `2 N V D` recomputing `z`) |
//! | `linear_grad_head` | a 64-entry tile of `dW` (with `G` in memory: 64 x 64), `db` | `H`, `W` (+ `G`) | `dW` once per row tile, `db` | `2 N V D` (+ `2 N V D`) |
//!
//! [`Memory::Recompute`] keeps no logits: five matmul-equivalents with every gradient
//! (three with a frozen head), scratch `32 N B + 24 N` bytes and a few hundred more, about
//! 1/64 of the logits' `4 N V`. [`Memory::Chunked`] keeps a chunk of rows' logits within the
//! caller's byte budget (a multiple of 64 rows) and turns them into their gradient in place:
//! three matmul-equivalents. With `G` in memory the product owners are 64 x 64 tiles (the rows
//! or entries times `D / 64` column tiles), since reading a `G` tile again costs little, so a
//! chunk of 64 rows still gives every core (or SM) work; recomputing `G` costs a matmul over
//! all of `D` per tile, so in recompute mode an owner takes all of `D` and `dH` has `N / 64`
//! owners. More would need vocabulary-split partials of `dH` (`4 N D` bytes each, summed in a
//! fixed order), which the 1/32 scratch allowance leaves little room for at the bench's shapes
//! (at 1024 x 1024 x 128256 the records take 8.2 of its 16.4 MB, and two `dH` partials, 4.2 MB
//! each, would pass it): for few rows on a GPU, chunked mode is the parallel one.
//!
//! ## Deterministic
//!
//! No float atomics: every output word has one owner that adds its terms in a fixed order. A
//! block's record is the vocabulary shards' [`record`](crate::shards::record) — inside one
//! device the blocks are shards, merged per row in block order as the shards are merged in
//! rank order. `dH`'s row tile is owned by the workgroup that walks every vocabulary tile in
//! order, `dW`'s vocabulary tile (and `db`) by the one that walks every row tile in order,
//! chunks one after another. The loss, lse, `dH`, `dW` and `db` are the same bits on every run.
//!
//! ## The matmul
//!
//! shaders/matmul.wgsl: 64 x 64 tiles per workgroup of 64 invocations, an 8 x 8 register
//! block each, the depth in steps of 16 through workgroup memory, the two operand tiles packed
//! so that the inner loop takes four `vec4` loads per 64 multiply-adds (a CPU adapter loads
//! workgroup memory lane by lane, so loads bound it: packing the tiles made the forward pass
//! 3.8x faster on lavapipe, and 8 x 8 blocks instead of 4 x 4 about 2.5x again), f32
//! accumulation for f32, f16 and bf16 inputs (16-bit inputs are decoded on load). 24 KiB of
//! workgroup memory (checked against the device's limit). The epilogue (bias, scale and
//! soft-cap, running max, sum of exp, target sums, argmax; or the gradient coefficient) runs on
//! the tile while it is in registers and workgroup memory.
//!
//! Two paths, the same bits. The portable one (shaders/matmul_portable.wgsl) needs nothing
//! but workgroup memory and runs on every backend. Where the kernel uses subgroups
//! ([`KernelConfig::use_subgroups`](crate::KernelConfig) and `Features::SUBGROUP`),
//! shaders/matmul_subgroups.wgsl replaces the reads that the eight invocations of a block row
//! make of the same eight rows of A (in the logits matmul) or of `G` (in the gradient
//! products): each reads one and `subgroupBroadcast` hands the eight around. That needs 8-lane
//! subgroups laid out in `local_invocation_index` order, which WGSL does not promise, so each
//! workgroup checks once and otherwise runs the portable loop. On lavapipe (8 lanes) the logits
//! matmul runs 1.10-1.16x faster and lsce's unfused head (one matmul, two products) 1.12-1.27x
//! (`--matmul` in `benches/linear.rs`); `tests/linear.rs` holds the two paths bitwise equal
//! and probes the layout. Wider subgroups (32 on NVIDIA) take the portable loop: a group
//! inside them would need `subgroupShuffle` from a computed lane, which ran 1.1x slower than
//! workgroup memory on lavapipe, and a GPU serves a workgroup-memory read of one address by
//! all lanes as one broadcast. Native f16 loads (`enable f16`, `array<f16>` bindings, with
//! `Features::SHADER_F16`) ran the f16 logits matmul 1.02-1.11x slower than reading u32 words
//! of two halves, so 16-bit inputs are read as words on every device. The naga test checks
//! both modules for SPIR-V, MSL, HLSL and GLSL.
//!
//! A head larger than one storage binding (`W` of 1024 x 128256 f32 is 525 MB; lavapipe
//! binds 128 MiB) is bound in **vocabulary windows** of whole blocks, one bind group each. On a
//! CPU adapter the gradient walks are cut into **segments** dispatched in order: lavapipe stops
//! any loop of an invocation after 65535 back edges in all, which a walk over a large
//! vocabulary would pass (the results were silently wrong before the cut; `tests/linear.rs`
//! holds a 128256-entry vocabulary and a deep head against the reference).
//!
//! ## Gradients and precision
//!
//! The gradients are `f32` buffers, accumulated in `f32` whatever the inputs' type: they are the
//! accumulators (a `dW` tile's owner adds each row tile's product into it, and each chunk's),
//! so a 16-bit gradient would be rounded once per row tile — how bf16 `dW` accumulation
//! diverged in Liger (#512). A 16-bit copy is one rounding after the step (the Burn module
//! makes it for f16 parameters). A row with
//! an invalid label makes its loss and `G` row NaN, and so `dW` and `db` (reported in the
//! summary; the staging call returns `LabelOutOfRange`). An ignored row contributes nothing.

//!
//! ## Vocabulary-parallel over ranks
//!
//! `W` split by vocabulary across `P` ranks (any widths: a [`ShardLayout`](crate::shards::ShardLayout)
//! over `V`), `H` replicated: [`LinearShardPlan`] (or [`compute_linear_shard`]) runs a rank's
//! slice as the fused head over its classes with the loss's global terms (labels, the excluded
//! class, the smoothing of the global `K`, as [`ShardProblem`](crate::shards::ShardProblem)
//! defines them), over any [`Collective`](crate::shards::Collective) (`ThreadCollective`,
//! `MpiCollective`). A step: pass 1, its blocks' records merged per row into the rank's record
//! block; [`exchange`](crate::shards::exchange) (a status round, one all-gather, the merge in
//! rank order); pass 2 from the merged rows: the rank's `dW`, `db` slice and partial `dH`; a
//! second status round and an all-gather of the partial `dH`s, summed in rank order on every
//! rank ([`sum_in_rank_order`]). Not `MPI_Allreduce`: its order of additions is the library's
//! (the standard only advises the same result on every rank), so its bits may change with `P`,
//! the message size or the library's version; the all-gather makes the sum a function of the
//! layout alone, bitwise the same on every rank and every run.
//!
//! | per rank and step | bytes sent |
//! |---|---|
//! | status | 256 |
//! | records | `32 + 32 N` |
//! | status (with gradients) | 256 |
//! | partial `dH` (with gradients) | `4 N D` |
//!
//! A failed rank (bad input: a `W` slice whose width is not the layout's, `H`'s `D` not `W`'s;
//! a failed pass) fails every rank with an `Err` naming it, and a rank with another spec, `D`,
//! gradients, bias or element type is named by every rank; none waits for another. The example
//! `linear_parallel` runs under `mpirun`; `tests/linear_mpi.rs` holds `P = 1..4` against the
//! unsharded `f64` reference and bitwise against the slices computed in one process.

mod batch;
pub mod cpu;
mod encode;
mod plan;
mod problem;
mod shard;
mod staging;

pub use batch::{LinearBatch, LinearOptions, LinearOutput};
pub use encode::{LinearBinding, LinearBuffers};
pub use plan::{LinearPlan, TILE};
pub use problem::{HeadGradients, LinearProblem, Memory};
pub use shard::{compute_linear_shard, sum_in_rank_order, LinearShardPlan};
