"""Import imagecorruptions 1.1.2 (the reference implementation) on today's stack.

The released package no longer imports: it needs ``pkg_resources`` (gone from setuptools >= 81),
passes ``multichannel=`` to scikit-image (removed in 0.19+), uses ``np.float_`` (gone in NumPy 2),
and its impulse noise draws from a fresh generator, ignoring ``np.random.seed``. The shims below
live in the tests only: library code never imports imagecorruptions.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np


def load_reference():
    """Return the imagecorruptions module, importable and seedable through ``np.random.seed``."""
    if "imagecorruptions" in sys.modules:
        return sys.modules["imagecorruptions"]
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None:
        raise ImportError("imagecorruptions is not installed")
    package_dir = os.path.dirname(spec.origin)

    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            fake = types.ModuleType("pkg_resources")

            def resource_filename(_package, resource):
                return os.path.normpath(os.path.join(package_dir, resource))

            fake.resource_filename = resource_filename
            sys.modules["pkg_resources"] = fake

    if not hasattr(np, "float_"):
        np.float_ = np.float64

    import skimage.filters
    import skimage.util

    original_gaussian = skimage.filters.gaussian
    if not getattr(original_gaussian, "_dynrobust_shim", False):

        def gaussian(image, sigma=1, multichannel=None, **kwargs):
            if multichannel:
                kwargs.setdefault("channel_axis", -1)
            # skimage >= 0.19 keeps the float input's range only when asked; the 2019 code relied on it
            kwargs.setdefault("preserve_range", True)
            return original_gaussian(image, sigma=sigma, **kwargs)

        gaussian._dynrobust_shim = True
        skimage.filters.gaussian = gaussian

    original_random_noise = skimage.util.random_noise
    if not getattr(original_random_noise, "_dynrobust_shim", False):

        def random_noise(image, mode="gaussian", rng=None, **kwargs):
            if rng is None:  # make np.random.seed govern it, as it did in 2019
                rng = int(np.random.randint(0, 2**31 - 1))
            return original_random_noise(image, mode=mode, rng=rng, **kwargs)

        random_noise._dynrobust_shim = True
        skimage.util.random_noise = random_noise

    import imagecorruptions

    return imagecorruptions
