"""The numbers of a comparison report, computed from the results stores with :mod:`robustbench_dyn.metrics`.

Units in every table here: accuracies, errors, CE and relative CE in % (columns ending ``_pct``),
differences of accuracy in percentage points (``_pp``), p-values as probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from robustbench_dyn.corruptions import CATEGORY_OF, CORRUPTION_NAMES, STANDARD
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.metrics import (
    CLEAN_CELL,
    CorruptionMetrics,
    corruption_metrics,
    holm_adjust,
    image_units,
    paired_delta_top1,
    paired_outcomes,
)
from robustbench_dyn.progress import progress_bar
from robustbench_dyn.report.runs import (
    Run,
    describe_preprocessing,
    find_stores,
    load_runs,
    resolve_run,
    run_bad_images,
    run_outcomes,
    runs_without_records,
)

_ORDER = {name: i for i, name in enumerate((CLEAN_CELL,) + CORRUPTION_NAMES)}


@dataclass
class ModelResults:
    """One run's results in a report.

    ``cells``: corruption, severity, images, top1_acc, top5_acc (fractions), clean first;
    ``metrics``: CE, mCE, ... of its corrupted cells (None when it has none); ``clean_err``: top-1
    error on the clean images (fraction, None without them); ``images``: distinct images evaluated;
    ``images`` counts a clean file and its ImageNet-C versions once (:func:`robustbench_dyn.metrics.image_units`);
    ``paired``: :func:`robustbench_dyn.metrics.paired_delta_top1` against the baseline (None for
    the baseline), with ``p_holm``; ``unpaired``: this run's records without a baseline counterpart.
    """

    run: Run
    role: str
    cells: pd.DataFrame
    metrics: CorruptionMetrics | None
    clean_err: float | None
    clean_images: int
    images: int
    records: int
    bad_images: pd.DataFrame
    paired: pd.DataFrame | None = None
    unpaired: int = 0


@dataclass
class ReportData:
    """Everything a report shows: the baseline and the other runs, the settings and notes."""

    stores: list
    baseline: ModelResults
    models: list
    n_boot: int
    level: float
    seed: int
    notes: list = field(default_factory=list)

    @property
    def everyone(self) -> list:
        """The baseline, then the compared runs."""
        return [self.baseline] + list(self.models)


def _cells(outcomes: pd.DataFrame) -> pd.DataFrame:
    grouped = outcomes.groupby(["corruption", "severity"], sort=False)
    cells = grouped.agg(images=("correct1", "size"), top1_acc=("correct1", "mean"), top5_acc=("correct5", "mean"))
    cells = cells.reset_index()
    cells["_order"] = cells["corruption"].map(_ORDER)
    unknown = cells.loc[cells["_order"].isna(), "corruption"].unique()
    if len(unknown):
        raise DynrobustError(f"the store holds records of unknown corruption(s): {', '.join(map(str, unknown))}")
    cells = cells.sort_values(["_order", "severity"]).drop(columns="_order").reset_index(drop=True)
    cells["severity"] = cells["severity"].astype(int)
    cells["images"] = cells["images"].astype(int)
    return cells


def model_results(run: Run, role: str) -> tuple:
    """Read one run and compute its own numbers; returns (ModelResults, per-image outcomes)."""
    outcomes = run_outcomes(run)
    cells = _cells(outcomes)
    corrupted = cells[cells["corruption"] != CLEAN_CELL]
    clean = cells[cells["corruption"] == CLEAN_CELL]
    clean_err = float(1.0 - clean["top1_acc"].iloc[0]) if len(clean) else None
    metrics = None
    if len(corrupted):
        errors = pd.DataFrame({
            "corruption": corrupted["corruption"],
            "severity": corrupted["severity"],
            "top1_err": 1.0 - corrupted["top1_acc"],
            "top5_err": 1.0 - corrupted["top5_acc"],
        })
        metrics = corruption_metrics(errors, clean_err=clean_err)
    result = ModelResults(
        run=run,
        role=role,
        cells=cells,
        metrics=metrics,
        clean_err=clean_err,
        clean_images=int(clean["images"].iloc[0]) if len(clean) else 0,
        images=int(len(set(image_units(outcomes["image_id"])))),
        records=len(outcomes),
        bad_images=run_bad_images(run),
    )
    return result, outcomes


def _split_specs(specs) -> list:
    words = []
    for spec in specs or ():
        words += [w.strip() for w in str(spec).split(",") if w.strip()]
    return words


def compute_report(
    sources,
    baseline: str,
    models=None,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> ReportData:
    """Read the runs in ``sources`` (stores or folders) and compute everything a report shows.

    ``baseline``: a model name or run (see :func:`robustbench_dyn.report.runs.resolve_run`);
    ``models``: names or runs to compare with it (comma-separated strings allowed; default: every
    other run in the stores). Paired statistics use ``n_boot`` bootstrap replicates, intervals at
    ``level`` (a fraction), draws seeded by ``seed``. Raises DynrobustError for a baseline or model
    not in the stores, or nothing to compare.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise DynrobustError(f"--bootstrap must be at least 100 replicates, got {n_boot!r}")
    if not 0.5 <= float(level) < 1.0:
        raise DynrobustError(f"--level must be a fraction in [0.5, 1), e.g. 0.95; got {level!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:  # numpy's generators take no negative seed
        raise DynrobustError(f"--seed must be a whole number, 0 or more; got {seed!r}")
    stores = find_stores(sources)
    runs = load_runs(stores)
    without_records = runs_without_records(stores)
    base_run = resolve_run(baseline, runs, "--baseline", without_records)
    wanted = _split_specs(models)
    if wanted:
        chosen = []
        for spec in wanted:
            run = resolve_run(spec, runs, "--models", without_records)
            if run.run_key == base_run.run_key:
                raise DynrobustError(f"--models {spec} is the baseline itself; compare other runs with it")
            if run not in chosen:
                chosen.append(run)
    else:
        chosen = [r for r in runs if r.run_key != base_run.run_key]
    if not chosen:
        raise DynrobustError(
            f"the stores hold only the baseline ({base_run.label}): a report compares models; evaluate "
            "another model into the same --out (e.g. dynrobust eval --model resnext50_32x4d ...)"
        )

    bar = progress_bar(total=len(chosen) + 1, desc="report", unit="run", enabled=progress)
    try:
        base, base_outcomes = model_results(base_run, "baseline")
        if base.metrics is None:
            raise DynrobustError(
                f"the baseline {base_run.label} has no corrupted images in the stores (only clean ones): "
                "a report compares results on ImageNet-C"
            )
        bar.update(1)
        compared = []
        for run in chosen:
            bar.set_postfix_str(run.label, refresh=False)
            result, outcomes = model_results(run, "model")
            pairs = paired_outcomes(outcomes, base_outcomes)
            if (pairs["corruption"] == CLEAN_CELL).all():
                raise DynrobustError(
                    f"{run.label} and the baseline {base_run.label} share no corrupted image (same corruption, "
                    "severity and image): evaluate them on the same ImageNet-C cells"
                )
            result.unpaired = len(outcomes) - len(pairs)
            paired = paired_delta_top1(pairs, n_boot=n_boot, level=level, seed=seed)
            is_corruption = paired["scope"] == "corruption"
            paired["p_holm"] = np.nan
            paired.loc[is_corruption, "p_holm"] = holm_adjust(paired.loc[is_corruption, "p_value"].to_numpy())
            result.paired = paired
            compared.append(result)
            bar.update(1)
    finally:
        bar.close()

    data = ReportData(stores=stores, baseline=base, models=compared, n_boot=n_boot, level=float(level), seed=seed)
    randoms = [m.run.label for m in data.everyone if m.run.random_weights]
    if randoms:
        data.notes.append(
            f"RANDOM WEIGHTS: {', '.join(randoms)} {'was' if len(randoms) == 1 else 'were'} evaluated without a "
            f"checkpoint; {'its' if len(randoms) == 1 else 'their'} numbers say nothing about the "
            f"architecture{'' if len(randoms) == 1 else 's'}."
        )
    for m in data.everyone:
        if m.metrics is not None and m.metrics.missing:
            data.notes.append(
                f"{m.run.label}: {len(m.metrics.missing)} of the 75 standard cells are missing, so mCE, "
                "relative mCE and the standard mean are not given."
            )
        if m.clean_err is None:
            data.notes.append(f"{m.run.label}: no clean images in the store, so no clean error or relative mCE.")
        if m.unpaired:
            data.notes.append(
                f"{m.run.label}: {m.unpaired} of its {m.records} records have no baseline record of the same "
                "image and cell; paired statistics use the shared images only."
            )
        if len(m.bad_images):
            data.notes.append(f"{m.run.label}: {len(m.bad_images)} bad image(s) were skipped during evaluation.")
    return data


# -- tables ----------------------------------------------------------------------------------------


def _pct(value):
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else 100.0 * float(value)


def summary_table(data: ReportData) -> pd.DataFrame:
    """One row per run (baseline first): clean error, mean corruption accuracy, mCE, relative mCE
    (all in %), delta top-1 over all corruptions present with its interval (pp) and p-value."""
    rows = []
    for m in data.everyone:
        metrics = m.metrics
        overall = None
        if m.paired is not None:
            overall = m.paired[(m.paired["scope"] == "mean") & (m.paired["name"] == "all")]
            overall = overall.iloc[0] if len(overall) else None
        rows.append({
            "label": m.run.label,
            "role": m.role,
            "model": m.run.model,
            "weights": m.run.weights or "random (no checkpoint)",
            "images": m.images,
            "clean_err_pct": _pct(m.clean_err),
            "mean_corruption_acc_pct": _pct(metrics.mean_acc_all) if metrics else None,
            "mean_corruption_acc_standard_pct": _pct(metrics.mean_acc_standard) if metrics else None,
            "mce_pct": _pct(metrics.mce) if metrics else None,
            "relative_mce_pct": _pct(metrics.relative_mce) if metrics else None,
            "corruptions": int(len(metrics.per_corruption)) if metrics else 0,
            "delta_top1_pp": None if overall is None else float(overall["delta_top1"]),
            "ci_low_pp": None if overall is None else float(overall["ci_low"]),
            "ci_high_pp": None if overall is None else float(overall["ci_high"]),
            "p_value": None if overall is None else float(overall["p_value"]),
            "bad_images": len(m.bad_images),
        })
    return pd.DataFrame(rows)


def per_corruption_table(data: ReportData) -> pd.DataFrame:
    """One row per run and corruption: mean top-1 accuracy and error over the severities present,
    CE and relative CE (% of AlexNet's; NaN unless all 5 severities are there)."""
    rows = []
    for m in data.everyone:
        if m.metrics is None:
            continue
        for row in m.metrics.per_corruption.itertuples():
            rows.append({
                "label": m.run.label,
                "corruption": row.corruption,
                "category": row.category,
                "standard": bool(row.standard),
                "n_severities": int(row.n_severities),
                "mean_top1_acc_pct": 100.0 * row.mean_acc,
                "mean_top1_err_pct": 100.0 * row.mean_err,
                "ce_pct": 100.0 * row.ce,
                "relative_ce_pct": 100.0 * row.relative_ce,
            })
    return pd.DataFrame(rows)


def delta_table(data: ReportData) -> pd.DataFrame:
    """Delta top-1 of each compared run over the baseline, paired on the same images: one row per
    run and scope (clean, each corruption, category means, standard and all), with the bootstrap
    interval (pp), the images better/worse, the sign-test p-value and Holm's adjustment over the
    corruptions."""
    frames = []
    for m in data.models:
        frame = m.paired.rename(columns={
            "model_top1": "model_top1_pct", "baseline_top1": "baseline_top1_pct", "delta_top1": "delta_top1_pp",
            "ci_low": "ci_low_pp", "ci_high": "ci_high_pp",
        })
        frame.insert(0, "label", m.run.label)
        frame.insert(1, "baseline", data.baseline.run.label)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def severity_table(data: ReportData) -> pd.DataFrame:
    """Top-1 and top-5 accuracy (%) of each run per (corruption, severity) cell, the clean cell as severity 0."""
    frames = []
    for m in data.everyone:
        frame = m.cells.copy()
        frame.insert(0, "label", m.run.label)
        frame["category"] = frame["corruption"].map(CATEGORY_OF).fillna("clean")
        frame["standard"] = frame["corruption"].isin(STANDARD)
        frame["top1_acc_pct"] = 100.0 * frame.pop("top1_acc")
        frame["top5_acc_pct"] = 100.0 * frame.pop("top5_acc")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def runs_table(data: ReportData) -> pd.DataFrame:
    """Where each run comes from: model, weights and their SHA-256, device, torch, stores, images."""
    rows = []
    for m in data.everyone:
        run = m.run
        rows.append({
            "label": run.label,
            "role": m.role,
            "model": run.model,
            "weights": run.weights or "none (random init)",
            "weights_sha256": run.weights_sha256,
            "preprocessing": describe_preprocessing(run),
            "device": run.device,
            "torch": run.torch_version,
            "ops_backend": run.ops_backend,
            "records": m.records,
            "images": m.images,
            "run_key": run.run_key,
            "stores": "; ".join(f"{p} (run {i})" for p, i in run.sources),
        })
    return pd.DataFrame(rows)
