"""Corruption-robustness metrics of Hendrycks & Dietterich 2019 (ImageNet-C), and delta top-1.

Pure pandas/numpy: the input is a table of top-1 errors per (corruption, severity) cell, however it
was measured. Units: every error, accuracy, CE and relative CE this module *returns in a
CorruptionMetrics* is a fraction (1.0 = 100 %); :func:`delta_top1` returns percentage points, as
Fig. 3 of the Bi-volution paper plots them.

With E(s, c) the top-1 error at severity s of corruption c (Hendrycks & Dietterich 2019, Sec. 4):

- CE_c = sum_s E(s, c) / sum_s E_AlexNet(s, c), over the 5 severities;
- mCE = mean of CE_c over the 15 standard corruptions;
- relative CE_c = sum_s (E(s, c) - E_clean) / sum_s (E_AlexNet(s, c) - E_AlexNet_clean);
- relative mCE = mean of relative CE_c over the 15 standard corruptions.

The 4 extra corruptions (speckle_noise, gaussian_blur, spatter, saturate) get their CE reported
apart and never enter mCE, relative mCE, the category means or the standard means.

Missing cells: CE and relative CE are given only for corruptions that have all 5 severities, since
a sum over fewer severities is not comparable with AlexNet's. mCE, relative mCE and the mean error
over the 15 standard corruptions need all 75 standard cells; when any is missing they are ``None``
and :attr:`CorruptionMetrics.missing` lists the absent (corruption, severity) cells, rather than a
silently biased number. Mean errors per corruption, per category and over "all present" corruptions
are averages over what is there.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd

from robustbench_dyn.corruptions import CATEGORIES, CATEGORY_OF, CORRUPTION_NAMES, EXTRA, SEVERITIES, STANDARD
from robustbench_dyn.errors import DynrobustError

__all__ = [
    "ALEXNET_CLEAN_ERR",
    "CorruptionMetrics",
    "alexnet_errors",
    "corruption_metrics",
    "delta_top1",
    "validate_errors",
]

# AlexNet clean top-1 error (fraction): google-research/robustness_metrics
# reports/imagenet_variants.py ALEXNET_AVERAGE_ERR_CLEAN, citing Appendix C of Hendrycks & Dietterich 2019.
ALEXNET_CLEAN_ERR = 0.4348

_ALEXNET_FILE = "imagenet_c_alexnet_error.csv"
_ORDER = {name: i for i, name in enumerate(CORRUPTION_NAMES)}
_SHOWN = 10  # offending values quoted in an error message


@functools.lru_cache(maxsize=1)
def _alexnet_long() -> pd.DataFrame:
    source = resources.files("robustbench_dyn.reference").joinpath(_ALEXNET_FILE)
    with source.open("r", encoding="utf-8") as handle:
        wide = pd.read_csv(handle, comment="#")
    long = wide.melt(
        id_vars=["corruption"], value_vars=[f"s{s}" for s in SEVERITIES], var_name="severity", value_name="top1_err"
    )
    long["severity"] = long["severity"].str[1:].astype(int)
    long["_order"] = long["corruption"].map(_ORDER)
    return long.sort_values(["_order", "severity"]).drop(columns="_order").reset_index(drop=True)


def alexnet_errors() -> pd.DataFrame:
    """AlexNet's top-1 error on ImageNet-C: columns corruption, severity (1..5), top1_err (fraction).

    95 rows (19 corruptions x 5 severities) in ImageNet-C order; from the hendrycks/robustness README
    at commit 76d93933 (see ``robustbench_dyn/reference/imagenet_c_alexnet_error.csv``).
    """
    return _alexnet_long().copy()


def _quote(values) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_SHOWN])
    return shown + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")


def _fraction_column(frame: pd.DataFrame, column: str, what: str) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = frame.loc[values.isna(), column]
    if len(bad):
        raise DynrobustError(f"{what}: column {column!r} has values that are not numbers: {_quote(bad.tolist())}")
    values = values.astype(float)
    outside = values[(values < 0) | (values > 1)]
    if len(outside):
        hint = " (they look like percentages: give fractions, e.g. 0.25 for 25 %)" if outside.max() <= 100 else ""
        raise DynrobustError(
            f"{what}: column {column!r} must hold fractions in [0, 1], got {_quote(outside.tolist())}{hint}"
        )
    return values


def validate_errors(errors: pd.DataFrame, what: str = "errors") -> pd.DataFrame:
    """Check a table of per-cell errors and return a clean copy in ImageNet-C order.

    ``errors`` needs columns ``corruption`` (one of the 19 ImageNet-C names), ``severity`` (integer
    1..5) and ``top1_err`` (fraction in [0, 1]); an optional ``top5_err`` (fraction) is kept; other
    columns are dropped. Each (corruption, severity) cell may appear once. Raises a DynrobustError
    naming the problem; ``what`` names the table in that message.
    """
    if not isinstance(errors, pd.DataFrame):
        raise DynrobustError(f"{what}: expected a pandas DataFrame, got {type(errors).__name__}")
    absent = [c for c in ("corruption", "severity", "top1_err") if c not in errors.columns]
    if absent:
        raise DynrobustError(
            f"{what}: missing column(s) {', '.join(absent)}; need corruption, severity, top1_err "
            f"(got {', '.join(map(str, errors.columns)) or 'no columns'})"
        )
    if errors.empty:
        raise DynrobustError(f"{what}: no rows")
    blank = errors["corruption"].isna() | (errors["corruption"].astype(str).str.strip() == "")
    if blank.any():
        raise DynrobustError(f"{what}: {int(blank.sum())} row(s) have no corruption name")
    out = pd.DataFrame({"corruption": errors["corruption"].astype(str).str.strip()})

    unknown = sorted(set(out["corruption"]) - set(CORRUPTION_NAMES))
    if unknown:
        hints = []
        for name in unknown[:_SHOWN]:
            close = difflib.get_close_matches(name, CORRUPTION_NAMES, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise DynrobustError(
            f"{what}: unknown corruption(s) {', '.join(hints)}; the ImageNet-C corruptions are "
            f"{', '.join(CORRUPTION_NAMES)}"
        )

    severity = pd.to_numeric(errors["severity"], errors="coerce")
    bad = errors.loc[severity.isna() | ~severity.isin(SEVERITIES), "severity"]
    if len(bad):
        raise DynrobustError(f"{what}: severity must be an integer from 1 to 5, got {_quote(bad.tolist())}")
    out["severity"] = severity.astype(int).to_numpy()

    out["top1_err"] = _fraction_column(errors, "top1_err", what).to_numpy()
    if "top5_err" in errors.columns:
        top5 = _fraction_column(errors, "top5_err", what).to_numpy()
        if np.any(top5 > out["top1_err"].to_numpy() + 1e-12):
            raise DynrobustError(f"{what}: top5_err is larger than top1_err in some cells, which cannot be")
        out["top5_err"] = top5

    duplicated = out.loc[out.duplicated(["corruption", "severity"]), ["corruption", "severity"]]
    if len(duplicated):
        cells = [f"{c}/{s}" for c, s in duplicated.drop_duplicates().itertuples(index=False)]
        raise DynrobustError(
            f"{what}: each (corruption, severity) cell must appear once; repeated: {_quote(cells)}"
        )
    out["_order"] = out["corruption"].map(_ORDER)
    return out.sort_values(["_order", "severity"]).drop(columns="_order").reset_index(drop=True)


def _none_if_nan(value):
    if value is None:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def _records(frame: pd.DataFrame) -> list:
    return [{k: _none_if_nan(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


@dataclass(frozen=True, eq=False)
class CorruptionMetrics:
    """The ImageNet-C metrics of one model. All errors, accuracies, CEs are fractions (1.0 = 100 %).

    Attributes:
        cells: one row per cell present: corruption, category, standard (bool), severity,
            top1_err, top1_acc (and top5_err if given).
        per_corruption: one row per corruption present, ImageNet-C order, columns corruption,
            category, standard, n_severities, mean_err and mean_acc (over the severities present),
            ce and relative_ce (NaN unless all 5 severities are present; relative_ce also NaN
            without a clean error), and mean_top5_err when top-5 errors were given.
        per_category: noise, blur, weather, digital: the mean of mean_err (and mean_acc) over the
            *standard* corruptions of the category that are present; n_corruptions counts them and
            complete says whether all of the category's standard cells are there.
        mce, relative_mce: mean CE / relative CE over the 15 standard corruptions; None when a
            standard cell is missing (see ``missing``) or, for relative_mce, without clean_err.
        mean_err_standard, mean_acc_standard: mean over the 75 standard cells; None when any is missing.
        mean_err_all, mean_acc_all: mean of mean_err / mean_acc over every corruption present
            (standard and extra), whatever its severities.
        clean_err: the model's clean top-1 error, if given.
        missing: the (corruption, severity) cells of the 15 standard corruptions that are absent.
    """

    cells: pd.DataFrame
    per_corruption: pd.DataFrame
    per_category: pd.DataFrame
    mce: float | None
    relative_mce: float | None
    mean_err_standard: float | None
    mean_acc_standard: float | None
    mean_err_all: float
    mean_acc_all: float
    clean_err: float | None
    missing: tuple

    @property
    def ce(self) -> dict:
        """CE (fraction) of each corruption that has all 5 severities, standard and extra."""
        rows = self.per_corruption.dropna(subset=["ce"])
        return dict(zip(rows["corruption"], rows["ce"].astype(float)))

    @property
    def extra_ce(self) -> dict:
        """CE (fraction) of the extra corruptions with all 5 severities; reported apart, never in mCE."""
        return {name: ce for name, ce in self.ce.items() if name in EXTRA}

    def to_dict(self) -> dict:
        """A JSON-friendly dict (NaN becomes None); values are fractions, like the attributes."""
        return {
            "units": "fraction (1.0 = 100 %) for errors, accuracies, CE and relative CE",
            "normalizer": "AlexNet (Hendrycks & Dietterich 2019), clean error %.4f" % ALEXNET_CLEAN_ERR,
            "mce": self.mce,
            "relative_mce": self.relative_mce,
            "mean_err_standard": self.mean_err_standard,
            "mean_acc_standard": self.mean_acc_standard,
            "mean_err_all": self.mean_err_all,
            "mean_acc_all": self.mean_acc_all,
            "clean_err": self.clean_err,
            "missing": [[c, int(s)] for c, s in self.missing],
            "extra_ce": self.extra_ce,
            "per_corruption": _records(self.per_corruption),
            "per_category": _records(self.per_category),
            "cells": _records(self.cells),
        }


def _check_clean_err(clean_err) -> float | None:
    if clean_err is None:
        return None
    try:
        value = float(clean_err)
    except (TypeError, ValueError):
        raise DynrobustError(f"clean error must be a number, got {clean_err!r}") from None
    if not 0.0 <= value <= 1.0:
        raise DynrobustError(f"clean error must be a fraction in [0, 1], got {clean_err!r}")
    return value


def corruption_metrics(errors: pd.DataFrame, clean_err: float | None = None) -> CorruptionMetrics:
    """Compute CE, mCE, relative CE/mCE and mean errors of one model on ImageNet-C.

    ``errors``: columns corruption, severity (1..5), top1_err (fraction), optionally top5_err
    (fraction); see :func:`validate_errors`. ``clean_err``: the model's clean top-1 error as a
    fraction, needed only for relative CE and relative mCE. Returns a :class:`CorruptionMetrics`
    whose values are all fractions (mCE 0.767 = 76.7 %). Missing cells never bias a number: see the
    module docstring.
    """
    cells = validate_errors(errors)
    clean = _check_clean_err(clean_err)

    cells.insert(1, "category", cells["corruption"].map(CATEGORY_OF))
    cells.insert(2, "standard", cells["corruption"].isin(STANDARD))
    position = cells.columns.get_loc("top1_err") + 1
    cells.insert(position, "top1_acc", 1.0 - cells["top1_err"])

    alexnet = alexnet_errors().rename(columns={"top1_err": "alexnet_err"})
    joined = cells.merge(alexnet, on=["corruption", "severity"], how="left")

    rows = []
    for name, group in joined.groupby("corruption", sort=False):
        complete = len(group) == len(SEVERITIES)
        err_sum, alex_sum = group["top1_err"].sum(), group["alexnet_err"].sum()
        ce = err_sum / alex_sum if complete else np.nan
        relative = np.nan
        if complete and clean is not None:
            n = len(SEVERITIES)
            relative = (err_sum - n * clean) / (alex_sum - n * ALEXNET_CLEAN_ERR)
        row = {
            "corruption": name,
            "category": CATEGORY_OF[name],
            "standard": name in STANDARD,
            "n_severities": len(group),
            "mean_err": group["top1_err"].mean(),
            "mean_acc": group["top1_acc"].mean(),
            "ce": ce,
            "relative_ce": relative,
        }
        if "top5_err" in group.columns:
            row["mean_top5_err"] = group["top5_err"].mean()
        rows.append(row)
    per_corruption = pd.DataFrame(rows)

    standard_rows = per_corruption[per_corruption["standard"]]
    categories = []
    for category in CATEGORIES:
        members = standard_rows[standard_rows["category"] == category]
        expected = [n for n in STANDARD if CATEGORY_OF[n] == category]
        categories.append(
            {
                "category": category,
                "n_corruptions": len(members),
                "complete": len(members) == len(expected)
                and bool((members["n_severities"] == len(SEVERITIES)).all()),
                "mean_err": members["mean_err"].mean() if len(members) else np.nan,
                "mean_acc": members["mean_acc"].mean() if len(members) else np.nan,
            }
        )
    per_category = pd.DataFrame(categories)

    present = set(zip(cells["corruption"], cells["severity"]))
    missing = tuple((c, s) for c in STANDARD for s in SEVERITIES if (c, s) not in present)
    if missing:
        mce = relative_mce = mean_err_standard = mean_acc_standard = None
    else:
        mce = float(standard_rows["ce"].mean())
        relative_mce = None if clean is None else float(standard_rows["relative_ce"].mean())
        standard_cells = cells[cells["standard"]]
        mean_err_standard = float(standard_cells["top1_err"].mean())
        mean_acc_standard = float(standard_cells["top1_acc"].mean())

    return CorruptionMetrics(
        cells=cells,
        per_corruption=per_corruption,
        per_category=per_category,
        mce=mce,
        relative_mce=relative_mce,
        mean_err_standard=mean_err_standard,
        mean_acc_standard=mean_acc_standard,
        mean_err_all=float(per_corruption["mean_err"].mean()),
        mean_acc_all=float(per_corruption["mean_acc"].mean()),
        clean_err=clean,
        missing=missing,
    )


def delta_top1(model: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Top-1 accuracy of ``model`` minus ``baseline``'s on ImageNet-C, in percentage points.

    Both tables have columns corruption, severity, top1_err (fractions), as for
    :func:`corruption_metrics`. Per corruption, each model's top-1 accuracy is averaged over the
    severities *both* tables have (Fig. 3 of the Bi-volution paper, AAAI 2022: "an average over five
    corruption severity"), then subtracted. Returns a DataFrame with one row per shared corruption
    (scope "corruption", ImageNet-C order, extra ones included), one per category with a standard
    corruption in common (scope "category": mean over those standard corruptions), then scope "mean"
    rows "standard" (over the shared standard corruptions) and "all" (over every shared corruption).
    Columns: scope, name, category, standard, cells (shared cells behind the row), model_top1,
    baseline_top1 (accuracy in %) and delta_top1 (percentage points). Raises a DynrobustError when
    the tables share no cell.
    """
    model_cells = validate_errors(model, "model errors")
    base_cells = validate_errors(baseline, "baseline errors")
    shared = model_cells[["corruption", "severity", "top1_err"]].merge(
        base_cells[["corruption", "severity", "top1_err"]], on=["corruption", "severity"], suffixes=("_model", "_base")
    )
    if shared.empty:
        raise DynrobustError(
            "model and baseline errors share no (corruption, severity) cell: nothing to compare"
        )
    shared["_order"] = shared["corruption"].map(_ORDER)
    shared = shared.sort_values(["_order", "severity"])

    rows = []
    for name, group in shared.groupby("corruption", sort=False):
        model_top1 = 100.0 * (1.0 - group["top1_err_model"]).mean()
        base_top1 = 100.0 * (1.0 - group["top1_err_base"]).mean()
        rows.append(
            {
                "scope": "corruption",
                "name": name,
                "category": CATEGORY_OF[name],
                "standard": name in STANDARD,
                "cells": len(group),
                "model_top1": model_top1,
                "baseline_top1": base_top1,
                "delta_top1": model_top1 - base_top1,
            }
        )
    per_corruption = pd.DataFrame(rows)

    def mean_row(scope, name, members, category=None, standard=None):
        return {
            "scope": scope,
            "name": name,
            "category": category,
            "standard": standard,
            "cells": int(members["cells"].sum()),
            "model_top1": members["model_top1"].mean(),
            "baseline_top1": members["baseline_top1"].mean(),
            "delta_top1": members["delta_top1"].mean(),
        }

    summary = []
    standard_rows = per_corruption[per_corruption["standard"]]
    for category in CATEGORIES:
        members = standard_rows[standard_rows["category"] == category]
        if len(members):
            summary.append(mean_row("category", category, members, category=category, standard=True))
    if len(standard_rows):
        summary.append(mean_row("mean", "standard", standard_rows, standard=True))
    summary.append(mean_row("mean", "all", per_corruption))
    frame = pd.concat([per_corruption, pd.DataFrame(summary)], ignore_index=True)
    frame["cells"] = frame["cells"].astype(int)
    return frame
