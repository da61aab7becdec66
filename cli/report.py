"""``dynrobust report``: compare models with a baseline from results stores; Markdown, HTML, figures, CSV, JSON."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from robustbench_dyn.cli.paths import PATH


def _command_line(sources, baseline, models, out, n_boot, level, seed) -> str:
    """The command as a person would type it (for the report's header), with defaults left out."""
    words = ["dynrobust", "report", *map(str, sources), "--baseline", baseline]
    if models:
        words += ["--models", ",".join(models)]
    words += ["--out", str(out)]
    if n_boot != 2000:
        words += ["--bootstrap", str(n_boot)]
    if level != 0.95:
        words += ["--level", str(level)]
    if seed != 0:
        words += ["--seed", str(seed)]
    return " ".join(shlex.quote(w) for w in words)


@click.command("report")
@click.argument("sources", nargs=-1, required=True, type=PATH)
@click.option("--baseline", required=True,
              help="The model (or run label, or run key prefix) every other run is compared with, e.g. resnet50.")
@click.option("--models", multiple=True,
              help="Runs to compare, comma-separated or repeated [default: every other run in the stores].")
@click.option("--out", type=PATH, default=Path("report"), show_default=True, help="Folder for the report.")
@click.option("--bootstrap", "n_boot", type=int, default=2000, show_default=True,
              help="Bootstrap replicates for the intervals (at least 100).")
@click.option("--level", type=float, default=0.95, show_default=True, help="Confidence level of the intervals.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap draws.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def report_command(sources, baseline, models, out, n_boot, level, seed, quiet):
    """Compare models with a baseline on ImageNet-C, from the results stores SOURCES.

    SOURCES are results.sqlite files or folders holding one (as `dynrobust eval --out` writes; one
    level of sub-folders is searched too). Reads only the stores: per-image records give the
    clean error, mean corruption accuracy, mCE, relative mCE and CE per corruption of every run;
    Fig. 3 of the Bi-volution paper (delta top-1 per corruption over the baseline, with paired
    bootstrap intervals over images); severity curves; and a paired sign test (McNemar's exact test
    on a single cell) of each run against the baseline on the same images.

    Writes OUT/report.md, OUT/report.html (self-contained), the figures as PNG and SVG, and the
    numbers as CSV and report.json.
    """
    from robustbench_dyn.report import compute_report, write_report

    words = [w.strip() for spec in models for w in spec.split(",") if w.strip()]
    data = compute_report(sources, baseline, words, n_boot=n_boot, level=level, seed=seed, progress=not quiet)
    files = write_report(data, out, command=_command_line(sources, baseline, words, out, n_boot, level, seed))
    for note in data.notes:
        click.secho(note, fg="red" if note.startswith("RANDOM") else None, err=True)
    click.echo(f"compared {', '.join(m.run.label for m in data.models)} with {data.baseline.run.label} "
               f"({len(data.stores)} store(s))")
    click.echo(f"report:  {files.markdown}  and  {files.html}")
    click.echo(f"figures: {', '.join(p.name for p in files.figures)}")
    click.echo(f"numbers: {', '.join(p.name for p in files.tables)}, {files.json.name}")
