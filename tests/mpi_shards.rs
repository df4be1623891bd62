//! The third use of vocabulary shards: MPI processes. Runs `examples/vocab_parallel.rs` under
//! `mpirun -np 2` and `-np 4` (as root: `--allow-run-as-root --oversubscribe`); the example
//! checks the loss and the gathered gradient against one device and fails otherwise.
#![cfg(feature = "mpi")]

use std::path::PathBuf;
use std::process::Command;

/// Builds the example (a no-op when fresh) and returns its path.
fn example() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--features",
            "mpi",
            "--example",
            "vocab_parallel",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build for the example");
    assert!(
        status.success(),
        "building examples/vocab_parallel.rs failed"
    );
    // This test binary lives in <target>/release/deps; the example in <target>/release/examples.
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|release| release.join("examples").join("vocab_parallel"))
        .expect("the target directory")
}

fn run(ranks: u32) {
    let example = example();
    let out = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &ranks.to_string(),
        ])
        .arg(&example)
        .output()
        .unwrap_or_else(|e| {
            panic!("mpirun not found ({e}): install Open MPI (Debian: openmpi-bin libopenmpi-dev)")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "mpirun -np {ranks} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("vocab_parallel: OK"),
        "rank 0 did not confirm the check"
    );
    assert_eq!(
        stdout.matches("in 1 collective call").count(),
        ranks as usize,
        "every rank reports its one collective call"
    );
}

#[test]
fn mpirun_two_and_four_ranks_match_one_device() {
    run(2);
    run(4);
}
