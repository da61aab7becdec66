"""The runs a report compares: found in results stores, named, and their per-image outcomes read.

A run is identified by its run key (a hash of model, weights content and preprocessing, see
:class:`robustbench_dyn.store.RunIdentity`), so the same run split over several store files (one per
rank of a distributed evaluation, or copied folders) is one run here: its records are the union.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.store import STORE_NAME, ResultsStore

_RANDOM_PREFIX = "random-init"


@dataclass(frozen=True)
class Run:
    """One evaluated run, as the report names it.

    ``label``: its unique name in the report (the model name when only one run has that model);
    ``run_key``: the store's identity hash; ``weights``: the checkpoint path as given to eval (None
    for random weights); ``sources``: (store file, run id) pairs holding its records.
    """

    label: str
    model: str
    run_key: str
    weights: str | None
    weights_sha256: str
    preprocessing: str
    device: str | None
    torch_version: str | None
    ops_backend: str | None
    started_at: float
    finished_at: float | None
    sources: tuple

    @property
    def random_weights(self) -> bool:
        """True when the run was made without a checkpoint (its numbers say nothing)."""
        return self.weights_sha256.startswith(_RANDOM_PREFIX)


def find_stores(paths) -> list:
    """The store files named by ``paths``: ``.sqlite`` files, or folders holding ``results.sqlite``
    (directly or one level down, e.g. ``demo-out/runs``). Raises DynrobustError for a path that is
    missing or holds no store; a file found twice counts once."""
    if not paths:
        raise DynrobustError("give at least one results store (a folder with results.sqlite, or the file)")
    found = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise DynrobustError(f"{path} does not exist")
        if path.is_file():
            found.append(path)
            continue
        if (path / STORE_NAME).is_file():
            found.append(path / STORE_NAME)
            continue
        below = sorted(p for p in path.glob(f"*/{STORE_NAME}") if p.is_file())
        if not below:
            raise DynrobustError(f"{path} holds no {STORE_NAME} (looked in it and in its sub-folders)")
        found += below
    unique = {}
    for path in found:  # shown as given, told apart by where they really are
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _label_runs(rows: list) -> list:
    """Give every run a unique, readable label: the model, else model@<weights file>, else model#<key>."""
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    for model, group in by_model.items():
        if len(group) == 1:
            group[0]["label"] = model
            continue
        names = [f"{model}@{Path(r['weights']).stem if r['weights'] else 'random'}" for r in group]
        if len(set(names)) == len(names):
            for row, name in zip(group, names):
                row["label"] = name
        else:
            for row in group:
                row["label"] = f"{model}#{row['run_key'][:8]}"
    return rows


def _store_runs(store_files):
    """(store file, run row, whether it has records) of every run of ``store_files``, read-only."""
    for path in store_files:
        with ResultsStore.open_existing(path) as store:
            runs = store.runs()
            counts = store.record_counts()
        for row in runs.itertuples():
            yield path, row, bool(counts.get(row.run_id))


def load_runs(store_files) -> list:
    """Every run with at least one record in ``store_files``, merged by run key, labelled; sorted by
    start time. Stores are opened read-only. Raises DynrobustError when none holds a record."""
    merged = {}
    for path, row, has_records in _store_runs(store_files):
        if has_records:
            entry = merged.setdefault(row.run_key, {
                "model": row.model, "run_key": row.run_key, "weights": row.weights,
                "weights_sha256": row.weights_sha256, "preprocessing": row.preprocessing,
                "device": row.device, "torch_version": row.torch_version, "ops_backend": row.ops_backend,
                "started_at": float(row.started_at),
                "finished_at": None if pd.isna(row.finished_at) else float(row.finished_at),
                "sources": [],
            })
            entry["sources"].append((str(path), int(row.run_id)))
            entry["started_at"] = min(entry["started_at"], float(row.started_at))
    if not merged:
        shown = ", ".join(str(p) for p in store_files)
        raise DynrobustError(f"no evaluated images in {shown}: run `dynrobust eval ... --out` first")
    rows = sorted(merged.values(), key=lambda r: (r["started_at"], r["model"]))
    return [Run(**{**row, "sources": tuple(row["sources"])}) for row in _label_runs(rows)]


def runs_without_records(store_files) -> dict:
    """{model: [store files]} of the runs in ``store_files`` that have no record yet (an evaluation
    stopped before its first batch was committed); :func:`load_runs` leaves them out."""
    empty = {}
    for path, row, has_records in _store_runs(store_files):
        if not has_records:
            empty.setdefault(row.model, []).append(str(path))
    return empty


def resolve_run(spec: str, runs: list, option: str = "--baseline", without_records=None) -> Run:
    """Find the run ``spec`` names: a run label, a model name that only one run has, or a prefix
    (8+ hex digits) of a run key. Raises DynrobustError listing the runs when none or several match,
    or saying that the run has no records when ``spec`` is a model of ``without_records``
    (from :func:`runs_without_records`)."""
    spec = str(spec).strip()
    listing = "; ".join(f"{r.label} (run key {r.run_key[:12]})" for r in runs)
    for run in runs:
        if run.label == spec:
            return run
    same_model = [r for r in runs if r.model == spec]
    if len(same_model) == 1:
        return same_model[0]
    if len(same_model) > 1:
        raise DynrobustError(
            f"{option} {spec}: the stores hold {len(same_model)} runs of {spec}; name one of "
            f"{', '.join(r.label for r in same_model)} (or a run key prefix)"
        )
    if len(spec) >= 8 and all(c in "0123456789abcdef" for c in spec.lower()):
        keyed = [r for r in runs if r.run_key.startswith(spec.lower())]
        if len(keyed) == 1:
            return keyed[0]
    if spec in (without_records or {}):
        raise DynrobustError(
            f"{option} {spec}: its run in {', '.join(without_records[spec])} has no records (its evaluation "
            f"stopped before the first batch was saved); run the same `dynrobust eval --model {spec} ...` again "
            "to evaluate it"
        )
    close = difflib.get_close_matches(spec, [r.label for r in runs], n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise DynrobustError(f"{option} {spec}: no such model or run in the stores.{hint} Runs: {listing}")


def run_outcomes(run: Run) -> pd.DataFrame:
    """The per-image outcomes of ``run`` from every store holding it: corruption, severity,
    image_id, label, correct1, correct5 (0/1); a record in two stores counts once."""
    frames = []
    for path, run_id in run.sources:
        with ResultsStore.open_existing(path) as store:
            frames.append(store.outcomes(run_id))
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return frame.drop_duplicates(["corruption", "severity", "image_id"]).reset_index(drop=True)


def run_bad_images(run: Run) -> pd.DataFrame:
    """Images of ``run`` that could not be decoded: corruption, severity, image_id, path, reason."""
    frames = []
    for path, run_id in run.sources:
        with ResultsStore.open_existing(path) as store:
            frames.append(store.bad_images(run_id))
    frame = pd.concat(frames, ignore_index=True)
    frame = frame.drop_duplicates(["corruption", "severity", "image_id"])
    return frame[["corruption", "severity", "image_id", "path", "reason"]].reset_index(drop=True)


def describe_preprocessing(run: Run) -> str:
    """The run's clean-image preprocessing in a few words (e.g. 'resize 256, crop 224, bilinear')."""
    try:
        clean = json.loads(run.preprocessing).get("clean", {})
        return f"resize {clean['resize']}, crop {clean['crop']}, {clean['interpolation']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"
