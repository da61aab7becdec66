"""The bundled sample: natural photos shipped with scikit-image, each with an ImageNet class.

Used by ``dynrobust demo``, the docs and the tests, so nothing has to be downloaded. The photos are
scikit-image's (their licences are listed in ``skimage/data/README.txt``); the ImageNet classes are
our reading of what each photo shows.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustbench_dyn.errors import DynrobustError


@dataclass(frozen=True)
class SampleImage:
    """One bundled photo: a short name, its ImageNet wnid and class name, and its file."""

    name: str
    wnid: str
    label: str
    path: Path

    def load(self) -> np.ndarray:
        """The photo as uint8 (H, W, 3)."""
        from robustbench_dyn.data.images import load_rgb

        return load_rgb(self.path)


# (name, file in skimage/data, wnid, ImageNet class)
_SAMPLE = (
    ("chelsea", "chelsea.png", "n02123045", "tabby cat"),
    ("coffee", "coffee.png", "n07920052", "espresso"),
    ("rocket", "rocket.jpg", "n03773504", "missile"),
    ("motorcycle", "motorcycle_left.png", "n03785016", "moped"),
)


def _skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DynrobustError("the bundled sample needs scikit-image: pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def sample_images() -> list[SampleImage]:
    """Return the bundled photos (four natural photos of different sizes, with ImageNet labels)."""
    data_dir = _skimage_data_dir()
    images = []
    for name, filename, wnid, label in _SAMPLE:
        path = data_dir / filename
        if not path.is_file():
            raise DynrobustError(f"the sample photo {path} is missing from this scikit-image install")
        images.append(SampleImage(name, wnid, label, path))
    return images


def write_sample_dataset(root) -> Path:
    """Copy the sample into a class-folder dataset ``<root>/<wnid>/<name><ext>``; return ``root``."""
    root = Path(root)
    for image in sample_images():
        folder = root / image.wnid
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image.path, folder / (image.name + image.path.suffix))
    return root
