#!/usr/bin/env bash
# The one command for issue 11 on the H200 (under 8 minutes): lsce's bench over Vulkan beside
# PyTorch (eager, torch.compile) and Liger on CUDA, in one run, on one GPU, plus sweeps of the
# KernelConfig knobs that choose row teams, subgroup rows and split rows.
#
# It runs from the repository root with what benches/peers/prepare.sh left in ignored folders
# (the H200 machine reaches no package registry):
#   .bin/lsce-bench   the bench binary, built here (release, x86-64)
#   .gl/*.deb         the Vulkan loader (libvulkan1) and its GL/EGL neighbours, unpacked to /
#                     only when the machine has no libvulkan.so.1
#   .whl/*.whl        Liger's wheel (pure Python; torch and Triton are on the machine)
# Everything lands under $OUT (./peers-out when OUT is unset), at most 8 files as the device
# tool brings back: lsce.json (the main run, every dtype and shape), sweeps.json (every sweep
# record, each with its knob settings), peers.json (torch_cuda.py's records), log.txt (all
# output, the tables included) and runs.tar.gz (each run's own JSON and stderr).
#
# LSCE_PEERS_TINY=1 runs the same steps on tiny shapes with few repeats, to check the script on
# a machine without the GPU (lavapipe, the CPU fallback of the peer script). PYTHON picks the
# interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/peers-out}
mkdir -p "$OUT/runs"
log="$OUT/log.txt"
: >"$log"
say() { echo "== $* ($SECONDS s)" | tee -a "$log"; }
# Every step has a deadline, so the whole stays inside its budget whatever hangs.
deadline=${LSCE_PEERS_SECONDS:-330}
left() { echo $((deadline - SECONDS)); }
python=${PYTHON:-python3}
bench=${LSCE_BENCH:-.bin/lsce-bench}

if [ "${LSCE_PEERS_TINY:-0}" = 1 ]; then
    shapes=64x1000,8x5000
    short_rows=64x1000
    long_rows=8x5000
    mixed=64x1000,8x5000
    bench_timing=(--repeats 2 --warmup 1)
    peer_timing=(--repeats 2 --warmup 1)
else
    # The bench's defaults plus the large-vocabulary shapes of issue 11.
    shapes=4096x1000,4096x32000,256x128256,64x262144,16384x50257,8192x128256,4096x262144
    # What each sweep can change: subgroup rows serve short rows, split rows few long ones.
    short_rows=4096x1000,4096x32000
    long_rows=256x128256,64x262144,4096x262144,16384x50257
    mixed=4096x1000,4096x32000,256x128256,16384x50257
    bench_timing=()
    peer_timing=()
fi

# shellcheck source=benches/peers/gpu_env.sh
. benches/peers/gpu_env.sh

# One run of the lsce bench over Vulkan: NAME, SHAPES, then bench arguments. Its JSON and
# stderr go to runs/NAME.*, its table to the log.
lsce() {
    local name=$1 cases=$2
    shift 2
    local budget
    budget=$(left)
    if [ "$budget" -lt 10 ]; then
        say "lsce $name: not run, the budget is spent"
        return
    fi
    say "lsce $name: $*"
    timeout "$budget" "$bench" --bench --backend vulkan --shapes "$cases" "${bench_timing[@]}" \
        --json "$OUT/runs/$name.json" "$@" 2>"$OUT/runs/$name.err" | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { say "lsce $name: exit $rc"; tail -5 "$OUT/runs/$name.err" | tee -a "$log"; }
}

# 1. lsce, every dtype, at the adapter's defaults.
lsce main "$shapes" --dtype f32,bf16,f16

# 2. The peers, with Liger's wheel on the path (skipped, and said, when it is missing).
if compgen -G '.whl/*.whl' >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$log" 2>&1 && export PYTHONPATH=/tmp/site
fi
peer_budget=$(($(left) - 120))
if [ "$peer_budget" -gt 30 ]; then
    say "peers: torch eager, torch.compile, Liger (budget ${peer_budget} s)"
    PYTHONUNBUFFERED=1 timeout $((peer_budget + 60)) "$python" benches/peers/torch_cuda.py \
        --shapes "$shapes" --dtype f32,bf16,f16 "${peer_timing[@]}" --budget "$peer_budget" \
        --json "$OUT/peers.json" 2>&1 | tee -a "$log"
else
    say "peers: not run, the budget is spent"
fi

# 3. Sweeps, f32, one knob at a time from the defaults, each on the shapes it can change: split
#    rows (min_row_teams; 1 = off), subgroup rows (subgroup_rows_max_classes; 0 = none), the
#    row workgroup and the row cache.
for teams in 1 256 4096; do lsce "row-teams-$teams" "$long_rows" --row-teams "$teams"; done
for classes in 0 1024 8192 32768; do
    lsce "subgroup-rows-$classes" "$short_rows" --subgroup-rows-max-classes "$classes"
done
for wg in 128 512 1024; do lsce "row-workgroup-$wg" "$mixed" --row-workgroup "$wg"; done
for cache in 16 64; do lsce "row-cache-$cache" "$mixed" --row-cache "$cache"; done

# The results: the main run, every sweep record tagged with its run, and the raw files.
"$python" - "$OUT" <<'EOF' 2>&1 | tee -a "$log"
import json, os, sys
out = sys.argv[1]
runs = os.path.join(out, "runs")
def load(name):
    try:
        with open(os.path.join(runs, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{name}: no records ({e})")
        return []
main = load("main")
json.dump(main, open(os.path.join(out, "lsce.json"), "w"), indent=1)
sweeps = []
for name in sorted(n[:-5] for n in os.listdir(runs) if n.endswith(".json") and n != "main.json"):
    for r in load(name):
        r["sweep"] = name
        sweeps.append(r)
json.dump(sweeps, open(os.path.join(out, "sweeps.json"), "w"), indent=1)
print(f"lsce.json: {len(main)} records; sweeps.json: {len(sweeps)} records")
EOF
tar -czf "$OUT/runs.tar.gz" -C "$OUT" runs && rm -r "$OUT/runs"
say "done"
