//! The one collective round of a sharded step: every rank all-gathers every rank's record
//! block, then merges them itself, in rank order (so every rank gets bitwise the same merge).

use std::sync::{Arc, Barrier, Mutex};

use crate::error::{LsceError, Result};
use crate::UpstreamGrad;

use super::layout::ShardProblem;
use super::merge::{merge_records, Merged};
use super::record::{HEADER_BYTES, RECORD_BYTES};

/// A transport for the shards' one collective call per step: an all-gather of equal-sized
/// byte blocks. Implement it over NCCL, Burn's collective ops, sockets, anything.
pub trait Collective {
    /// This process's (or thread's) rank, `0..size()`: the shard it computes.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank passes a block of the same length; every rank receives all blocks
    /// concatenated in rank order.
    fn all_gather(&mut self, send: &[u8]) -> Result<Vec<u8>>;
}

/// The bytes one rank sends per step: its header and one record per row.
pub fn block_bytes(problem: &ShardProblem) -> usize {
    HEADER_BYTES + problem.rows as usize * RECORD_BYTES
}

/// One step's exchange: all-gathers `block` (this rank's pass-1 records) and merges all
/// ranks' blocks in rank order. Exactly one [`Collective::all_gather`] call.
///
/// Errors, before any communication: a collective whose size is not the layout's shard count,
/// or a block of the wrong length; after it, anything [`merge_records`] rejects.
pub fn exchange(
    problem: &ShardProblem,
    collective: &mut dyn Collective,
    block: &[u8],
    upstream: UpstreamGrad<'_>,
) -> Result<Merged> {
    let shards = problem.layout.shards();
    if collective.size() != shards || collective.rank() >= shards {
        return Err(LsceError::RankCount {
            expected: shards,
            actual: collective.size(),
        });
    }
    let len = block_bytes(problem);
    if block.len() != len {
        return Err(LsceError::ForeignRecords {
            shard: collective.rank(),
            reason: "this rank's block is not header + rows * 32 bytes of this problem",
        });
    }
    let all = collective.all_gather(block)?;
    if all.len() != len * shards {
        return Err(LsceError::Transport(format!(
            "all-gather returned {} bytes, expected {}",
            all.len(),
            len * shards
        )));
    }
    let blocks: Vec<&[u8]> = all.chunks(len).collect();
    merge_records(problem, &blocks, upstream)
}

/// The in-process [`Collective`]: one per thread, created together by [`ThreadCollective::group`].
///
/// ```
/// use lsce::shards::{Collective, ThreadCollective};
/// let ranks = ThreadCollective::group(3);
/// let gathered: Vec<Vec<u8>> = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks.into_iter().map(|mut c| s.spawn(move || {
///         c.all_gather(&[c.rank() as u8; 2]).unwrap()
///     })).collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(gathered.iter().all(|g| g == &[0, 0, 1, 1, 2, 2]));
/// ```
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    slots: Mutex<Vec<Vec<u8>>>,
    barrier: Barrier,
}

impl ThreadCollective {
    /// `size` connected ranks; hand one to each thread.
    pub fn group(size: usize) -> Vec<ThreadCollective> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); size]),
            barrier: Barrier::new(size),
        });
        (0..size)
            .map(|rank| ThreadCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.slots.lock().map_or(0, |s| s.len())
    }

    fn all_gather(&mut self, send: &[u8]) -> Result<Vec<u8>> {
        let poisoned = |_| LsceError::Transport("a rank's thread panicked".into());
        self.shared.slots.lock().map_err(poisoned)?[self.rank] = send.to_vec();
        // Everyone has written before anyone reads, and everyone has read before anyone can
        // write the next round.
        self.shared.barrier.wait();
        let gathered = {
            let slots = self.shared.slots.lock().map_err(poisoned)?;
            if slots.iter().any(|s| s.len() != send.len()) {
                Err(LsceError::Transport(
                    "ranks sent blocks of different lengths".into(),
                ))
            } else {
                Ok(slots.concat())
            }
        };
        self.shared.barrier.wait();
        gathered
    }
}
