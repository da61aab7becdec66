"""``dynrobust report`` and the paired statistics in ``robustbench_dyn.metrics``.

The report's numbers are recomputed here from the raw SQLite rows with plain SQL and arithmetic;
p-values against scipy.stats.binomtest; bootstrap intervals against the normal approximation.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import sqlite3
import xml.etree.ElementTree as ET
from importlib import resources

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import binomtest

from robustbench_dyn.cli import main
from robustbench_dyn.corruptions import CORRUPTION_NAMES, STANDARD
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.metrics import (
    delta_top1,
    holm_adjust,
    mcnemar_exact,
    paired_delta_top1,
    paired_outcomes,
    sign_test,
)
from robustbench_dyn.store import ResultsStore, RunIdentity

N_IMAGES = 40
PREPROCESSING = {"clean": {"resize": 256, "crop": 224, "interpolation": "bilinear"}}


def add_run(folder, model, weights_sha, accuracy, seed, images=N_IMAGES, corruptions=CORRUPTION_NAMES,
            severities=(1, 2, 3, 4, 5), weights=None, ids=None):
    """Write one run into the store at ``folder``: per image and cell, correct with probability
    ``accuracy(corruption, severity)``; returns the run id."""
    rng = np.random.default_rng(seed)
    ids = ids or [f"n01440764/img_{i:03d}.JPEG" for i in range(images)]
    with ResultsStore(folder) as store:
        run = store.open_run(RunIdentity(model, weights_sha, PREPROCESSING), weights, {"device": "cpu"})
        cells = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
        for corruption, severity in cells:
            p = accuracy(corruption, severity)
            records = []
            for i, image_id in enumerate(ids):
                label = i % 1000
                right = rng.random() < p
                top5 = [label, 1, 2, 3, 4] if right else [(label + 7) % 1000, label, 900, 901, 902]
                records.append((image_id, label, top5))
            store.commit_batch(run, corruption, severity, records, [])
        store.mark_finished(run)
    return run


def falling(start, step):
    """Accuracy ``start`` on clean images, falling by ``step`` per severity and a little per corruption."""

    def accuracy(corruption, severity):
        if corruption == "clean":
            return start
        return max(0.02, start - step * severity - 0.01 * (CORRUPTION_NAMES.index(corruption) % 7))

    return accuracy


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    add_run(folder, "resnet50", "sha-base", falling(0.75, 0.1), seed=1, weights="resnet50.pth")
    add_run(folder, "binet50_dcca", "sha-binet", falling(0.8, 0.08), seed=2, weights="binet.pth")
    add_run(folder, "resnext50_32x4d", "random-init-seed0", falling(0.7, 0.12), seed=3)
    return folder


@pytest.fixture(scope="module")
def report(store_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with pytest.raises(SystemExit) as stop:
        main(["report", str(store_dir), "--baseline", "resnet50", "--out", str(out), "-q", "--bootstrap", "400"])
    assert stop.value.code == 0
    return out


def sql_accuracy(db, model):
    """{(corruption, severity): top-1 accuracy} of ``model``, by SQL on the raw rows."""
    rows = db.execute(
        "SELECT corruption, severity, AVG(correct1) FROM records JOIN runs USING (run_id) WHERE model=?"
        " GROUP BY corruption, severity", (model,)).fetchall()
    return {(c, s): a for c, s, a in rows}


def alexnet():
    text = resources.files("robustbench_dyn.reference").joinpath("imagenet_c_alexnet_error.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return {r["corruption"]: [float(r[f"s{s}"]) for s in range(1, 6)] for r in rows}


# --- numbers against the raw store --------------------------------------------------------------


def test_summary_and_ce_match_the_raw_rows(store_dir, report):
    db = sqlite3.connect(store_dir / "results.sqlite")
    summary = pd.read_csv(report / "summary.csv").set_index("label")
    per_corruption = pd.read_csv(report / "per_corruption.csv").set_index(["label", "corruption"])
    alex = alexnet()
    for model in ("resnet50", "binet50_dcca", "resnext50_32x4d"):
        acc = sql_accuracy(db, model)
        clean_err = 1 - acc[("clean", 0)]
        assert summary.loc[model, "clean_err_pct"] == pytest.approx(100 * clean_err, abs=1e-9)
        means = {c: np.mean([acc[(c, s)] for s in range(1, 6)]) for c in CORRUPTION_NAMES}
        assert summary.loc[model, "mean_corruption_acc_pct"] == pytest.approx(100 * np.mean(list(means.values())), abs=1e-6)
        ce = {c: sum(1 - acc[(c, s)] for s in range(1, 6)) / sum(alex[c]) for c in CORRUPTION_NAMES}
        relative = {c: sum(1 - acc[(c, s)] - clean_err for s in range(1, 6)) / sum(a - 0.4348 for a in alex[c])
                    for c in CORRUPTION_NAMES}
        for c in CORRUPTION_NAMES:
            assert per_corruption.loc[(model, c), "ce_pct"] == pytest.approx(100 * ce[c], abs=1e-4)
            assert per_corruption.loc[(model, c), "relative_ce_pct"] == pytest.approx(100 * relative[c], abs=1e-4)
            assert per_corruption.loc[(model, c), "mean_top1_acc_pct"] == pytest.approx(100 * means[c], abs=1e-6)
        assert summary.loc[model, "mce_pct"] == pytest.approx(100 * np.mean([ce[c] for c in STANDARD]), abs=1e-4)
        assert summary.loc[model, "relative_mce_pct"] == pytest.approx(
            100 * np.mean([relative[c] for c in STANDARD]), abs=1e-4)
    assert summary.loc["resnet50", "role"] == "baseline"
    assert pd.isna(summary.loc["resnet50", "delta_top1_pp"])


def test_delta_top1_and_its_p_values_match_the_raw_rows(store_dir, report):
    db = sqlite3.connect(store_dir / "results.sqlite")
    deltas = pd.read_csv(report / "delta_top1.csv")
    base = sql_accuracy(db, "resnet50")
    for model in ("binet50_dcca", "resnext50_32x4d"):
        acc = sql_accuracy(db, model)
        rows = deltas[deltas["label"] == model].set_index(["scope", "name"])
        for c in CORRUPTION_NAMES:
            expected = 100 * np.mean([acc[(c, s)] - base[(c, s)] for s in range(1, 6)])
            assert rows.loc[("corruption", c), "delta_top1_pp"] == pytest.approx(expected, abs=1e-8)
        noise = [c for c in STANDARD if c.endswith("_noise")]
        expected_noise = np.mean([rows.loc[("corruption", c), "delta_top1_pp"] for c in noise])
        assert rows.loc[("category", "noise"), "delta_top1_pp"] == pytest.approx(expected_noise, abs=1e-8)
        # clean: McNemar's exact test on the discordant images, counted in SQL
        b, c = db.execute(
            "SELECT SUM(m.correct1 = 1 AND r.correct1 = 0), SUM(m.correct1 = 0 AND r.correct1 = 1)"
            " FROM records m JOIN runs mr ON m.run_id = mr.run_id"
            " JOIN records r ON r.corruption = m.corruption AND r.severity = m.severity AND r.image_id = m.image_id"
            " JOIN runs rr ON r.run_id = rr.run_id"
            " WHERE mr.model = ? AND rr.model = 'resnet50' AND m.corruption = 'clean'", (model,)).fetchone()
        clean = rows.loc[("clean", "clean")]
        assert (clean["n_better"], clean["n_worse"]) == (b, c)
        assert clean["p_value"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0, rel=1e-9)
        # every interval holds its point estimate
        assert (rows["ci_low_pp"] <= rows["delta_top1_pp"] + 1e-9).all()
        assert (rows["ci_high_pp"] >= rows["delta_top1_pp"] - 1e-9).all()


def test_paired_delta_equals_delta_top1_on_the_errors(rng):
    frames = {}
    for name, accuracy in (("model", 0.6), ("base", 0.5)):
        rows = [{"corruption": c, "severity": s, "image_id": f"w/{i}.JPEG", "correct1": int(rng.random() < accuracy)}
                for c in ("gaussian_noise", "fog", "saturate") for s in (1, 2, 4) for i in range(25)]
        frames[name] = pd.DataFrame(rows)
    pairs = paired_outcomes(frames["model"], frames["base"])
    paired = paired_delta_top1(pairs, n_boot=200).set_index(["scope", "name"])
    errors = {k: f.groupby(["corruption", "severity"])["correct1"].mean().rsub(1).rename("top1_err").reset_index()
              for k, f in frames.items()}
    plain = delta_top1(errors["model"], errors["base"]).set_index(["scope", "name"])
    for key in plain.index:
        assert paired.loc[key, "delta_top1"] == pytest.approx(plain.loc[key, "delta_top1"], abs=1e-9)
        assert paired.loc[key, "model_top1"] == pytest.approx(plain.loc[key, "model_top1"], abs=1e-9)


# --- bootstrap and tests ------------------------------------------------------------------------


def one_cell_pairs(rng, n, p_model=0.7, p_base=0.6):
    model = (rng.random(n) < p_model).astype(int)
    base = (rng.random(n) < p_base).astype(int)
    frame = pd.DataFrame({"corruption": "fog", "severity": 3, "image_id": [f"x/{i}.JPEG" for i in range(n)],
                          "model_correct": model, "baseline_correct": base})
    return frame, model - base


def test_bootstrap_interval_matches_the_normal_approximation_and_shrinks(rng):
    widths = {}
    for n in (100, 1600):
        pairs, d = one_cell_pairs(rng, n)
        row = paired_delta_top1(pairs, n_boot=3000, seed=1).set_index("scope").loc["corruption"]
        assert row["ci_low"] <= row["delta_top1"] <= row["ci_high"]
        standard_error = 100 * d.std() / math.sqrt(n)
        assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * 1.96 * standard_error, rel=0.12)
        assert (row["ci_low"] + row["ci_high"]) / 2 == pytest.approx(row["delta_top1"], abs=0.6 * standard_error)
        widths[n] = row["ci_high"] - row["ci_low"]
    assert widths[1600] == pytest.approx(widths[100] / 4, rel=0.2)  # 1/sqrt(n)


def test_bootstrap_is_reproducible_and_resamples_images_jointly(rng):
    pairs, _ = one_cell_pairs(rng, 60)
    first = paired_delta_top1(pairs, n_boot=500, seed=7)
    assert first.equals(paired_delta_top1(pairs, n_boot=500, seed=7))
    # the same outcomes at two severities: resampling whole images keeps the two cells identical, so
    # the corruption's interval is as wide as one cell's (independent draws per cell would shrink it)
    doubled = pd.concat([pairs, pairs.assign(severity=4)], ignore_index=True)
    both = paired_delta_top1(doubled, n_boot=500, seed=7).set_index("scope").loc["corruption"]
    one = first.set_index("scope").loc["corruption"]
    assert both["ci_high"] - both["ci_low"] == pytest.approx(one["ci_high"] - one["ci_low"], rel=1e-9)


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (7, 2), (30, 45), (12, 12), (150, 110)])
def test_mcnemar_exact_against_scipy_binomtest(b, c):
    model = [1] * b + [0] * c + [1] * 5 + [0] * 3
    base = [0] * b + [1] * c + [1] * 5 + [0] * 3
    result = mcnemar_exact(model, base)
    assert (result.n_positive, result.n_negative, result.n_ties) == (b, c, 8)
    expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert result.p_value == pytest.approx(expected, rel=1e-9)


def test_sign_test_on_real_differences_and_holm():
    result = sign_test([0.2, -0.1, 0.4, 0.0, 0.3, 0.25, 0.05])
    assert (result.n_positive, result.n_negative, result.n_ties) == (5, 1, 1)
    assert result.p_value == pytest.approx(binomtest(5, 6, 0.5).pvalue)
    # Holm by hand: sorted 0.005, 0.01, 0.03, 0.04 -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(holm_adjust([np.nan, 0.5])[0]) and holm_adjust([np.nan, 0.5])[1] == 0.5


def test_bad_statistics_input_is_a_clear_error():
    with pytest.raises(DynrobustError, match="0/1"):
        mcnemar_exact([0, 2], [1, 1])
    with pytest.raises(DynrobustError, match="one outcome per image"):
        mcnemar_exact([0, 1], [1])
    pairs = pd.DataFrame({"corruption": ["fog"], "severity": [1], "image_id": ["a"], "model_correct": [1],
                          "baseline_correct": [0]})
    with pytest.raises(DynrobustError, match="at least 100"):
        paired_delta_top1(pairs, n_boot=10)
    with pytest.raises(DynrobustError, match="share no"):
        paired_outcomes(
            pd.DataFrame({"corruption": ["fog"], "severity": [1], "image_id": ["a"], "correct1": [1]}),
            pd.DataFrame({"corruption": ["fog"], "severity": [1], "image_id": ["b"], "correct1": [1]}),
        )


# --- files ---------------------------------------------------------------------------------------


def test_figures_and_documents_exist_and_parse(report):
    for stem in ("fig3_delta_top1", "severity_curves"):
        with Image.open(report / f"{stem}.png") as png:
            png.load()
            assert png.format == "PNG" and png.size[0] > 600 and png.size[1] > 300
            assert _colours(png) > 10  # something is drawn
        assert ET.parse(report / f"{stem}.svg").getroot().tag.endswith("svg")
    markdown = (report / "report.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", markdown):
        assert (report / link).is_file(), link
    assert "binet50_dcca" in markdown and "RANDOM WEIGHTS" in markdown and "resnext50_32x4d" in markdown
    page = (report / "report.html").read_text()
    images = re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page)
    assert len(images) == 2
    for data in images:
        assert ET.fromstring(base64.b64decode(data)).tag.endswith("svg")
    assert 'src="' not in page.replace('src="data:', "")  # nothing outside the page
    payload = json.loads((report / "report.json").read_text())
    assert payload["baseline"] == "resnet50" and sorted(payload["models"]) == ["binet50_dcca", "resnext50_32x4d"]
    summary = pd.read_csv(report / "summary.csv").set_index("label")
    by_label = {row["label"]: row for row in payload["summary"]}
    assert by_label["binet50_dcca"]["mce_pct"] == pytest.approx(summary.loc["binet50_dcca", "mce_pct"], rel=1e-5)


def test_the_figure_draws_the_deltas_and_their_intervals(store_dir):
    """Fig. 3's bars are the deltas of the table, per corruption, category and overall, one colour per model."""
    from robustbench_dyn.report import compute_report
    from robustbench_dyn.report.figures import draw_delta_figure

    data = compute_report([store_dir], "resnet50", n_boot=200, progress=False)
    axis = draw_delta_figure(data).axes[0]
    containers = [c for c in axis.containers if hasattr(c, "patches")]
    assert [c.get_label() for c in containers] == ["binet50_dcca", "resnext50_32x4d"]
    labels = [t.get_text() for t in axis.get_xticklabels()]
    assert labels[:19] == list(CORRUPTION_NAMES)
    assert labels[19:] == ["noise (mean)", "blur (mean)", "weather (mean)", "digital (mean)", "all (mean)"]
    for model, container in zip(data.models, containers):
        rows = model.paired.set_index(["scope", "name"])
        keys = [("corruption", n) for n in CORRUPTION_NAMES] + [
            ("category", n) for n in ("noise", "blur", "weather", "digital")] + [("mean", "all")]
        heights = [bar.get_height() for bar in container.patches]
        np.testing.assert_allclose(heights, [rows.loc[k, "delta_top1"] for k in keys], atol=1e-9)
        colours = {bar.get_facecolor() for bar in container.patches}
        assert len(colours) == 1
        # the error bars span the bootstrap interval
        segments = container.errorbar.lines[2][0].get_segments()
        np.testing.assert_allclose([seg[0][1] for seg in segments], [rows.loc[k, "ci_low"] for k in keys], atol=1e-9)
        np.testing.assert_allclose([seg[1][1] for seg in segments], [rows.loc[k, "ci_high"] for k in keys], atol=1e-9)


def test_runs_split_over_two_stores_are_one_run(tmp_path):
    ids = [f"n01440764/img_{i:03d}.JPEG" for i in range(30)]
    acc_base, acc_model = (lambda c, s: 0.5), (lambda c, s: 0.7)
    kw = {"corruptions": ("fog",), "severities": (1, 2)}
    add_run(tmp_path / "whole", "resnet50", "a", acc_base, 1, ids=ids, **kw)
    add_run(tmp_path / "whole", "resnet26", "b", acc_model, 2, ids=ids, **kw)
    for shard, part in (("rank0", ids[:15]), ("rank1", ids[15:])):
        add_run(tmp_path / shard, "resnet50", "a", acc_base, 1, ids=ids, **kw)
        add_run(tmp_path / shard, "resnet26", "b", acc_model, 2, ids=ids, **kw)
        with sqlite3.connect(tmp_path / shard / "results.sqlite") as db:  # keep only this shard's images
            db.execute(f"DELETE FROM records WHERE image_id NOT IN ({','.join('?' * len(part))})", part)
    from robustbench_dyn.report import compute_report
    from robustbench_dyn.report.tables import delta_table

    whole = delta_table(compute_report([tmp_path / "whole"], "resnet50", n_boot=200, progress=False))
    split = delta_table(compute_report([tmp_path / "rank0", tmp_path / "rank1"], "resnet50", n_boot=200,
                                       progress=False))
    pd.testing.assert_frame_equal(whole, split)


# --- errors --------------------------------------------------------------------------------------


def run_report(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report", *map(str, args)])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["{store}", "--baseline", "resnet18"], "no such model or run"),
        (["{store}", "--baseline", "resnet50", "--models", "nope"], "--models nope: no such model"),
        (["{store}", "--baseline", "resnet50", "--models", "resnet50"], "is the baseline itself"),
        (["{store}", "--baseline", "resnet50", "--bootstrap", "5"], "at least 100"),
        (["{store}", "--baseline", "resnet50", "--level", "1.5"], "--level"),
        (["{store}", "--baseline", "resnet50", "--seed", "-1"], "--seed must be"),
        (["{tmp}/missing", "--baseline", "resnet50"], "does not exist"),
        (["{tmp}/empty", "--baseline", "resnet50"], "holds no results.sqlite"),
        (["{tmp}/text.sqlite", "--baseline", "resnet50"], "not a dynrobust results store"),
        (["{tmp}/other.sqlite", "--baseline", "resnet50"], "not a dynrobust results store"),
        (["{tmp}/foreign-runs.sqlite", "--baseline", "resnet50"], "not a dynrobust results store (its runs table"),
        (["{tmp}/word-schema", "--baseline", "resnet50"], "not a dynrobust results store (its schema 'one'"),
        (["{tmp}/single", "--baseline", "resnet50"], "only the baseline"),
        (["{tmp}/twice", "--baseline", "resnet50"], "2 runs of resnet50"),
        (["{tmp}/disjoint", "--baseline", "resnet50"], "share no"),
        (["{tmp}/clean-only", "--baseline", "resnet50"], "no corrupted images"),
        (["{tmp}/no-records", "--baseline", "resnet50"], "--baseline resnet50: its run in {tmp}/no-records/results.sqlite has no records"),
    ],
)
def test_bad_input_is_one_error_line(store_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.sqlite").write_text("not a database at all " * 100)
    with sqlite3.connect(tmp_path / "other.sqlite") as db:
        db.execute("CREATE TABLE t (x)")
    with sqlite3.connect(tmp_path / "foreign-runs.sqlite") as db:  # dynrobust's table names, not its columns
        db.executescript("CREATE TABLE meta (key, value); INSERT INTO meta VALUES ('schema', '1');"
                         " CREATE TABLE runs (x); CREATE TABLE records (x); CREATE TABLE bad_images (x);")
    add_run(tmp_path / "word-schema", "resnet50", "a", lambda c, s: 0.5, 1, corruptions=("fog",), severities=(1,))
    with sqlite3.connect(tmp_path / "word-schema" / "results.sqlite") as db:
        db.execute("UPDATE meta SET value='one' WHERE key='schema'")
    add_run(tmp_path / "single", "resnet50", "a", lambda c, s: 0.5, 1, corruptions=("fog",), severities=(1,))
    add_run(tmp_path / "twice", "resnet50", "a", lambda c, s: 0.5, 1, corruptions=("fog",), severities=(1,),
            weights="x/first.pth")
    add_run(tmp_path / "twice", "resnet50", "b", lambda c, s: 0.5, 1, corruptions=("fog",), severities=(1,),
            weights="y/second.pth")
    add_run(tmp_path / "disjoint", "resnet50", "a", lambda c, s: 0.5, 1, corruptions=("fog",), severities=(1,),
            ids=["n01440764/a.JPEG"])
    add_run(tmp_path / "disjoint", "resnet26", "b", lambda c, s: 0.5, 1, corruptions=("fog",), severities=(1,),
            ids=["n01440764/b.JPEG"])
    add_run(tmp_path / "clean-only", "resnet50", "a", lambda c, s: 0.5, 1, corruptions=(), severities=())
    add_run(tmp_path / "clean-only", "resnet26", "b", lambda c, s: 0.5, 1, corruptions=(), severities=())
    add_run(tmp_path / "no-records", "resnet26", "b", lambda c, s: 0.5, 1, corruptions=("fog",), severities=(1,))
    with ResultsStore(tmp_path / "no-records") as store:  # an evaluation stopped before its first batch
        store.open_run(RunIdentity("resnet50", "a", PREPROCESSING), None, {"device": "cpu"})
    filled = [a.format(store=store_dir, tmp=tmp_path) for a in args]
    message = message.format(tmp=tmp_path)
    code, out, err = run_report(filled + ["--out", tmp_path / "out", "-q"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0]
    assert "Traceback" not in err


def test_without_out_the_report_goes_to_report_in_the_current_folder(store_dir, tmp_path, capsys, monkeypatch):
    # the mission's own command line: `dynrobust report runs/ --baseline resnet50`
    monkeypatch.chdir(tmp_path)
    code, out, err = run_report([store_dir, "--baseline", "resnet50", "-q", "--bootstrap", "100"], capsys)
    assert code == 0, err
    assert "report:  report/report.md" in out
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert summary["label"].tolist() == ["resnet50", "binet50_dcca", "resnext50_32x4d"]
    assert "--out report" in (tmp_path / "report" / "report.md").read_text()


def test_two_runs_of_one_model_are_told_apart_by_their_weights(tmp_path, capsys):
    for sha, weights in (("a", "ckpt/first.pth"), ("b", "ckpt/second.pth")):
        add_run(tmp_path / "runs", "resnet50", sha, lambda c, s: 0.5, 1, corruptions=("fog",), severities=(1,),
                weights=weights)
    code, out, err = run_report([tmp_path / "runs", "--baseline", "resnet50@first", "--out", tmp_path / "r", "-q",
                                 "--bootstrap", "100"], capsys)
    assert code == 0, err
    assert pd.read_csv(tmp_path / "r" / "summary.csv")["label"].tolist() == ["resnet50@first", "resnet50@second"]


def _colours(image) -> int:
    """How many distinct colours an image has (capped at 65536): a blank figure has one or two."""
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    return 1 << 16 if colours is None else len(colours)
