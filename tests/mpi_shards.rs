//! The third use of vocabulary shards: MPI processes. Runs `examples/vocab_parallel.rs` under
//! `mpirun -np 2` and `-np 4` (as root: `--allow-run-as-root --oversubscribe`); the example
//! checks the loss and the gathered gradient against one device and fails otherwise. Then,
//! with `--fail KIND RANK`, one rank fails its step (issue 14, item 2): every rank must print
//! the `Err` its exchange returned, naming the failed rank, and mpirun must end well within
//! `DEADLINE` instead of hanging.
//!
//! The same for the vocabulary-parallel linear head (`examples/linear_parallel.rs`, issue 16
//! part 2): at `-np 2` and `-np 4` every rank's result must be bitwise the same slices computed
//! in one process, rank 0's within its bounds of the unsharded f64 reference; with bad input on
//! one rank (a `V` split that is not the layout's, `H`'s `D` not `W`'s, another spec) every
//! rank prints an `Err` naming it, within the deadline.
#![cfg(feature = "mpi")]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one `mpirun` may take: process start-up and a device per rank take a few seconds
/// on a CPU adapter; a rank left waiting for a failed one would take forever.
const DEADLINE: Duration = Duration::from_secs(60);

/// Builds the example `vocab_parallel` (a no-op when fresh) and returns its path.
fn example() -> PathBuf {
    example_named("vocab_parallel")
}

/// Builds the example `name` (a no-op when fresh) and returns its path.
fn example_named(name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--features", "mpi", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build for the example");
    assert!(status.success(), "building examples/{name}.rs failed");
    // This test binary lives in <target>/release/deps; the example in <target>/release/examples.
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|release| release.join("examples").join(name))
        .expect("the target directory")
}

/// Runs the example on `ranks` processes with `args`; kills it at the deadline. Returns its
/// stdout, or panics with what it printed.
fn mpirun(example: &Path, ranks: u32, args: &[&str]) -> String {
    let mut child = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &ranks.to_string(),
        ])
        .arg(example)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("mpirun not found ({e}): install Open MPI (Debian: openmpi-bin libopenmpi-dev)")
        });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for mpirun") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            // The child is mpirun, which this test started; it takes its ranks down with it.
            let _ = child.kill();
            let _ = child.wait();
            panic!("mpirun -np {ranks} {args:?} still running after {DEADLINE:?}: a rank hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("stdout");
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("stderr");
    eprintln!(
        "mpirun -np {ranks} {args:?}: {:.1} s\n{stdout}",
        start.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "mpirun -np {ranks} {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[test]
fn mpirun_two_and_four_ranks_match_one_device() {
    let example = example();
    for ranks in [2, 4] {
        let stdout = mpirun(&example, ranks, &[]);
        assert!(
            stdout.contains("vocab_parallel: OK"),
            "rank 0 did not confirm the check"
        );
        assert_eq!(
            stdout.matches("in 1 exchange").count(),
            ranks as usize,
            "every rank reports its one exchange"
        );
    }
}

/// Each rank's `Err` line (`rank R/P: Err after MS ms: ...`) of an `mpirun` with `--fail
/// KIND RANK`, checked to come within 5 s of the step's start and to name the failed rank
/// (`named(line, rank)`).
fn assert_every_rank_fails(
    stdout: &str,
    ranks: u32,
    kind: &str,
    failed: u32,
    named: impl Fn(&str, u32) -> bool,
) {
    for rank in 0..ranks {
        let prefix = format!("rank {rank}/{ranks}: Err after ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{kind}: rank {rank} printed no Err:\n{stdout}"));
        let ms: f64 = line[prefix.len()..]
            .split(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no time in {line:?}"));
        assert!(ms < 5000.0, "{kind}: rank {rank} took {ms} ms: {line}");
        assert!(
            named(line, rank),
            "{kind}: rank {rank} does not name rank {failed}: {line}"
        );
    }
}

#[test]
fn mpirun_a_failed_rank_fails_every_rank_within_seconds() {
    let example = example();
    for ranks in [2u32, 4] {
        for kind in ["bad-label", "short-block", "fingerprint"] {
            let failed = ranks - 1;
            let stdout = mpirun(&example, ranks, &["--fail", kind, &failed.to_string()]);
            // Every rank names the failed one: by its own error (bad label, short block),
            // in RankFailed, or as the rank whose problem differs.
            assert_every_rank_fails(&stdout, ranks, kind, failed, |line, rank| {
                match (kind, rank == failed) {
                    ("bad-label", true) => line.contains("has label 1000"),
                    ("short-block", true) => line.contains(&format!("shard {failed}'s records")),
                    ("fingerprint", _) => line.contains(&format!("shard {failed}'s records")),
                    _ => line.contains(&format!("rank {failed} failed")),
                }
            });
        }
    }
}

#[test]
fn mpirun_linear_head_two_and_four_ranks_match_one_process_and_the_reference() {
    let example = example_named("linear_parallel");
    for ranks in [2, 4] {
        let stdout = mpirun(&example, ranks, &[]);
        assert_eq!(
            stdout.matches("bitwise OK").count(),
            ranks as usize,
            "every rank matches the same slices in one process bitwise:\n{stdout}"
        );
        assert!(
            stdout.contains("linear_parallel: OK"),
            "rank 0 did not confirm the bounds against the f64 reference:\n{stdout}"
        );
    }
}

#[test]
fn mpirun_linear_head_bad_input_fails_every_rank_within_seconds() {
    let example = example_named("linear_parallel");
    for ranks in [2u32, 4] {
        for kind in ["wide-slice", "head-dim", "spec"] {
            let failed = ranks - 1;
            let stdout = mpirun(&example, ranks, &["--fail", kind, &failed.to_string()]);
            // The failed rank its own error (the head slice's length), the others RankFailed
            // or, for another spec, the rank whose problem differs.
            assert_every_rank_fails(&stdout, ranks, kind, failed, |line, rank| {
                match (kind, rank == failed) {
                    ("spec", _) => line.contains(&format!("shard {failed}'s records")),
                    (_, true) => line.contains("head slice"),
                    _ => line.contains(&format!("rank {failed} failed")),
                }
            });
        }
    }
}
