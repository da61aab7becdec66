"""Whole `dynrobust eval` pipeline vs the bare model forward, images/s, side by side in one run.

    python benchmarks/bench_eval.py [--model resnet50] [--batch-size 32] [--device cpu] [--corruptions noise,blur] [--severities 3] [--copies 8] [--repeats 3]

Builds an ImageNet-C tree from the bundled photos, each copied ``--copies`` times under new names
so that every (corruption, severity) cell holds 4 x copies images, then times (1) ``evaluate()``
end to end: model construction, reading and decoding the JPEGs, the forward, top-5, and committing
per-image records to SQLite; and (2) the bare forward of the same model on the same images, already
decoded and normalised in memory, cut into the same batches (eval batches never span two cells).
Target: (1) at least 90% of (2) on CPU. Not part of the tests.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sample_tree import build_sample_tree


def main():
    from robustbench_dyn.data.images import load_rgb
    from robustbench_dyn.evaluate import evaluate
    from robustbench_dyn.models import create_model, model_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--corruptions", default="noise,blur")
    parser.add_argument("--severities", default="3")
    parser.add_argument("--copies", type=int, default=8, help="copies of each bundled photo (cell size = 4 x copies)")
    parser.add_argument("--repeats", type=int, default=3, help="pipeline runs, each between two bare runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = build_sample_tree(tmp, args.copies, args.corruptions, args.severities)
        cells = sorted({p.parent.parent for p in tree.rglob("*.jpg")})
        batches = []  # the pipeline's batches: per cell, images sorted by id, cut every batch_size
        files = []
        for cell in cells:
            images = sorted(cell.rglob("*.jpg"), key=lambda p: p.relative_to(cell).as_posix())
            for i in range(0, len(images), args.batch_size):
                batches.append(range(len(files) + i, len(files) + min(i + args.batch_size, len(images))))
            files += images
        print(f"# {platform.machine()} {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
              f"device {args.device}; {args.model}, batch {args.batch_size}, {len(files)} images 224x224")

        # (2) bare forward on the same images, decoded and normalised beforehand; timed before and
        # after the pipeline, and the faster of the two kept (the conservative choice for the ratio)
        config = model_config(args.model).preprocessing
        torch.manual_seed(0)
        model = create_model(args.model).eval().to(args.device)
        mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        std = torch.tensor(config.std).view(1, 3, 1, 1)
        pixels = torch.from_numpy(np.stack([load_rgb(f) for f in files])).permute(0, 3, 1, 2).float() / 255
        inputs = ((pixels - mean) / std).to(args.device)

        def bare_forward() -> float:
            with torch.inference_mode():
                model(inputs[: args.batch_size])  # warm-up
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for batch in batches:
                    model(inputs[batch.start : batch.stop]).topk(5, dim=1)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                return time.perf_counter() - start

        # the machine's speed drifts (shared cores): alternate bare, pipeline, bare, ... and compare
        # each pipeline run with the mean of the bare runs on either side of it
        bare_times, pipeline_times = [bare_forward()], []
        for k in range(args.repeats):
            start = time.perf_counter()
            summary = evaluate(args.model, imagenet_c=tree, corruptions=args.corruptions, severities=args.severities,
                               batch_size=args.batch_size,
                               device=args.device, out=tmp / f"runs{k}", progress=False)
            pipeline_times.append(time.perf_counter() - start)
            assert summary.images_evaluated == len(files)
            bare_times.append(bare_forward())

    n = len(files)
    ratios = [(bare_times[k] + bare_times[k + 1]) / 2 / pipeline_times[k] for k in range(len(pipeline_times))]
    print("bare forward (s):   " + " ".join(f"{t:6.1f}" for t in bare_times))
    print("dynrobust eval (s): " + " ".join(f"{t:6.1f}" for t in pipeline_times) + "   (model construction included)")
    print(f"bare forward:       {n / min(bare_times):8.2f} images/s (best run)")
    print(f"dynrobust eval:     {n / min(pipeline_times):8.2f} images/s (best run)")
    print("pipeline / bare, each run against its neighbours: " + " ".join(f"{r:.1%}" for r in ratios))
    print(f"pipeline / bare, median: {sorted(ratios)[len(ratios) // 2]:.1%} (target >= 90% on CPU)")


if __name__ == "__main__":
    main()
