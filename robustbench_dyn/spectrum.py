"""DCT power spectra of images and of their corrupted versions (Fig. 4, right, of the Bi-volution paper).

For an image, the luminance Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601) with pixels in [0, 1]
goes through the 2-D orthonormal DCT-II (``scipy.fft.dctn(..., norm="ortho")``); the power of a
coefficient is its square, so by Parseval the powers sum to the sum of Y^2. The 1-D profile at an
integer frequency f is the mean power of the coefficients (u, v) whose frequency index is f:

- ``diagonal`` (default): f = u + v, from 0 (the DC term) to (H - 1) + (W - 1);
- ``radial``: f = floor(sqrt(u^2 + v^2)), from 0 to floor(sqrt((H - 1)^2 + (W - 1)^2)).

The high-frequency share of an image is the power of the coefficients with f > f_max / 2 over
the power of every coefficient but the DC term: a fraction in [0, 1].

Corrupted versions come from the same engine and canonical seeds as ``dynrobust eval --on-the-fly``:
by default each image is first resized and cropped the ImageNet-C way (shorter side 256, centre
224), then corrupted with the seed ``canonical_seed(image_id, corruption, severity)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from robustbench_dyn.corruptions import canonical_seed, check_severity, corrupt, resolve_corruptions
from robustbench_dyn.data import build_imagenet_c as imagenet_c_recipe
from robustbench_dyn.data.images import (
    IMAGE_EXTENSIONS,
    decode_jpeg,
    encode_jpeg,
    is_image_file,
    load_rgb,
    resize_center_crop,
)
from robustbench_dyn.errors import BadImageError, DynrobustError
from robustbench_dyn.progress import progress_bar

BINNINGS = ("diagonal", "radial")
PREPROCESSING = ("imagenet-c", "none")
# the paper's four noises (Fig. 4 right: Gaussian, shot, impulse and speckle noise)
DEFAULT_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
DEFAULT_SEVERITY = 3
MIN_SIDE = 32  # the engine's smallest image (ImageNet-C corruptions are defined down to 32 px)
CLEAN = "clean"  # the clean version's name in the tables (severity 0), as in the results store

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601


def luminance(rgb: np.ndarray) -> np.ndarray:
    """The luminance Y = 0.299 R + 0.587 G + 0.114 B of a uint8 (H, W, 3) image, float64 in [0, 1]."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DynrobustError(f"expected a uint8 RGB image of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return (rgb.astype(np.float64) / 255.0) @ _LUMA


def dct_power(image: np.ndarray) -> np.ndarray:
    """The power (squared coefficient) of the 2-D orthonormal DCT-II of a 2-D float array.

    For the luminance of an image with pixels in [0, 1], the result is in [0, H W]; its sum equals
    the sum of the squared pixels (Parseval). Shape (H, W); index (u, v) = (vertical, horizontal).
    """
    from scipy.fft import dctn

    values = np.asarray(image, dtype=np.float64)
    if values.ndim != 2:
        raise DynrobustError(f"the DCT power spectrum needs a 2-D array, got shape {values.shape}")
    return dctn(values, type=2, norm="ortho") ** 2


def frequency_index(shape, binning: str = "diagonal") -> np.ndarray:
    """The integer frequency of every DCT coefficient of an array of ``shape`` (H, W).

    ``diagonal``: u + v; ``radial``: floor(sqrt(u^2 + v^2)). Returns an int64 array of ``shape``.
    """
    if binning not in BINNINGS:
        raise DynrobustError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    u = np.arange(shape[0])[:, None]
    v = np.arange(shape[1])[None, :]
    if binning == "diagonal":
        return (u + v).astype(np.int64)
    # exact integer square root, so that u^2 + v^2 = k^2 lands on k (a float sqrt can fall just short)
    squared = (u * u + v * v).astype(np.int64)
    root = np.floor(np.sqrt(squared)).astype(np.int64)
    root -= (root * root > squared).astype(np.int64)
    root += ((root + 1) * (root + 1) <= squared).astype(np.int64)
    return root


@dataclass(frozen=True)
class Spectrum:
    """The DCT power spectrum of one image, reduced.

    ``profile[f]``: mean power of the coefficients at frequency f (f = 0 .. len - 1, unitless power
    of a luminance in [0, 1]); ``dc_power``: power of the (0, 0) term; ``low_power`` and
    ``high_power``: summed power of the coefficients with 0 < f <= f_max / 2 and with f > f_max / 2;
    ``high_share`` = high_power / (low_power + high_power), a fraction.
    """

    profile: np.ndarray
    dc_power: float
    low_power: float
    high_power: float

    @property
    def high_share(self) -> float:
        """Fraction of the non-DC power above half the largest frequency."""
        total = self.low_power + self.high_power
        return self.high_power / total if total > 0 else 0.0


def image_spectrum(rgb: np.ndarray, binning: str = "diagonal") -> Spectrum:
    """The DCT power spectrum of a uint8 (H, W, 3) image's luminance, reduced to a :class:`Spectrum`."""
    power = dct_power(luminance(rgb))
    frequency = frequency_index(power.shape, binning)
    top = int(frequency.max())
    sums = np.bincount(frequency.ravel(), power.ravel(), minlength=top + 1)
    counts = np.bincount(frequency.ravel(), minlength=top + 1)
    high = frequency > top / 2.0
    dc = float(power[0, 0])
    high_power = float(power[high].sum())
    return Spectrum(
        profile=sums / counts,
        dc_power=dc,
        low_power=float(power.sum()) - high_power - dc,
        high_power=high_power,
    )


# -- images ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectrumImage:
    """An image to analyse: its id (the canonical seed's key), its path and its uint8 pixels."""

    image_id: str
    path: Path
    pixels: np.ndarray


def image_id_of(path, root=None) -> str:
    """The image id the canonical seed hashes: the path relative to ``root`` (a dataset folder), or
    ``"<parent folder>/<file>"`` for a single file, which is eval's ``"<wnid>/<file>"`` when the
    image sits in an ImageNet class folder."""
    path = Path(path)
    if root is not None:
        return path.relative_to(root).as_posix()
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def prepare(pixels: np.ndarray, path, preprocess: str, needed_by: str = "the spectrum") -> np.ndarray:
    """Check an image's size and bring it to what is analysed: the ImageNet-C crop (shorter side 256,
    centre 224, bilinear) for ``"imagenet-c"``, unchanged for ``"none"``. Raises BadImageError for a
    side under 32 px, saying that ``needed_by`` (what the image is for) needs more."""
    if preprocess not in PREPROCESSING:
        raise DynrobustError(f"preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocess!r}")
    height, width = pixels.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise BadImageError(path, f"the image is {width}x{height} px; {needed_by} needs at least {MIN_SIDE} px on each side")
    if preprocess == "imagenet-c":
        return resize_center_crop(pixels, imagenet_c_recipe.RESIZE, imagenet_c_recipe.CROP)
    return pixels


def load_image(path, preprocess: str = "imagenet-c", root=None, *, needed_by: str = "the spectrum",
               folder_hint: str = " (use --dataset for a folder)") -> SpectrumImage:
    """Decode one image file (any mode, through the project's one decoder) and :func:`prepare` it.

    Raises BadImageError (a DynrobustError) for a missing, empty, broken or too small file, or a
    folder; ``needed_by`` and ``folder_hint`` word those errors for the command that called
    (the defaults are ``dynrobust spectrum``'s)."""
    path = Path(path)
    if path.is_dir():
        raise BadImageError(path, f"is a folder, not an image{folder_hint}")
    pixels = prepare(load_rgb(path), path, preprocess, needed_by)
    return SpectrumImage(image_id_of(path, root), path, pixels)


@dataclass
class DatasetScan:
    """The image files found under a folder: ``files`` chosen (sorted by id), ``not_images``: other files."""

    root: Path
    files: list = field(default_factory=list)
    not_images: list = field(default_factory=list)


def scan_dataset(folder, limit: int | None = None) -> DatasetScan:
    """Find the image files under ``folder`` (recursively; hidden files and folders skipped).

    Ids are paths relative to ``folder`` (``"<wnid>/<file>"`` in an ImageNet class-folder tree, as
    eval's). ``limit`` keeps that many, round-robin over the sub-folders (class-balanced, as eval's
    ``--limit``). Raises DynrobustError for a missing folder or one without image files.
    """
    from robustbench_dyn.data.build_imagenet_c import SourceImage, select_class_balanced

    root = Path(folder)
    if not root.exists():
        raise DynrobustError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DynrobustError(f"--dataset {root} is not a folder")
    if limit is not None and limit < 1:
        raise DynrobustError(f"--limit must be at least 1, got {limit}")
    scan = DatasetScan(root)
    found = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(parent) / name
            if is_image_file(name):
                found.append(path)
            else:
                scan.not_images.append(path)
    if not found:
        raise DynrobustError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {root}")
    sources = [
        SourceImage(image_id_of(p, root), p, p.parent.relative_to(root).as_posix(), p.name) for p in found
    ]
    scan.files = [s.path for s in select_class_balanced(sources, limit)]
    return scan


# -- spectra of clean and corrupted versions -------------------------------------------------------


def versions_of(image: SpectrumImage, corruptions, severity: int, jpeg: bool = False):
    """Yield (corruption, severity, uint8 pixels): the clean image (``"clean"``, 0), then each corruption.

    Corruptions use the canonical seed of (image id, corruption, severity), as on-the-fly eval does;
    with ``jpeg`` each corrupted version also goes through the JPEG quality-85 round trip that
    ImageNet-C files (and eval's on-the-fly images) went through.
    """
    yield CLEAN, 0, image.pixels
    for name in corruptions:
        seed = canonical_seed(image.image_id, name, severity)
        pixels = corrupt(image.pixels, name, severity, seed=seed)
        if jpeg:
            pixels = decode_jpeg(encode_jpeg(pixels, imagenet_c_recipe.JPEG_QUALITY))
        yield name, severity, pixels


@dataclass
class SpectrumResult:
    """What :func:`compute_spectra` found.

    ``profiles``: long table image, corruption, severity, frequency, power (mean DCT power per
    frequency; for a dataset, the mean over its images, with image = the dataset label);
    ``summary``: one row per image (or dataset) and version: images, dc_power, low_power,
    high_power (summed DCT power, averaged over images), high_share (fraction, averaged over
    images) and the ratios of dc_power, low_power and high_share to the clean version's;
    ``bad_images``: (path, reason) of files skipped; ``binning``, ``preprocess``, ``jpeg``: the settings.
    """

    profiles: pd.DataFrame
    summary: pd.DataFrame
    bad_images: list
    binning: str
    preprocess: str
    jpeg: bool
    not_images: list = field(default_factory=list)


def _check_settings(corruptions, severity, binning, preprocess) -> tuple:
    names = resolve_corruptions(DEFAULT_CORRUPTIONS if corruptions is None else corruptions)
    severity = check_severity(severity)
    if binning not in BINNINGS:
        raise DynrobustError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    if preprocess not in PREPROCESSING:
        raise DynrobustError(f"preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocess!r}")
    return names, severity


def _summary_rows(label: str, spectra: dict, images: int) -> list:
    """Summary rows of one image or dataset: ``spectra`` maps (corruption, severity) to lists of Spectrum."""
    rows = []
    for (name, severity), items in spectra.items():
        rows.append({
            "image": label,
            "corruption": name,
            "severity": severity,
            "images": images,
            "dc_power": float(np.mean([s.dc_power for s in items])),
            "low_power": float(np.mean([s.low_power for s in items])),
            "high_power": float(np.mean([s.high_power for s in items])),
            "high_share": float(np.mean([s.high_share for s in items])),
        })
    frame = pd.DataFrame(rows)
    clean = frame.iloc[0]
    for column, ratio in (("dc_power", "dc_ratio"), ("low_power", "low_power_ratio"), ("high_share", "high_share_ratio")):
        frame[ratio] = frame[column] / clean[column] if clean[column] > 0 else np.nan
    return frame.to_dict("records")


def _profile_rows(label: str, spectra: dict) -> list:
    rows = []
    for (name, severity), items in spectra.items():
        profile = np.mean([s.profile for s in items], axis=0)
        rows += [
            {"image": label, "corruption": name, "severity": severity, "frequency": f, "power": float(p)}
            for f, p in enumerate(profile)
        ]
    return rows


def compute_spectra(
    images=(),
    *,
    dataset=None,
    limit: int | None = None,
    corruptions=None,
    severity: int = DEFAULT_SEVERITY,
    binning: str = "diagonal",
    preprocess: str = "imagenet-c",
    jpeg: bool = False,
    progress: bool = True,
) -> SpectrumResult:
    """DCT power profiles of images, clean and corrupted; returns a :class:`SpectrumResult`.

    ``images``: image files, each analysed on its own; a bad one (missing, not an image, under 32
    px) raises a DynrobustError naming it. ``dataset``: a folder whose images' profiles are averaged
    (at most ``limit`` images, class-balanced); there a bad file is reported in ``bad_images`` and
    skipped. ``corruptions``: names or groups (default: the paper's four noises); ``severity`` 1-5.
    With ``preprocess="none"`` images are analysed at their own size; a dataset then needs all its
    images to have one size.
    """
    names, severity = _check_settings(corruptions, severity, binning, preprocess)
    images = [Path(p) for p in images]
    if not images and dataset is None:
        raise DynrobustError("give one or more IMAGE files, or a folder with --dataset DIR")
    if limit is not None and dataset is None:
        raise DynrobustError("--limit applies to --dataset")
    # every single image is checked before any work, so a bad one fails fast
    loaded = [load_image(p, preprocess) for p in images]
    scan = scan_dataset(dataset, limit) if dataset is not None else None

    versions = len(names) + 1
    total = versions * (len(loaded) + (len(scan.files) if scan else 0))
    profiles, summary, bad = [], [], []
    bar = progress_bar(total=total, desc="spectra", unit="img", enabled=progress)
    try:
        for image in loaded:
            spectra = {}
            for name, sev, pixels in versions_of(image, names, severity, jpeg):
                spectra[(name, sev)] = [image_spectrum(pixels, binning)]
                bar.update(1)
            label = str(image.path)
            profiles += _profile_rows(label, spectra)
            summary += _summary_rows(label, spectra, 1)
        if scan is not None:
            spectra, shape, used = {}, None, 0
            for path in scan.files:
                try:
                    image = load_image(path, preprocess, root=scan.root)
                except BadImageError as exc:
                    bad.append((str(path), exc.reason))
                    bar.update(versions)
                    continue
                if shape is None:
                    shape = image.pixels.shape
                elif image.pixels.shape != shape:
                    raise DynrobustError(
                        f"{path} is {image.pixels.shape[1]}x{image.pixels.shape[0]} px but the first image was "
                        f"{shape[1]}x{shape[0]}: profiles of different sizes cannot be averaged; use the "
                        "default --preprocess imagenet-c"
                    )
                for name, sev, pixels in versions_of(image, names, severity, jpeg):
                    spectra.setdefault((name, sev), []).append(image_spectrum(pixels, binning))
                    bar.update(1)
                used += 1
            if used == 0:
                raise DynrobustError(
                    f"none of the {len(scan.files)} image file(s) under {scan.root} could be used "
                    f"(first: {bad[0][0]}: {bad[0][1]})"
                )
            label = f"{scan.root} (mean of {used} images)"
            profiles += _profile_rows(label, spectra)
            summary += _summary_rows(label, spectra, used)
    finally:
        bar.close()
    return SpectrumResult(
        profiles=pd.DataFrame(profiles, columns=["image", "corruption", "severity", "frequency", "power"]),
        summary=pd.DataFrame(summary),
        bad_images=bad,
        binning=binning,
        preprocess=preprocess,
        jpeg=jpeg,
        not_images=[str(p) for p in scan.not_images] if scan else [],
    )


# -- plot ------------------------------------------------------------------------------------------


def plot_spectra(result: SpectrumResult, path_stem) -> list:
    """Draw each image's profile, clean vs every corruption, on a log power axis (Fig. 4 right).

    One panel per image (or dataset); the DC term (f = 0) is left off the plot (it is in the CSV).
    Writes ``<path_stem>.png`` and ``<path_stem>.svg``; returns their paths.
    """
    import matplotlib

    from robustbench_dyn.report.figures import FIGURE_STYLE, model_colours, new_figure, save_figure

    labels = list(dict.fromkeys(result.profiles["image"]))
    columns = min(2, len(labels))
    rows = -(-len(labels) // columns)
    axis_name = "u + v" if result.binning == "diagonal" else "floor(sqrt(u² + v²))"
    with matplotlib.rc_context(FIGURE_STYLE):
        figure = new_figure(5.6 * columns, 3.9 * rows + 0.4)
        axes = figure.subplots(rows, columns, squeeze=False)
        for axis, label in zip(axes.flat, labels):
            frame = result.profiles[result.profiles["image"] == label]
            versions = list(dict.fromkeys(zip(frame["corruption"], frame["severity"])))
            colours = model_colours(len(versions))
            for k, (name, severity) in enumerate(versions):
                line = frame[(frame["corruption"] == name) & (frame["severity"] == severity) & (frame["frequency"] > 0)]
                if name == CLEAN:
                    axis.plot(line["frequency"], line["power"], color="black", lw=1.6, label="clean", zorder=3)
                else:
                    axis.plot(line["frequency"], line["power"], color=colours[k - 1], lw=1.0,
                              label=f"{name} (severity {severity})", alpha=0.9)
            axis.set_yscale("log")
            axis.set_xlabel(f"frequency ({result.binning}: {axis_name})")
            axis.set_ylabel("mean DCT power")
            axis.set_title(label if len(label) <= 70 else "…" + label[-69:])
            axis.grid(True, which="major", alpha=0.3)
        for axis in list(axes.flat)[len(labels):]:
            axis.set_visible(False)
        axes.flat[0].legend(fontsize=8, loc="upper right", frameon=False)
        figure.suptitle("DCT power spectrum of the luminance, clean vs corrupted")
        return save_figure(figure, path_stem)
