"""``dynrobust spectrum``: DCT power spectra of images, clean vs corrupted (Fig. 4 right of the Bi-volution paper)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from robustbench_dyn.cli.paths import PATH

SPECTRUM_CSV = "spectrum.csv"
SUMMARY_CSV = "spectrum_summary.csv"
PLOT_STEM = "spectrum"


def render_summary(summary) -> str:
    """The summary as text: per image (or dataset) and version, the high-frequency share (%) and the
    ratios of high-frequency share, low-frequency power and DC power to the clean version's."""
    lines = []
    for label, group in summary.groupby("image", sort=False):
        lines.append(label)
        lines.append(f"  {'version':<24} {'high-freq share %':>17} {'x clean':>8} {'low-freq power x clean':>23} "
                     f"{'DC x clean':>10}")
        for row in group.itertuples():
            version = "clean" if row.corruption == "clean" else f"{row.corruption} s{row.severity}"
            lines.append(f"  {version:<24} {100 * row.high_share:>17.3f} {row.high_share_ratio:>8.2f} "
                         f"{row.low_power_ratio:>23.3f} {row.dc_ratio:>10.4f}")
        if group[["high_share_ratio", "low_power_ratio", "dc_ratio"]].isna().to_numpy().any():
            lines.append("  nan: the clean version has no power there (a uniform image), so the ratio is undefined")
    return "\n".join(lines)


@click.command("spectrum")
@click.argument("images", nargs=-1, type=PATH)
@click.option("--dataset", type=PATH,
              help="A folder of images (searched recursively): average the profiles over its images.")
@click.option("--limit", type=int, help="With --dataset: at most N images, class-balanced over sub-folders.")
@click.option("-c", "--corruptions", default="gaussian_noise,shot_noise,impulse_noise,speckle_noise", show_default=True,
              help="Corruptions and groups, comma-separated (e.g. 'noise,fog').")
@click.option("-s", "--severity", type=int, default=3, show_default=True, help="Severity, 1 to 5.")
@click.option("--binning", type=click.Choice(["diagonal", "radial"]), default="diagonal", show_default=True,
              help="Frequency of coefficient (u, v): u + v, or floor(sqrt(u^2 + v^2)).")
@click.option("--preprocess", type=click.Choice(["imagenet-c", "none"]), default="imagenet-c", show_default=True,
              help="imagenet-c: resize 256 and crop 224 first, as ImageNet-C and eval --on-the-fly; none: own size.")
@click.option("--jpeg", is_flag=True, help="JPEG quality-85 round trip after corrupting, as ImageNet-C files had.")
@click.option("--out", type=PATH, default=Path("spectrum-out"), show_default=True,
              help="Folder for spectrum.csv, spectrum_summary.csv and the plot.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="How the summary is printed (the files are written either way).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def spectrum_command(images, dataset, limit, corruptions, severity, binning, preprocess, jpeg, out, fmt, quiet):
    """DCT power spectra of IMAGE files (or of a --dataset folder), clean vs corrupted.

    For the clean image and each corrupted version (same engine and canonical seeds as eval; by
    default the paper's four noises at severity 3): the 2-D orthonormal DCT-II of the luminance
    Y = 0.299 R + 0.587 G + 0.114 B (pixels in [0, 1]); power = coefficient squared; the profile at
    frequency f is the mean power of the coefficients with u + v = f (diagonal) or
    floor(sqrt(u^2 + v^2)) = f (radial).

    Writes OUT/spectrum.csv (image, corruption, severity, frequency, power), OUT/spectrum.png and
    .svg (log power, clean vs each corruption) and OUT/spectrum_summary.csv: per version the share of
    the non-DC power above half the largest frequency, and the DC and low-frequency power, with
    their ratios to the clean image's.
    """
    from robustbench_dyn.errors import DynrobustError
    from robustbench_dyn.spectrum import compute_spectra, plot_spectra

    if out.exists() and not out.is_dir():
        raise DynrobustError(f"--out {out} exists and is not a folder")
    result = compute_spectra(images, dataset=dataset, limit=limit, corruptions=corruptions, severity=severity,
                             binning=binning, preprocess=preprocess, jpeg=jpeg, progress=not quiet)
    try:
        out.mkdir(parents=True, exist_ok=True)
        result.profiles.to_csv(out / SPECTRUM_CSV, index=False, float_format="%.8g")
        result.summary.to_csv(out / SUMMARY_CSV, index=False, float_format="%.8g")
        plots = plot_spectra(result, out / PLOT_STEM)
    except OSError as exc:
        raise DynrobustError(f"cannot write into {out}: {exc.strerror or exc}") from None

    for path, reason in result.bad_images:
        click.echo(f"bad image skipped: {path}: {reason}", err=True)
    if result.not_images:
        click.echo(f"note: {len(result.not_images)} file(s) without an image extension ignored "
                   f"(first: {result.not_images[0]})", err=True)
    if fmt == "json":
        click.echo(json.dumps({
            "binning": binning, "preprocess": preprocess, "jpeg": jpeg,
            "units": "power: squared orthonormal DCT-II coefficient of the luminance in [0, 1]; shares: fractions",
            "summary": result.summary.to_dict(orient="records"),
            "bad_images": [{"path": p, "reason": r} for p, r in result.bad_images],
            "files": [str(out / SPECTRUM_CSV), str(out / SUMMARY_CSV), *map(str, plots)],
        }, indent=2))
        return
    if fmt == "csv":
        click.echo(result.summary.to_csv(index=False, float_format="%.8g"), nl=False)
        return
    click.echo(render_summary(result.summary))
    click.echo("")
    click.echo(f"high-freq share: power of the coefficients above half the largest frequency over all but DC "
               f"({binning} binning{', ImageNet-C crop 224' if preprocess == 'imagenet-c' else ''}"
               f"{', JPEG q85' if jpeg else ''})")
    click.echo(f"wrote {out / SPECTRUM_CSV}, {out / SUMMARY_CSV}, {', '.join(str(p) for p in plots)}")
