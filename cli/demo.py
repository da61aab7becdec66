"""``dynrobust demo``: build a small ImageNet-C from the bundled photos and draw a contact sheet.

Nothing is downloaded: the clean images are the scikit-image photos of ``robustbench_dyn.sample``.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from robustbench_dyn.cli.paths import PATH
from robustbench_dyn.progress import format_duration

CONTACT_SHEET = "corruptions.png"
# half of the 224 px crop: a 2x2 box average, so thumbnails stay faithful to the pixels
THUMBNAIL = 112
_GAP = 4
_LABEL_WIDTH = 150
_HEADER_HEIGHT = 26


def write_contact_sheet(path, clean, corrupted, title) -> Path:
    """Draw one image under every corruption and severity into a PNG at ``path``; return ``path``.

    ``clean`` is the 224x224 uint8 crop; ``corrupted`` maps each corruption name to a list of its
    uint8 images at severities 1, 2, ... Rows are corruptions (in the mapping's order), columns are
    the clean crop then the severities; thumbnails are ``THUMBNAIL`` px, labelled.
    """
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    columns = 1 + max(len(images) for images in corrupted.values())
    width = _LABEL_WIDTH + columns * (THUMBNAIL + _GAP)
    height = 2 * _HEADER_HEIGHT + len(corrupted) * (THUMBNAIL + _GAP)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)

    def thumbnail(pixels):
        return Image.fromarray(pixels).resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)

    draw.text((_GAP, _GAP), title, fill="black", font=font)
    headers = ["clean"] + [f"severity {s}" for s in range(1, columns)]
    for column, header in enumerate(headers):
        left = _LABEL_WIDTH + column * (THUMBNAIL + _GAP)
        draw.text((left, _HEADER_HEIGHT + _GAP), header, fill="black", font=font)
    clean_thumbnail = thumbnail(clean)
    for row, (name, images) in enumerate(corrupted.items()):
        top = 2 * _HEADER_HEIGHT + row * (THUMBNAIL + _GAP)
        draw.text((_GAP, top + THUMBNAIL // 2 - 7), name, fill="black", font=font)
        sheet.paste(clean_thumbnail, (_LABEL_WIDTH, top))
        for column, pixels in enumerate(images, start=1):
            sheet.paste(thumbnail(pixels), (_LABEL_WIDTH + column * (THUMBNAIL + _GAP), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG", optimize=True)
    return path


@click.command("demo")
@click.option(
    "--out",
    type=PATH,
    default=Path("demo-out"),
    show_default=True,
    help="Folder for the clean sample, the ImageNet-C tree and the contact sheet.",
)
@click.option(
    "--workers",
    "-j",
    type=int,
    default=None,
    help="Worker processes [default: number of CPUs, at most 8]. 0 or 1: no pool.",
)
@click.option("--model", "model_name", default="resnet50", show_default=True, help="Model to evaluate.")
@click.option("--weights", type=PATH, help="Its checkpoint; without one the weights are random.")
# for the tests: a smaller demo that exercises the same code
@click.option("--corruptions", default="all", hidden=True)
def demo_command(out, workers, model_name, weights, corruptions):
    """Build a small ImageNet-C from the bundled photos and evaluate a model on it, end to end.

    Writes OUT/clean (4 photos in ImageNet class folders), OUT/imagenet-c (the same photos the
    ImageNet-C way: resize 256, crop 224, corrupt, JPEG quality 85, 19 corruptions x 5 severities),
    OUT/corruptions.png (a contact sheet of one photo under every corruption and severity), and
    OUT/runs/results.sqlite (the model's per-image predictions on the clean and corrupted photos).
    Runs offline in about a minute on two cores; run again to reuse what is already there.
    """
    from robustbench_dyn.cli.corrupt import describe_build
    from robustbench_dyn.corruptions import SEVERITIES
    from robustbench_dyn.data.build_imagenet_c import (
        CROP,
        RESIZE,
        build_imagenet_c,
        list_source_images,
        output_path,
    )
    from robustbench_dyn.data.images import load_rgb, resize_center_crop
    from robustbench_dyn.errors import DynrobustError
    from robustbench_dyn.sample import sample_images, write_sample_dataset

    started = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise DynrobustError(f"--out {out} exists and is not a folder")
    # the model and its checkpoint first: a bad name or file should fail before a minute of building
    from robustbench_dyn.models import create_model

    create_model(model_name, weights=weights)  # built and dropped; evaluate builds its own
    try:
        clean_dir = write_sample_dataset(out / "clean")
    except OSError as exc:
        reason = exc.strerror or exc
        raise DynrobustError(f"cannot write the sample photos into {out / 'clean'}: {reason}") from None
    summary = build_imagenet_c(
        clean_dir, out / "imagenet-c", corruptions, SEVERITIES, workers=workers, progress=True
    )

    shown = sample_images()[0]
    shown_id = f"{shown.wnid}/{shown.name}{shown.path.suffix}"  # as write_sample_dataset names it
    image = next(im for im in list_source_images(clean_dir) if im.image_id == shown_id)
    corrupted = {
        name: [load_rgb(output_path(summary.out, name, s, image)) for s in summary.severities]
        for name in summary.corruptions
    }
    sheet = write_contact_sheet(
        out / CONTACT_SHEET,
        resize_center_crop(load_rgb(image.path), RESIZE, CROP),
        corrupted,
        f"{shown.name} ({shown.label}, {shown.wnid}) as saved in {summary.out}",
    )

    click.echo(
        f"dynrobust demo: {summary.images} sample photos x {len(summary.corruptions)} corruptions "
        f"x {len(summary.severities)} severities"
    )
    click.echo(f"clean photos:  {clean_dir}")
    click.echo("\n".join(describe_build(summary)))
    click.echo(f"contact sheet: {sheet} (rows: corruptions; columns: clean, severities 1-5)")

    from robustbench_dyn.cli.eval import render_table, summary_metrics
    from robustbench_dyn.evaluate import evaluate

    click.echo("")
    if weights is None:
        click.secho(f"evaluating {model_name} with RANDOM weights (no --weights): the pipeline runs end to end, "
                    "but the errors below mean nothing", fg="red", bold=True, err=True)
    summary = evaluate(model_name, weights=weights, imagenet_c=summary.out, imagenet_val=clean_dir,
                       corruptions=corruptions, out=out / "runs", batch_size=16, channels_last=True, progress=True)
    click.echo(render_table(summary, summary_metrics(summary)))
    click.echo(f"per-image records: {summary.store} ({summary.images_evaluated} evaluated now, "
               f"{summary.images_already_done} already there); "
               f"`dynrobust eval ... --format csv` gives the per-cell errors that `dynrobust metrics` reads")
    click.echo(f"done in {format_duration(time.perf_counter() - started)}")
