#!/usr/bin/env python3
"""The linear bench's peer: PyTorch's `F.linear_cross_entropy` (2.13+) on the CPU, for peak
memory, time and accuracy on the cases of `cargo bench --bench linear`.

Same cases: `H [N, D]`, `W [V, D]`, `b [V]` from the bench's generator (value i of seed s:
`((u32(i) * 2654435761 mod 2^32) ^ s) % 2001 / 1000 - 1`, times `D^(-1/4)`, in f32 and then
rounded to the dtype), class labels `(7919 r) mod V`, label smoothing 0.1, mean reduction, a
bias; forward and `backward()` giving dH, dW and db.

Implementations, each measured in the same run:
  * chunked:   `F.linear_cross_entropy(h, w, y, linear_bias=b, label_smoothing=0.1,
               options=torch.nn.LinearCrossEntropyOptions())`, PyTorch's chunked path (the
               batch in pieces, no full logits; its `"auto"` choices);
  * reference: the same with `options=None`, PyTorch's reference path
               (`F.cross_entropy(F.linear(h, w, b), y, ..)`: the logits materialised);
  * liger:     Liger's `LigerFusedLinearCrossEntropyLoss` (CUDA only; skipped with a message
               when `liger_kernel` is not installed or the device is not CUDA).

Peak memory: on CUDA `torch.cuda.max_memory_allocated()` after a reset, less nothing (the
inputs are allocated before the reset and counted, as the lsce bench counts inputs, outputs
and scratch). PyTorch has no allocator statistics for the CPU, so there the step runs once
under `torch.profiler` with `profile_memory=True` and the memory timeline (`_memory_profile()`,
a private API of the profiler; the script says so when it is missing) is replayed: the largest
sum of live CPU allocations, the inputs (present before the step) included. Time: the median
of `--repeats` steps after a warm-up (`time.perf_counter`, after `torch.cuda.synchronize()` on
CUDA). Accuracy (`--check`): the max absolute error of the loss, dH, dW and db against the
reference path in float64 from the same (rounded) inputs, on the CPU.

    python3 benches/peers/torch_linear_ce.py [--quick | --full | --shapes 512x256x8192,..]
        [--dtype f32,bf16] [--impl chunked,reference,liger] [--device cpu|cuda]
        [--repeats 5] [--check] [--json FILE]
"""

import argparse
import json
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

FULL = [(4096, 512, 32000), (1024, 1024, 128256), (256, 2048, 262144), (16384, 256, 50257)]
QUICK = [(512, 256, 8192), (128, 512, 32000), (1024, 128, 16384), (1024, 128, 32000)]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SMOOTHING = 0.1  # --smoothing; PyTorch 2.15's chunked path takes only 0 (it falls back)


def values(count, seed, d):
    """The bench's generator (benches/linear.rs, `Inputs::new`), bit for bit in f32."""
    i = np.arange(count, dtype=np.uint64)
    mixed = ((i * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)) ^ np.uint64(seed)
    scale = np.float32(1.0) / np.sqrt(np.sqrt(np.float32(d)))
    x = (mixed % np.uint64(2001)).astype(np.float32) / np.float32(1000.0) - np.float32(1.0)
    return torch.from_numpy(x * scale)


def inputs(n, d, v, dtype, device):
    h = values(n * d, 1, d).reshape(n, d).to(dtype)
    w = values(v * d, 2, d).reshape(v, d).to(dtype)
    b = values(v, 3, d).to(dtype)
    y = (torch.arange(n, dtype=torch.int64) * 7919) % v
    return tuple(t.to(device) for t in (h, w, b, y))


def liger_loss():
    """Liger's fused linear cross-entropy module, or None when it is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(label_smoothing=SMOOTHING)


def falls_back(h, w, b, y):
    """PyTorch's warning when its chunked path does not take this case (None when it does)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step("chunked", h, w, b, y)
    messages = [str(c.message) for c in caught if "options" in str(c.message)]
    return messages[0] if messages else None


def step(impl, h, w, b, y):
    """One forward and backward from fresh leaves: the loss and (dH, dW, db)."""
    h, w, b = (t.detach().requires_grad_(True) for t in (h, w, b))
    if impl == "chunked":
        loss = F.linear_cross_entropy(h, w, y, linear_bias=b, label_smoothing=SMOOTHING,
                                      options=torch.nn.LinearCrossEntropyOptions())
    elif impl == "liger":
        loss = liger_loss()(w, h, y, b)
    else:
        loss = F.linear_cross_entropy(h, w, y, linear_bias=b, label_smoothing=SMOOTHING)
    loss.backward()
    return loss.detach(), (h.grad, w.grad, b.grad)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(impl, h, w, b, y):
    """The peak bytes allocated during one step, inputs included."""
    if h.device.type == "cuda":
        sync(h.device)
        torch.cuda.reset_peak_memory_stats(h.device)
        step(impl, h, w, b, y)
        sync(h.device)
        return torch.cuda.max_memory_allocated(h.device)
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step(impl, h, w, b, y)
    live = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def median_ms(impl, h, w, b, y, repeats):
    step(impl, h, w, b, y)
    times = []
    for _ in range(repeats):
        sync(h.device)
        start = time.perf_counter()
        step(impl, h, w, b, y)
        sync(h.device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def errors(impl, h, w, b, y):
    """Max |x - x64| of the loss, dH, dW, db against float64 from the same inputs."""
    loss, grads = step(impl, h, w, b, y)
    cpu = [t.cpu() for t in (h, w, b, y)]
    loss64, grads64 = step("reference", cpu[0].double(), cpu[1].double(), cpu[2].double(),
                           cpu[3])
    loss, grads = loss.cpu(), [g.cpu() for g in grads]
    out = {"loss": abs(loss.double() - loss64).item()}
    for name, g, g64 in zip(("d_hidden", "d_head", "d_bias"), grads, grads64):
        out[name] = (g.double() - g64).abs().max().item()
    return out


def parse_shapes(text):
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]


def main():
    global SMOOTHING
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=parse_shapes)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--dtype", default="f32,bf16")
    parser.add_argument("--impl", default="chunked,reference,liger")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--smoothing", type=float, default=SMOOTHING)
    parser.add_argument("--json")
    args = parser.parse_args()
    SMOOTHING = args.smoothing
    warnings.filterwarnings("ignore", message="linear_cross_entropy: ``options`` ignored")
    if not hasattr(F, "linear_cross_entropy"):
        sys.exit(f"torch {torch.__version__} has no F.linear_cross_entropy (2.13+ has)")
    shapes = args.shapes or (FULL if args.full else QUICK)
    records = []
    device = torch.device(args.device)
    impls = args.impl.split(",")
    if "liger" in impls and (device.type != "cuda" or liger_loss() is None):
        print("liger skipped: it needs CUDA and liger_kernel installed")
        impls.remove("liger")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}")
    print(f"{'NxDxV dtype':>22} {'impl':>9} {'ms':>9} {'peak MB':>9} {'logits MB':>9}"
          + (f" {'loss err':>9} {'dH err':>9} {'dW err':>9} {'db err':>9}" if args.check else ""))
    for n, d, v in shapes:
        for dtype_name in args.dtype.split(","):
            h, w, b, y = inputs(n, d, v, DTYPES[dtype_name], device)
            for impl in impls:
                record = {"shape": [n, d, v], "dtype": dtype_name, "implementation": impl,
                          "torch": torch.__version__, "device": where,
                          "smoothing": SMOOTHING, "logits_bytes": n * v * 4}
                if impl == "chunked":
                    record["fallback"] = falls_back(h, w, b, y)
                record["ms"] = median_ms(impl, h, w, b, y, args.repeats)
                try:
                    record["peak_bytes"] = peak_bytes(impl, h, w, b, y)
                except (ImportError, AttributeError, ValueError) as e:
                    record["peak_bytes"] = None
                    print(f"  no memory timeline in this torch: {e}")
                line = (f"{f'{n}x{d}x{v} {dtype_name}':>22} {impl:>9} {record['ms']:>9.1f} "
                        f"{(record['peak_bytes'] or 0) / 1e6:>9.1f} {n * v * 4 / 1e6:>9.1f}")
                if args.check:
                    record["max_abs_error"] = errors(impl, h, w, b, y)
                    line += "".join(f" {record['max_abs_error'][k]:>9.2e}"
                                    for k in ("loss", "d_hidden", "d_head", "d_bias"))
                if record.get("fallback"):
                    line += "  (PyTorch fell back to its reference path)"
                print(line, flush=True)
                records.append(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
