"""``dynrobust eval``: stream ImageNet-C (or a clean set, corrupted on the fly) through a model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from robustbench_dyn.cli.paths import PATH
from robustbench_dyn.progress import format_duration


def summary_rows(summary) -> list:
    """Per-cell rows (corruption, severity, images, top1_err, top5_err as fractions) of a summary."""
    return [
        {
            "corruption": row.corruption,
            "severity": int(row.severity),
            "images": int(row.images),
            "top1_err": float(row.top1_err),
            "top5_err": float(row.top5_err),
        }
        for row in summary.errors.itertuples()
    ]


def summary_metrics(summary) -> dict | None:
    """mCE and friends from the summary's cells (None when no corrupted cell was evaluated)."""
    from robustbench_dyn.metrics import corruption_metrics
    from robustbench_dyn.store import CLEAN

    errors = summary.errors
    corrupted = errors[errors.corruption != CLEAN]
    if corrupted.empty:
        return None
    clean = errors[errors.corruption == CLEAN]
    clean_err = float(clean.top1_err.iloc[0]) if not clean.empty else None
    return corruption_metrics(corrupted[["corruption", "severity", "top1_err", "top5_err"]], clean_err=clean_err).to_dict()


def render_table(summary, metrics) -> str:
    """The summary as text: top-1 error % per corruption and severity, then the metrics."""
    from robustbench_dyn.corruptions import SEVERITIES
    from robustbench_dyn.store import CLEAN

    errors = summary.errors
    lines = []
    header = f"{'corruption':18s} " + " ".join(f"{'s' + str(s):>6s}" for s in SEVERITIES) + f" {'mean':>6s}   top-1 error %"
    lines.append(header)
    for corruption, group in errors.groupby("corruption", sort=False):
        by_severity = dict(zip(group.severity, group.top1_err))
        if corruption == CLEAN:
            lines.append(f"{'clean':18s} {100 * by_severity[0]:6.2f}")
            continue
        cells = " ".join(f"{100 * by_severity[s]:6.2f}" if s in by_severity else f"{'-':>6s}" for s in SEVERITIES)
        lines.append(f"{corruption:18s} {cells} {100 * sum(by_severity.values()) / len(by_severity):6.2f}")
    if metrics:
        lines.append("")
        labels = {
            "clean_err": "clean top-1 error",
            "mean_err_all": "mean corruption error",
            "mean_err_standard": "mean error, 15 standard",
            "mce": "mCE (AlexNet = 100)",
            "relative_mce": "relative mCE",
        }
        for key, label in labels.items():
            value = metrics.get(key)
            if value is not None:
                lines.append(f"{label:26s} {100 * value:6.2f} %")
        for name, ce in (metrics.get("extra_ce") or {}).items():
            lines.append(f"{'CE ' + name + ' (extra)':26s} {100 * ce:6.2f} %")
        if metrics.get("missing"):
            lines.append(f"mCE and relative mCE need the 15 standard corruptions x 5 severities; "
                         f"{len(metrics['missing'])} of those cells are not in this run")
    return "\n".join(lines)


@click.command("eval")
@click.option("--model", "model_name", required=True, help="Registered model name, e.g. resnet50 (robustbench_dyn.models.list_models() lists them).")
@click.option("--weights", type=PATH, help="Checkpoint (.pth, .pt, .safetensors). Without it the weights are random.")
@click.option("--imagenet-c", type=PATH, help="ImageNet-C root: <root>/<corruption>/<severity>/<wnid>/<file> (or nested under categories).")
@click.option("--imagenet-val", type=PATH, help="Clean ImageNet val in class folders <wnid>/<file>: adds the clean error.")
@click.option("--on-the-fly", is_flag=True, help="Corrupt --imagenet-val with the engine instead of reading ImageNet-C.")
@click.option("--no-jpeg", is_flag=True, help="With --on-the-fly: skip the JPEG quality-85 round trip ImageNet-C files went through.")
@click.option("-c", "--corruptions", default="all", show_default=True, help="Corruptions and groups, e.g. 'noise,fog' or 'standard'.")
@click.option("-s", "--severities", default="1-5", show_default=True, help="A range like 1-5 or a list like 1,3,5.")
@click.option("--limit", type=int, help="At most N images per cell, class-balanced and deterministic.")
@click.option("-b", "--batch-size", type=int, default=64, show_default=True)
@click.option("-j", "--workers", type=int, help="Data-loading processes [default: 0 on CPU, min(8, CPUs) on CUDA; CPUs per rank under torchrun].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--amp", is_flag=True, help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format for model and inputs.")
@click.option("--out", type=PATH, default=Path("runs"), show_default=True, help="Folder of the results store (results.sqlite).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--strict", is_flag=True, help="Stop at the first bad image (default: record it and go on).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(model_name, weights, imagenet_c, imagenet_val, on_the_fly, no_jpeg, corruptions, severities, limit,
                 batch_size, workers, device, amp, channels_last, out, fmt, strict, quiet):
    """Evaluate a model on ImageNet-C and/or clean ImageNet; results are resumable.

    Per-image records (top-5 predictions, correct@1, correct@5) go to OUT/results.sqlite, committed
    in chunks: after a crash, run the same command again and only the missing chunks are evaluated.
    Prints top-1 error per corruption and severity, and mCE / relative mCE when the 15 standard
    corruptions at 5 severities (and the clean set, for relative mCE) are there.

    Several GPUs or machines: start it with torchrun (`torchrun --nproc-per-node 4 -m robustbench_dyn
    eval ... --device cuda`); each rank evaluates a fixed share on cuda:LOCAL_RANK, and rank 0
    merges the shares into OUT/results.sqlite and prints the results.
    """
    from robustbench_dyn.distributed import Ranks
    from robustbench_dyn.evaluate import evaluate
    from robustbench_dyn.models import model_config

    model_config(model_name)  # an unknown name is one error line, before any warning about it
    first_rank = Ranks.from_environment().rank == 0  # under torchrun, only rank 0 speaks
    if weights is None and first_rank:
        click.secho(f"WARNING: no --weights: {model_name} will have RANDOM weights; its errors mean nothing.",
                    fg="red", bold=True, err=True)
    summary = evaluate(
        model_name, weights=weights, imagenet_c=imagenet_c, imagenet_val=imagenet_val, on_the_fly=on_the_fly,
        jpeg_round_trip=not no_jpeg, corruptions=corruptions, severities=severities, limit=limit,
        batch_size=batch_size, workers=workers, device=device, amp=amp, channels_last=channels_last, out=out,
        strict=strict, progress=not quiet,
    )
    if summary.rank > 0:
        return
    rows = summary_rows(summary)
    metrics = summary_metrics(summary)
    if fmt == "json":
        click.echo(json.dumps({"model": summary.model, "weights": summary.weights, "store": str(summary.store),
                               "run_id": summary.run_id, "cells": rows, "metrics": metrics,
                               "bad_images": summary.bad_images[["corruption", "severity", "path", "reason"]].to_dict("records"),
                               "notes": summary.notes}, indent=2))
        return
    if fmt == "csv":
        click.echo("corruption,severity,images,top1_err,top5_err")
        for row in rows:
            click.echo(f"{row['corruption']},{row['severity']},{row['images']},{row['top1_err']:.6f},{row['top5_err']:.6f}")
        return
    click.echo(render_table(summary, metrics))
    click.echo("")
    click.echo(f"images: {summary.images_evaluated} evaluated now, {summary.images_already_done} already in the store; "
               f"{len(summary.bad_images)} bad")
    for bad in summary.bad_images.itertuples():
        click.echo(f"  bad image skipped: {bad.path}: {bad.reason}")
    click.echo(f"results: {summary.store} (run {summary.run_id}); {format_duration(summary.elapsed_s)}")
    for note in summary.notes:
        click.secho(note, fg="red", bold=True, err=True)
