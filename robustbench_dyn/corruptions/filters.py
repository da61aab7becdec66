"""Image filters the corruptions are built from, vectorised with NumPy/SciPy.

Each filter reproduces the library call imagecorruptions makes (scikit-image, SciPy, OpenCV) with
the same kernel, coordinate convention and border rule, without a per-pixel Python loop and
without importing OpenCV. Images are float32 (H, W) or (H, W, C) unless said otherwise.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.fft
import scipy.ndimage as ndi


def gaussian_filter(image: np.ndarray, sigma, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur over the two spatial axes, as ``skimage.filters.gaussian`` computes it.

    ``sigma`` is a number or a (row, column) pair in pixels; a channel axis is never blurred.
    ``mode`` is SciPy's border mode (scikit-image's default is ``'nearest'``). Returns float32.
    """
    sigma_rc = tuple(np.broadcast_to(np.asarray(sigma, dtype=np.float64), (2,)))
    sigmas = sigma_rc + (0.0,) * (image.ndim - 2)
    return ndi.gaussian_filter(image.astype(np.float32, copy=False), sigmas, mode=mode, truncate=truncate)


def _cv2_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    # cv2.getGaussianKernel for sigma > 0: exp(-(i - (ksize-1)/2)^2 / (2 sigma^2)), normalised to sum 1
    offsets = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2.0
    kernel = np.exp(-(offsets**2) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


@lru_cache(maxsize=None)
def disk_kernel(radius: int, alias_blur: float) -> np.ndarray:
    """The anti-aliased disk of ImageNet-C's defocus blur (float32, square, sums to 1).

    A disk of ``radius`` on a grid of half-width max(8, radius), normalised, then smoothed by a 3x3
    (radius <= 8) or 5x5 Gaussian of sigma ``alias_blur`` with OpenCV's reflect-101 border.
    """
    half = max(8, radius)
    ksize = 3 if radius <= 8 else 5
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _cv2_gaussian_kernel(ksize, alias_blur)
    pad = ksize // 2
    padded = np.pad(disk, pad, mode="reflect")  # NumPy's 'reflect' is OpenCV's BORDER_REFLECT_101
    rows = sum(g[i] * padded[i : i + disk.shape[0], :] for i in range(ksize))
    smooth = sum(g[j] * rows[:, j : j + disk.shape[1]] for j in range(ksize))
    kernel = smooth.astype(np.float32)
    kernel.setflags(write=False)
    return kernel


@lru_cache(maxsize=32)
def _kernel_spectrum(kernel_key: tuple, kernel_shape: tuple, fft_shape: tuple) -> np.ndarray:
    kernel = np.frombuffer(kernel_key[0], dtype=np.float32).reshape(kernel_shape)
    # correlation = convolution with the flipped kernel
    return scipy.fft.rfft2(kernel[::-1, ::-1].astype(np.float32), s=fft_shape, axes=(0, 1))


def correlate_reflect101(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation of each channel with ``kernel`` (odd sides), reflect-101 border: ``cv2.filter2D``.

    Computed with real FFTs (as OpenCV itself does for large kernels). Returns float32 of the
    input's shape.
    """
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    height, width = image.shape[:2]
    pad = ((ph, ph), (pw, pw)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image.astype(np.float32, copy=False), pad, mode="reflect")
    fft_shape = (scipy.fft.next_fast_len(padded.shape[0], real=True), scipy.fft.next_fast_len(padded.shape[1], real=True))
    spectrum = _kernel_spectrum((np.ascontiguousarray(kernel, dtype=np.float32).tobytes(),), kernel.shape, fft_shape)
    if image.ndim == 3:
        spectrum = spectrum[..., None]
    product = scipy.fft.rfft2(padded, s=fft_shape, axes=(0, 1))
    product *= spectrum
    full = scipy.fft.irfft2(product, s=fft_shape, axes=(0, 1))
    return np.ascontiguousarray(full[kh - 1 : kh - 1 + height, kw - 1 : kw - 1 + width], dtype=np.float32)


def motion_blur_taps(radius: int, sigma: float, angle: float, height: int, width: int):
    """The taps of imagecorruptions' motion blur: a list of (dy, dx, weight).

    A one-sided Gaussian of ``2 * radius + 1`` taps (sigma in taps) laid along ``angle`` degrees;
    tap i moves the image by (dy, dx) pixels. Taps stop where the motion would leave the image.
    """
    size = 2 * radius + 1
    offsets = np.arange(size)
    weights = np.exp(-(offsets**2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    weights = weights / weights.sum()
    # the same float expressions as the reference, so ceil() rounds identically
    point = (size * np.sin(np.deg2rad(angle)), size * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    taps = []
    for i in range(size):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        if abs(dy) >= height or abs(dx) >= width:
            break
        taps.append((dy, dx, float(weights[i])))
    return taps


def motion_blur(image: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """Sum of shifted copies of ``image`` weighted by :func:`motion_blur_taps` (edge pixels repeat).

    ``shifted[y, x] = image[clamp(y - dy), clamp(x - dx)]``, as imagecorruptions' ``shift``. Returns
    float32 of the input's shape.
    """
    height, width = image.shape[:2]
    taps = motion_blur_taps(radius, sigma, angle, height, width)
    dys = [t[0] for t in taps]
    dxs = [t[1] for t in taps]
    top, bottom = max(0, max(dys)), max(0, -min(dys))
    left, right = max(0, max(dxs)), max(0, -min(dxs))
    pad = ((top, bottom), (left, right)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image.astype(np.float32, copy=False), pad, mode="edge")
    out = np.zeros(image.shape, dtype=np.float32)
    scratch = np.empty_like(out)
    for dy, dx, weight in taps:
        view = padded[top - dy : top - dy + height, left - dx : left - dx + width]
        np.multiply(view, np.float32(weight), out=scratch)
        out += scratch
    return out


def _linear_taps(n_in: int, n_out: int, n_take: int):
    # scipy.ndimage.zoom(order=1, grid_mode=False): output i samples input i * (n_in - 1) / (n_out - 1)
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
    coords = np.arange(n_take, dtype=np.float64) * step
    lo = np.minimum(np.floor(coords).astype(np.intp), n_in - 1)
    frac = (coords - lo).astype(np.float32)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, frac


def clipped_zoom(image: np.ndarray, zoom: float, keep_shape: bool = True, scratch: np.ndarray | None = None) -> np.ndarray:
    """Zoom into the centre of ``image`` by ``zoom`` >= 1 with bilinear interpolation.

    The centre ``ceil(side / zoom)`` pixels are scaled to ``round(that * zoom)`` pixels with
    ``scipy.ndimage.zoom(order=1)``'s corner-aligned grid, as imagecorruptions' ``clipped_zoom``.
    With ``keep_shape`` only the top-left (H, W) of the zoomed image is computed (what zoom blur
    keeps); otherwise the whole zoomed image is returned. Returns float32.

    ``image`` may be uint8 or float. ``scratch``, a float32 array of shape (3, H, W * channels) from
    :func:`zoom_scratch`, holds the intermediate results (``keep_shape`` only); the returned array
    is then a view into it, valid until the next call with the same scratch. Reusing it saves
    fresh (page-faulted) memory per layer.
    """
    height, width = image.shape[:2]
    crop_h = int(np.ceil(height / float(zoom)))
    crop_w = int(np.ceil(width / float(zoom)))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = image[top : top + crop_h, left : left + crop_w]
    out_h, out_w = int(round(crop_h * zoom)), int(round(crop_w * zoom))
    take_h, take_w = (min(height, out_h), min(width, out_w)) if keep_shape else (out_h, out_w)
    r0, r1, fr = _linear_taps(crop_h, out_h, take_h)
    c0, c1, fc = _linear_taps(crop_w, out_w, take_w)
    channels = 1 if image.ndim == 2 else int(np.prod(image.shape[2:]))
    n_cols = take_w * channels
    if scratch is None or not keep_shape:
        scratch = np.empty((3, max(crop_h, take_h), n_cols), dtype=np.float32)
    else:
        scratch = scratch[:, :, :n_cols]
    # columns first, on the smaller crop and in the input's dtype (uint8 moves 4x fewer bytes),
    # as one gather over the (column, channel) pairs of each row
    flat = crop.reshape(crop_h, crop_w * channels)
    lanes = np.arange(channels)
    left_px = np.take(flat, (c0[:, None] * channels + lanes).ravel(), axis=1)
    right_px = np.take(flat, (c1[:, None] * channels + lanes).ravel(), axis=1)
    cols, rows_top, rows_bottom = scratch[0, :crop_h], scratch[2, :take_h], scratch[1, :take_h]
    np.subtract(right_px, left_px, out=cols, dtype=np.float32)
    cols *= np.repeat(fc, channels)
    np.add(cols, left_px, out=cols, dtype=np.float32)
    np.take(cols, r0, axis=0, out=rows_top)
    np.take(cols, r1, axis=0, out=rows_bottom)
    rows_bottom -= rows_top
    rows_bottom *= fr[:, None]
    rows_top += rows_bottom
    return rows_top.reshape((take_h, take_w) + image.shape[2:])


def zoom_scratch(image: np.ndarray) -> np.ndarray:
    """Scratch memory for repeated :func:`clipped_zoom` calls on ``image`` (float32)."""
    height, width = image.shape[:2]
    return np.empty((3, height, width * int(np.prod(image.shape[2:]))), dtype=np.float32)


def bilinear_sample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``image`` (H, W, C) at fractional (rows, cols) of shape (H', W') with bilinear weights.

    Outside the image the signal is extended by half-sample symmetric reflection, as
    ``scipy.ndimage.map_coordinates(order=1, mode='reflect')``: the image is padded that way just
    enough for the furthest sample, so the gathers need no per-sample border logic. ``image`` may
    be uint8 (gathered as bytes, interpolated in float32). Returns float32 (H', W', C).
    """
    height, width, channels = image.shape
    r_floor = np.floor(rows)
    c_floor = np.floor(cols)
    fr = (rows - r_floor).astype(np.float32).reshape(-1, 1)
    fc = (cols - c_floor).astype(np.float32).reshape(-1, 1)
    margin = 1 + int(max(0.0, -r_floor.min(), r_floor.max() - (height - 2), -c_floor.min(), c_floor.max() - (width - 2)))
    padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), mode="symmetric")
    stride = width + 2 * margin
    flat = padded.reshape(-1, channels)
    top_left = ((r_floor.astype(np.intp) + margin) * stride + (c_floor.astype(np.intp) + margin)).ravel()

    def lerp_columns(index):
        a = np.take(flat, index, axis=0)
        out = np.subtract(np.take(flat, index + 1, axis=0), a, dtype=np.float32)
        out *= fc
        return np.add(out, a, out=out, dtype=np.float32)

    top = lerp_columns(top_left)
    bottom = lerp_columns(top_left + stride)
    bottom -= top
    bottom *= fr
    top += bottom
    return top.reshape(rows.shape + (channels,))


def value_and_minimum(image: np.ndarray):
    """HSV value (max over channels) and the minimum over channels of uint8 (H, W, 3), as float32.

    Computed on uint8 with elementwise max/min (cheaper than a float reduction over the last axis).
    """
    value = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
    low = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])
    return value.astype(np.float32), low.astype(np.float32)
