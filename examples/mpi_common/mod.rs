//! What the two MPI examples (`vocab_parallel`, `linear_parallel`) share: the same data on
//! every rank from a fixed seed, the `--fail KIND RANK` argument, and the line a failed step
//! prints.

use std::time::Instant;

pub type Error = Box<dyn std::error::Error>;

/// SplitMix64 from a fixed seed: every rank draws the same numbers.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn fixed_seed() -> Self {
        Self(0x1234_5678_9abc_def0)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` values uniform in `[-scale / 2, scale / 2)`.
    pub fn uniform(&mut self, n: u32, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
            .collect()
    }
}

/// The failure `--fail KIND RANK` asks for, if any; `usage` otherwise.
pub fn fault(usage: &str) -> Result<Option<(String, usize)>, Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(None),
        [flag, kind, rank] if flag == "--fail" => Ok(Some((kind.clone(), rank.parse()?))),
        _ => Err(usage.into()),
    }
}

/// A step that must fail: prints its `Err` and the time since `start` (what tests/mpi_shards.rs
/// reads), or returns an `Err` when it succeeded.
pub fn report_failure<T>(
    rank: usize,
    ranks: usize,
    start: Instant,
    step: lsce::Result<T>,
) -> Result<(), Error> {
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match step {
        Err(err) => {
            println!("rank {rank}/{ranks}: Err after {ms:.0} ms: {err}");
            Ok(())
        }
        Ok(_) => Err(format!("rank {rank}: the step with a failed rank returned Ok").into()),
    }
}
