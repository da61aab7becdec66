"""DDF and involution: native kernels vs the pure-PyTorch reference vs a depthwise convolution of the
same kernel size (channels_last), time and peak memory, forward and forward + backward, side by side.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--ops ddf,involution] [--shapes paper,r50]
                                   [--repeats 5] [--no-reference] [--no-memory] [--floor]

Shapes: ``paper`` is the DDF paper's Table 2 input, 2x256x200x300 (k=3 for DDF, 7 for involution);
``r50`` the inputs of the ResNet-50 3x3 convolutions at batch 32: 32x64x56x56, 32x128x28x28,
32x256x14x14, 32x512x7x7; ``r50s2`` those of the first blocks of stages 2-4, whose 3x3 (and so
DDF-ResNet's DDF and RedNet's involution) has stride 2: 32x128x56x56/2, 32x256x28x28/2,
32x512x14x14/2. DDF: k=3, head 1, 'mul' (DDF-ResNet); involution: k=7, groups C/16 (RedNet).

Time: the median of ``--repeats`` runs after one warm-up, the three implementations interleaved in
each round so that the machine's load hits them alike. In the forward + backward rounds the backward
(``torch.autograd.grad``) is also timed on its own, and backward/forward is the median of those
backward times over the median forward (without autograd): measured, not a difference of two
medians, which on a noisy machine could come out negative.

Peak memory: what the call allocates beyond its inputs (the output, saved tensors and workspace),
and in brackets the total including the inputs. CUDA: from torch.cuda.max_memory_allocated. CPU:
each measurement runs in a fresh subprocess, resets the peak resident set size (Linux
/proc/self/clear_refs) once the inputs exist, and reads VmHWM - VmRSS after the call, so it sees
every allocation, oneDNN's included.

``--floor`` adds, per shape, the streaming floor of the forward: the time to read every input once
and write an output of x's size (sums and a fill, memory-bound), and native / floor: near 1 means
memory-bound, well above 1 means the arithmetic or the access pattern is the limit.

Large outputs: glibc returns allocations over 32 MB to the system when they are freed, so every
call page-faults them in afresh (the involution's filter gradient on 32x64x56x56 is 78 MB: about 25
ms of page faults on the 2-core machine of RESULTS.md). PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` puts
such allocations on transparent huge pages; the header line says whether it was set.

Targets (operators issue): native forward within 1.5x of the depthwise conv's time and within 1.2x
of its peak memory; native backward within 3x of its forward. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PAPER = [(2, 256, 200, 300)]
R50 = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7)]
R50_STRIDE2 = [(32, 128, 56, 56, 2), (32, 256, 28, 28, 2), (32, 512, 14, 14, 2)]  # (B, C, H, W, stride)
KERNEL = {"ddf": 3, "involution": 7}
IMPLS = ("native", "reference", "dwconv")


def _stride(shape):
    return shape[4] if len(shape) > 4 else 1


def shape_name(shape):
    return "x".join(map(str, shape[:4])) + (f"/{_stride(shape)}" if _stride(shape) > 1 else "")


def make_inputs(op, shape, device, requires_grad=False, seed=0):
    """The op's inputs (channels_last) and the depthwise conv's weight, as a dict of tensors;
    shape is (B, C, H, W) or (B, C, H, W, stride)."""
    b, c, h, w = shape[:4]
    s = _stride(shape)
    k = KERNEL[op]
    gen = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(b, c, h, w, generator=gen).contiguous(memory_format=cl)
    t = {"x": x, "weight": torch.randn(c, 1, k, k, generator=gen)}
    if op == "ddf":
        t["channel_filter"] = torch.randn(b, c, k, k, generator=gen)
        t["spatial_filter"] = torch.randn(b, k * k, h // s, w // s, generator=gen).contiguous(memory_format=cl)
    else:
        # as RedNet makes it: a 1x1 conv's channels_last output (B, G*k*k, H, W) viewed as 5-D
        oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
        t["kernel"] = torch.randn(b, c // 16 * k * k, oh, ow, generator=gen).contiguous(memory_format=cl).view(
            b, c // 16, k * k, oh, ow)
    return {name: v.to(device).requires_grad_(requires_grad) for name, v in t.items()}


def run(op, impl, t, s):
    from robustbench_dyn import ops

    k = KERNEL[op]
    if impl == "dwconv":
        return F.conv2d(t["x"], t["weight"], stride=s, padding=k // 2, groups=t["x"].shape[1])
    if op == "ddf":
        args = (t["x"], t["channel_filter"], t["spatial_filter"], k, 1, s)
        return ops.ddf(*args) if impl == "native" else ops.ddf_reference(*args, "mul", 1)
    args = (t["x"], t["kernel"], k, 1, s)
    return ops.involution(*args) if impl == "native" else ops.involution_reference(*args)


def _grad_inputs(op, impl, t):
    if impl == "dwconv":
        return [t["x"], t["weight"]]
    return [t["x"], t["channel_filter"], t["spatial_filter"]] if op == "ddf" else [t["x"], t["kernel"]]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(op, impl, t, device, backward, stride):
    """Seconds for the forward (no autograd), or (forward + backward, backward alone) with backward."""
    _sync(device)
    start = time.perf_counter()
    if not backward:
        with torch.no_grad():
            run(op, impl, t, stride)
        _sync(device)
        return time.perf_counter() - start
    out = run(op, impl, t, stride)
    grad_out = torch.ones_like(out)
    _sync(device)
    middle = time.perf_counter()
    torch.autograd.grad(out, _grad_inputs(op, impl, t), grad_out)
    _sync(device)
    end = time.perf_counter()
    return end - start, end - middle


def streaming_floor(t, repeats):
    """Median time to read each input of the op once and write an output of x's size."""
    inputs = [v for name, v in t.items() if name != "weight"]

    def stream():
        for v in inputs:
            v.sum()
        torch.empty_like(t["x"]).fill_(0)

    stream()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        stream()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def measure_memory(op, impl, shape, device, backward):
    """(extra bytes, total bytes) of one call: peak minus inputs, and peak."""
    if device == "cuda":
        t = make_inputs(op, shape, device, requires_grad=backward)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        time_call(op, impl, t, device, backward, _stride(shape))
        peak = torch.cuda.max_memory_allocated()
        return peak - base, peak
    # CPU: a fresh process, so ru_maxrss is this call's high-water mark
    code = (f"import sys, json; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); import bench_ops as b; "
            f"print(json.dumps(b._cpu_memory_child({op!r}, {impl!r}, {tuple(shape)!r}, {backward!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def _rss_bytes(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_memory_child(op, impl, shape, backward):
    from robustbench_dyn import ops

    if impl == "native":
        ops.backend_info()  # build/load the kernels before measuring
    t = make_inputs(op, shape, "cpu", requires_grad=backward)
    for v in t.values():
        v.detach().add_(0)  # touch every page
    input_bytes = sum(v.numel() * v.element_size() for name, v in t.items() if name != "weight" or impl == "dwconv")
    # reset the peak (VmHWM) to the current RSS, so that freed temporaries of the set-up do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes("VmRSS")
    time_call(op, impl, t, "cpu", backward, _stride(shape))
    extra = _rss_bytes("VmHWM") - before
    return extra, extra + input_bytes


def main():
    from robustbench_dyn import ops

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ops", default="ddf,involution")
    parser.add_argument("--shapes", default="paper,r50,r50s2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--floor", action="store_true", help="also time the streaming floor (CPU)")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    info = ops.backend_info()
    if info.for_device(device) != "native":
        sys.exit(f"the native ops are not active for {device}: {info}")
    shapes = {"paper": PAPER, "r50": R50, "r50s2": R50_STRIDE2}
    impls = [i for i in IMPLS if not (args.no_reference and i == "reference")]
    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads"
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    print(f"# {where}; torch {torch.__version__}; float32, channels_last; median of {args.repeats}; "
          f"THP_MEM_ALLOC_ENABLE={thp}")
    header = f"{'op':<10} {'shape':<18} {'pass':<8}" + "".join(f"{i + ' ms':>14}" for i in impls) + \
        f"{'native/dw':>11}" + ("" if args.no_memory else "".join(f"{i + ' MB':>20}" for i in impls) + f"{'mem n/dw':>10}")
    print(header)
    summary = []
    for op in args.ops.split(","):
        for group in args.shapes.split(","):
            for shape in shapes[group]:
                times = {}
                for backward in (False, True):
                    t = {impl: make_inputs(op, shape, device, requires_grad=backward) for impl in impls}
                    runs = {impl: [] for impl in impls}
                    for impl in impls:
                        time_call(op, impl, t[impl], device, backward, _stride(shape))  # warm-up
                    for _ in range(args.repeats):
                        for impl in impls:
                            runs[impl].append(time_call(op, impl, t[impl], device, backward, _stride(shape)))
                    del t
                    if backward:
                        bwd = {impl: statistics.median(b for _, b in v) * 1e3 for impl, v in runs.items()}
                        runs = {impl: [total for total, _ in v] for impl, v in runs.items()}
                    med = {impl: statistics.median(v) * 1e3 for impl, v in runs.items()}
                    times[backward] = med
                    name = "fwd+bwd" if backward else "forward"
                    line = f"{op:<10} {shape_name(shape):<18} {name:<8}" + "".join(
                        f"{med[i]:>14.2f}" for i in impls) + f"{med['native'] / med['dwconv']:>10.2f}x"
                    if not args.no_memory:
                        mem = {i: measure_memory(op, i, shape, device, backward) for i in impls}
                        line += "".join(f"{mem[i][0] / 2**20:>9.1f} ({mem[i][1] / 2**20:>7.1f})" for i in impls)
                        line += f"{mem['native'][0] / max(mem['dwconv'][0], 1):>9.2f}x"
                        if not backward:
                            summary.append((op, shape, "memory", mem["native"][0] / max(mem["dwconv"][0], 1)))
                    print(line, flush=True)
                    if backward:
                        print(f"{op:<10} {shape_name(shape):<18} {'bwd':<8}" + "".join(
                            f"{bwd[i]:>14.2f}" for i in impls) + f"{bwd['native'] / bwd['dwconv']:>10.2f}x", flush=True)
                fwd = times[False]["native"]
                if args.floor:
                    with torch.no_grad():
                        floor = streaming_floor(make_inputs(op, shape, device), args.repeats) * 1e3
                    print(f"{op:<10} {shape_name(shape):<18} floor    {floor:>14.2f}  native/floor "
                          f"{fwd / floor:.2f}x", flush=True)
                summary.append((op, shape, "time", fwd / times[False]["dwconv"]))
                summary.append((op, shape, "backward/forward", bwd["native"] / fwd))
    print("\n# targets: forward time <= 1.5x dwconv, forward memory <= 1.2x dwconv, backward <= 3x forward")
    for op, shape, what, ratio in summary:
        target = {"time": 1.5, "memory": 1.2, "backward/forward": 3.0}[what]
        print(f"{op:<10} {shape_name(shape):<18} {what:<17} {ratio:6.2f}x  "
              f"{'met' if ratio <= target else 'MISSED'} (target {target}x)")


if __name__ == "__main__":
    main()
