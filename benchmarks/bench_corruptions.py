"""Corruption engine vs imagecorruptions 1.1.2: ms per 224x224 image, side by side in one run.

    python benchmarks/bench_corruptions.py [--repeats 3] [--quick]

For every corruption and severity both implementations process the same bundled photos
(Resize 256 + CenterCrop 224), alternating so that machine noise hits both alike; the best of
``--repeats`` rounds is kept for each. Prints a table, the full 19-corruption sweep per image and
the speed-up ratios the issue targets (sweep >= 20x, glass_blur >= 50x). Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from imagecorruptions_shim import load_reference  # noqa: E402

from robustbench_dyn.corruptions import CORRUPTION_NAMES, SEVERITIES, corrupt  # noqa: E402
from robustbench_dyn.data.images import resize_center_crop  # noqa: E402
from robustbench_dyn.sample import sample_images  # noqa: E402


def _time_per_image(fn, images):
    start = time.perf_counter()
    for image in images:
        fn(image)
    return (time.perf_counter() - start) / len(images) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per cell; the fastest is kept")
    parser.add_argument("--quick", action="store_true", help="one photo, one round (a smoke run)")
    args = parser.parse_args()

    reference = load_reference()
    images = [resize_center_crop(s.load()) for s in sample_images()]
    repeats = args.repeats
    if args.quick:
        images, repeats = images[:1], 1
    # warm caches (frost pictures, Poisson tables, FFT plans) for both before timing
    for name in CORRUPTION_NAMES:
        for severity in SEVERITIES:
            corrupt(images[0], name, severity, seed=0)
            if name != "glass_blur":
                reference.corrupt(images[0], severity=severity, corruption_name=name)

    print(f"# {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, NumPy {np.__version__}; {len(images)} photos 224x224, "
          f"best of {repeats}")
    print(f"{'corruption':18s} {'sev':>3s} {'ours ms':>9s} {'ref ms':>9s} {'speed-up':>9s}")
    ours_total = {s: 0.0 for s in SEVERITIES}
    ref_total = {s: 0.0 for s in SEVERITIES}
    per_name = {}
    for name in CORRUPTION_NAMES:
        ours_name = ref_name = 0.0
        for severity in SEVERITIES:
            ours_ms, ref_ms = [], []
            for r in range(repeats):
                ours_ms.append(_time_per_image(lambda im: corrupt(im, name, severity, seed=r), images))
                np.random.seed(r)
                ref_ms.append(_time_per_image(lambda im: reference.corrupt(im, severity=severity, corruption_name=name), images))
            ours, ref = min(ours_ms), min(ref_ms)
            ours_total[severity] += ours
            ref_total[severity] += ref
            ours_name += ours / len(SEVERITIES)
            ref_name += ref / len(SEVERITIES)
            print(f"{name:18s} {severity:3d} {ours:9.2f} {ref:9.2f} {ref / ours:8.1f}x", flush=True)
        per_name[name] = (ours_name, ref_name)
    print()
    print(f"{'corruption (mean over severities)':34s} {'ours ms':>9s} {'ref ms':>9s} {'speed-up':>9s}")
    for name, (ours, ref) in per_name.items():
        print(f"{name:34s} {ours:9.2f} {ref:9.2f} {ref / ours:8.1f}x")
    ours_sweep = sum(ours_total.values()) / len(SEVERITIES)
    ref_sweep = sum(ref_total.values()) / len(SEVERITIES)
    print()
    print(f"full 19-corruption sweep per image (mean over severities): ours {ours_sweep:.1f} ms, "
          f"imagecorruptions {ref_sweep:.1f} ms, speed-up {ref_sweep / ours_sweep:.1f}x (target >= 20x)")
    glass_ours, glass_ref = per_name["glass_blur"]
    print(f"glass_blur: ours {glass_ours:.2f} ms, imagecorruptions {glass_ref:.1f} ms, "
          f"speed-up {glass_ref / glass_ours:.1f}x (target >= 50x)")


if __name__ == "__main__":
    main()
