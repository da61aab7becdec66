"""Metrics of Hendrycks & Dietterich 2019 (CE, mCE, relative mCE) and delta top-1, library and CLI.

Expected values are computed here by explicit arithmetic on AlexNet's published numbers (typed in,
or read from the packaged CSV with plain pandas), never with the module's own helpers.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from robustbench_dyn.cli import app
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.metrics import (
    ALEXNET_CLEAN_ERR,
    alexnet_errors,
    corruption_metrics,
    delta_top1,
)

STANDARD_15 = [
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
]  # fmt: skip
EXTRA_4 = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]

# AlexNet top-1 errors typed from the hendrycks/robustness README (commit 76d93933)
ALEX_GAUSSIAN_NOISE = [0.69528, 0.82542, 0.93554, 0.98138, 0.99452]
ALEX_FOG = [0.67474, 0.76050, 0.84378, 0.87260, 0.94500]
ALEX_SPATTER = [0.47196, 0.62194, 0.75052, 0.84132, 0.90182]


def _packaged_wide() -> pd.DataFrame:
    """The packaged reference CSV read with plain pandas, as the independent oracle."""
    text = resources.files("robustbench_dyn.reference").joinpath("imagenet_c_alexnet_error.csv").read_text()
    return pd.read_csv(io.StringIO(text), comment="#").set_index("corruption")


def _long(table: dict) -> pd.DataFrame:
    """{corruption: {severity: top1_err}} -> a long frame."""
    rows = [(c, s, e) for c, cells in table.items() for s, e in cells.items()]
    return pd.DataFrame(rows, columns=["corruption", "severity", "top1_err"])


def _scaled_alexnet(factor: float) -> pd.DataFrame:
    wide = _packaged_wide()
    return _long({c: {s: factor * wide.loc[c, f"s{s}"] for s in range(1, 6)} for c in wide.index})


# --- the reference data ---------------------------------------------------------------------------


def test_packaged_alexnet_table_is_the_published_one():
    wide = _packaged_wide()
    assert list(wide.index) == STANDARD_15 + EXTRA_4
    assert list(wide.loc[STANDARD_15, "standard"]) == ["yes"] * 15
    assert list(wide.loc[EXTRA_4, "standard"]) == ["extra"] * 4
    # the published per-corruption averages agree with the per-severity numbers (a typo would not)
    for name, row in wide.iterrows():
        assert np.mean([row[f"s{s}"] for s in range(1, 6)]) == pytest.approx(row["average"], abs=6e-7), name
    assert [wide.loc["gaussian_noise", f"s{s}"] for s in range(1, 6)] == ALEX_GAUSSIAN_NOISE
    assert wide.loc["saturate", "s5"] == 0.82260
    assert ALEXNET_CLEAN_ERR == 0.4348


def test_alexnet_errors_long_form():
    long = alexnet_errors()
    assert list(long.columns) == ["corruption", "severity", "top1_err"]
    assert len(long) == 95
    gauss = long[long["corruption"] == "gaussian_noise"].sort_values("severity")
    assert gauss["top1_err"].tolist() == ALEX_GAUSSIAN_NOISE
    assert long.loc[(long.corruption == "brightness") & (long.severity == 1), "top1_err"].item() == 0.45140
    # a copy: changing it must not change the next call
    long["top1_err"] = 0.0
    assert alexnet_errors()["top1_err"].sum() > 50


# --- CE, mCE, relative mCE ------------------------------------------------------------------------


def test_alexnet_against_itself_is_100_percent():
    result = corruption_metrics(alexnet_errors(), clean_err=0.4348)
    assert len(result.ce) == 19
    for name, ce in result.ce.items():
        assert ce == pytest.approx(1.0, abs=1e-12), name
    assert result.per_corruption["relative_ce"].to_numpy() == pytest.approx(np.ones(19), abs=1e-12)
    assert result.mce == pytest.approx(1.0, abs=1e-12)
    assert result.relative_mce == pytest.approx(1.0, abs=1e-12)
    assert result.missing == ()


def test_resnet50_sanity_scaled_alexnet_gives_mce_76_7():
    # the published torchvision ResNet-50 mCE is 76.7 %: errors 0.767 x AlexNet's give exactly that
    result = corruption_metrics(_scaled_alexnet(0.767))
    assert result.mce == pytest.approx(0.767, abs=1e-12)
    assert 100 * result.mce == pytest.approx(76.7, abs=1e-9)
    assert result.relative_mce is None  # no clean error given


def test_mce_is_the_mean_of_ce_not_a_ratio_of_sums():
    wide = _packaged_wide()
    errors = _scaled_alexnet(1.0)
    errors.loc[errors["corruption"] == "brightness", "top1_err"] *= 0.5
    result = corruption_metrics(errors)
    assert result.ce["brightness"] == pytest.approx(0.5, abs=1e-12)
    assert result.mce == pytest.approx((14 + 0.5) / 15, abs=1e-12)
    ratio_of_sums = (wide.loc[STANDARD_15, "average"].sum() - 0.5 * wide.loc["brightness", "average"]) / wide.loc[
        STANDARD_15, "average"
    ].sum()
    assert abs(result.mce - ratio_of_sums) > 1e-3


def test_relative_mce_by_hand():
    wide = _packaged_wide()
    clean = 0.2385
    result = corruption_metrics(_scaled_alexnet(0.767), clean_err=clean)
    relatives = []
    for name in STANDARD_15:
        alex = [wide.loc[name, f"s{s}"] for s in range(1, 6)]
        relatives.append(sum(0.767 * a - clean for a in alex) / sum(a - 0.4348 for a in alex))
    assert result.relative_mce == pytest.approx(sum(relatives) / 15, rel=1e-12)
    assert result.relative_mce > 1.0  # a lower clean error makes the relative degradation look worse


def test_hand_computed_cells():
    errors = _long(
        {
            "gaussian_noise": {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8, 5: 0.9},
            "fog": {1: 0.2, 3: 0.4},
            "spatter": {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5},
        }
    )
    result = corruption_metrics(errors, clean_err=0.3)
    alex_gauss = 0.69528 + 0.82542 + 0.93554 + 0.98138 + 0.99452
    assert result.ce["gaussian_noise"] == pytest.approx(3.5 / alex_gauss, rel=1e-12)
    rows = result.per_corruption.set_index("corruption")
    assert rows.loc["gaussian_noise", "relative_ce"] == pytest.approx(
        (3.5 - 5 * 0.3) / (alex_gauss - 5 * 0.4348), rel=1e-12
    )
    assert rows.loc["gaussian_noise", "mean_err"] == pytest.approx(0.7, abs=1e-12)
    assert rows.loc["gaussian_noise", "mean_acc"] == pytest.approx(0.3, abs=1e-12)
    # fog has 2 severities: a mean error, but no CE (not comparable with AlexNet's 5)
    assert rows.loc["fog", "n_severities"] == 2
    assert rows.loc["fog", "mean_err"] == pytest.approx(0.3, abs=1e-12)
    assert math.isnan(rows.loc["fog", "ce"]) and math.isnan(rows.loc["fog", "relative_ce"])
    assert "fog" not in result.ce
    # the extra corruption's CE is reported apart
    assert result.extra_ce == pytest.approx({"spatter": 1.5 / (0.47196 + 0.62194 + 0.75052 + 0.84132 + 0.90182)})
    # categories average the standard corruptions only: spatter is not in "weather"
    cats = result.per_category.set_index("category")
    assert cats.loc["noise", "mean_err"] == pytest.approx(0.7, abs=1e-12)
    assert cats.loc["weather", "mean_err"] == pytest.approx(0.3, abs=1e-12)
    assert cats.loc["weather", "n_corruptions"] == 1 and not cats.loc["weather", "complete"]
    assert cats.loc["blur", "n_corruptions"] == 0 and math.isnan(cats.loc["blur", "mean_err"])
    # mean over all present corruptions: the mean of the three corruption means
    assert result.mean_err_all == pytest.approx((0.7 + 0.3 + 0.3) / 3, abs=1e-12)
    assert result.mean_acc_all == pytest.approx(1 - (0.7 + 0.3 + 0.3) / 3, abs=1e-12)
    # not enough cells for mCE: None, and the missing standard cells listed
    assert result.mce is None and result.relative_mce is None
    assert result.mean_err_standard is None and result.mean_acc_standard is None
    assert len(result.missing) == 75 - 5 - 2
    assert ("fog", 2) in result.missing and ("shot_noise", 1) in result.missing
    assert not any(c == "gaussian_noise" for c, _ in result.missing)
    assert not any(c == "spatter" for c, _ in result.missing)


def test_extra_corruptions_never_enter_mce():
    wide = _packaged_wide()
    errors = _scaled_alexnet(1.0)
    errors.loc[errors["corruption"].isin(EXTRA_4), "top1_err"] = 0.0
    result = corruption_metrics(errors, clean_err=0.4348)
    assert result.mce == pytest.approx(1.0, abs=1e-12)
    assert result.relative_mce == pytest.approx(1.0, abs=1e-12)
    assert result.extra_ce == {"speckle_noise": 0.0, "gaussian_blur": 0.0, "spatter": 0.0, "saturate": 0.0}
    assert result.mean_err_standard == pytest.approx(wide.loc[STANDARD_15, "average"].mean(), abs=1e-6)
    # "all present" does see them: 15 AlexNet averages and 4 zeros
    assert result.mean_err_all == pytest.approx(wide.loc[STANDARD_15, "average"].sum() / 19, abs=1e-6)
    # and without the extras at all, mCE is the same
    only_standard = errors[errors["corruption"].isin(STANDARD_15)]
    assert corruption_metrics(only_standard).mce == pytest.approx(1.0, abs=1e-12)


def test_one_missing_standard_cell_gives_none_and_the_list():
    errors = _scaled_alexnet(0.767)
    errors = errors[~((errors["corruption"] == "fog") & (errors["severity"] == 3))]
    result = corruption_metrics(errors, clean_err=0.2)
    assert result.mce is None and result.relative_mce is None and result.mean_err_standard is None
    assert result.missing == (("fog", 3),)
    assert "fog" not in result.ce
    assert result.ce["snow"] == pytest.approx(0.767, abs=1e-12)
    assert result.to_dict()["missing"] == [["fog", 3]]


def test_a_missing_extra_cell_does_not_block_mce():
    errors = _scaled_alexnet(0.767)
    errors = errors[~((errors["corruption"] == "saturate") & (errors["severity"] == 5))]
    result = corruption_metrics(errors)
    assert result.mce == pytest.approx(0.767, abs=1e-12)
    assert result.missing == ()
    assert set(result.extra_ce) == {"speckle_noise", "gaussian_blur", "spatter"}


def test_top5_is_carried_through():
    errors = _long({"fog": {1: 0.5, 2: 0.7}})
    errors["top5_err"] = [0.2, 0.3]
    result = corruption_metrics(errors)
    assert result.cells["top5_err"].tolist() == [0.2, 0.3]
    assert result.per_corruption.set_index("corruption").loc["fog", "mean_top5_err"] == pytest.approx(0.25)


def test_to_dict_is_json_without_nan():
    errors = _long({"fog": {1: 0.5, 2: 0.7}, "snow": {s: 0.5 for s in range(1, 6)}})
    payload = json.loads(json.dumps(corruption_metrics(errors).to_dict(), allow_nan=False))
    assert payload["mce"] is None
    rows = {r["corruption"]: r for r in payload["per_corruption"]}
    assert rows["fog"]["ce"] is None
    assert rows["snow"]["ce"] == pytest.approx(2.5 / (0.71726 + 0.88392 + 0.86468 + 0.91870 + 0.94952))
    assert rows["snow"]["standard"] is True and rows["snow"]["n_severities"] == 5


# --- bad input ------------------------------------------------------------------------------------


def _one(corruption="fog", severity=1, err=0.5) -> pd.DataFrame:
    return pd.DataFrame({"corruption": [corruption], "severity": [severity], "top1_err": [err]})


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"corruption": ["fog"], "top1_err": [0.5]}), "missing column(s) severity"),
        (pd.DataFrame({"corruption": ["fog"], "severity": [1]}), "missing column(s) top1_err"),
        (pd.DataFrame({"corruption": [], "severity": [], "top1_err": []}), "no rows"),
        (_one(corruption="gausian_noise"), "did you mean gaussian_noise"),
        (_one(corruption="clean"), "unknown corruption"),
        (_one(corruption=None), "no corruption name"),
        (_one(severity=0), "severity must be an integer from 1 to 5"),
        (_one(severity=6), "severity must be an integer from 1 to 5"),
        (_one(severity=2.5), "severity must be an integer from 1 to 5"),
        (_one(severity="two"), "severity must be an integer from 1 to 5"),
        (_one(err=1.5), "fractions in [0, 1]"),
        (_one(err=55.0), "look like percentages"),
        (_one(err=-0.1), "fractions in [0, 1]"),
        (_one(err="abc"), "not numbers"),
        (_one(err=float("nan")), "not numbers"),
        (pd.concat([_one(), _one(err=0.6)]), "repeated: 'fog/1'"),
        (_one().assign(top5_err=0.7), "top5_err is larger than top1_err"),
        ([("fog", 1, 0.5)], "expected a pandas DataFrame"),
    ],
)
def test_bad_input_is_a_clear_error(frame, message):
    with pytest.raises(DynrobustError) as info:
        corruption_metrics(frame)
    assert message in str(info.value)


@pytest.mark.parametrize("clean", [1.5, -0.2, "x"])
def test_bad_clean_error(clean):
    with pytest.raises(DynrobustError, match="clean error"):
        corruption_metrics(_one(), clean_err=clean)


# --- delta top-1 ----------------------------------------------------------------------------------


def _delta_frames():
    model = _long(
        {
            "gaussian_noise": {1: 0.4, 2: 0.5, 3: 0.6},
            "fog": {2: 0.25},
            "speckle_noise": {1: 0.3},
            "snow": {1: 0.1},  # the baseline has no snow
        }
    )
    baseline = _long(
        {
            "gaussian_noise": {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8, 5: 0.9},
            "fog": {1: 0.9, 2: 0.2},
            "speckle_noise": {1: 0.5},
        }
    )
    return model, baseline


def test_delta_top1_by_hand():
    model, baseline = _delta_frames()
    delta = delta_top1(model, baseline)
    rows = {(r.scope, r.name): r for r in delta.itertuples()}
    # gaussian_noise: severities 1-3 only; model acc (60+50+40)/3 = 50, baseline (50+40+30)/3 = 40
    g = rows[("corruption", "gaussian_noise")]
    assert (g.cells, g.model_top1, g.baseline_top1) == (3, pytest.approx(50.0), pytest.approx(40.0))
    assert g.delta_top1 == pytest.approx(10.0)
    # fog: only severity 2 is shared: 75 - 80
    assert rows[("corruption", "fog")].delta_top1 == pytest.approx(-5.0)
    assert rows[("corruption", "fog")].cells == 1
    assert rows[("corruption", "speckle_noise")].delta_top1 == pytest.approx(20.0)
    assert ("corruption", "snow") not in rows
    # category means over the standard corruptions: speckle_noise (extra) is not in "noise"
    assert rows[("category", "noise")].delta_top1 == pytest.approx(10.0)
    assert rows[("category", "weather")].delta_top1 == pytest.approx(-5.0)
    assert ("category", "blur") not in rows
    assert rows[("mean", "standard")].delta_top1 == pytest.approx((10.0 - 5.0) / 2)
    assert rows[("mean", "all")].delta_top1 == pytest.approx((10.0 - 5.0 + 20.0) / 3)
    assert rows[("mean", "all")].cells == 5
    assert list(delta["scope"]) == ["corruption"] * 3 + ["category"] * 2 + ["mean"] * 2


def test_delta_top1_is_antisymmetric_and_zero_on_itself():
    model, baseline = _delta_frames()
    forward = delta_top1(model, baseline)["delta_top1"].to_numpy()
    backward = delta_top1(baseline, model)["delta_top1"].to_numpy()
    assert forward == pytest.approx(-backward)
    assert delta_top1(model, model)["delta_top1"].to_numpy() == pytest.approx(np.zeros(8))


def test_delta_top1_without_shared_cells():
    with pytest.raises(DynrobustError, match="share no"):
        delta_top1(_one("fog", 1), _one("fog", 2))
    with pytest.raises(DynrobustError, match="baseline errors: unknown corruption"):
        delta_top1(_one("fog", 1), _one("fogg", 1))


# --- the CLI --------------------------------------------------------------------------------------


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _invoke(*args):
    return CliRunner().invoke(app, ["metrics", *map(str, args)])


def _expected_relative_mce(factor: float, clean: float) -> float:
    wide = _packaged_wide()
    values = []
    for name in STANDARD_15:
        alex = [wide.loc[name, f"s{s}"] for s in range(1, 6)]
        values.append((factor * sum(alex) - 5 * clean) / (sum(alex) - 5 * 0.4348))
    return sum(values) / 15


def test_cli_table(tmp_path):
    errors = _write(_scaled_alexnet(0.767), tmp_path / "r50.csv")
    result = _invoke(errors, "--clean-err", "0.2385")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    by_name = {f[0]: f for f in map(str.split, lines) if f and f[0] in STANDARD_15 + EXTRA_4}
    assert set(by_name) == set(STANDARD_15 + EXTRA_4)
    wide = _packaged_wide()
    for name, fields in by_name.items():
        # corruption, category, severities, error %, CE %, relative CE %
        assert fields[2] == "1-5"
        assert float(fields[3]) == pytest.approx(100 * 0.767 * wide.loc[name, "average"], abs=0.006)
        assert fields[4] == "76.7"
    mce_line = next(line for line in lines if line.startswith("mCE (15 standard)"))
    assert mce_line.split()[-1] == "76.7"
    rel_line = next(line for line in lines if line.startswith("relative mCE"))
    assert float(rel_line.split()[-1]) == pytest.approx(100 * _expected_relative_mce(0.767, 0.2385), abs=0.051)
    assert any(line.startswith("extra corruptions") for line in lines)


def test_cli_table_shows_a_perfect_model_as_zero_not_missing(tmp_path):
    errors = _write(_scaled_alexnet(0.0), tmp_path / "perfect.csv")
    result = _invoke(errors, "--clean-err", "0")
    assert result.exit_code == 0, result.output
    summary = {line.rsplit("  ", 1)[0].strip(): line.split()[-1] for line in result.output.splitlines() if "  " in line}
    assert summary["mCE (15 standard)"] == "0.0"
    assert summary["mean corruption error (15 standard)"] == "0.00"
    assert summary["clean error"] == "0.00"


def test_cli_table_missing_cells_and_baseline(tmp_path):
    model = _scaled_alexnet(0.7)
    model = model[~((model["corruption"] == "fog") & (model["severity"] == 3))]
    errors = _write(model, tmp_path / "model.csv")
    baseline = _write(_scaled_alexnet(0.767), tmp_path / "base.csv")
    result = _invoke(errors, "--baseline", baseline)
    assert result.exit_code == 0, result.output
    assert "mCE (15 standard)                       n/a (standard cells missing)" in result.output
    assert "missing 1 of the 75 standard cells: fog severity 3" in result.output
    assert "delta top-1 against" in result.output
    assert "leaves out 1 cell(s) only in" in result.output
    fog = next(line for line in result.output.splitlines() if line.startswith("fog "))
    assert fog.split()[2] == "1,2,4,5" and fog.split()[4] == "-"


def test_cli_json_parses_back(tmp_path):
    errors = _write(_scaled_alexnet(0.767), tmp_path / "r50.csv")
    baseline = _write(_scaled_alexnet(1.0), tmp_path / "alexnet.csv")
    result = _invoke(errors, "--clean-err", "0.2385", "--baseline", baseline, "--format", "json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["mce"] == pytest.approx(0.767, abs=1e-12)
    assert payload["relative_mce"] == pytest.approx(_expected_relative_mce(0.767, 0.2385), rel=1e-12)
    assert payload["clean_err"] == 0.2385
    assert payload["missing"] == []
    assert [r["ce"] for r in payload["per_corruption"]] == pytest.approx([0.767] * 19, abs=1e-12)
    assert set(payload["extra_ce"]) == set(EXTRA_4)
    wide = _packaged_wide()
    rows = {(r["scope"], r["name"]): r for r in payload["delta_top1"]["rows"]}
    # delta = 100 * (1 - 0.767 E) - 100 * (1 - E) = 100 * 0.233 * mean E
    fog = rows[("corruption", "fog")]
    assert fog["delta_top1"] == pytest.approx(100 * 0.233 * wide.loc["fog", "average"], abs=1e-9)
    assert rows[("mean", "all")]["standard"] is None


def test_cli_csv_parses_back(tmp_path):
    errors = _write(_scaled_alexnet(0.767), tmp_path / "r50.csv")
    baseline = _write(_scaled_alexnet(1.0), tmp_path / "alexnet.csv")
    result = _invoke(errors, "--clean-err", "0.2385", "--baseline", baseline, "--format", "csv")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    rows = {(r.scope, r.name): r for r in table.itertuples()}
    assert rows[("summary", "standard")].ce == pytest.approx(0.767, abs=1e-12)
    assert rows[("summary", "standard")].relative_ce == pytest.approx(
        _expected_relative_mce(0.767, 0.2385), rel=1e-12
    )
    assert rows[("summary", "clean")].mean_err == 0.2385
    wide = _packaged_wide()
    for name in STANDARD_15 + EXTRA_4:
        row = rows[("corruption", name)]
        assert row.ce == pytest.approx(0.767, abs=1e-12)
        assert row.mean_err == pytest.approx(0.767 * wide.loc[name, "average"], abs=1e-6)
        assert row.delta_top1_pp == pytest.approx(100 * 0.233 * wide.loc[name, "average"], abs=1e-4)
    noise = [0.233 * 100 * wide.loc[n, "average"] for n in ("gaussian_noise", "shot_noise", "impulse_noise")]
    assert rows[("category", "noise")].delta_top1_pp == pytest.approx(sum(noise) / 3, abs=1e-4)


def test_cli_percent_and_accuracy_columns(tmp_path):
    frame = _scaled_alexnet(0.767)
    as_percent_acc = pd.DataFrame(
        {"corruption": frame["corruption"], "severity": frame["severity"], "top1_acc": 100 * (1 - frame["top1_err"])}
    )
    path = _write(as_percent_acc, tmp_path / "acc_percent.csv")
    result = _invoke(path, "--percent", "--clean-err", "23.85", "--format", "json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["mce"] == pytest.approx(0.767, abs=1e-12)
    assert payload["clean_err"] == pytest.approx(0.2385, abs=1e-12)
    # without --percent the same file is refused with a hint
    refused = _invoke(path)
    assert refused.exit_code == 1
    assert "add --percent" in str(refused.exception)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("", "the file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\xff\xfe", "not a readable CSV"),
        ("a,b\n1,2\n", "missing column(s) corruption, severity, top1_err"),
        ("corruption,severity,top1_err\nfogg,1,0.5\n", "did you mean fog"),
        ("corruption,severity,top1_err\nfog,9,0.5\n", "severity must be an integer from 1 to 5"),
        ("corruption,severity,top1_err\nfog,1,2.5\n", "fractions in [0, 1]"),
        ("corruption,severity,top1_err\nfog,1,lots\n", "not numbers"),
        ("corruption,severity,top1_err\nfog,1,0.5\nfog,1,0.4\n", "repeated"),
        ('corruption,severity,top1_err\n"fog,1,0.5\n', "not a readable CSV"),
        ("corruption,severity,top1_err\n", "no rows"),
        ("corruption,severity,top1_err\nclean,0,0.25\n", "no corruption rows, only the clean one"),
        ("corruption,severity,top1_err,top1_acc\nfog,1,0.5,0.5\nfog,2,0.3,0.6\n",
         "top1_err and top1_acc disagree in 1 row(s), e.g. fog 2: top1_err 0.3 and top1_acc 0.6 do not add up to 1"),
    ],
)
def test_cli_bad_input_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "errors.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = _invoke(path)
    assert result.exit_code == 1
    assert isinstance(result.exception, DynrobustError)
    assert message in str(result.exception)
    assert str(path) in str(result.exception)


def test_cli_directory_and_bad_clean_error(tmp_path):
    result = _invoke(tmp_path)
    assert isinstance(result.exception, DynrobustError) and "is a directory" in str(result.exception)
    errors = _write(_one(), tmp_path / "one.csv")
    result = _invoke(errors, "--clean-err", "23.85")
    assert result.exit_code == 1 and "--clean-err must be a fraction" in str(result.exception)


def test_clean_row_and_clean_err_must_agree(tmp_path):
    errors = _write(_one(), tmp_path / "one.csv")
    with_clean = tmp_path / "with_clean.csv"
    with_clean.write_text(errors.read_text() + "clean,0,0.25\n")
    result = _invoke(with_clean, "--clean-err", "0.3")
    assert result.exit_code == 1 and isinstance(result.exception, DynrobustError)
    assert f"--clean-err 0.3 disagrees with the clean row of {with_clean} (0.25)" in str(result.exception)
    assert _invoke(with_clean, "--clean-err", "0.25").exit_code == 0  # the same number twice is fine


def test_err_and_acc_columns_that_agree_are_accepted(tmp_path):
    path = tmp_path / "both.csv"
    path.write_text("corruption,severity,top1_err,top1_acc\nfog,1,23.45,76.55\nfog,2,30,70\n")
    result = _invoke(path, "--percent", "--format", "json")
    assert result.exit_code == 0, result.output


def test_console_script_bad_file_exits_1_without_traceback(tmp_path):
    script = shutil.which("dynrobust", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the dynrobust console script is not installed next to this Python (pip install -e .)")
    bad = tmp_path / "bad.csv"
    bad.write_text("corruption,severity,top1_err\nfog,1,not-a-number\n")
    done = subprocess.run([script, "metrics", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == [
        f"error: {bad}: column 'top1_err' has values that are not numbers: 'not-a-number'"
    ]
