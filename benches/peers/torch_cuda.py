#!/usr/bin/env python3
"""The lsce bench's peers: PyTorch `F.cross_entropy` (eager and `torch.compile`) and Liger's
`LigerCrossEntropyLoss`, timed on the same cases as `cargo bench --bench lsce`.

Same cases: `rows x classes` logits uniform in [-8, 8) rounded to the dtype (f32, f16 or bf16),
class labels `(7919 r + 13) mod classes`, PyTorch's label smoothing 0.1, ignore index -100,
mean reduction (the bench's `LossSpec::pytorch(0.1)`); the gradient has the logits' dtype, as
the bench's fused plan writes it. The logits are passed in their dtype, as a model in that dtype
hands them over (no autocast to f32 first).

Measured per case, on one device in one run:
  * fused:   forward + backward (the loss and the gradient of the logits): `fused_ms`;
  * forward: the loss alone, on logits that do not require a gradient: `forward_ms`;
  * copy:    `dst.copy_(logits)`, torch's device-to-device copy (`copy_ms`, `copy_gbps`
             counting the bytes read and written), and read: `logits.sum()` (`read_ms`).
`ratio_to_copy` = copy time / fused time and `forward_ratio_to_read` = read time / forward time,
with the bytes counted as the lsce bench counts them. Timing: CUDA events around each run, after
warm-up runs (which include torch.compile's compilation), median of the repeats; without CUDA
the script runs on the CPU with `time.perf_counter` so that its logic can be checked anywhere.

Each implementation is first checked against an f64 reference on a small case with ignored rows
(loss and gradient); a disagreement is reported in the record's `check` field.

The records are a JSON array with the lsce bench's keys (those that do not apply are null) plus
`implementation`, `check` and `torch`. Liger is skipped, with a message, when `liger_kernel` is
not installed or there is no CUDA device.

    python3 benches/peers/torch_cuda.py [--shapes 4096x32000,..] [--dtype f32,bf16,f16]
        [--impl eager,compile,liger] [--repeats 7] [--warmup 2] [--quick] [--json FILE]
        [--compile-shapes dynamic|static] [--budget SECONDS] [--device cuda|cpu]
"""

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

# The lsce bench's defaults (benches/lsce/cli.rs).
DEFAULT_SHAPES = [(4096, 1000), (4096, 32000), (256, 128256), (64, 262144), (16384, 50257)]
QUICK_SHAPES = [(1024, 1000), (256, 32000), (32, 128256), (8, 262144)]
SMOOTHING = 0.1
IGNORE_INDEX = -100
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Relative spacing of each dtype's values (as the lsce bench's start-up check uses it).
ULP = {"f32": 2.0**-23, "f16": 2.0**-10, "bf16": 2.0**-7}
IMPLEMENTATIONS = ["eager", "compile", "liger"]
# The measured fields of an lsce bench record (benches/lsce/report.rs), in its order.
MEASURED_KEYS = [
    "fused_ms", "forward_ms", "unfused_ms", "cpu_ms", "cpu_rows", "copy_ms", "read_ms",
    "copy_gbps", "read_gbps", "fused_gbps", "forward_gbps", "ratio_to_copy",
    "forward_ratio_to_read", "speedup_vs_unfused", "scratch_bytes", "plan_windows",
]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", help="ROWSxCLASSES,... (default: the lsce bench's)")
    p.add_argument("--dtype", default="f32", help="f32, f16, bf16, comma-separated")
    p.add_argument("--impl", default=",".join(IMPLEMENTATIONS), help="eager, compile, liger")
    p.add_argument("--repeats", type=int, help="timed runs, median reported (default 7; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 2; --quick 1)")
    p.add_argument("--quick", action="store_true", help="the lsce bench's --quick shapes")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument(
        "--compile-shapes", choices=["dynamic", "static"], default="dynamic",
        help="dynamic (default): one torch.compile graph per dtype serves every shape, as its "
             "automatic dynamic shapes do for a training loop whose batch varies; static: a "
             "compilation per shape (slower to run the script)")
    p.add_argument("--budget", type=float,
                   help="seconds: cases not started by then are recorded as skipped")
    p.add_argument("--json", help="write the records here")
    a = p.parse_args(argv)
    if a.shapes:
        shapes = []
        for item in a.shapes.split(","):
            r, _, c = item.strip().lower().partition("x")
            if not (r.isdigit() and c.isdigit() and int(r) > 0 and int(c) > 0):
                p.error(f"--shapes: `{item}` is not ROWSxCLASSES (e.g. 4096x32000)")
            shapes.append((int(r), int(c)))
        a.shapes = shapes
    else:
        a.shapes = QUICK_SHAPES if a.quick else DEFAULT_SHAPES
    a.dtype = [d.strip().lower() for d in a.dtype.split(",")]
    for d in a.dtype:
        if d not in DTYPES:
            p.error(f"--dtype: `{d}` is not f32, f16 or bf16")
    a.impl = [i.strip() for i in a.impl.split(",")]
    for i in a.impl:
        if i not in IMPLEMENTATIONS:
            p.error(f"--impl: `{i}` is not one of {', '.join(IMPLEMENTATIONS)}")
    a.repeats = a.repeats if a.repeats is not None else (3 if a.quick else 7)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    return a


def labels(rows, classes, device, with_ignored=False):
    r = torch.arange(rows, dtype=torch.int64, device=device)
    y = (r * 7919 + 13) % classes
    if with_ignored:
        y = torch.where(r % 7 == 6, torch.full_like(y, IGNORE_INDEX), y)
    return y


def logits(rows, classes, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(rows, classes, generator=g, device=device, dtype=torch.float32)
    return (x * 16.0 - 8.0).to(dtype)


def liger_loss():
    """LigerCrossEntropyLoss with the bench's spec, or the reason it cannot run."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except ImportError as e:
        return None, f"liger_kernel is not installed ({e})"
    return LigerCrossEntropyLoss(
        ignore_index=IGNORE_INDEX, label_smoothing=SMOOTHING, reduction="mean"
    ), None


def torch_loss(x, y):
    return F.cross_entropy(
        x, y, ignore_index=IGNORE_INDEX, label_smoothing=SMOOTHING, reduction="mean"
    )


def implementation(name, device, compile_shapes):
    """(loss function of (logits, labels), None) or (None, why it is skipped)."""
    if name == "eager":
        return torch_loss, None
    if name == "compile":
        if not hasattr(torch, "compile"):
            return None, f"torch {torch.__version__} has no torch.compile"
        if compile_shapes == "static":
            torch._dynamo.reset()
            return torch.compile(torch_loss, dynamic=False), None
        return torch.compile(torch_loss, dynamic=True), None
    if device != "cuda":
        return None, "Liger's Triton kernels need a CUDA device"
    return liger_loss()


class Clock:
    """CUDA events around each run on a GPU, `time.perf_counter` on the CPU."""

    def __init__(self, device):
        self.device = device
        self.name = "CUDA events" if device == "cuda" else "wall clock (perf_counter)"

    def median_ms(self, run, prepare, warmup, repeats):
        for _ in range(warmup):
            prepare()
            run()
        self.sync()
        times = []
        for _ in range(repeats):
            prepare()
            self.sync()
            if self.device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1e3)
        # The upper median of an even count, as the lsce bench reports.
        return sorted(times)[len(times) // 2]

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def check(loss_fn, dtype_name, device):
    """Loss and gradient against an f64 reference on a 37 x 301 case with ignored rows (the
    lsce bench's start-up case); 'ok' or what disagrees."""
    rows, classes = 37, 301
    dtype = DTYPES[dtype_name]
    x = logits(rows, classes, dtype, device, seed=1).requires_grad_(True)
    y = labels(rows, classes, device, with_ignored=True)
    x64 = x.detach().to("cpu", torch.float64).requires_grad_(True)
    ref = torch_loss(x64, y.cpu())
    ref.backward()
    probe = x.detach().clone().requires_grad_(True)
    loss = loss_fn(probe, y)
    loss.backward()
    grad = probe.grad.to("cpu", torch.float64)
    loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-30)
    scale = x64.grad.abs().max().item()
    grad_err = (grad - x64.grad).abs().max().item()
    # f32 arithmetic plus the rounding of the loss and of every gradient element to the dtype.
    tolerance = 1e-4 + 2 * ULP[dtype_name]
    if loss_err <= tolerance and grad_err <= tolerance * scale:
        return "ok"
    return (
        f"disagrees with the f64 reference: loss {loss.item()} vs {ref.item()} (relative "
        f"{loss_err:.2e}), gradient max error {grad_err:.2e} (largest {scale:.2e}, tolerance "
        f"{tolerance * scale:.2e})"
    )


def measure(loss_fn, rows, classes, dtype_name, clock, args):
    """The timed measures of one case, as the lsce bench's record fields."""
    device = clock.device
    dtype = DTYPES[dtype_name]
    x0 = logits(rows, classes, dtype, device)
    y = labels(rows, classes, device)
    x = x0.clone().requires_grad_(True)
    dst = torch.empty_like(x0)
    elem = torch.finfo(dtype).bits // 8
    tensor_bytes = rows * classes * elem

    def restore():
        # Liger writes the gradient over its input: every run starts from the same logits.
        with torch.no_grad():
            x.copy_(x0)
        x.grad = None

    def fused():
        loss_fn(x, y).backward()

    def forward():
        with torch.no_grad():
            loss_fn(x0, y)

    timed = lambda run, prepare=lambda: None: clock.median_ms(
        run, prepare, args.warmup, args.repeats
    )
    copy_ms = timed(lambda: dst.copy_(x0))
    read_ms = timed(lambda: x0.sum(dtype=torch.float32))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    fused_ms = timed(fused, restore)
    # Memory beyond the inputs that forward + backward held at its peak, the gradient included;
    # minus the gradient, what the lsce bench calls scratch.
    scratch = None
    if device == "cuda":
        scratch = max(torch.cuda.max_memory_allocated() - base - tensor_bytes, 0)
    forward_ms = timed(forward)
    gbps = lambda b, ms: b / (ms * 1e6)
    copy_gbps, read_gbps = gbps(2 * tensor_bytes, copy_ms), gbps(tensor_bytes, read_ms)
    fused_gbps, forward_gbps = gbps(2 * tensor_bytes, fused_ms), gbps(tensor_bytes, forward_ms)
    measured = {
        "fused_ms": fused_ms,
        "forward_ms": forward_ms,
        "unfused_ms": None,
        "cpu_ms": None,
        "cpu_rows": None,
        "copy_ms": copy_ms,
        "read_ms": read_ms,
        "copy_gbps": copy_gbps,
        "read_gbps": read_gbps,
        "fused_gbps": fused_gbps,
        "forward_gbps": forward_gbps,
        "ratio_to_copy": fused_gbps / copy_gbps,
        "forward_ratio_to_read": forward_gbps / read_gbps,
        "speedup_vs_unfused": None,
        "scratch_bytes": scratch,
        "plan_windows": None,
    }
    assert list(measured) == MEASURED_KEYS
    return measured


def record(name, rows, classes, dtype_name, clock, args, adapter, check_result, measured, skipped):
    """One JSON record: the lsce bench's keys in its order, then this script's own."""
    r = {
        "backend": clock.device,
        "adapter": adapter,
        "device_type": "Gpu" if clock.device == "cuda" else "Cpu",
        "timing": clock.name,
        "rows": rows,
        "classes": classes,
        "dtype": dtype_name,
        "repeats": args.repeats,
        "row_workgroup": None,
        "row_cache": None,
        "row_groups": None,
        "row_teams": None,
        "subgroups": None,
        "skipped": skipped,
    }
    r.update({k: (measured or {}).get(k) for k in MEASURED_KEYS})
    r.update({"implementation": name, "check": check_result, "torch": torch.__version__})
    return r


def main(argv):
    args = parse_args(argv)
    started = time.monotonic()
    clock = Clock(args.device)
    if args.device == "cuda":
        adapter = torch.cuda.get_device_name()
    else:
        adapter = platform.processor() or platform.machine()
        print("no CUDA device: timing on the CPU with the wall clock", file=sys.stderr)
    print(f"device: {adapter} | torch {torch.__version__} | timing: {clock.name} | median of "
          f"{args.repeats} after {args.warmup} warm-up", file=sys.stderr)
    # Each dtype and grad mode is a recompilation of the one compiled function.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)

    # Per implementation and dtype: the loss function and its check, or why it is skipped.
    prepared = {}
    for dtype_name in args.dtype:
        for name in args.impl:
            loss_fn, why = implementation(name, args.device, args.compile_shapes)
            if loss_fn is None:
                print(f"{name} {dtype_name}: skipped: {why}", file=sys.stderr)
                prepared[name, dtype_name] = (None, None, why)
                continue
            try:
                check_result = check(loss_fn, dtype_name, args.device)
            except Exception as e:  # a peer that cannot run this dtype: said, not fatal
                check_result = f"the check failed to run: {type(e).__name__}: {e}"
            print(f"{name} {dtype_name}: check {check_result}", file=sys.stderr)
            prepared[name, dtype_name] = (loss_fn, check_result, None)

    print(f"{'implementation':<10} {'shape':<14} {'dtype':<5} {'copy GB/s':>9} "
          f"{'fused ms':>9} {'/copy':>6} {'fwd ms':>9} {'/read':>6}")
    records = []
    # Shape by shape, so that a budget cut leaves whole comparisons.
    for rows, classes in args.shapes:
        for dtype_name in args.dtype:
            for name in args.impl:
                loss_fn, check_result, skipped = prepared[name, dtype_name]
                measured = None
                if skipped is None and args.budget and time.monotonic() - started > args.budget:
                    skipped = f"not started: the script's budget of {args.budget:g} s was spent"
                if skipped is None:
                    if name == "compile" and args.compile_shapes == "static":
                        loss_fn, _ = implementation(name, args.device, "static")
                    try:
                        measured = measure(loss_fn, rows, classes, dtype_name, clock, args)
                    except torch.cuda.OutOfMemoryError as e:
                        skipped = f"out of memory: {e}".splitlines()[0]
                    except Exception as e:
                        skipped = f"{type(e).__name__}: {e}".splitlines()[0]
                    finally:
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                records.append(record(name, rows, classes, dtype_name, clock, args, adapter,
                                      check_result, measured, skipped))
                shape = f"{rows}x{classes}"
                if measured is None:
                    print(f"{name:<10} {shape:<14} {dtype_name:<5} skipped: {skipped}")
                else:
                    m = measured
                    print(f"{name:<10} {shape:<14} {dtype_name:<5} {m['copy_gbps']:>9.2f} "
                          f"{m['fused_ms']:>9.3f} {m['ratio_to_copy']:>6.2f} "
                          f"{m['forward_ms']:>9.3f} {m['forward_ratio_to_read']:>6.2f}")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
