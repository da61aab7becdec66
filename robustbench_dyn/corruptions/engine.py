"""``corrupt()``: one ImageNet-C corruption of one image, reproducible from a seed.

Each corruption function takes a C-contiguous uint8 (H, W, 3) image, a severity 1..5 and a
``numpy.random.Generator``, and returns either uint8 or floats on the 0..255 scale. The last step,
clipping to [0, 255] and truncating to uint8, is the one ImageNet-C and imagecorruptions apply
(``np.uint8(corrupted)``), so it lives here once.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from robustbench_dyn.corruptions import blur, digital, noise, weather
from robustbench_dyn.corruptions.names import CORRUPTION_NAMES, check_corruption, check_severity
from robustbench_dyn.errors import DynrobustError

MIN_SIDE = 32

_FUNCTIONS = {
    "gaussian_noise": noise.gaussian_noise,
    "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise,
    "speckle_noise": noise.speckle_noise,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur,
    "zoom_blur": blur.zoom_blur,
    "gaussian_blur": blur.gaussian_blur,
    "snow": weather.snow,
    "frost": weather.frost,
    "fog": weather.fog,
    "brightness": weather.brightness,
    "spatter": weather.spatter,
    "contrast": digital.contrast,
    "elastic_transform": digital.elastic_transform,
    "pixelate": digital.pixelate,
    "jpeg_compression": digital.jpeg_compression,
    "saturate": digital.saturate,
}
assert set(_FUNCTIONS) == set(CORRUPTION_NAMES)


def as_rgb_uint8(image) -> np.ndarray:
    """Return ``image`` as a C-contiguous uint8 (H, W, 3) array.

    Accepts uint8 arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (grey is repeated, alpha dropped)
    and PIL images of any mode. Raises DynrobustError for other dtypes, shapes or sides under 32 px.
    """
    if isinstance(image, Image.Image):
        from robustbench_dyn.data.images import to_rgb_array

        array = to_rgb_array(image)
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise DynrobustError(
                f"expected a uint8 image (values 0..255), got dtype {array.dtype}; "
                "convert with (image * 255).round().astype(np.uint8) if it holds floats in [0, 1]"
            )
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise DynrobustError(
                f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}"
            )
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        elif array.shape[2] == 4:
            array = array[..., :3]
    height, width = array.shape[:2]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise DynrobustError(
            f"image is {width}x{height} px; corruptions need both sides of at least {MIN_SIDE} px"
        )
    return np.ascontiguousarray(array)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Clip floats on the 0..255 scale and truncate them to uint8, as ImageNet-C's ``np.uint8()`` does."""
    if values.dtype == np.uint8:
        return np.ascontiguousarray(values)
    clipped = np.clip(values, 0, 255, out=values if values.flags.writeable else None)
    return clipped.astype(np.uint8)


def make_rng(seed) -> np.random.Generator:
    """A Generator from an int seed, a SeedSequence, an existing Generator, or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, float)):
        raise DynrobustError(f"seed must be an integer or None, got {seed!r}")
    return np.random.default_rng(seed)


def corrupt(image, name: str, severity: int, seed=None) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5) to ``image``; return uint8 (H, W, 3).

    ``seed`` fixes every random draw: the same image, corruption, severity and seed always give the
    same pixels. Use :func:`canonical_seed` to derive it from the image's id. ``None`` draws fresh
    entropy. Parameters are those of imagecorruptions 1.1.2 (the ImageNet-C code packaged).
    """
    function = _FUNCTIONS[check_corruption(name)]
    severity = check_severity(severity)
    rng = make_rng(seed)
    return to_uint8(function(as_rgb_uint8(image), severity, rng))
