"""Parity of the engine with imagecorruptions 1.1.2 on real photos.

Three kinds of check:
- corruptions without randomness: the same pixels within 1 grey level on >= 99.9% of pixels;
- random corruptions, common random numbers: the reference's ``np.random`` calls are served from a
  Generator with our seed, in our draw order, so both compute from the same noise and must agree
  pixel by pixel. This is stronger than comparing distributions, and it is the only sound check
  for fog, frost and spatter, whose per-image statistics vary so much between seeds (sd 10-25% of
  the mean for fog and frost) that 20-seed averages of two correct implementations differ by >2%;
- random corruptions, in distribution: mean absolute difference from the clean image and PSNR,
  averaged over 20 seeds, within 2% of the reference's.
"""

import numpy as np
import pytest

from robustbench_dyn.corruptions import blur, corrupt
from robustbench_dyn.data.images import resize_center_crop

DETERMINISTIC = [
    "defocus_blur",
    "zoom_blur",
    "gaussian_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
    "saturate",
]
SEVERITIES = [1, 2, 3, 4, 5]


def _within_one(a, b):
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)) <= 1))


@pytest.fixture(scope="module")
def odd_photo():
    """A non-square photo with odd sides, to exercise borders and rounding of sizes."""
    from robustbench_dyn.sample import sample_images

    image = sample_images()[1].load()  # coffee, 400x600
    return np.ascontiguousarray(image[37:37 + 151, 60:60 + 203])


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_match_reference(name, photos, odd_photo, reference):
    for image in (photos["chelsea"], photos["rocket"], odd_photo):
        for severity in SEVERITIES:
            expected = reference.corrupt(image, severity=severity, corruption_name=name)
            ours = corrupt(image, name, severity, seed=0)
            assert ours.shape == expected.shape and ours.dtype == np.uint8
            agree = _within_one(ours, expected)
            assert agree >= 0.999, f"{name} s{severity}: {agree:.5f} of pixels within 1 grey level"


class _LegacyFromGenerator:
    """Stands in for np.random.{uniform,normal,randint}, drawing from a Generator."""

    def __init__(self, rng, glass_shifts=None):
        self.rng = rng
        self.glass_shifts = glass_shifts

    def uniform(self, low=0.0, high=1.0, size=None):
        return self.rng.uniform(low, high, size)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return self.rng.normal(loc, scale, size)

    def randint(self, low, high=None, size=None):
        if self.glass_shifts is not None and size == (2,):
            return next(self.glass_shifts)
        return self.rng.integers(low, high, size)


def _reference_with_our_noise(reference, monkeypatch, image, name, severity, seed):
    glass_shifts = None
    if name == "glass_blur":
        # the reference draws one (dx, dy) per visited pixel; we draw them all per pass, same order
        _, shift, passes = blur.GLASS[severity - 1]
        h, w = image.shape[:2]
        count = len(range(h - shift, shift, -1)) * len(range(w - shift, shift, -1))
        twin = np.random.default_rng(seed)
        glass_shifts = iter(np.concatenate([twin.integers(-shift, shift, size=(count, 2)) for _ in range(passes)]))
    legacy = _LegacyFromGenerator(np.random.default_rng(seed), glass_shifts)
    with monkeypatch.context() as patch:
        patch.setattr(np.random, "uniform", legacy.uniform)
        patch.setattr(np.random, "normal", legacy.normal)
        patch.setattr(np.random, "randint", legacy.randint)
        return reference.corrupt(image, severity=severity, corruption_name=name)


# (corruption, least fraction of pixels within 1 grey level per severity)
COMMON_NOISE = [
    ("motion_blur", (0.999,) * 5),
    ("snow", (0.999,) * 5),
    ("frost", (0.999,) * 5),
    ("fog", (0.999,) * 5),
    ("elastic_transform", (0.999,) * 5),
    ("glass_blur", (0.999,) * 5),
    # water spatter (1-3): our distance transform is exact Euclidean, OpenCV's DIST_L2 with a 5x5 mask
    # is a chamfer approximation (up to 0.23 px apart below 20 px); histogram equalisation and the
    # emboss filter amplify that into 0.5-4% of pixels (mean |diff| <= 0.21 grey levels measured).
    # Canny edges match OpenCV exactly.
    ("spatter", (0.95, 0.95, 0.95, 0.999, 0.999)),
]


@pytest.mark.parametrize("name,least", COMMON_NOISE, ids=[c[0] for c in COMMON_NOISE])
def test_random_corruptions_match_reference_given_the_same_noise(name, least, photos, reference, monkeypatch):
    images = [photos["chelsea"], photos["motorcycle"]]
    if name == "glass_blur":  # the reference's per-pixel loop takes ~0.8 s at 224 px
        images = [resize_center_crop(photos["chelsea"], 96, 96)]
    for severity in SEVERITIES:
        for k, image in enumerate(images):
            seed = 1000 * severity + k
            expected = _reference_with_our_noise(reference, monkeypatch, image, name, severity, seed)
            ours = corrupt(image, name, severity, seed=seed)
            agree = _within_one(ours, expected)
            assert agree >= least[severity - 1], f"{name} s{severity}: {agree:.5f} within 1 grey level"
            assert np.abs(ours.astype(float) - expected).mean() < 0.5


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 10 * np.log10(255.0**2 / mse)


IN_DISTRIBUTION = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "elastic_transform",
]


@pytest.mark.parametrize("name", IN_DISTRIBUTION)
def test_random_corruptions_match_reference_in_distribution(name, photos, reference):
    image = photos["coffee"]
    if name == "glass_blur":
        image = resize_center_crop(photos["coffee"], 80, 80)
    for severity in SEVERITIES:
        ref_mad, our_mad, ref_psnr, our_psnr = [], [], [], []
        for seed in range(20):
            np.random.seed(seed)
            expected = reference.corrupt(image, severity=severity, corruption_name=name)
            ours = corrupt(image, name, severity, seed=10_000 + seed)
            ref_mad.append(np.abs(expected.astype(float) - image).mean())
            our_mad.append(np.abs(ours.astype(float) - image).mean())
            ref_psnr.append(_psnr(expected, image))
            our_psnr.append(_psnr(ours, image))
        mad_gap = np.mean(our_mad) / np.mean(ref_mad) - 1
        psnr_gap = np.mean(our_psnr) / np.mean(ref_psnr) - 1
        assert abs(mad_gap) < 0.02, f"{name} s{severity}: mean |x' - x| off by {mad_gap:+.2%}"
        assert abs(psnr_gap) < 0.02, f"{name} s{severity}: PSNR off by {psnr_gap:+.2%}"


def test_canny_matches_opencv(reference):
    """Spatter's edge map is OpenCV's Canny (L1 gradient, 3x3 Sobel), reimplemented without cv2."""
    import cv2

    from robustbench_dyn.corruptions import filters, weather

    rng = np.random.default_rng(5)
    for sigma, threshold in ((4, 0.69), (3, 0.68), (2, 0.68)):
        for _ in range(4):
            liquid = filters.gaussian_filter(rng.normal(0.65, 0.3, (224, 224)), sigma)
            liquid[liquid < threshold] = 0
            layer = (liquid * 255).astype(np.uint8)
            expected = cv2.Canny(layer, 50, 150) > 0
            assert expected.any()
            assert np.array_equal(weather._canny(layer, 50, 150), expected)
