"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle noise.

Severity parameters are imagecorruptions 1.1.2's (= ImageNet-C's). Each function takes uint8
(H, W, 3), a severity and a Generator, and returns floats on the 0..255 scale or uint8.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import pdtr

GAUSSIAN = (0.08, 0.12, 0.18, 0.26, 0.38)  # std of the added noise, image in [0, 1]
SHOT = (60, 25, 12, 5, 3)  # photons per unit intensity: Poisson(x * c) / c
IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of values replaced, half salt half pepper
SPECKLE = (0.15, 0.2, 0.35, 0.45, 0.6)  # std of the multiplicative noise


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """x + N(0, c^2) per value, with x in [0, 1]; returned on the 0..255 scale (unclipped)."""
    out = rng.standard_normal(image.shape, dtype=np.float32)
    out *= np.float32(GAUSSIAN[severity - 1] * 255.0)
    out += image
    return out


_GUIDE_BINS = 256


@lru_cache(maxsize=None)
def _poisson_tables(photons: int):
    """Per grey level L: the Poisson(L/255 * photons) CDF, a guide table into it, and k -> uint8.

    Inverse-CDF sampling with a guide table (Chen & Asau 1974) draws exact Poisson variates with one
    uniform each; the input has only 256 levels, so the tables are built once per severity.
    """
    lam = np.arange(256, dtype=np.float64)[:, None] / 255.0 * photons
    k_max = int(np.ceil(photons + 12 * np.sqrt(photons) + 20))
    k = np.arange(k_max + 1, dtype=np.float64)[None, :]
    cdf = pdtr(k, lam)  # P(K <= k)
    cdf[:, -1] = 1.0  # the tail beyond k_max (< 1e-20) goes to the last value
    thresholds = np.arange(_GUIDE_BINS, dtype=np.float64) / _GUIDE_BINS
    guide = np.stack([np.searchsorted(row, thresholds, side="right") for row in cdf]).astype(np.int32)
    values = np.clip(np.arange(k_max + 1) / float(photons), 0, 1) * 255  # as the reference maps k
    return cdf, guide, values.astype(np.uint8)


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson(x * c) / c per value, with x in [0, 1]; returned as uint8."""
    cdf, guide, values = _poisson_tables(SHOT[severity - 1])
    cdf_flat, guide_flat = cdf.ravel(), guide.ravel()
    levels = image.reshape(-1)
    u = rng.random(levels.size)
    # index of (level, guide bin) = level * bins + floor(u * bins), built in one buffer (fewer
    # fresh arrays: at this size each costs more in page faults than in arithmetic)
    index = levels.astype(np.intp)
    index *= _GUIDE_BINS
    np.add(index, u * _GUIDE_BINS, out=index, casting="unsafe")  # truncation = floor, u >= 0
    k = np.take(guide_flat, index)
    # smallest k with u < CDF(k): walk up from the guide's start (one or two steps at most, typically)
    np.multiply(levels, cdf.shape[1], out=index, dtype=np.intp)
    index += k
    todo = np.flatnonzero(np.take(cdf_flat, index) <= u)
    while todo.size:
        k[todo] += 1
        index[todo] += 1
        todo = todo[np.take(cdf_flat, index[todo]) <= u[todo]]
    return np.take(values, k).reshape(image.shape)


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Each value becomes 0 with probability c/2 and 255 with probability c/2 (skimage 's&p')."""
    amount = IMPULSE[severity - 1]
    u = rng.random(image.shape, dtype=np.float32)
    out = image.copy()
    out[u < amount / 2] = 0
    out[(u >= amount / 2) & (u < amount)] = 255
    return out


def speckle_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """x + x * N(0, c^2) per value; returned on the 0..255 scale (unclipped)."""
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(SPECKLE[severity - 1])
    noise += np.float32(1.0)
    noise *= image
    return noise
