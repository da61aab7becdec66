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

Paired statistics between two runs (:func:`paired_outcomes`, :func:`paired_delta_top1`) work on
per-image records: both models saw the same images, so the unit of resampling and of testing is
the image. Confidence intervals are percentile intervals of a paired bootstrap over images (the
same resampled images for both models, jointly over every cell, since one image appears at every
corruption and severity); p-values come from an exact sign test on images, which on a single cell
is McNemar's exact test (:func:`mcnemar_exact`). docs/report.md says why.
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
    "SignTest",
    "alexnet_errors",
    "corruption_metrics",
    "delta_top1",
    "holm_adjust",
    "image_units",
    "mcnemar_exact",
    "paired_delta_top1",
    "paired_outcomes",
    "sign_test",
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


# -- paired statistics on per-image records ---------------------------------------------------------

CLEAN_CELL = "clean"  # the clean images' cell in per-image records (severity 0), as the store files it


@dataclass(frozen=True)
class SignTest:
    """An exact two-sided sign test on paired differences.

    ``n_positive`` / ``n_negative``: pairs where the model did better / worse than the baseline
    (for McNemar's test: images only the model / only the baseline got right); ``n_ties``: pairs
    with no difference, which carry no information and are left out. ``p_value``: two-sided, exact,
    under H0 that a non-tied pair is equally likely to go either way (Binomial(n_positive +
    n_negative, 1/2)); 1.0 when every pair is tied.
    """

    n_positive: int
    n_negative: int
    n_ties: int
    p_value: float


def sign_test(differences) -> SignTest:
    """Exact two-sided sign test of paired ``differences`` (model minus baseline, any real numbers).

    p = min(1, 2 P(X <= min(n+, n-))), X ~ Binomial(n+ + n-, 1/2): the doubled smaller tail, which
    for p = 1/2 equals the sum of the probabilities of every outcome no more likely than the one
    observed. Differences within 1e-12 of zero count as ties. Returns a :class:`SignTest`.
    """
    from scipy.stats import binom

    values = np.asarray(differences, dtype=float).ravel()
    if np.isnan(values).any():
        raise DynrobustError("sign test: the differences hold NaN")
    positive = int(np.sum(values > 1e-12))
    negative = int(np.sum(values < -1e-12))
    ties = int(values.size - positive - negative)
    n = positive + negative
    if n == 0:
        return SignTest(positive, negative, ties, 1.0)
    p_value = min(1.0, 2.0 * float(binom.cdf(min(positive, negative), n, 0.5)))
    return SignTest(positive, negative, ties, p_value)


def mcnemar_exact(model_correct, baseline_correct) -> SignTest:
    """McNemar's exact test: did two classifiers differ in top-1 accuracy on the same images?

    ``model_correct`` and ``baseline_correct``: 0/1 (or bool) per image, in the same image order.
    Only the discordant images count: ``n_positive`` = b (model right, baseline wrong),
    ``n_negative`` = c (model wrong, baseline right); p = min(1, 2 P(X <= min(b, c))), X ~
    Binomial(b + c, 1/2) (McNemar 1947; exact form, no continuity correction needed). Returns a
    :class:`SignTest`; this is :func:`sign_test` on the differences model - baseline.
    """
    model = np.asarray(model_correct).ravel()
    base = np.asarray(baseline_correct).ravel()
    if model.shape != base.shape:
        raise DynrobustError(
            f"McNemar's test needs one outcome per image for both models; got {model.size} and {base.size}"
        )
    for name, values in (("model", model), ("baseline", base)):
        if not np.isin(values, (0, 1)).all():
            raise DynrobustError(f"McNemar's test: the {name} outcomes must be 0/1 (correct or not)")
    return sign_test(model.astype(int) - base.astype(int))


def holm_adjust(p_values) -> np.ndarray:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values; returns them adjusted (same order).

    Controls the family-wise error rate for any dependence between the tests. NaN stays NaN and is
    not counted in the family.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    m = present.size
    if m == 0:
        return adjusted
    order = present[np.argsort(p[present], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def _outcome_table(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise DynrobustError(f"{what}: expected a pandas DataFrame, got {type(frame).__name__}")
    absent = [c for c in ("corruption", "severity", "image_id", "correct1") if c not in frame.columns]
    if absent:
        raise DynrobustError(f"{what}: missing column(s) {', '.join(absent)}")
    if not frame["correct1"].isin((0, 1)).all():
        raise DynrobustError(f"{what}: correct1 must be 0 or 1")
    table = frame[["corruption", "severity", "image_id", "correct1"]].copy()
    table["severity"] = table["severity"].astype(int)
    known = set(CORRUPTION_NAMES) | {CLEAN_CELL}
    unknown = sorted(set(table["corruption"]) - known)
    if unknown:
        raise DynrobustError(f"{what}: unknown corruption(s) {_quote(unknown)}")
    if table.duplicated(["corruption", "severity", "image_id"]).any():
        raise DynrobustError(f"{what}: an image appears twice in one (corruption, severity) cell")
    return table


def paired_outcomes(model: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Pair two runs' per-image top-1 outcomes on the images both have.

    ``model``, ``baseline``: per-image records with columns corruption (an ImageNet-C name, or
    ``"clean"`` with severity 0), severity, image_id and correct1 (0/1), as the results store holds
    them. Returns columns corruption, severity, image_id, model_correct, baseline_correct (0/1), one
    row per (corruption, severity, image_id) present in both, clean first, then ImageNet-C order.
    Raises a DynrobustError when they share no image.
    """
    left = _outcome_table(model, "model records").rename(columns={"correct1": "model_correct"})
    right = _outcome_table(baseline, "baseline records").rename(columns={"correct1": "baseline_correct"})
    pairs = left.merge(right, on=["corruption", "severity", "image_id"], how="inner")
    if pairs.empty:
        raise DynrobustError("the model and the baseline share no (corruption, severity, image) record: "
                             "nothing to pair; evaluate them on the same images")
    order = {name: i for i, name in enumerate((CLEAN_CELL,) + CORRUPTION_NAMES)}
    pairs["_order"] = pairs["corruption"].map(order)
    pairs = pairs.sort_values(["_order", "severity", "image_id"]).drop(columns="_order").reset_index(drop=True)
    pairs[["model_correct", "baseline_correct"]] = pairs[["model_correct", "baseline_correct"]].astype(int)
    return pairs


def image_units(image_ids) -> np.ndarray:
    """The resampling unit of each image id: the id without its file extension.

    ImageNet-C saves every image as JPEG, so a clean ``n02123045/cat.png`` is
    ``n02123045/cat.jpg`` in every corrupted cell; both are one image (the tree builder refuses two
    sources that differ only by extension). Returns an array of str.
    """
    ids = pd.Series(image_ids, dtype=object).astype(str)
    return ids.str.replace(r"\.[^./]*$", "", regex=True).to_numpy(dtype=str)


def _row_weights(cells: list) -> tuple[list, np.ndarray]:
    """The rows of a delta top-1 table and each row's weights over the cells.

    Rows and their definitions follow :func:`delta_top1`: a corruption is the mean over its
    severities; a category the mean of its standard corruptions; "standard" and "all" the means
    over those corruptions; "clean" the clean cell. Returns (row descriptions, weights of shape
    (rows, cells), each row summing to 1).
    """
    corrupted = [c for c in cells if c[0] != CLEAN_CELL]
    names = [n for n in CORRUPTION_NAMES if any(c[0] == n for c in corrupted)]
    index = {cell: i for i, cell in enumerate(cells)}
    per_corruption = {}
    for name in names:
        weights = np.zeros(len(cells))
        members = [c for c in corrupted if c[0] == name]
        for cell in members:
            weights[index[cell]] = 1.0 / len(members)
        per_corruption[name] = (weights, len(members))

    rows, matrix = [], []
    if (CLEAN_CELL, 0) in index:
        weights = np.zeros(len(cells))
        weights[index[(CLEAN_CELL, 0)]] = 1.0
        rows.append({"scope": "clean", "name": CLEAN_CELL, "category": None, "standard": None, "cells": 1})
        matrix.append(weights)
    for name in names:
        rows.append({"scope": "corruption", "name": name, "category": CATEGORY_OF[name],
                     "standard": name in STANDARD, "cells": per_corruption[name][1]})
        matrix.append(per_corruption[name][0])

    def mean_of(scope, label, members, category=None, standard=None):
        rows.append({"scope": scope, "name": label, "category": category, "standard": standard,
                     "cells": sum(per_corruption[n][1] for n in members)})
        matrix.append(np.mean([per_corruption[n][0] for n in members], axis=0))

    standard = [n for n in names if n in STANDARD]
    for category in CATEGORIES:
        members = [n for n in standard if CATEGORY_OF[n] == category]
        if members:
            mean_of("category", category, members, category=category, standard=True)
    if standard:
        mean_of("mean", "standard", standard, standard=True)
    if names:
        mean_of("mean", "all", names)
    return rows, np.array(matrix).reshape(len(rows), len(cells))


def paired_delta_top1(
    pairs: pd.DataFrame, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Delta top-1 of a model over a baseline on the same images, with bootstrap intervals and p-values.

    ``pairs``: as :func:`paired_outcomes` returns. Rows follow :func:`delta_top1` (scope
    "corruption", "category", "mean": standard and all), preceded by a "clean" row when the clean
    cell is there; the point estimates equal :func:`delta_top1` of the two runs' errors on these
    images (a corruption's delta is the mean over its severities of the difference of top-1
    accuracies; a category's the mean over its standard corruptions).

    Columns: scope, name, category, standard, cells, images (distinct images behind the row),
    model_top1, baseline_top1 (accuracy in %), delta_top1, ci_low, ci_high (percentage points),
    n_better, n_worse (images whose mean outcome over the row's cells is higher / lower for the
    model than for the baseline), p_value (exact two-sided sign test on those images; McNemar's
    exact test for a single cell).

    Interval: the ``level`` (e.g. 0.95) percentile interval of ``n_boot`` paired bootstrap
    replicates. Each replicate draws images with replacement (the same draw for model and baseline,
    and jointly over all cells, since one image is seen at every corruption and severity) and
    recomputes the row from the resampled cells; an image is its id without the file extension
    (:func:`image_units`), so a clean PNG and its ImageNet-C JPEGs are drawn together. ``seed``
    makes the draws reproducible.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 100:
        raise DynrobustError(f"the bootstrap needs at least 100 replicates, got {n_boot!r}")
    if not 0.0 < float(level) < 1.0:
        raise DynrobustError(f"the confidence level must be a fraction strictly between 0 and 1, got {level!r}")
    absent = [c for c in ("corruption", "severity", "image_id", "model_correct", "baseline_correct")
              if c not in pairs.columns]
    if absent:
        raise DynrobustError(f"paired outcomes: missing column(s) {', '.join(absent)}")
    if pairs.empty:
        raise DynrobustError("paired outcomes: no rows")

    cell_keys = list(dict.fromkeys(zip(pairs["corruption"], pairs["severity"].astype(int))))
    units, unit_index = np.unique(image_units(pairs["image_id"]), return_inverse=True)
    cell_lookup = {cell: i for i, cell in enumerate(cell_keys)}
    cell_index = np.array([cell_lookup[k] for k in zip(pairs["corruption"], pairs["severity"].astype(int))])
    n_units, n_cells = len(units), len(cell_keys)

    model = pairs["model_correct"].to_numpy(dtype=float)
    base = pairs["baseline_correct"].to_numpy(dtype=float)
    present = np.zeros((n_units, n_cells))
    difference = np.zeros((n_units, n_cells))
    present[unit_index, cell_index] = 1.0
    difference[unit_index, cell_index] = model - base
    count = present.sum(axis=0)
    model_acc = np.bincount(cell_index, model, minlength=n_cells) / count
    base_acc = np.bincount(cell_index, base, minlength=n_cells) / count

    rows, weights = _row_weights(cell_keys)
    point = difference.sum(axis=0) / count @ weights.T

    # bootstrap: per replicate, a count of how often each image was drawn; cell means follow by
    # matrix products, in chunks that keep the count matrix to about 32 MB
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 4_000_000 // max(1, n_units)))
    replicates = np.empty((n_boot, len(rows)))
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        draws = rng.integers(0, n_units, size=(size, n_units))
        draws += np.arange(size)[:, None] * n_units
        counts = np.bincount(draws.ravel(), minlength=size * n_units).reshape(size, n_units).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            cell_means = (counts @ difference) / (counts @ present)
        replicates[done : done + size] = cell_means @ weights.T  # NaN where a cell drew no image
        done += size
    tail = 100.0 * (1.0 - float(level)) / 2.0
    with np.errstate(invalid="ignore"):
        finite = ~np.isnan(replicates)
    low = np.full(len(rows), np.nan)
    high = np.full(len(rows), np.nan)
    for r in range(len(rows)):
        values = replicates[finite[:, r], r]
        if values.size:
            low[r], high[r] = np.percentile(values, [tail, 100.0 - tail])

    out = []
    for r, row in enumerate(rows):
        member = weights[r] > 0
        row_weight = present[:, member] @ weights[r, member]
        seen = row_weight > 0
        per_image = (difference[:, member] @ weights[r, member])[seen] / row_weight[seen]
        test = sign_test(per_image)
        out.append({
            **row,
            "images": int(seen.sum()),
            "model_top1": 100.0 * float(model_acc @ weights[r]),
            "baseline_top1": 100.0 * float(base_acc @ weights[r]),
            "delta_top1": 100.0 * float(point[r]),
            "ci_low": 100.0 * float(low[r]),
            "ci_high": 100.0 * float(high[r]),
            "n_better": test.n_positive,
            "n_worse": test.n_negative,
            "p_value": test.p_value,
        })
    return pd.DataFrame(out)
