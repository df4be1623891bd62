//! The collective round of a sharded step: every rank first all-gathers a small status word
//! (did its pass 1 succeed, for which problem, how long is its block), and only when every rank
//! succeeded for the same problem, every rank's record block; then each merges them itself, in
//! rank order (so every rank gets bitwise the same merge).
//!
//! The status round is what keeps a failed rank from hanging the others: a rank that failed
//! still takes part in it (with its error's text) and every rank returns an `Err` naming it,
//! where a data all-gather alone would wait forever for the failed rank's block, or (MPI) be
//! called with blocks of different lengths.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{LsceError, Result};
use crate::UpstreamGrad;

use super::layout::ShardProblem;
use super::merge::{merge_records, Merged};
use super::record::{HEADER_BYTES, RECORD_BYTES};

/// A transport for the shards' collective calls: an all-gather of equal-sized byte blocks.
/// Implement it over NCCL, Burn's collective ops, sockets, anything.
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

/// Bytes of one rank's status in the first all-gather of [`exchange`]: 24 bytes of words and
/// the start of its error's text.
pub const STATUS_BYTES: usize = 256;

/// Words ahead of the error text in a status: ok flag, block length, fingerprint (two words),
/// text length, a reserved word.
const STATUS_WORDS: usize = 6;

/// One rank's status as the status round carries it.
#[derive(Clone, Debug, PartialEq)]
struct Status {
    ok: bool,
    block_len: u32,
    fingerprint: u64,
    error: String,
}

impl Status {
    fn encode(&self) -> [u8; STATUS_BYTES] {
        let mut bytes = [0u8; STATUS_BYTES];
        let text_room = STATUS_BYTES - STATUS_WORDS * 4;
        // Cut on a character boundary, so that the text stays UTF-8.
        let mut cut = self.error.len().min(text_room);
        while !self.error.is_char_boundary(cut) {
            cut -= 1;
        }
        let words = [
            u32::from(self.ok),
            self.block_len,
            self.fingerprint as u32,
            (self.fingerprint >> 32) as u32,
            cut as u32,
            0,
        ];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        bytes[STATUS_WORDS * 4..STATUS_WORDS * 4 + cut]
            .copy_from_slice(&self.error.as_bytes()[..cut]);
        bytes
    }

    fn decode(bytes: &[u8]) -> Self {
        let word = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4"));
        let text = STATUS_WORDS * 4;
        let len = (word(4) as usize).min(STATUS_BYTES - text);
        Self {
            ok: word(0) == 1,
            block_len: word(1),
            fingerprint: u64::from(word(2)) | (u64::from(word(3)) << 32),
            error: String::from_utf8_lossy(&bytes[text..text + len]).into_owned(),
        }
    }
}

/// One step's exchange: this rank's outcome of pass 1 (its record block, or the error that
/// stopped it) in, the merged rows of all ranks out. Every rank of the step must call it, the
/// failed ones too: that is how the others learn of the failure instead of waiting for it.
///
/// Two [`Collective::all_gather`] calls: first every rank's [`STATUS_BYTES`]-byte status (its
/// outcome, its problem's fingerprint and its block's length), then, only when every status
/// is good and all agree, every rank's block, merged in rank order by [`merge_records`].
///
/// Errors, the same decision on every rank (it is made from the same gathered statuses):
/// - this rank's own failure: its error;
/// - another rank's failure: [`LsceError::RankFailed`] with the first failed rank and its
///   error's text (this rank's collective size or block length not matching the problem is
///   such a failure too);
/// - a rank whose problem's fingerprint or block length differs from the majority's:
///   [`LsceError::ForeignRecords`] naming it;
/// - after the data moved: anything [`merge_records`] rejects (a bad label included);
/// - the transport's own errors.
///
/// ```
/// use lsce::shards::{exchange, Collective, ShardLayout, ShardProblem, ThreadCollective};
/// use lsce::{LossSpec, LsceError, UpstreamGrad};
/// let problem = ShardProblem::new(LossSpec::pytorch(0.1), 4, ShardLayout::even(10, 2)?);
/// let results: Vec<_> = std::thread::scope(|s| {
///     let handles: Vec<_> = ThreadCollective::group(2).into_iter().map(|mut c| {
///         let problem = &problem;
///         s.spawn(move || {
///             // Rank 1's pass 1 failed; rank 0 learns it in the exchange.
///             let failure = LsceError::Unsupported("pass 1 failed");
///             let outcome = if c.rank() == 1 { Err(&failure) } else { Ok(&[0u8; 160][..]) };
///             exchange(problem, &mut c, outcome, UpstreamGrad::One)
///         })
///     }).collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(matches!(&results[0], Err(LsceError::RankFailed { rank: 1, .. })));
/// assert_eq!(results[1], Err(LsceError::Unsupported("pass 1 failed")));
/// # Ok::<(), LsceError>(())
/// ```
pub fn exchange(
    problem: &ShardProblem,
    collective: &mut dyn Collective,
    block: std::result::Result<&[u8], &LsceError>,
    upstream: UpstreamGrad<'_>,
) -> Result<Merged> {
    exchange_as(problem, problem.fingerprint(), collective, block, upstream)
}

/// [`exchange`] with the status round agreeing on `fingerprint` rather than the problem's own
/// (a caller whose ranks must agree on more than the records' problem, such as the
/// vocabulary-parallel linear head's hidden size, folds that into it). The records' headers
/// still carry, and the merge still checks, `problem.fingerprint()`.
pub(crate) fn exchange_as(
    problem: &ShardProblem,
    fingerprint: u64,
    collective: &mut dyn Collective,
    block: std::result::Result<&[u8], &LsceError>,
    upstream: UpstreamGrad<'_>,
) -> Result<Merged> {
    let shards = problem.layout.shards();
    let len = block_bytes(problem);
    let rank = collective.rank();
    // This rank's own verdict: its pass 1, then what it can check of its block alone.
    let local: Result<&[u8]> = block.map_err(Clone::clone).and_then(|b| {
        if collective.size() != shards || rank >= shards {
            Err(LsceError::RankCount {
                expected: shards,
                actual: collective.size(),
            })
        } else if b.len() != len {
            Err(LsceError::ForeignRecords {
                shard: rank,
                reason: "this rank's block is not header + rows * 32 bytes of this problem",
            })
        } else {
            Ok(b)
        }
    });
    agree(
        collective,
        local.as_ref().map(|_| ()).map_err(Clone::clone),
        fingerprint,
        len,
    )?;
    let block = local?;
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

/// The status round ahead of a data all-gather: every rank sends its outcome (`local`), the
/// `fingerprint` of what it computed and the length of the block it is about to send
/// ([`STATUS_BYTES`] bytes in all). `Ok` on every rank only when every rank succeeded with the
/// same fingerprint and length, so that the data all-gather that follows cannot wait for a
/// failed rank or mix blocks of different lengths; otherwise the same decision on every rank:
/// this rank's own error, [`LsceError::RankFailed`] naming the first failed rank, or
/// [`LsceError::ForeignRecords`] naming the odd one out.
pub(crate) fn agree(
    collective: &mut dyn Collective,
    local: Result<()>,
    fingerprint: u64,
    block_len: usize,
) -> Result<()> {
    let mine = Status {
        ok: local.is_ok(),
        block_len: block_len as u32,
        fingerprint,
        error: local
            .as_ref()
            .err()
            .map_or(String::new(), ToString::to_string),
    };
    let gathered = collective.all_gather(&mine.encode())?;
    if gathered.len() % STATUS_BYTES != 0 || gathered.is_empty() {
        return Err(LsceError::Transport(format!(
            "the status all-gather returned {} bytes, not a multiple of {STATUS_BYTES}",
            gathered.len()
        )));
    }
    let statuses: Vec<Status> = gathered.chunks(STATUS_BYTES).map(Status::decode).collect();
    if let Some(failed) = statuses.iter().position(|s| !s.ok) {
        return Err(match local {
            Err(own) => own,
            Ok(()) => LsceError::RankFailed {
                rank: failed,
                reason: statuses[failed].error.clone(),
            },
        });
    }
    if let Some(odd) = odd_one_out(&statuses) {
        return Err(LsceError::ForeignRecords {
            shard: odd,
            reason: "its problem (fingerprint or block length) is not the other ranks' one",
        });
    }
    Ok(())
}

/// The first rank whose (fingerprint, block length) is not the most common one (ties to the
/// lowest rank's): every rank computes it from the same statuses, so all name the same rank.
fn odd_one_out(statuses: &[Status]) -> Option<usize> {
    let key = |s: &Status| (s.fingerprint, s.block_len);
    let count = |k| statuses.iter().filter(|s| key(s) == k).count();
    let majority = statuses
        .iter()
        .map(key)
        .fold(None, |best: Option<((u64, u32), usize)>, k| {
            let n = count(k);
            match best {
                Some((_, m)) if m >= n => best,
                _ => Some((k, n)),
            }
        })?
        .0;
    statuses.iter().position(|s| key(s) != majority)
}

/// The in-process [`Collective`]: one per thread, created together by [`ThreadCollective::group`].
///
/// A rank that leaves the group (its `ThreadCollective` dropped, by returning early or by a
/// panic) ends every call that waits for it, then and later, with an `Err` naming it: no rank
/// waits for a block that will never come.
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
    size: usize,
    state: Mutex<Round>,
    changed: Condvar,
}

/// The group's current round.
struct Round {
    /// Rounds completed so far.
    completed: u64,
    /// This round's blocks, by rank.
    slots: Vec<Option<Vec<u8>>>,
    /// The last completed round's blocks, until every rank has read them.
    gathered: Option<Result<Arc<Vec<u8>>>>,
    /// Ranks yet to read `gathered`.
    unread: usize,
    /// The first rank that left the group.
    departed: Option<usize>,
}

impl ThreadCollective {
    /// `size` connected ranks; hand one to each thread.
    pub fn group(size: usize) -> Vec<ThreadCollective> {
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(Round {
                completed: 0,
                slots: vec![None; size],
                gathered: None,
                unread: 0,
                departed: None,
            }),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Round>> {
        self.shared
            .state
            .lock()
            .map_err(|_| LsceError::Transport("a rank's thread panicked holding the group".into()))
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Round>) -> Result<MutexGuard<'a, Round>> {
        self.shared
            .changed
            .wait(guard)
            .map_err(|_| LsceError::Transport("a rank's thread panicked holding the group".into()))
    }
}

fn departed(rank: usize) -> LsceError {
    LsceError::Transport(format!(
        "rank {rank} left the group (its thread returned or panicked) without taking part in \
         the all-gather"
    ))
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&mut self, send: &[u8]) -> Result<Vec<u8>> {
        let mut round = self.lock()?;
        // The previous round's blocks stay until every rank has read them.
        while round.gathered.is_some() {
            round = self.wait(round)?;
        }
        if let Some(rank) = round.departed {
            return Err(departed(rank));
        }
        let mine = round.completed;
        round.slots[self.rank] = Some(send.to_vec());
        if round.slots.iter().all(Option::is_some) {
            let blocks: Vec<Vec<u8>> = round.slots.iter_mut().filter_map(Option::take).collect();
            round.gathered = Some(if blocks.iter().any(|b| b.len() != send.len()) {
                Err(LsceError::Transport(
                    "ranks sent blocks of different lengths".into(),
                ))
            } else {
                Ok(Arc::new(blocks.concat()))
            });
            round.unread = self.shared.size;
            round.completed += 1;
            self.shared.changed.notify_all();
        }
        while round.completed == mine {
            if let Some(rank) = round.departed {
                round.slots[self.rank] = None;
                return Err(departed(rank));
            }
            round = self.wait(round)?;
        }
        let result = match &round.gathered {
            Some(Ok(all)) => Ok(all.to_vec()),
            Some(Err(err)) => Err(err.clone()),
            None => Err(LsceError::Transport("a completed round was lost".into())),
        };
        round.unread -= 1;
        if round.unread == 0 {
            round.gathered = None;
            self.shared.changed.notify_all();
        }
        result
    }
}

impl Drop for ThreadCollective {
    /// Leaves the group: every call waiting for this rank, and every later one, returns `Err`.
    fn drop(&mut self) {
        let mut round = match self.shared.state.lock() {
            Ok(round) => round,
            Err(poisoned) => poisoned.into_inner(),
        };
        round.departed.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}
