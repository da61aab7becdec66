"""Weather corruptions: snow, frost, fog, brightness and spatter.

Severity parameters are imagecorruptions 1.1.2's (= ImageNet-C's). Each function takes uint8
(H, W, 3), a severity and a Generator, and returns floats on the 0..255 scale or uint8.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from PIL import Image

from robustbench_dyn.corruptions import filters
from robustbench_dyn.errors import DynrobustError

# snow: layer mean, layer std, zoom, threshold, blur radius, blur sigma, image weight
SNOW = (
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
)
FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # image weight, frost weight
FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # fog strength, fractal decay
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
# spatter: layer mean, layer std, layer blur sigma, threshold, intensity (water) or blur sigma (mud), mud?
SPATTER = (
    (0.65, 0.3, 4, 0.69, 0.6, 0),
    (0.65, 0.3, 3, 0.68, 0.6, 0),
    (0.65, 0.3, 2, 0.68, 0.5, 0),
    (0.65, 0.3, 1, 0.65, 1.5, 1),
    (0.67, 0.4, 1, 0.65, 1.5, 1),
)
FROST_PICTURES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
# the reference draws randint(5): frost6 is never used
FROST_CHOICES = 5

_RGB_TO_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # cv2.COLOR_RGB2GRAY


def snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Zoomed, thresholded, motion-blurred noise flakes over a whitened image."""
    mean, std, zoom, threshold, radius, sigma, weight = SNOW[severity - 1]
    height, width = image.shape[:2]
    x = image.astype(np.float32) / np.float32(255)
    layer = rng.normal(mean, std, (height, width)).astype(np.float32)
    layer = filters.clipped_zoom(layer, zoom, keep_shape=False)
    layer[layer < threshold] = 0
    np.clip(layer, 0, 1, out=layer)
    layer = filters.motion_blur(layer, radius, sigma, rng.uniform(-135, -45))
    # the reference rounds the layer to 8 bits, then crops it to the image
    layer = (np.round(layer * 255).astype(np.uint8)[:height, :width] / np.float32(255)).astype(np.float32)
    grey = x @ _RGB_TO_GREY
    whitened = np.maximum(x, (grey * np.float32(1.5) + np.float32(0.5))[..., None])
    x = np.float32(weight) * x + np.float32(1 - weight) * whitened
    x += (layer + layer[::-1, ::-1])[..., None]
    np.clip(x, 0, 1, out=x)
    x *= np.float32(255)
    return x


def _frost_dir() -> Path:
    # The pictures ship inside the installed imagecorruptions package. Its module is not imported
    # (it fails on today's stack); find_spec only locates it.
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        raise DynrobustError(
            "frost needs the frost pictures shipped with imagecorruptions: pip install imagecorruptions"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "frost"


def _cubic_weights(n_in: int, n_out: int):
    # cv2.resize(INTER_CUBIC): source x = (dst + 0.5) * n_in / n_out - 0.5, Keys kernel a = -0.75,
    # indices clamped at the border
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    base = np.floor(src).astype(np.intp)
    t = src - base
    a = -0.75
    weights = np.empty((n_out, 4))
    for tap, dist in enumerate((1 + t, t, 1 - t, 2 - t)):
        near = (a + 2) * dist**3 - (a + 3) * dist**2 + 1
        far = a * dist**3 - 5 * a * dist**2 + 8 * a * dist - 4 * a
        weights[:, tap] = np.where(dist <= 1, near, far)
    index = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    return index, weights


def _resize_cubic(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    rows_i, rows_w = _cubic_weights(image.shape[0], out_h)
    cols_i, cols_w = _cubic_weights(image.shape[1], out_w)
    x = image.astype(np.float32)
    rows = sum(rows_w[:, k, None, None].astype(np.float32) * x[rows_i[:, k]] for k in range(4))
    out = sum(cols_w[None, :, k, None].astype(np.float32) * rows[:, cols_i[:, k]] for k in range(4))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@lru_cache(maxsize=64)
def frost_picture(index: int, height: int, width: int) -> np.ndarray:
    """Frost picture ``index`` (0..5) scaled as imagecorruptions does for an (height, width) image.

    It is scaled by 1.1 times the factor that makes it cover the image, with bicubic interpolation;
    the result is cached per image size, so a dataset of 224x224 images scales each picture once.
    Returns read-only uint8 RGB.
    """
    path = _frost_dir() / FROST_PICTURES[index]
    if not path.is_file():
        raise DynrobustError(f"the frost picture {path} is missing from the imagecorruptions install")
    with Image.open(path) as picture:
        frost = np.asarray(picture.convert("RGB"))
    f_h, f_w = frost.shape[:2]
    scale = 1.0
    if f_h < height and f_w >= width:
        scale = height / f_h
    elif f_h >= height and f_w < width:
        scale = width / f_w
    elif f_h < height and f_w < width:
        scale = max(height / f_h, width / f_w)
    scale *= 1.1
    scaled = _resize_cubic(frost, int(np.ceil(f_h * scale)), int(np.ceil(f_w * scale)))
    scaled.setflags(write=False)
    return scaled


def frost(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blend with a random crop of one of five frost photographs."""
    weight, frost_weight = FROST[severity - 1]
    height, width = image.shape[:2]
    picture = frost_picture(int(rng.integers(FROST_CHOICES)), height, width)
    top = int(rng.integers(0, picture.shape[0] - height))
    left = int(rng.integers(0, picture.shape[1] - width))
    crop = picture[top : top + height, left : left + width]
    out = image.astype(np.float32) * np.float32(weight)
    out += crop.astype(np.float32) * np.float32(frost_weight)
    return out


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) diamond-square height map in [0, 1] (``size`` a power of two).

    The recursion of ImageNet-C's fog: at each scale the new points are the mean of their four
    neighbours plus uniform noise of amplitude ``wibble**2``; ``wibble`` starts at 100 and is divided
    by ``decay`` per scale. Returns float64.
    """
    heights = np.zeros((size, size), dtype=np.float64)
    step = size
    wibble = 100.0

    def jitter(total):
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = heights[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square += np.roll(square, -1, axis=1)
        heights[half:size:step, half:size:step] = jitter(square)
        centres = heights[half:size:step, half:size:step]
        corners = heights[0:size:step, 0:size:step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        heights[0:size:step, half:size:step] = jitter(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        heights[half:size:step, 0:size:step] = jitter(top)
        step = half
        wibble /= decay
    heights -= heights.min()
    return heights / heights.max()


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add a plasma fractal, then rescale so the brightest value stays at the image's maximum."""
    strength, decay = FOG[severity - 1]
    height, width = image.shape[:2]
    size = 1 << (max(height, width) - 1).bit_length()  # next power of two
    x = image.astype(np.float32) / np.float32(255)
    max_val = x.max()
    x += (np.float32(strength) * plasma_fractal(size, decay, rng)[:height, :width, None]).astype(np.float32)
    x *= np.float32(max_val / (max_val + strength))
    np.clip(x, 0, 1, out=x)
    x *= np.float32(255)
    return x


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Raise the HSV value by c (capped at 1), keeping hue and saturation.

    With hue and saturation fixed, RGB scales with the value, so the HSV round trip of the
    reference reduces to a per-pixel gain; black pixels (saturation 0) become grey c.
    """
    value, _ = filters.value_and_minimum(image)
    new_value = np.minimum(value + np.float32(BRIGHTNESS[severity - 1] * 255), np.float32(255))
    gain = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    out = image * gain[..., None]
    black = value == 0
    out[black] = new_value[black][:, None]
    return out


def _canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges of a uint8 image as ``cv2.Canny(image, low, high)`` finds them (L1 gradient, 3x3 Sobel).

    Returns a boolean edge map.
    """
    padded = np.pad(image.astype(np.int32), 1, mode="edge")  # Canny's Sobel uses BORDER_REPLICATE
    h, w = image.shape

    def at(dy, dx):
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mag = np.abs(gx) + np.abs(gy)
    m = np.pad(mag, 1)  # magnitudes outside the image are 0

    def mag_at(dy, dx):
        return m[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # OpenCV's sector test in fixed point: tan(22.5 deg) * 2^15 = 13573 (all products fit in int32)
    ax, ay = np.abs(gx), np.abs(gy)
    tg22 = ax * 13573
    y = ay << 15
    horizontal = y < tg22
    vertical = y > tg22 + (ax << 16)
    diagonal = ~(horizontal | vertical)
    keep = horizontal & (mag > mag_at(0, -1)) & (mag >= mag_at(0, 1))
    keep |= vertical & (mag > mag_at(-1, 0)) & (mag >= mag_at(1, 0))
    opposite_signs = (gx ^ gy) < 0
    diag_pos = (mag > mag_at(-1, -1)) & (mag > mag_at(1, 1))  # gradient signs agree
    diag_neg = (mag > mag_at(-1, 1)) & (mag > mag_at(1, -1))  # gradient signs differ
    keep |= diagonal & np.where(opposite_signs, diag_neg, diag_pos)
    candidate = keep & (mag > low)
    strong = candidate & (mag > high)
    labels, count = ndi.label(candidate, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return candidate
    has_strong = np.zeros(count + 1, dtype=bool)
    has_strong[labels[strong]] = True
    has_strong[0] = False
    return has_strong[labels]


def _box3(image: np.ndarray) -> np.ndarray:
    # cv2.blur(ksize=(3, 3)): mean over 3x3 with reflect-101 border; sums kept exact in float64
    padded = np.pad(image.astype(np.float64), 1, mode="reflect")
    h, w = image.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))


def _equalize_hist(image: np.ndarray) -> np.ndarray:
    # cv2.equalizeHist: the first occupied bin maps to 0, the rest by the cumulative count
    hist = np.bincount(image.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = image.size
    if hist[first] == total:
        return np.full_like(image, first)
    scale = np.float32(255.0 / (total - hist[first]))
    lut = np.zeros(256, dtype=np.float32)
    lut[first + 1 :] = np.cumsum(hist[first + 1 :]).astype(np.float32) * scale
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)[image]


_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])


def _water_mask(liquid: np.ndarray) -> np.ndarray:
    """The water-drop intensity map of spatter (severities 1-3), normalised to max 1."""
    liquid_u8 = np.clip(liquid * 255, 0, 255).astype(np.uint8)
    edges = _canny(liquid_u8, 50, 150)
    # distance to the nearest edge (cv2.distanceTransform DIST_L2, here exact), truncated at 20
    dist = np.full(edges.shape, 20.0) if not edges.any() else ndi.distance_transform_edt(~edges)
    dist = np.minimum(dist, 20.0).astype(np.float32)
    dist = (_box3(dist) / 9).astype(np.uint8)
    dist = _equalize_hist(dist)
    padded = np.pad(dist.astype(np.int32), 1, mode="reflect")
    h, w = dist.shape
    embossed = sum(
        int(_EMBOSS[dy, dx]) * padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)
    )
    embossed = np.clip(embossed, 0, 255)
    dist = np.rint(_box3(embossed) / 9).astype(np.float32)
    mask = liquid_u8.astype(np.float32) * dist
    peak = mask.max()
    return mask / peak if peak > 0 else mask


_WATER = np.array([175, 238, 238], dtype=np.float32) / 255  # pale turquoise
_MUD = np.array([63, 42, 20], dtype=np.float32) / 255  # mud brown


def spatter(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Water drops (severities 1-3) or mud splashes (4-5) from a thresholded smoothed noise layer."""
    mean, std, sigma, threshold, intensity, mud = SPATTER[severity - 1]
    height, width = image.shape[:2]
    x = image.astype(np.float32) / np.float32(255)
    liquid = rng.normal(mean, std, (height, width))
    liquid = filters.gaussian_filter(liquid, sigma)
    liquid[liquid < threshold] = 0
    if not mud:
        mask = _water_mask(liquid) * np.float32(intensity)
        x += mask[..., None] * _WATER
    else:
        mask = filters.gaussian_filter((liquid > threshold).astype(np.float32), intensity)
        mask[mask < 0.8] = 0
        x *= (1 - mask)[..., None]
        x += mask[..., None] * _MUD
    np.clip(x, 0, 1, out=x)
    x *= np.float32(255)
    return x
