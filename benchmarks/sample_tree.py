"""An ImageNet-C tree of the bundled photos for the benchmarks, each photo copied under new names."""

from __future__ import annotations

import shutil
from pathlib import Path


def build_sample_tree(folder: Path, copies: int, corruptions: str, severities: str) -> Path:
    """``folder/clean`` (the 4 bundled photos, ``copies`` of each) and their ImageNet-C tree,
    ``folder/imagenet-c``, at ``corruptions`` and ``severities``; returns the tree."""
    from robustbench_dyn.data.build_imagenet_c import build_imagenet_c
    from robustbench_dyn.sample import write_sample_dataset

    clean = write_sample_dataset(folder / "clean")
    for photo in list(clean.glob("*/*")):
        for k in range(1, copies):
            shutil.copyfile(photo, photo.with_name(f"{photo.stem}_{k}{photo.suffix}"))
    tree = folder / "imagenet-c"
    build_imagenet_c(clean, tree, corruptions, severities, progress=False)
    return tree
