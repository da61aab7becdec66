"""Blur corruptions: defocus, glass, motion, zoom and gaussian blur.

Severity parameters are imagecorruptions 1.1.2's (= ImageNet-C's). Each function takes uint8
(H, W, 3), a severity and a Generator, and returns floats on the 0..255 scale or uint8.
"""

from __future__ import annotations

import numpy as np

from robustbench_dyn.corruptions import filters

DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, anti-alias sigma
GLASS = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, max shift, passes
MOTION = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius (taps = 2r+1), sigma in taps
ZOOM = (
    np.arange(1, 1.11, 0.01),
    np.arange(1, 1.16, 0.01),
    np.arange(1, 1.21, 0.02),
    np.arange(1, 1.26, 0.02),
    np.arange(1, 1.31, 0.03),
)  # zoom factors averaged with the image
GAUSSIAN_BLUR = (1, 2, 3, 4, 6)  # sigma in pixels


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Correlate each channel with an anti-aliased disk (reflect-101 border)."""
    radius, alias_blur = DEFOCUS[severity - 1]
    return filters.correlate_reflect101(image.astype(np.float32), filters.disk_kernel(radius, alias_blur))


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of sigma c pixels (edge pixels repeat)."""
    return filters.gaussian_filter(image.astype(np.float32), GAUSSIAN_BLUR[severity - 1])


def _glass_shuffle(image: np.ndarray, max_shift: int, passes: int, rng: np.random.Generator) -> np.ndarray:
    """ImageNet-C's local pixel shuffle, without its per-pixel Python loop.

    The reference visits rows from H - m down to m + 1 and, in each, columns from W - m down to
    m + 1, and for each pixel p draws d in [-m, m)^2 and executes ``x[p], x[p+d] = x[p+d], x[p]``
    on NumPy views: the right-hand side aliases ``x[p]``, so that line copies x[p+d] into x[p] and
    leaves x[p+d] unchanged. Sequentially, p receives the value x[p+d] holds at that moment: its
    final value if p+d was visited earlier in the pass, its value from before the pass otherwise.
    Following "visited earlier" links to the end of each chain (pointer doubling) gives every
    pixel's source at once.
    """
    height, width = image.shape[:2]
    rows = np.arange(height - max_shift, max_shift, -1)
    cols = np.arange(width - max_shift, max_shift, -1)
    if rows.size == 0 or cols.size == 0:
        return image
    visited = (rows[:, None] * width + cols[None, :]).ravel()  # flat positions, in visiting order
    count = visited.size
    step = np.arange(count)
    rank = np.full(height * width, count, dtype=np.intp)  # visiting step of each position; count = never
    rank[visited] = step
    # the visited pixels form the block [m+1, H-m] x [m+1, W-m], visited in reverse raster order
    block = (slice(max_shift + 1, height - max_shift + 1), slice(max_shift + 1, width - max_shift + 1))
    out = image.copy()
    for _ in range(passes):
        flat = out.reshape(height * width, -1)
        shifts = rng.integers(-max_shift, max_shift, size=(count, 2))  # (dx, dy), as the reference draws
        source = visited + shifts[:, 1] * width + shifts[:, 0]
        source_rank = rank[source]
        parent = np.where(source_rank < step, source_rank, step)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        values = np.take(flat, np.take(source, parent), axis=0)  # a new array: safe to write back
        out[block] = values.reshape(rows.size, cols.size, -1)[::-1, ::-1]
    return out


def glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, local pixel shuffle, Gaussian blur again."""
    sigma, max_shift, passes = GLASS[severity - 1]
    blurred = filters.gaussian_filter(image.astype(np.float32), sigma).astype(np.uint8)  # ref: np.uint8()
    shuffled = _glass_shuffle(blurred, max_shift, passes, rng)
    return filters.gaussian_filter(shuffled.astype(np.float32), sigma)


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur along a random direction in [-45, 45) degrees with a one-sided Gaussian."""
    radius, sigma = MOTION[severity - 1]
    angle = rng.uniform(-45, 45)
    return filters.motion_blur(image, radius, sigma, angle)


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Average of the image and its centre zoomed by each factor of the severity."""
    x = image.astype(np.float32)
    out = np.zeros_like(x)
    scratch = filters.zoom_scratch(image)
    for zoom in ZOOM[severity - 1]:
        out += filters.clipped_zoom(image, zoom, scratch=scratch)
    out += x
    out /= np.float32(len(ZOOM[severity - 1]) + 1)
    return out
