"""The engine's contract: seeds, shapes, input conversion, errors, names and groups."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from robustbench_dyn.corruptions import (
    CORRUPTION_NAMES,
    EXTRA,
    GROUPS,
    STANDARD,
    blur,
    canonical_seed,
    corrupt,
    noise,
    parse_severities,
    resolve_corruptions,
)
from robustbench_dyn.errors import DynrobustError

RANDOM = [n for n in CORRUPTION_NAMES if n not in (
    "defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast", "pixelate", "jpeg_compression", "saturate"
)]


def test_names_and_groups_follow_imagenet_c():
    assert len(CORRUPTION_NAMES) == 19 and len(STANDARD) == 15 and len(EXTRA) == 4
    assert set(EXTRA) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert resolve_corruptions("noise") == ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
    assert resolve_corruptions("standard") == STANDARD
    assert resolve_corruptions("extra,fog") == ("fog",) + EXTRA
    assert resolve_corruptions(None) == CORRUPTION_NAMES == resolve_corruptions("all")
    assert sorted(sum((GROUPS[c] for c in ("noise", "blur", "weather", "digital")), ())) == sorted(CORRUPTION_NAMES)
    with pytest.raises(DynrobustError, match="Did you mean gaussian_noise"):
        resolve_corruptions("gausian_noise")


def test_parse_severities():
    assert parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert parse_severities("4,2, 2") == (2, 4)
    assert parse_severities("1-2,5") == (1, 2, 5)
    for bad in ("0", "6", "3-1", "a", "1-9", ""):
        with pytest.raises(DynrobustError):
            parse_severities(bad)


def test_canonical_seed_is_a_stable_hash_of_the_image_corruption_and_severity():
    key = b"\x1f".join([b"dynrobust.corruption.v1", b"n01440764/ILSVRC2012_val_00000293.JPEG", b"fog", b"3"])
    expected = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    assert canonical_seed("n01440764/ILSVRC2012_val_00000293.JPEG", "fog", 3) == expected
    seeds = {canonical_seed(i, c, s) for i in range(20) for c in ("fog", "snow") for s in (1, 2)}
    assert len(seeds) == 80
    # another interpreter (another hash randomisation) gives the same seed
    code = "from robustbench_dyn.corruptions import canonical_seed; print(canonical_seed('a/b.JPEG', 'snow', 5))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert int(out.stdout) == canonical_seed("a/b.JPEG", "snow", 5)


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_pixels_other_seed_other_pixels(name, photos):
    image = photos["chelsea"]
    first = corrupt(image, name, 3, seed=canonical_seed("img-a", name, 3))
    again = corrupt(image, name, 3, seed=canonical_seed("img-a", name, 3))
    other = corrupt(image, name, 3, seed=canonical_seed("img-b", name, 3))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
@pytest.mark.parametrize("shape", [(32, 32), (33, 57), (300, 451), (451, 300)])
def test_any_size_from_32_px_keeps_its_shape(name, shape, photos):
    from robustbench_dyn.data.images import resize_center_crop

    big = resize_center_crop(photos["coffee"], 480, 480)
    image = np.ascontiguousarray(big[: shape[0], : shape[1]])
    out = corrupt(image, name, 5, seed=1)
    assert out.shape == shape + (3,) and out.dtype == np.uint8 and out.flags.c_contiguous
    if name not in ("pixelate", "jpeg_compression", "contrast") or shape != (32, 32):
        assert not np.array_equal(out, image), "the corruption changed nothing"


def test_grey_rgba_and_pil_inputs_are_converted(photos):
    rgb = photos["rocket"]
    grey = rgb[..., 1].copy()
    as_rgb = np.repeat(grey[..., None], 3, axis=2)
    for name in ("fog", "saturate", "glass_blur"):
        expected = corrupt(as_rgb, name, 2, seed=7)
        assert np.array_equal(corrupt(grey, name, 2, seed=7), expected)
        assert np.array_equal(corrupt(grey[..., None], name, 2, seed=7), expected)
        assert np.array_equal(corrupt(Image.fromarray(grey), name, 2, seed=7), expected)
        rgba = np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])
        assert np.array_equal(corrupt(rgba, name, 2, seed=7), corrupt(rgb, name, 2, seed=7))


@pytest.mark.parametrize(
    "image,name,severity,message",
    [
        (np.zeros((64, 64, 3), np.uint8), "fogg", 1, "unknown corruption"),
        (np.zeros((64, 64, 3), np.uint8), "fog", 0, "severity must be"),
        (np.zeros((64, 64, 3), np.uint8), "fog", 6, "severity must be"),
        (np.zeros((64, 64, 3), np.uint8), "fog", 2.5, "severity must be"),
        (np.zeros((64, 64, 3), np.uint8), "fog", True, "severity must be"),
        (np.zeros((31, 64, 3), np.uint8), "fog", 1, "at least 32 px"),
        (np.zeros((64, 64, 3), np.float32), "fog", 1, "uint8"),
        (np.zeros((64, 64, 2), np.uint8), "fog", 1, "shape"),
        (np.zeros((64,), np.uint8), "fog", 1, "shape"),
    ],
)
def test_bad_input_raises_a_clear_error(image, name, severity, message):
    with pytest.raises(DynrobustError, match=message):
        corrupt(image, name, severity, seed=0)


def _glass_shuffle_literally(image, max_shift, passes, rng):
    """The reference's loop, line for line (numpy views included), with our draws."""
    x = image.copy()
    h, w = x.shape[:2]
    count = len(range(h - max_shift, max_shift, -1)) * len(range(w - max_shift, max_shift, -1))
    for _ in range(passes):
        shifts = iter(rng.integers(-max_shift, max_shift, size=(count, 2)))
        for row in range(h - max_shift, max_shift, -1):
            for col in range(w - max_shift, max_shift, -1):
                dx, dy = next(shifts)
                x[row, col], x[row + dy, col + dx] = x[row + dy, col + dx], x[row, col]
    return x


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_vectorised_glass_shuffle_equals_the_sequential_loop(severity, photos):
    image = np.ascontiguousarray(photos["motorcycle"][50:98, 60:101])
    _, shift, passes = blur.GLASS[severity - 1]
    ours = blur._glass_shuffle(image, shift, passes, np.random.default_rng(severity))
    literal = _glass_shuffle_literally(image, shift, passes, np.random.default_rng(severity))
    assert np.array_equal(ours, literal)
    assert not np.array_equal(ours, image)


@pytest.mark.parametrize("photons", noise.SHOT)
def test_shot_noise_sampler_is_poisson(photons):
    level = 200
    image = np.full((200, 200, 3), level, np.uint8)
    out = noise.shot_noise(image, noise.SHOT.index(photons) + 1, np.random.default_rng(3))
    # invert the k -> grey map to recover counts, then test them against Poisson(level / 255 * photons)
    cdf, _, values = noise._poisson_tables(photons)
    lam = level / 255 * photons
    counts = np.bincount(out.ravel(), minlength=256)
    ks = np.arange(len(values))
    expected = np.zeros(256)
    np.add.at(expected, values, stats.poisson.pmf(ks, lam))
    keep = expected * out.size > 5
    observed = counts[keep]
    exp = expected[keep] * out.size
    exp *= observed.sum() / exp.sum()
    chi2 = stats.chisquare(observed, exp)
    assert chi2.pvalue > 1e-3, chi2


def test_frost_without_imagecorruptions_pictures_says_so(monkeypatch, photos):
    import importlib.util

    from robustbench_dyn.corruptions import weather

    weather.frost_picture.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imagecorruptions" else real(name, *a))
    with pytest.raises(DynrobustError, match="pip install imagecorruptions"):
        corrupt(photos["chelsea"], "frost", 1, seed=0)
    weather.frost_picture.cache_clear()
