"""Digital corruptions: contrast, elastic transform, pixelate, JPEG compression and saturate.

Severity parameters are imagecorruptions 1.1.2's (= ImageNet-C's). Each function takes uint8
(H, W, 3), a severity and a Generator, and returns floats on the 0..255 scale or uint8.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image

from robustbench_dyn.corruptions import filters

CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor on the deviation from the channel mean
ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)  # displacement gain
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # downscale factor
JPEG_QUALITY = (25, 18, 15, 10, 7)
SATURATE = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))  # HSV saturation * a + b


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Shrink each channel's deviation from its mean by c."""
    x = image.astype(np.float32)
    # exact channel sums from 256-bin histograms (a float reduction over (H, W) is 3x slower)
    levels = np.arange(256)
    means = np.array([np.bincount(image[..., c].ravel(), minlength=256) @ levels for c in range(3)]) / (
        image.shape[0] * image.shape[1]
    )
    means = means.astype(np.float32)
    x -= means
    x *= np.float32(CONTRAST[severity - 1])
    x += means
    return x


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Resample the image along a smoothed random displacement field (bilinear, reflected border).

    As imagecorruptions: uniform noise in +-0.5% of the height, Gaussian-smoothed with sigma 1% of
    each side (truncated at 3 sigma, reflected border), times alpha, displaces rows and columns.
    """
    height, width = image.shape[:2]
    alpha = ELASTIC_ALPHA[severity - 1]
    sigma = np.array((height, width)) * 0.01
    max_shift = height * 0.005  # the reference uses the height for both directions
    fields = []
    for _ in range(2):  # dx first, then dy, as the reference draws them
        noise = rng.uniform(-max_shift, max_shift, size=(height, width))
        smooth = filters.gaussian_filter(noise, sigma, mode="reflect", truncate=3)
        fields.append((smooth * np.float32(alpha)).astype(np.float32))
    dx, dy = fields
    rows = np.arange(height, dtype=np.float64)[:, None] + dy
    cols = np.arange(width, dtype=np.float64)[None, :] + dx
    out = filters.bilinear_sample(image, rows, cols)
    np.clip(out, 0, 255, out=out)
    return out


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Downscale by c with a box filter, then upscale back with nearest neighbour (PIL)."""
    factor = PIXELATE[severity - 1]
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((int(width * factor), int(height * factor)), Image.BOX)
    return np.asarray(small.resize((width, height), Image.NEAREST))


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Encode as JPEG at quality c and decode again (PIL)."""
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=JPEG_QUALITY[severity - 1])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def saturate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Set the HSV saturation to clip(s * a + b, 0, 1), keeping hue and value.

    With hue and value fixed, each channel's distance below the value scales with the saturation,
    so the reference's HSV round trip reduces to per-pixel arithmetic. Grey pixels have hue 0 in
    scikit-image, so an added b turns them red-tinted: R = V, G = B = V (1 - b).
    """
    a, b = SATURATE[severity - 1]
    value, low = filters.value_and_minimum(image)
    delta = value - low
    sat = np.divide(delta, value, out=np.zeros_like(value), where=value > 0)
    new_sat = sat * np.float32(a)
    new_sat += np.float32(b)
    np.clip(new_sat, 0, 1, out=new_sat)
    ratio = np.divide(new_sat, sat, out=np.zeros_like(sat), where=delta > 0)
    out = value[..., None] - image  # distance below the value, float32
    out *= ratio[..., None]
    np.subtract(value[..., None], out, out=out)
    if b > 0:
        grey = delta == 0
        out[grey, 1] = value[grey] * (1 - new_sat[grey])
        out[grey, 2] = out[grey, 1]
    return out
