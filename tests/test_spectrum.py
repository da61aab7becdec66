"""DCT power spectra (``robustbench_dyn.spectrum``, ``dynrobust spectrum``): values against an explicit
DCT-II matrix product in numpy, what Fig. 4 (right) of the Bi-volution paper relies on, image modes,
seeds shared with eval, outputs and errors."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from robustbench_dyn.cli import main
from robustbench_dyn.corruptions import canonical_seed, corrupt
from robustbench_dyn.data.build_imagenet_c import list_source_images
from robustbench_dyn.data.images import load_rgb, resize_center_crop
from robustbench_dyn.sample import sample_images, write_sample_dataset
from robustbench_dyn.spectrum import compute_spectra, dct_power, image_spectrum, luminance, scan_dataset


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix, from its definition: C[k, j] = a_k cos(pi (2j + 1) k / 2n)."""
    k = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j + 1) * k / (2 * n))
    matrix[0, :] = np.sqrt(1.0 / n)
    return matrix


def independent_profile(rgb: np.ndarray, binning: str):
    """Profile, DC, low and high power by explicit matrices and plain Python loops (no scipy.fft)."""
    pixels = rgb.astype(np.float64) / 255.0
    y = 0.299 * pixels[..., 0] + 0.587 * pixels[..., 1] + 0.114 * pixels[..., 2]
    h, w = y.shape
    coefficients = dct_matrix(h) @ y @ dct_matrix(w).T
    power = coefficients**2
    sums, counts = {}, {}
    for u in range(h):
        for v in range(w):
            f = u + v if binning == "diagonal" else math.isqrt(u * u + v * v)
            sums[f] = sums.get(f, 0.0) + power[u, v]
            counts[f] = counts.get(f, 0) + 1
    top = max(sums)
    profile = np.array([sums[f] / counts[f] for f in range(top + 1)])
    high = sum(power[u, v] for u in range(h) for v in range(w)
               if (u + v if binning == "diagonal" else math.isqrt(u * u + v * v)) > top / 2)
    return profile, power[0, 0], power.sum() - power[0, 0] - high, high


@pytest.fixture(scope="module")
def cat():
    """A real photo, cropped to a non-square 48x72 so rows and columns cannot be confused."""
    image = sample_images()[0].load()
    return np.ascontiguousarray(image[100:148, 150:222])


@pytest.mark.parametrize("binning", ["diagonal", "radial"])
def test_profile_equals_an_explicit_dct_matrix_product(cat, binning):
    profile, dc, low, high = independent_profile(cat, binning)
    spectrum = image_spectrum(cat, binning)
    assert spectrum.profile.shape == profile.shape
    expected_length = 47 + 71 + 1 if binning == "diagonal" else math.isqrt(47**2 + 71**2) + 1
    assert len(profile) == expected_length
    np.testing.assert_allclose(spectrum.profile, profile, rtol=1e-9, atol=1e-15)
    assert spectrum.dc_power == pytest.approx(dc, rel=1e-12)
    assert spectrum.low_power == pytest.approx(low, rel=1e-9)
    assert spectrum.high_power == pytest.approx(high, rel=1e-9)
    assert spectrum.high_share == pytest.approx(high / (low + high), rel=1e-9)


def test_parseval_and_luminance(cat):
    y = luminance(cat)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert y[3, 5] == pytest.approx((0.299 * cat[3, 5, 0] + 0.587 * cat[3, 5, 1] + 0.114 * cat[3, 5, 2]) / 255)
    assert dct_power(y).sum() == pytest.approx((y**2).sum(), rel=1e-12)
    # the DC coefficient of the orthonormal DCT is sqrt(H W) times the mean
    assert dct_power(y)[0, 0] == pytest.approx(y.size * y.mean() ** 2, rel=1e-12)


@pytest.fixture(scope="module")
def noise_summary():
    paths = [image.path for image in sample_images()]
    result = compute_spectra(paths, corruptions="gaussian_noise,shot_noise,impulse_noise,speckle_noise",
                             severity=3, progress=False)
    return result.summary


@pytest.mark.parametrize("noise", ["gaussian_noise", "shot_noise"])
def test_noise_raises_the_high_frequencies_not_the_low_ones_nor_dc(noise_summary, noise):
    """Fig. 4 right: Gaussian and shot noise change the high frequencies and keep the low ones."""
    rows = noise_summary[noise_summary["corruption"] == noise]
    assert len(rows) == 4
    for row in rows.itertuples():
        assert row.high_share_ratio > 10.0, row  # measured 30-60x on the bundled photos
        assert 0.7 < row.low_power_ratio < 1.6, row
        assert row.high_share_ratio > 10.0 * row.low_power_ratio
        assert abs(row.dc_ratio - 1.0) < 0.1, row  # the mean brightness barely moves


def test_clean_rows_are_the_reference(noise_summary):
    clean = noise_summary[noise_summary["corruption"] == "clean"]
    assert (clean["severity"] == 0).all()
    np.testing.assert_allclose(clean[["dc_ratio", "low_power_ratio", "high_share_ratio"]].to_numpy(), 1.0)
    # natural photos keep well under 5 % of their non-DC power in the upper half of the frequencies
    assert (clean["high_share"] < 0.05).all()


def test_versions_use_eval_seeds_and_the_imagenet_c_crop(tmp_path):
    """A dataset image's id is eval's '<wnid>/<file>', so its corrupted pixels are eval's."""
    root = write_sample_dataset(tmp_path / "clean")
    scan = scan_dataset(root, limit=1)
    source = list_source_images(root)[0]
    assert [p.relative_to(root).as_posix() for p in scan.files] == [source.image_id]
    crop = resize_center_crop(load_rgb(source.path))
    noisy = corrupt(crop, "shot_noise", 2, seed=canonical_seed(source.image_id, "shot_noise", 2))
    result = compute_spectra(dataset=root, limit=1, corruptions="shot_noise", severity=2, progress=False)
    got = result.profiles[result.profiles["corruption"] == "shot_noise"]["power"].to_numpy()
    np.testing.assert_allclose(got, image_spectrum(noisy).profile, rtol=1e-12)
    # and a single file in a class folder gets the same id, hence the same pixels
    single = compute_spectra([source.path], corruptions="shot_noise", severity=2, progress=False)
    np.testing.assert_allclose(single.profiles[single.profiles["corruption"] == "shot_noise"]["power"], got, rtol=1e-12)


def test_dataset_profile_is_the_mean_of_the_image_profiles(tmp_path):
    root = write_sample_dataset(tmp_path / "clean")
    together = compute_spectra(dataset=root, corruptions="gaussian_noise", progress=False)
    alone = compute_spectra(sorted(root.glob("*/*")), corruptions="gaussian_noise", progress=False)
    assert together.summary["images"].iloc[0] == 4
    for version in ("clean", "gaussian_noise"):
        mean = (alone.profiles[alone.profiles["corruption"] == version]
                .groupby("frequency")["power"].mean().to_numpy())
        got = together.profiles[together.profiles["corruption"] == version]["power"].to_numpy()
        np.testing.assert_allclose(got, mean, rtol=1e-12)


def test_every_image_mode_is_converted(tmp_path, cat):
    rgb = Image.fromarray(cat)
    grey = rgb.convert("L")
    files = {
        "rgb.png": rgb,
        "rgba.png": rgb.convert("RGBA"),
        "grey.png": grey,
        "palette.png": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    # a 16-bit PNG of the grey image: every 8-bit level v becomes 257 v, which maps back to v exactly
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    result = compute_spectra(sorted(tmp_path.iterdir()), corruptions="gaussian_noise", preprocess="none",
                             progress=False)
    clean = result.summary[result.summary["corruption"] == "clean"].set_index("image")["high_share"]
    by_name = {k.rsplit("/", 1)[-1]: v for k, v in clean.items()}
    assert set(by_name) == set(files) | {"grey16.png"}
    assert by_name["rgba.png"] == pytest.approx(by_name["rgb.png"], rel=1e-12)
    assert by_name["grey16.png"] == pytest.approx(by_name["grey.png"], rel=1e-12)
    # grey keeps the luminance within rounding
    assert by_name["grey.png"] == pytest.approx(by_name["rgb.png"], rel=0.05)
    # a palette image is its palette's colours, looked up here by hand
    palette = Image.open(tmp_path / "palette.png")
    colours = np.asarray(palette.getpalette(), dtype=np.uint8).reshape(-1, 3)[np.asarray(palette)]
    assert by_name["palette.png"] == pytest.approx(image_spectrum(colours).high_share, rel=1e-12)
    # a CMYK JPEG keeps the photo's brightness (the DC term) within JPEG's loss
    dc = result.summary[result.summary["corruption"] == "clean"].set_index("image")["dc_power"]
    dc = {k.rsplit("/", 1)[-1]: v for k, v in dc.items()}
    assert dc["cmyk.jpg"] == pytest.approx(dc["rgb.png"], rel=0.03)
    assert dc["cmyk.jpg"] != dc["rgb.png"]


# --- the command ---------------------------------------------------------------------------------


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(list(map(str, args)))
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_cli_writes_csv_plot_and_summary(tmp_path, capsys):
    photo = sample_images()[1].path
    code, out, err = run_cli(["spectrum", photo, "--out", tmp_path / "out", "-q", "--binning", "radial"], capsys)
    assert code == 0, err
    profiles = pd.read_csv(tmp_path / "out" / "spectrum.csv")
    assert list(profiles.columns) == ["image", "corruption", "severity", "frequency", "power"]
    assert list(dict.fromkeys(profiles["corruption"])) == [
        "clean", "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"]
    assert set(profiles.loc[profiles["corruption"] != "clean", "severity"]) == {3}
    crop = resize_center_crop(load_rgb(photo))
    clean = profiles[profiles["corruption"] == "clean"]["power"].to_numpy()
    np.testing.assert_allclose(clean, image_spectrum(crop, "radial").profile, rtol=1e-6)
    summary = pd.read_csv(tmp_path / "out" / "spectrum_summary.csv")
    assert {"high_share", "high_share_ratio", "dc_ratio", "low_power_ratio"} <= set(summary.columns)
    assert "gaussian_noise s3" in out
    with Image.open(tmp_path / "out" / "spectrum.png") as png:
        png.load()
        assert png.size[0] > 300 and png.size[1] > 200
    assert ET.parse(tmp_path / "out" / "spectrum.svg").getroot().tag.endswith("svg")


def test_cli_explains_the_nan_ratios_of_a_uniform_image(tmp_path, capsys):
    # An all-black image has no power at all: its ratios to clean are 0/0. The table says why, and
    # only then (the photo's table has no such line).
    Image.new("RGB", (40, 40)).save(tmp_path / "black.png")
    code, out, err = run_cli(["spectrum", tmp_path / "black.png", "--preprocess", "none", "-c", "gaussian_noise",
                              "--out", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    summary = pd.read_csv(tmp_path / "out" / "spectrum_summary.csv")
    assert summary["high_share_ratio"].isna().all()
    assert "nan: the clean version has no power there (a uniform image)" in out
    code, out, err = run_cli(["spectrum", sample_images()[1].path, "-c", "gaussian_noise", "--out", tmp_path / "o2",
                              "-q"], capsys)
    assert code == 0 and "no power there" not in out, err


def test_cli_dataset_reports_and_skips_bad_files(tmp_path, capsys):
    root = write_sample_dataset(tmp_path / "clean")
    wnid = sample_images()[0].wnid
    (root / wnid / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (20, 40)).save(root / wnid / "tiny.png")
    (root / "notes.txt").write_text("hello")
    code, out, err = run_cli(["spectrum", "--dataset", root, "--out", tmp_path / "out", "-q",
                              "-c", "gaussian_noise", "--format", "csv"], capsys)
    assert code == 0, err
    assert "broken.jpg" in err and "tiny.png" in err and "20x40" in err
    assert "1 file(s) without an image extension" in err
    summary = pd.read_csv(tmp_path / "out" / "spectrum_summary.csv")
    assert (summary["images"] == 4).all()
    assert "mean of 4 images" in summary["image"].iloc[0]


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: d / "missing.png", [], "cannot read the file"),
        (lambda d: (d / "text.png").write_text("hello") and d / "text.png", [], "not an image"),
        (lambda d: Image.new("RGB", (31, 64)).save(d / "small.png") or d / "small.png", [], "at least 32 px"),
        (lambda d: d, [], "is a folder"),
        (lambda d: sample_images()[0].path, ["-c", "gaussian_nois"], "unknown corruption"),
        (lambda d: sample_images()[0].path, ["--severity", "7"], "severity must be an integer from 1 to 5"),
        (lambda d: sample_images()[0].path, ["--limit", "3"], "--limit applies to --dataset"),
        (lambda d: None, [], "give one or more IMAGE files"),
        (lambda d: None, ["--dataset", "/nonexistent-folder"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, capsys, make, extra, message):
    target = make(tmp_path)
    args = ["spectrum"] + ([target] if target is not None else []) + extra + ["--out", tmp_path / "out", "-q"]
    code, out, err = run_cli(args, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0]
    assert "Traceback" not in err


def test_cli_mixed_sizes_without_crop_is_an_error(tmp_path, capsys):
    root = write_sample_dataset(tmp_path / "clean")  # the four photos have different sizes
    code, out, err = run_cli(["spectrum", "--dataset", root, "--preprocess", "none", "--out", tmp_path / "o", "-q"],
                             capsys)
    assert code == 1 and err.startswith("error:") and "cannot be averaged" in err
