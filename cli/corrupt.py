"""``dynrobust corrupt``: write an ImageNet-C tree from a folder of clean class folders."""

from __future__ import annotations

import click

from robustbench_dyn.cli.paths import PATH
from robustbench_dyn.progress import format_duration

# bad images printed in the summary; the full list is always in <out>/bad_images.txt
_BAD_IMAGES_SHOWN = 20


def describe_build(summary) -> list:
    """Return the lines that tell a person what a build did (counts, bad images, time, where)."""
    lines = [f"ImageNet-C tree: {summary.out}"]
    severities = ",".join(str(s) for s in summary.severities)
    lines.append(
        f"  {len(summary.corruptions)} corruption(s) x severities {severities}; "
        f"workers: {summary.workers or 'none (in this process)'}"
    )
    already = f" ({summary.images_already_done} were already complete)" if summary.images_already_done else ""
    lines.append(
        f"  images: {summary.images_done} of {summary.images} done{already}, {len(summary.bad_images)} bad"
    )
    lines.append(
        f"  files: {summary.files_written} written, {summary.files_skipped} skipped as already complete"
    )
    if summary.stale_temp_files_removed:
        lines.append(
            f"  removed {summary.stale_temp_files_removed} temporary file(s) left by an interrupted run"
        )
    if summary.bad_images:
        lines.append(f"  bad images, skipped (all listed in {summary.bad_images_file}):")
        for bad in summary.bad_images[:_BAD_IMAGES_SHOWN]:
            lines.append(f"    {bad.path}: {bad.reason}")
        if len(summary.bad_images) > _BAD_IMAGES_SHOWN:
            lines.append(f"    ... and {len(summary.bad_images) - _BAD_IMAGES_SHOWN} more")
    lines.append(f"  elapsed: {format_duration(summary.elapsed_s)}")
    return lines


@click.command("corrupt")
@click.argument("src_dir", type=PATH)
@click.argument("out_dir", type=PATH)
@click.option(
    "--corruptions",
    "-c",
    default="all",
    show_default=True,
    help="Comma-separated corruptions and groups, e.g. 'gaussian_noise,fog' or 'noise,blur'. "
    "Groups: noise, blur, weather, digital, standard (the 15 of mCE), extra (the other 4), all.",
)
@click.option(
    "--severities", "-s", default="1-5", show_default=True, help="A range like 1-5 or a list like 1,3,5."
)
@click.option(
    "--workers",
    "-j",
    type=int,
    default=None,
    help="Worker processes [default: number of CPUs, at most 8]. 0 or 1: no pool. "
    "The outputs do not depend on it.",
)
@click.option(
    "--limit",
    type=int,
    default=None,
    help="Use only N source images, class-balanced: round-robin over the sorted classes, "
    "sorted files within a class.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (the summary is still printed).")
def corrupt_command(src_dir, out_dir, corruptions, severities, workers, limit, quiet):
    """Corrupt clean images SRC_DIR/<wnid>/<file> into OUT_DIR/<corruption>/<severity>/<wnid>/<file>.

    Class folders must be ImageNet wnids (e.g. n01440764), as `dynrobust eval` reads the labels from them.

    Each image is resized to 256 and centre-cropped to 224, corrupted with a seed derived from
    "<wnid>/<file>", the corruption and the severity, and saved as JPEG quality 85, as ImageNet-C
    was made. Files keep their names; a source that is not .jpg/.jpeg becomes <stem>.jpg.

    Run the same command again to resume: complete files are skipped. Images that cannot be
    decoded are skipped and listed in OUT_DIR/bad_images.txt; the exit status is still 0.
    """
    from robustbench_dyn.data.build_imagenet_c import build_imagenet_c, list_source_images
    from robustbench_dyn.data.imagenet import check_wnid_folders

    # eval reads the labels from the wnid folders: refuse other names before hours of corrupting
    check_wnid_folders(src_dir, list_source_images(src_dir))
    summary = build_imagenet_c(
        src_dir,
        out_dir,
        corruptions,
        severities,
        workers=workers,
        limit=limit,
        progress=not quiet,
    )
    click.echo("\n".join(describe_build(summary)))
