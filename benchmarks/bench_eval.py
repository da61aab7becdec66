"""Whole `dynrobust eval` pipeline vs the bare model forward, images/s, side by side in one run.

    python benchmarks/bench_eval.py [--model resnet50] [--batch-size 32] [--device cpu] [--severities 1-5]

Builds an ImageNet-C tree from the bundled photos (4 photos x 19 corruptions x the severities),
then times (1) ``evaluate()`` end to end: model construction, reading and decoding the JPEGs, the
forward, top-5, and committing per-image records to SQLite; and (2) the bare forward of the same
model on the same images, already decoded and normalised in memory, in batches of the same size.
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


def main():
    from robustbench_dyn.data.build_imagenet_c import build_imagenet_c
    from robustbench_dyn.data.images import load_rgb
    from robustbench_dyn.evaluate import evaluate
    from robustbench_dyn.models import create_model, model_config
    from robustbench_dyn.sample import write_sample_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--severities", default="1-5")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = write_sample_dataset(tmp / "clean")
        tree = tmp / "imagenet-c"
        build_imagenet_c(clean, tree, None, args.severities, workers=0, progress=False)
        files = sorted(p for p in tree.rglob("*.jpg"))
        print(f"# {platform.machine()} {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
              f"device {args.device}; {args.model}, batch {args.batch_size}, {len(files)} images 224x224")

        # (2) bare forward on the same images, decoded and normalised beforehand
        config = model_config(args.model).preprocessing
        torch.manual_seed(0)
        model = create_model(args.model).eval().to(args.device)
        mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        std = torch.tensor(config.std).view(1, 3, 1, 1)
        pixels = torch.from_numpy(np.stack([load_rgb(f) for f in files])).permute(0, 3, 1, 2).float() / 255
        inputs = ((pixels - mean) / std).to(args.device)
        with torch.inference_mode():
            model(inputs[: args.batch_size])  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(0, len(inputs), args.batch_size):
                model(inputs[i : i + args.batch_size]).topk(5, dim=1)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            bare_s = time.perf_counter() - start
        del model, inputs, pixels

        # (1) the whole pipeline, end to end
        start = time.perf_counter()
        summary = evaluate(args.model, imagenet_c=tree, severities=args.severities, batch_size=args.batch_size,
                           device=args.device, out=tmp / "runs", progress=False)
        pipeline_s = time.perf_counter() - start
        assert summary.images_evaluated == len(files)

    bare = len(files) / bare_s
    pipeline = len(files) / pipeline_s
    print(f"bare forward:       {bare:8.2f} images/s ({bare_s:.1f} s)")
    print(f"dynrobust eval:     {pipeline:8.2f} images/s ({pipeline_s:.1f} s, model construction included)")
    print(f"pipeline / bare:    {pipeline / bare:8.1%} (target >= 90% on CPU)")


if __name__ == "__main__":
    main()
