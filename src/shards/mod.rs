//! # Vocabulary shards: the loss over logits split by class
//!
//! When a row's classes do not live in one buffer (a 128k vocabulary past a binding limit,
//! tensor-parallel training with `[rows, K/P]` per device, or a linear layer producing the
//! logits chunk by chunk), each shard `p` holds the classes `[c0, c1)` of a [`ShardLayout`]
//! (of `[rows, K]` logits, or of PyTorch's `[N, K, d1..dk]` split along dimension 1:
//! [`ShardProblem::for_shape`], each shard's part a [`Batch`](crate::Batch) of shape
//! `[N, c1 - c0, d1..dk]`, read in place by the strided kernel) and a step is:
//!
//! 1. **pass 1**, per shard: one fixed-size record of partial statistics per row
//!    ([`record`]: 32 bytes per row, plus a 32-byte header carrying the plan's fingerprint);
//! 2. **one exchange** ([`exchange`]): every rank all-gathers every rank's status (did its pass
//!    1 succeed, for which problem: [`STATUS_BYTES`] bytes), then, when all did, every rank's
//!    records ([`Collective::all_gather`]): `32 * rows` bytes sent per rank, `32 * P` bytes per
//!    row received. A rank that failed takes part in the status round with its error, so every
//!    rank returns an `Err` naming it instead of waiting for its records;
//! 3. **the merge**, on every rank, in rank order ([`merge`], [`merge_records`] on the host; on
//!    the device inside pass 2 for shards on one device): the loss, lse, accuracy and the
//!    per-row constants of the gradient, bitwise the same on every rank;
//! 4. **pass 2**, per shard: its own gradient, which needs nothing from the other shards but the
//!    merged row constants ([`RowGrad`]: max, coefficient, scale).
//!
//! Shards may have any widths (one class too) and the layout is checked to tile `[0, K)`
//! exactly. The loss is the unsharded one: PyTorch's `F.cross_entropy` over the **global** `K`
//! for every [`Smoothing`](crate::Smoothing) convention, the excluded class living in whichever
//! shard holds it, class weights, probability targets, ignore_index, z-loss, soft-cap, logit
//! scale, every reduction and upstream gradient, and token accuracy with the argmax taken as the
//! first maximum by global class index.
//!
//! ## What a shard publishes, and why it is enough
//!
//! Per row: its max `m_p`, `s_p = sum exp(z - m_p)`, `shifted_p = sum a_c (m_p - z_c)`, the target
//! mass `mass_p = sum a_c`, its first largest raw logit and class, the label, whether it holds
//! it, and the row kind; per step, its part of the mean's denominator (`sum w_y` over the rows
//! whose label it holds). Because the target
//! coefficients `a_c` are linear in the classes, the loss `A lse - sum a_c z_c` decomposes as
//! `A ln S + sum_p (shifted_p + mass_p (M - m_p))` with `M = max_p m_p`: every term is
//! non-negative for non-negative targets, so large logits do not cancel. The smoothing mass
//! of a class label, `off * sum_{c != excluded} w_c`, is counted in each shard over its own
//! classes with the off-value of the **global** `K`, so the sum over shards is the unsharded
//! one whatever the widths.
//!
//! ## The three uses
//!
//! - **Several devices or processes**: each rank runs its [`ShardPlan`] (pass 1:
//!   [`ShardPlan::encode_records`]), sends the block (or its error) through its [`Collective`]
//!   and merges ([`exchange`]: a status `all_gather`, then the records'), then runs pass 2 from
//!   the merged rows
//!   ([`ShardPlan::encode_gradient`], [`Merged::grad_words`]). [`ThreadCollective`] connects
//!   devices in threads of one process, `MpiCollective` (feature `mpi`) processes; the example
//!   `vocab_parallel` runs under `mpirun`.
//! - **One device, P buffers**: every shard's pass 1 writes its block into one record buffer,
//!   and every shard's pass 2 ([`MergeOn::Device`], [`ShardPlan::encode_merged_gradient`])
//!   merges the rows on the device itself; no host round trip ([`compute_on_device`] does it
//!   from host slices).
//!
//! ## Bytes
//!
//! | what | bytes |
//! |---|---|
//! | a record (per row and shard) | 32 |
//! | a block (per shard and step) | `32 + 32 rows` |
//! | sent by a rank per step | one block |
//! | received by every rank per row | `32 P` |
//! | merged rows pass 2 reads (host merge) | `16` per row |
//! | pass 1, f32 | reads `4 rows w` logits once, writes its block |
//! | pass 2, f32 | reads `4 rows w` logits again (+ `32 P` per row with the device merge), writes `4 rows w` gradient |
//!
//! ## Against Megatron and flash-attention
//!
//! | | Megatron `vocab_parallel_cross_entropy` | flash-attention `cross_entropy(process_group=..)` | lsce shards |
//! |---|---|---|---|
//! | collective calls per step | three all-reduces (max, predicted logit, sum of exp) | an all-gather of the lse and an all-reduce of the losses | a 256-byte status all-gather (a failed rank fails every rank), then **one** all-gather of 32 bytes per row and rank |
//! | shard widths | equal (`K / P`) | equal | any, each checked to tile `[0, K)` |
//! | label smoothing | `eps / (K_local - 1)` off-value: the **local** shard's class count (Megatron-LM #737, NeMo #7464), so the loss changes with `P` | `eps / K` with the global `K` | the unsharded convention over the global `K`, any [`Smoothing`](crate::Smoothing) |
//! | ignore_index, weights, probability targets, z-loss, soft-cap | no weights or probabilities | ignore_index, z-loss; no weights or probabilities | all |
//! | merge order | all-reduce order of the library | all-reduce order of the library | rank order, on every rank: deterministic |
//! | backward | needs the saved softmax shard | recomputes from the gathered lse | recomputes from the merged `(M, coef, scale)` |
//!
//! Megatron's smoothing term takes `vocab_size` from the **partition** (`K/P` classes): the
//! factor `eps K_local / (K_local - 1)` and the mean of the log-probabilities over the local
//! classes only, so the loss changes with `P` and is not the unsharded one (Megatron-LM #737,
//! NeMo #7464). lsce's `Smoothing::OffTarget(eps)` is the intended `eps/(K-1)` over the global
//! `K` at every `P`, and `Smoothing::Uniform(eps)` PyTorch's `eps/K`. flash-attention's
//! smoothing uses the global class count, but only because it requires equal shards
//! (`K = P * K_local`).
//!
//! ## Transport
//!
//! [`Collective`] is one method, `all_gather` of equal-sized byte blocks. [`ThreadCollective`]
//! connects threads of one process (several wgpu devices; a rank whose collective is dropped
//! fails the others' calls); `MpiCollective` (feature `mpi`) wraps an rsmpi communicator;
//! anything else implements the trait. [`exchange`] agrees on success in the status round,
//! makes the data call and merges. On one device the GPU merges the shards itself.
//!
//! The host side (layout, records, merge, transports and the `f64` [`reference`](mod@reference)) is
//! independent of wgpu. The tests hold each use against the unsharded result: the reference
//! against `cpu::compute` (`tests/shards.rs`), the device passes for P = 1..8 uneven shards with
//! both merges, f16/bf16 and two devices on two threads against the unsharded GPU-vs-CPU bound
//! (`tests/gpu_shards.rs`), and `mpirun -np 2` / `-np 4` (`tests/mpi_shards.rs`).

mod batch;
mod collective;
mod device;
mod gpu;
mod layout;
mod merge;
#[cfg(feature = "mpi")]
mod mpi;
pub mod record;
pub mod reference;

pub use batch::ShardBatch;
pub(crate) use collective::{agree, exchange_as};
pub use collective::{block_bytes, exchange, Collective, ThreadCollective, STATUS_BYTES};
pub use device::compute_on_device;
pub use gpu::{MergeOn, ShardBuffers, ShardOptions, ShardPlan, MERGED_ROW_BYTES};
pub use layout::{ShardLayout, ShardProblem};
pub(crate) use merge::fold_rows;
pub use merge::{merge, merge_records, Merged, RowGrad};
#[cfg(feature = "mpi")]
pub use mpi::MpiCollective;
pub use record::{PartialRow, RowKind, ShardPartials, RECORD_BYTES};
