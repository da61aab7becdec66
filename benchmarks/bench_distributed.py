"""`dynrobust eval` in one process vs the same command under torchrun with N ranks, side by side.

    python benchmarks/bench_distributed.py [--model resnet50] [--ranks 2] [--batch-size 16] [--corruptions noise,blur] [--severities 3] [--copies 4] [--repeats 2] [--device cpu]

Builds an ImageNet-C tree from the bundled photos (each copied ``--copies`` times), then runs the
whole command (start-up, model, decoding, forward, records, and for torchrun the merge of the
parts), alternating one process and ``torchrun --standalone --nproc-per-node N``, into fresh
output folders, and prints the wall times, the speed-up, and whether both stores hold the same
per-image predictions. On the CPU, one process uses every core through torch's threads, and
torchrun gives each rank one thread (its default OMP_NUM_THREADS=1); on GPUs, use ``--device cuda``
with one rank per GPU. Not part of the tests.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sample_tree import build_sample_tree


def _timed(command) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def _predictions(out):
    from robustbench_dyn.store import ResultsStore

    with ResultsStore.open_existing(out) as store:
        records = store.records()
    return records.drop(columns="run_id").sort_values(["corruption", "severity", "image_id"]).reset_index(drop=True)


def main():
    import torch

    from robustbench_dyn.models import create_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--corruptions", default="noise,blur")
    parser.add_argument("--severities", default="3")
    parser.add_argument("--copies", type=int, default=4, help="copies of each bundled photo (cell size = 4 x copies)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = build_sample_tree(tmp, args.copies, args.corruptions, args.severities)
        images = sum(1 for _ in tree.rglob("*.jpg"))
        weights = tmp / "weights.pth"
        torch.manual_seed(0)
        torch.save(create_model(args.model).state_dict(), weights)
        eval_args = ["eval", "--model", args.model, "--weights", str(weights), "--imagenet-c", str(tree),
                     "-c", args.corruptions, "-s", args.severities, "-b", str(args.batch_size), "--device",
                     args.device, "-q"]
        alone = [sys.executable, "-m", "robustbench_dyn", *eval_args]
        ranked = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                  "-m", "robustbench_dyn", *eval_args]
        print(f"# {platform.machine()}, {torch.get_num_threads()} cores for torch, torch {torch.__version__}, "
              f"device {args.device}; {args.model}, batch {args.batch_size}, {images} images 224x224, "
              f"{args.ranks} ranks")
        times = {"one process": [], f"torchrun {args.ranks} ranks": []}
        for repeat in range(args.repeats):
            for (name, command), folder in zip(zip(times, (alone, ranked)), ("alone", "ranked")):
                out = tmp / f"{folder}{repeat}"
                times[name].append(_timed(command + ["--out", str(out)]))
                print(f"  {name:18s} run {repeat + 1}: {times[name][-1]:6.1f} s", flush=True)
        same = _predictions(tmp / "alone0").equals(_predictions(tmp / "ranked0"))
        medians = {name: statistics.median(values) for name, values in times.items()}
        one, many = medians.values()
        for name, value in medians.items():
            print(f"{name:20s} median {value:6.1f} s  {images / value:6.1f} images/s")
        print(f"speed-up of torchrun: {one / many:.2f}x; same predictions per image: {same}")


if __name__ == "__main__":
    main()
