#!/usr/bin/env bash
# Prepares, on this machine, everything benches/peers/h200.sh needs on the H200, which reaches
# no package registry, into folders .gitignore keeps out of git:
#   .bin/lsce-bench   the bench binary (release, x86-64, stripped)
#   .bin/lsce-linear-bench.gz  the linear bench (release, all features, gzipped), for linear_gpu.sh
#   .gl/*.deb         the Vulkan loader and its GL/EGL neighbours (Debian amd64 packages)
#   .whl/*.whl        Liger's wheel for the machine's Python 3.12
# then prints the device tool's `run` call that carries them. Run it from the repository that
# the device tool sends (the session's own checkout).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
liger=${LIGER_VERSION:-0.8.5}

# The executable cargo builds for bench NAME (further arguments go to cargo).
bench_executable() {
    local name=$1
    shift
    local executable
    executable=$(cargo bench --bench "$name" "$@" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[1] \
            and "bench" in m["target"]["kind"] and m.get("executable"):
        print(m["executable"])' "$name")
    [ -n "$executable" ] || { echo "cargo built no $name bench executable" >&2; exit 1; }
    echo "$executable"
}

[ "$(uname -m)" = x86_64 ] || { echo "the H200 machine is x86-64; this one is $(uname -m)" >&2; exit 1; }
echo "building the bench (release)"
executable=$(bench_executable lsce)
mkdir -p .bin .gl .whl
cp "$executable" .bin/lsce-bench
strip .bin/lsce-bench

echo "building the linear bench (release, all features: Burn's rows too)"
linear=$(bench_executable linear --all-features)
# Burn's kernels make it 83 MB stripped, past the device tool's 64 MiB carry: gzip (24 MB).
strip -o /tmp/lsce-linear-bench "$linear"
gzip -9 -c /tmp/lsce-linear-bench >.bin/lsce-linear-bench.gz

echo "downloading the Vulkan loader packages"
mkdir -p /tmp/amd64/partial
apt_amd64=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
compgen -G '/tmp/amd64/*_Packages' >/dev/null || apt-get "${apt_amd64[@]}" update -q
rm -f .gl/*.deb
(cd .gl && apt-get "${apt_amd64[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)

echo "downloading Liger $liger"
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "liger-kernel==$liger"

du -ch .bin .gl .whl | tail -1
cat <<'EOF'

The device call (one H200; the script keeps to 330 s, so a rerun still fits the 15 minutes of device time):
  run(command: "bash benches/peers/h200.sh", carry: [".bin", ".gl", ".whl"], timeout_s: 400)
Its files come back as lsce.json, sweeps.json, peers.json, log.txt and runs.tar.gz.

The fused linear head, a second call (keeps to 270 s):
  run(command: "bash benches/peers/linear_gpu.sh", carry: [".bin", ".gl", ".whl"], timeout_s: 330)
Its files come back as linear.json, linear.svg, linear-peers.json and linear-log.txt.
EOF
