#!/usr/bin/env bash
# The fused linear head on a lent GPU (H100 or H200), in one device call of under 5 minutes:
# lsce's linear bench over Vulkan (the issue's four shapes, f32 and bf16: fused in both memory
# modes, unfused, the logits matmul alone, Burn's matmul, Burn's Linear + CrossEntropyLoss and
# LsceLinearLoss in Burn, device memory from wgpu's allocator report), then its CUDA peers from
# benches/peers/torch_linear_ce.py (PyTorch's F.linear_cross_entropy, chunked and reference
# paths, and Liger's LigerFusedLinearCrossEntropyLoss), same shapes and inputs, time and peak
# memory; with label smoothing 0.1 (lsce's case), and 0 (the only one PyTorch's chunked path
# takes).
#
# It runs from the repository root with what benches/peers/prepare.sh left in ignored folders:
#   .bin/lsce-linear-bench.gz  the linear bench, built here (release, all features, x86-64,
#                           gzipped to fit the device tool's carry)
#   .gl/*.deb               the Vulkan loader, unpacked to / only when the machine lacks it
#   .whl/*.whl              Liger's wheel
# Everything lands under $OUT (./peers-out when OUT is unset), four files: linear.json,
# linear.svg (lsce's records and chart), linear-peers.json (the peers' records) and
# linear-log.txt (all output, the tables included).
#
# LSCE_PEERS_TINY=1 runs the same steps on tiny shapes, to rehearse the script on a machine
# without the GPU (lavapipe; the peers on the CPU). PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/peers-out}
mkdir -p "$OUT"
log="$OUT/linear-log.txt"
: >"$log"
say() { echo "== $* ($SECONDS s)" | tee -a "$log"; }
deadline=${LSCE_LINEAR_SECONDS:-270}
left() { echo $((deadline - SECONDS)); }
python=${PYTHON:-python3}
bench=${LSCE_LINEAR_BENCH:-}
if [ -z "$bench" ]; then
    bench=/tmp/lsce-linear-bench
    gunzip -c .bin/lsce-linear-bench.gz >"$bench" && chmod +x "$bench"
fi

if [ "${LSCE_PEERS_TINY:-0}" = 1 ]; then
    shapes=(--shapes 128x64x2000,64x32x1000)
    peer_shapes=(--shapes 128x64x2000,64x32x1000)
    repeats=1
else
    shapes=(--full)
    peer_shapes=(--full)
    repeats=3
fi

# shellcheck source=benches/peers/gpu_env.sh
. benches/peers/gpu_env.sh

# 1. lsce, Vulkan (WGPU_BACKEND picks it for lsce's device and Burn's).
say "lsce linear bench"
WGPU_BACKEND=vulkan timeout $(($(left) - 120)) "$bench" --bench "${shapes[@]}" --dtypes f32,bf16 \
    --repeats "$repeats" --json "$OUT/linear.json" --svg "$OUT/linear.svg" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || say "lsce linear bench: exit ${PIPESTATUS[0]}"

# 2. The peers, with Liger's wheel on the path (skipped, and said, when it is missing).
if compgen -G '.whl/*.whl' >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$log" 2>&1 && export PYTHONPATH=/tmp/site
fi
for smoothing in 0.1 0; do
    budget=$(( $(left) / 2 ))
    if [ "$budget" -lt 15 ]; then
        say "peers, smoothing $smoothing: not run, the budget is spent"
        continue
    fi
    say "peers, smoothing $smoothing (budget $budget s)"
    PYTHONUNBUFFERED=1 timeout "$budget" "$python" benches/peers/torch_linear_ce.py \
        "${peer_shapes[@]}" --dtype f32,bf16 --repeats "$repeats" --smoothing "$smoothing" \
        --json "$OUT/linear-peers-$smoothing.json" 2>&1 | grep -v 'USDT\|gpuGetDeviceCount' | tee -a "$log"
done
"$python" - "$OUT" <<'EOF' 2>&1 | tee -a "$log"
import json, os, sys
out = sys.argv[1]
records = []
for smoothing in ("0.1", "0"):
    path = os.path.join(out, f"linear-peers-{smoothing}.json")
    if os.path.exists(path):
        records += json.load(open(path))
        os.remove(path)
json.dump(records, open(os.path.join(out, "linear-peers.json"), "w"), indent=1)
print(f"linear-peers.json: {len(records)} records")
EOF
say "done"
