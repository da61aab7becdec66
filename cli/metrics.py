"""``dynrobust metrics``: CE, mCE, relative mCE and delta top-1 from a CSV of per-cell errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click
import pandas as pd

from robustbench_dyn.cli.paths import PATH
from robustbench_dyn.corruptions import SEVERITIES, STANDARD
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.metrics import (
    ALEXNET_CLEAN_ERR,
    CorruptionMetrics,
    corruption_metrics,
    delta_top1,
    validate_errors,
)

_MISSING_SHOWN = 12
# how far an error and an accuracy of the same cell (or two clean errors) may disagree, as fractions:
# rounding to 0.1 %, not a different number
_AGREEMENT = 1e-3


def _numeric(frame: pd.DataFrame, column: str, path: Path, percent: bool) -> pd.Series:
    """The column as fractions; non-numbers and values out of range are a DynrobustError."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = frame.loc[values.isna(), column]
    if len(bad):
        shown = ", ".join(repr(v) for v in bad.tolist()[:5])
        raise DynrobustError(f"{path}: column {column!r} has values that are not numbers: {shown}")
    top = 100.0 if percent else 1.0
    outside = values[(values < 0) | (values > top)]
    if len(outside):
        shown = ", ".join(repr(float(v)) for v in outside.tolist()[:5])
        if percent:
            raise DynrobustError(f"{path}: column {column!r} must be in [0, 100] with --percent, got {shown}")
        hint = "; if these are percentages, add --percent" if outside.max() <= 100 and outside.min() >= 0 else ""
        raise DynrobustError(f"{path}: column {column!r} must hold fractions in [0, 1], got {shown}{hint}")
    return values.astype(float) / top


def read_errors_csv(path: Path, percent: bool = False, allow_clean: bool = False) -> pd.DataFrame:
    """Read a CSV of per-cell errors into columns corruption, severity, top1_err[, top5_err] (fractions).

    Accepts ``top1_err`` or, failing that, ``top1_acc`` (likewise ``top5_err``/``top5_acc``), as
    fractions, or as percentages with ``percent=True``. Lines starting with ``#`` are comments;
    other columns are ignored. With ``allow_clean`` a row whose corruption is ``clean`` (the clean
    error, as ``dynrobust eval --format csv`` writes it) is kept as is. Any problem is a
    DynrobustError that names the file.
    """
    path = Path(path)
    if not path.exists():
        raise DynrobustError(f"{path}: no such file")
    if path.is_dir():
        raise DynrobustError(f"{path}: is a directory, not a CSV file")
    try:
        frame = pd.read_csv(path, comment="#", skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DynrobustError(
            f"{path}: the file is empty; expected a CSV with columns corruption, severity, top1_err"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DynrobustError(f"{path}: not a readable CSV file ({reason})") from None
    except OSError as exc:
        raise DynrobustError(f"{path}: cannot read ({exc.strerror or exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]

    missing = [c for c in ("corruption", "severity") if c not in frame.columns]
    if "top1_err" not in frame.columns and "top1_acc" not in frame.columns:
        missing.append("top1_err (or top1_acc)")
    if missing:
        got = ", ".join(frame.columns[:8]) + (", ..." if len(frame.columns) > 8 else "")
        raise DynrobustError(
            f"{path}: missing column(s) {', '.join(missing)}; expected a CSV with columns "
            f"corruption, severity, top1_err (got: {got or 'no columns'})"
        )
    if frame.empty:
        raise DynrobustError(f"{path}: no rows after the header")

    out = pd.DataFrame({"corruption": frame["corruption"], "severity": frame["severity"]})
    for k in ("top1", "top5"):
        if f"{k}_err" in frame.columns:
            out[f"{k}_err"] = _numeric(frame, f"{k}_err", path, percent)
            if f"{k}_acc" in frame.columns:
                acc = _numeric(frame, f"{k}_acc", path, percent)
                off = (out[f"{k}_err"] + acc - 1.0).abs() > _AGREEMENT
                if off.any():
                    row = off.idxmax()
                    raise DynrobustError(
                        f"{path}: {k}_err and {k}_acc disagree in {int(off.sum())} row(s), e.g. "
                        f"{frame.loc[row, 'corruption']} {frame.loc[row, 'severity']}: {k}_err "
                        f"{frame.loc[row, f'{k}_err']} and {k}_acc {frame.loc[row, f'{k}_acc']} do not add up to "
                        f"{'100' if percent else '1'}; keep one of the columns"
                    )
        elif f"{k}_acc" in frame.columns:
            out[f"{k}_err"] = 1.0 - _numeric(frame, f"{k}_acc", path, percent)
    clean = out["corruption"].astype(str).str.strip() == "clean" if allow_clean else pd.Series(False, index=out.index)
    if clean.sum() > 1:
        raise DynrobustError(f"{path}: more than one 'clean' row")
    if clean.any() and not 0.0 <= float(out.loc[clean, "top1_err"].iloc[0]) <= 1.0:
        raise DynrobustError(f"{path}: the clean row's top-1 error is not a fraction in [0, 1]")
    if clean.all():
        raise DynrobustError(f"{path}: no corruption rows, only the clean one; expected one row per corruption "
                             "and severity")
    cells = validate_errors(out.loc[~clean].reset_index(drop=True), what=str(path))
    return pd.concat([cells, out.loc[clean].assign(corruption="clean")], ignore_index=True) if clean.any() else cells


def _severities(cells: pd.DataFrame, corruption: str) -> str:
    present = sorted(cells.loc[cells["corruption"] == corruption, "severity"].tolist())
    if present and present == list(range(present[0], present[-1] + 1)) and len(present) > 2:
        return f"{present[0]}-{present[-1]}"
    return ",".join(map(str, present))


def _pct(value, digits: int = 2) -> str:
    if value is None or pd.isna(value):
        return "-"
    return f"{100.0 * value:.{digits}f}"


def _pct_or(value, absent: str, digits: int = 2) -> str:
    return absent if value is None else _pct(value, digits)


def _missing_lines(result: CorruptionMetrics) -> list:
    if not result.missing:
        return []
    total = len(STANDARD) * len(SEVERITIES)
    by_corruption: dict = {}
    for corruption, severity in result.missing:
        by_corruption.setdefault(corruption, []).append(severity)
    parts = [
        f"{c} (all severities)" if len(s) == len(SEVERITIES) else f"{c} severity {','.join(map(str, s))}"
        for c, s in by_corruption.items()
    ]
    shown = "; ".join(parts[:_MISSING_SHOWN]) + (
        f"; and {len(parts) - _MISSING_SHOWN} more corruptions" if len(parts) > _MISSING_SHOWN else ""
    )
    return [
        f"missing {len(result.missing)} of the {total} standard cells: {shown}",
        "  mCE, relative mCE and the standard means need all 5 severities of all 15 standard corruptions;",
        "  CE is given only for corruptions with all 5 severities.",
    ]


def format_table(
    result: CorruptionMetrics, source: str, delta: pd.DataFrame | None = None, baseline: str | None = None
) -> str:
    """The metrics as a readable text table; every number in % (delta top-1 in percentage points)."""
    has_top5 = "mean_top5_err" in result.per_corruption.columns
    lines = [
        f"ImageNet-C metrics of {source}",
        "Hendrycks & Dietterich 2019: CE and relative CE normalised by AlexNet "
        f"(clean error {100 * ALEXNET_CLEAN_ERR:.2f} %); all numbers in %;",
        "error = top-1 error averaged over the severities listed.",
        "",
    ]
    header = f"{'corruption':<18} {'category':<8} {'severities':<10} {'error':>7} {'CE':>7} {'rel. CE':>8}"
    if has_top5:
        header += f" {'top-5 err':>9}"

    def corruption_line(row) -> str:
        line = (
            f"{row.corruption:<18} {row.category:<8} {_severities(result.cells, row.corruption):<10} "
            f"{_pct(row.mean_err):>7} {_pct(row.ce, 1):>7} {_pct(row.relative_ce, 1):>8}"
        )
        if has_top5:
            line += f" {_pct(row.mean_top5_err):>9}"
        return line

    standard = result.per_corruption[result.per_corruption["standard"]]
    extra = result.per_corruption[~result.per_corruption["standard"]]
    if len(standard):
        lines += [header, *(corruption_line(r) for r in standard.itertuples())]
    if len(extra):
        lines += ["", "extra corruptions (reported apart, never in mCE):", header]
        lines += [corruption_line(r) for r in extra.itertuples()]

    categories = result.per_category[result.per_category["n_corruptions"] > 0]
    if len(categories):
        lines += ["", "category means over the standard corruptions present:"]
        lines.append(f"{'category':<18} {'corruptions':>11} {'error':>7} {'accuracy':>9}")
        for row in categories.itertuples():
            note = "" if row.complete else "  (incomplete)"
            lines.append(
                f"{row.category:<18} {row.n_corruptions:>11} {_pct(row.mean_err):>7} {_pct(row.mean_acc):>9}{note}"
            )

    relative = (
        _pct(result.relative_mce, 1)
        if result.relative_mce is not None
        else ("n/a (give --clean-err)" if result.clean_err is None else "n/a (standard cells missing)")
    )
    n_all = len(result.per_corruption)
    summary = [
        ("mCE (15 standard)", _pct_or(result.mce, "n/a (standard cells missing)", 1)),
        ("relative mCE (15 standard)", relative),
        ("mean corruption error (15 standard)", _pct_or(result.mean_err_standard, "n/a")),
        ("mean corruption accuracy (15 standard)", _pct_or(result.mean_acc_standard, "n/a")),
        (f"mean corruption error ({n_all} present)", _pct(result.mean_err_all)),
        (f"mean corruption accuracy ({n_all} present)", _pct(result.mean_acc_all)),
        ("clean error", _pct_or(result.clean_err, "not given")),
    ]
    width = max(len(k) for k, _ in summary)
    lines += [""] + [f"{k:<{width}}  {v}" for k, v in summary]
    if result.extra_ce:
        lines.append(
            f"{'extra CE (not in mCE)':<{width}}  "
            + ", ".join(f"{name} {_pct(ce, 1)}" for name, ce in result.extra_ce.items())
        )
    missing = _missing_lines(result)
    if missing:
        lines += [""] + missing

    if delta is not None:
        lines += [
            "",
            f"delta top-1 against {baseline} (percentage points; top-1 accuracy in %, averaged over the",
            "severities both tables have; category and standard means over the 15 standard corruptions):",
            f"{'':<18} {'cells':>5} {'model':>7} {'baseline':>9} {'delta':>7}",
        ]
        for row in delta.itertuples():
            label = row.name if row.scope == "corruption" else (
                f"{row.name} (mean)" if row.scope == "category" else f"mean, {row.name}"
            )
            lines.append(
                f"{label:<18} {row.cells:>5} {row.model_top1:>7.2f} {row.baseline_top1:>9.2f} {row.delta_top1:>+7.2f}"
            )
    return "\n".join(lines)


def format_csv(result: CorruptionMetrics, delta: pd.DataFrame | None = None) -> str:
    """One CSV: rows per corruption, per category and summary; fractions, delta_top1_pp in points.

    Summary rows: ``standard`` (mean_err/mean_acc over the 75 standard cells, ce = mCE,
    relative_ce = relative mCE), ``all`` (means over every corruption present) and ``clean``.
    """
    rows = []
    for row in result.per_corruption.itertuples():
        rows.append(
            {
                "scope": "corruption",
                "name": row.corruption,
                "category": row.category,
                "standard": row.standard,
                "n_severities": row.n_severities,
                "mean_err": row.mean_err,
                "mean_acc": row.mean_acc,
                "ce": row.ce,
                "relative_ce": row.relative_ce,
            }
        )
    for row in result.per_category.itertuples():
        rows.append(
            {"scope": "category", "name": row.category, "category": row.category, "standard": True,
             "mean_err": row.mean_err, "mean_acc": row.mean_acc}
        )
    rows.append(
        {"scope": "summary", "name": "standard", "standard": True, "mean_err": result.mean_err_standard,
         "mean_acc": result.mean_acc_standard, "ce": result.mce, "relative_ce": result.relative_mce}
    )
    rows.append({"scope": "summary", "name": "all", "mean_err": result.mean_err_all, "mean_acc": result.mean_acc_all})
    if result.clean_err is not None:
        clean = result.clean_err
        rows.append({"scope": "summary", "name": "clean", "mean_err": clean, "mean_acc": 1.0 - clean})
    columns = ["scope", "name", "category", "standard", "n_severities", "mean_err", "mean_acc", "ce", "relative_ce"]
    table = pd.DataFrame(rows, columns=columns)
    table["n_severities"] = table["n_severities"].astype("Int64")
    if delta is not None:
        # delta's "mean" rows (standard, all) are this table's "summary" rows of the same name
        scopes = delta["scope"].replace({"mean": "summary"})
        by_row = dict(zip(zip(scopes, delta["name"]), delta["delta_top1"]))
        table["delta_top1_pp"] = [by_row.get(key) for key in zip(table["scope"], table["name"])]
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    return buffer.getvalue()


def _split_clean(frame):
    """Separate a ``clean`` row (as ``dynrobust eval --format csv`` writes it) from the corrupted cells."""
    is_clean = frame["corruption"] == "clean"
    clean = float(frame.loc[is_clean, "top1_err"].iloc[0]) if is_clean.any() else None
    return frame.loc[~is_clean].reset_index(drop=True), clean


@click.command("metrics")
@click.argument("errors_csv", type=PATH)
@click.option(
    "--clean-err",
    type=float,
    default=None,
    help="The model's clean top-1 error (a fraction, or % with --percent); needed for relative CE and relative mCE.",
)
@click.option(
    "--baseline",
    "baseline_csv",
    type=PATH,
    default=None,
    help="A second errors CSV (e.g. ResNet-50): also report delta top-1 against it, in percentage points.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="table: for people; json and csv: every number as a fraction (delta top-1 in points).",
)
@click.option(
    "--percent",
    is_flag=True,
    help="The CSVs' errors/accuracies and --clean-err are percentages (0-100), not fractions.",
)
def metrics_command(errors_csv, clean_err, baseline_csv, output_format, percent):
    """CE, mCE and relative mCE (Hendrycks & Dietterich 2019) from ERRORS_CSV.

    ERRORS_CSV has one row per (corruption, severity) cell with columns corruption (an ImageNet-C
    name), severity (1-5) and top1_err, a fraction in [0, 1] (or top1_acc instead; an optional
    top5_err/top5_acc is carried through). CE is normalised by AlexNet's errors; mCE and relative mCE
    average the 15 standard corruptions and need all 5 severities of each: with cells missing they
    are not given and the missing cells are listed. The 4 extra corruptions are reported apart.
    A row with corruption 'clean' (as `dynrobust eval --format csv` writes) gives the clean error.
    """
    errors, clean_row = _split_clean(read_errors_csv(errors_csv, percent=percent, allow_clean=True))
    given = clean_err
    if clean_err is None and clean_row is not None:
        clean_err = clean_row * 100.0 if percent else clean_row  # scaled back below with --percent
    if clean_err is not None and percent:
        clean_err = clean_err / 100.0
    if clean_err is not None and not 0.0 <= clean_err <= 1.0:
        unit = "a percentage in [0, 100]" if percent else "a fraction in [0, 1] (or add --percent)"
        raise DynrobustError(f"--clean-err must be {unit}")
    if given is not None and clean_row is not None and abs(clean_err - clean_row) > _AGREEMENT:
        shown = f"{100 * clean_row:g}" if percent else f"{clean_row:g}"
        raise DynrobustError(f"--clean-err {given:g} disagrees with the clean row of {errors_csv} ({shown}); "
                             "give one of them")
    result = corruption_metrics(errors, clean_err=clean_err)

    delta = None
    if baseline_csv is not None:
        baseline, _ = _split_clean(read_errors_csv(baseline_csv, percent=percent, allow_clean=True))
        delta = delta_top1(errors, baseline)
        if output_format != "json":
            model_cells = set(zip(errors["corruption"], errors["severity"]))
            base_cells = set(zip(baseline["corruption"], baseline["severity"]))
            only_model, only_base = len(model_cells - base_cells), len(base_cells - model_cells)
            counts = ((only_model, errors_csv), (only_base, baseline_csv))
            left_out = [f"{n} cell(s) only in {p}" for n, p in counts if n]
            if left_out:
                click.echo(f"note: delta top-1 leaves out {' and '.join(left_out)}", err=True)

    if output_format == "table":
        click.echo(format_table(result, str(errors_csv), delta, str(baseline_csv) if baseline_csv else None))
    elif output_format == "json":
        payload = {"errors_csv": str(errors_csv), **result.to_dict()}
        if delta is not None:
            payload["delta_top1"] = {
                "baseline_csv": str(baseline_csv),
                "units": "model_top1 and baseline_top1 in %, delta_top1 in percentage points",
                "rows": delta.astype(object).where(delta.notna(), None).to_dict(orient="records"),
            }
        click.echo(json.dumps(payload, indent=2, allow_nan=False))
    else:
        for line in _missing_lines(result):
            click.echo(line, err=True)
        click.echo(format_csv(result, delta), nl=False)
