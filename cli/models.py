"""``dynrobust models``: the model zoo with measured parameters and MACs next to the papers' numbers."""

from __future__ import annotations

import json

import click

from robustbench_dyn.errors import DynrobustError

_GLOB = set("*?[")


def model_rows(pattern: str | None = None, image_size: int = 224) -> list[dict]:
    """One dict per registered model matching ``pattern`` (an fnmatch pattern; without wildcards,
    a substring): name, family, params (count), params_m, macs (per image), gmacs, the paper's
    params_m / gmacs / top1 / source (None where no paper table names the model) and ops_backend
    (the dynamic ops' backend for models that call them, '-' for the others).
    A pattern that matches nothing is a DynrobustError.
    """
    from robustbench_dyn.models import list_models, model_config
    from robustbench_dyn.profile import cost_cache_file, model_costs

    names = list_models(pattern if pattern is None or _GLOB & set(pattern) else f"*{pattern}*")
    if not names:
        raise DynrobustError(f"no model matches {pattern!r} ({len(list_models())} models are registered; "
                             "`dynrobust models` lists them all)")
    def announce(count):  # measuring takes 0.1-2 s per model; cached afterwards
        click.echo(f"measuring parameters and MACs of {count} model{'s' if count > 1 else ''} on the meta device "
                   f"(once; cached in {cost_cache_file()})", err=True)

    costs = model_costs(names, image_size, on_measure=announce)
    backend = None
    rows = []
    for cost in costs:
        config = model_config(cost.name)
        if cost.uses_dynamic_ops and backend is None:
            from robustbench_dyn.ops import backend_info

            backend = backend_info().name
        rows.append({
            "name": cost.name,
            "family": config.family,
            "params": cost.params,
            "params_m": cost.params / 1e6,
            "macs": cost.macs,
            "gmacs": cost.macs / 1e9,
            "image_size": image_size,
            "paper_params_m": config.params_m,
            "paper_gmacs": config.gmacs,
            "paper_top1": config.top1,
            "paper_source": config.source,
            "ops_backend": backend if cost.uses_dynamic_ops else "-",
        })
    return rows


def render_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (params in M, MACs in G, top-1 in %)."""

    def num(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    header = ("model", "family", "params M", "paper", "GMACs", "paper", "top-1 %", "ops")
    body = [
        (r["name"], r["family"], num(r["params_m"], 2), num(r["paper_params_m"], 2), num(r["gmacs"], 3),
         num(r["paper_gmacs"], 3), num(r["paper_top1"], 2), r["ops_backend"])
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 1, 7}

    def line(cells):
        padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), *(line(cells) for cells in body)])


@click.command("models")
@click.argument("pattern", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def models_command(pattern, fmt):
    """List the registered models, or those matching PATTERN (fnmatch, e.g. 'od_resnet50*';
    a plain word matches as a substring, e.g. 'dcdc').

    Parameters and MACs (per 224x224 image) are measured on the meta device, the first time in a
    few tens of seconds for the whole zoo, then read from a cache keyed by the model code; the
    paper columns are the published numbers (params M, GMACs, ImageNet top-1 %) from
    reference/paper_tables.csv. 'ops' is the backend of the dynamic operators for models that use
    them ('-' for models built from torch's own convolutions).
    """
    rows = model_rows(pattern)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(render_table(rows))
