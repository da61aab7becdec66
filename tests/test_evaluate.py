"""`dynrobust eval` end to end on small ImageNet-C trees made from the bundled photos."""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robustbench_dyn.cli import app
from robustbench_dyn.data.build_imagenet_c import build_imagenet_c
from robustbench_dyn.data.images import load_rgb, resize_center_crop
from robustbench_dyn.data.imagenet import imagenet_wnids
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.evaluate import evaluate
from robustbench_dyn.models import create_model, model_config
from robustbench_dyn.sample import write_sample_dataset
from robustbench_dyn.store import ResultsStore

MODEL = "resnet50"
CORRUPTIONS = "gaussian_noise,fog"
SEVERITIES = "1,3"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    clean = write_sample_dataset(root / "clean")
    flat = root / "imagenet-c"
    build_imagenet_c(clean, flat, CORRUPTIONS, SEVERITIES, workers=0, progress=False)
    nested = root / "nested"
    shutil.copytree(flat / "gaussian_noise", nested / "noise" / "gaussian_noise")
    shutil.copytree(flat / "fog", nested / "weather" / "fog")
    torch.manual_seed(1)
    weights = root / "resnet50-test.pth"
    torch.save(create_model(MODEL).state_dict(), weights)
    return {"root": root, "clean": clean, "flat": flat, "nested": nested, "weights": weights}


def _eval(*args):
    result = CliRunner().invoke(app, ["eval", "--model", MODEL, "-q", *map(str, args)], catch_exceptions=False)
    return result


def _records(out):
    with ResultsStore(out) as store:
        frame = store.records()
    return frame.sort_values(["corruption", "severity", "image_id"]).reset_index(drop=True)


def _independent_top1(model, config, path, clean):
    pixels = load_rgb(path)
    if clean:
        pixels = resize_center_crop(pixels, config.resize, config.crop, config.interpolation)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(config.mean).view(1, 3, 1, 1)) / torch.tensor(config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return int(model(x).argmax(1))


def test_eval_agrees_with_an_independent_loop(data, tmp_path):
    result = _eval("--weights", data["weights"], "--imagenet-c", data["flat"], "--imagenet-val", data["clean"],
                   "-c", CORRUPTIONS, "-s", SEVERITIES, "-b", "3", "--out", tmp_path / "runs", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    records = _records(tmp_path / "runs")
    assert len(records) == 4 * (1 + 2 * 2)
    model = create_model(MODEL, weights=data["weights"])
    config = model_config(MODEL).preprocessing
    wnids = imagenet_wnids()
    for row in records.itertuples():
        wnid, name = row.image_id.split("/")
        assert row.label == wnids.index(wnid)
        if row.corruption == "clean":
            path = data["clean"] / row.image_id
        else:
            path = data["flat"] / row.corruption / str(row.severity) / row.image_id
        assert row.top1 == _independent_top1(model, config, path, row.corruption == "clean"), row
        assert row.correct1 == int(row.top1 == row.label)
        assert row.correct5 == int(row.label in json.loads(row.top5))
    cells = {(c["corruption"], c["severity"]): c for c in report["cells"]}
    for (corruption, severity), group in records.groupby(["corruption", "severity"]):
        assert cells[(corruption, severity)]["top1_err"] == pytest.approx(1 - group.correct1.mean())
        assert cells[(corruption, severity)]["images"] == 4


def test_nested_layout_gives_the_same_records(data, tmp_path):
    for name, tree in (("flat", data["flat"]), ("nested", data["nested"])):
        result = _eval("--weights", data["weights"], "--imagenet-c", tree, "-c", CORRUPTIONS, "-s", SEVERITIES,
                       "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    flat, nested = _records(tmp_path / "flat"), _records(tmp_path / "nested")
    assert len(flat) == 16
    assert flat[["corruption", "severity", "image_id", "top5"]].equals(nested[["corruption", "severity", "image_id", "top5"]])


def test_on_the_fly_equals_the_tree_written_by_corrupt(data, tmp_path):
    """Same recipe, same canonical seeds, same JPEG: the predictions must be identical."""
    result = _eval("--weights", data["weights"], "--imagenet-val", data["clean"], "--on-the-fly",
                   "-c", CORRUPTIONS, "-s", SEVERITIES, "--out", tmp_path / "fly")
    assert result.exit_code == 0, result.output
    result = _eval("--weights", data["weights"], "--imagenet-c", data["flat"], "-c", CORRUPTIONS, "-s", SEVERITIES,
                   "--out", tmp_path / "disk")
    assert result.exit_code == 0, result.output
    fly = _records(tmp_path / "fly")
    disk = _records(tmp_path / "disk")
    fly = fly[fly.corruption != "clean"].reset_index(drop=True)
    # the sample's PNGs are written to the tree as <stem>.jpg: compare by stem
    for frame in (fly, disk):
        frame["image_id"] = frame.image_id.str.rsplit(".", n=1).str[0]
    assert len(fly) == 16
    assert fly[["corruption", "severity", "image_id", "top5"]].equals(disk[["corruption", "severity", "image_id", "top5"]])


def test_killed_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    script = Path(sys.executable).with_name("dynrobust")
    command = [str(script), "eval", "--model", MODEL, "--weights", str(data["weights"]), "--imagenet-c", str(data["flat"]),
               "-c", CORRUPTIONS, "-s", SEVERITIES, "-b", "2", "-q"]
    killed_out = tmp_path / "killed"
    process = subprocess.Popen(command + ["--out", str(killed_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    database = killed_out / "results.sqlite"
    deadline = time.monotonic() + 120
    done = 0
    while process.poll() is None and time.monotonic() < deadline:
        if database.exists():
            try:
                with sqlite3.connect(database, timeout=1) as db:
                    done = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 4:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 4 <= done < 16, "the run was not caught mid-way"
    resumed = subprocess.run(command + ["--out", str(killed_out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "already in the store" in resumed.stdout
    whole = subprocess.run(command + ["--out", str(tmp_path / "whole")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    a, b = _records(killed_out), _records(tmp_path / "whole")
    assert len(a) == 16
    assert a.drop(columns="run_id").equals(b.drop(columns="run_id"))


def test_bad_images_are_counted_and_strict_stops_keeping_the_work(data, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(data["flat"], tree)
    broken = tree / "fog" / "3" / "n07920052" / "zz_broken.JPEG"  # the last class: after every good image
    broken.write_bytes(b"")
    (tree / "fog" / "3" / "n07920052" / "zz_text.JPEG").write_text("not an image")
    (tree / "fog" / "3" / "n07920052" / "zz_wz_gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")  # a dangling link
    result = _eval("--weights", data["weights"], "--imagenet-c", tree, "-c", "fog", "-s", "3", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "3 bad" in result.stdout and "zz_broken.JPEG" in result.stdout and "empty" in result.stdout
    assert "zz_wz_gone.JPEG" in result.stdout
    assert len(_records(tmp_path / "a")) == 4

    result = CliRunner().invoke(app, ["eval", "--model", MODEL, "--weights", str(data["weights"]), "--imagenet-c", str(tree),
                                      "-c", "fog", "-s", "3", "-b", "1", "--strict", "-q", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0
    assert "--strict" in str(result.exception) and "saved" in str(result.exception)
    assert len(_records(tmp_path / "b")) == 4  # the four good images sort before the bad ones


def test_another_weights_file_is_another_run(data, tmp_path):
    torch.manual_seed(2)
    other = tmp_path / "other.pth"
    torch.save(create_model(MODEL).state_dict(), other)
    for weights in (data["weights"], other):
        result = _eval("--weights", weights, "--imagenet-c", data["flat"], "-c", "fog", "-s", "1", "--out", tmp_path / "runs")
        assert result.exit_code == 0, result.output
    with ResultsStore(tmp_path / "runs") as store:
        runs = store.runs()
    assert len(runs) == 2 and runs.weights_sha256.nunique() == 2


def test_no_weights_says_so_loudly(data, tmp_path):
    result = _eval("--imagenet-c", data["flat"], "-c", "fog", "-s", "1", "--out", tmp_path / "r", "--limit", "1")
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--imagenet-c", "/does/not/exist"], "does not exist"),
        (["-c", "fog", "-s", "2"], "fog/2"),
        (["-c", "snow"], "snow"),
        (["--on-the-fly"], "--imagenet-val"),
        (["--limit", "0"], "--limit"),
        (["--device", "tpu"], "--device"),
        (["--batch-size", "0"], "--batch-size"),
        (["--no-jpeg"], "--no-jpeg applies to --on-the-fly only"),
    ],
)
def test_user_errors_are_one_clear_line(data, tmp_path, capsys, args, message):
    # in this process, through the CLI's own exit handling (the console script's is checked by
    # test_an_unknown_model_is_one_line_without_the_random_weights_warning)
    base = ["--imagenet-c", str(data["flat"])] if "--imagenet-c" not in args and "--on-the-fly" not in args else []
    code, out, err = _main(["eval", "--model", MODEL, "--weights", data["weights"], *base, *args,
                            "--out", tmp_path / "o", "-q"], capsys)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_an_unknown_model_is_one_line_without_the_random_weights_warning(data, tmp_path):
    script = Path(sys.executable).with_name("dynrobust")
    result = subprocess.run([str(script), "eval", "--model", "resnet5", "--imagenet-c", str(data["flat"]),
                             "--out", str(tmp_path / "o"), "-q"], capture_output=True, text=True)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'resnet5'; did you mean resnet50"), lines
    assert not (tmp_path / "o").exists()


def test_two_folders_of_one_corruption_are_an_error_naming_both(data, tmp_path):
    tree = tmp_path / "tree"
    for category in ("noise", "more_noise"):
        shutil.copytree(data["flat"] / "gaussian_noise", tree / category / "gaussian_noise")
    shutil.copytree(data["flat"] / "fog", tree / "weather" / "fog")
    with pytest.raises(DynrobustError) as raised:
        _eval("--imagenet-c", tree, "-c", "gaussian_noise", "-s", "1", "--out", tmp_path / "runs")
    assert str(raised.value) == (
        f"{tree} holds gaussian_noise twice: {tree / 'more_noise' / 'gaussian_noise'}, "
        f"{tree / 'noise' / 'gaussian_noise'}; keep one, or give the folder of one of them as --imagenet-c"
    )
    # a corruption that is there once is still found
    assert _eval("--imagenet-c", tree, "-c", "fog", "-s", "1", "--limit", "1", "--out", tmp_path / "runs").exit_code == 0


def test_a_folder_that_is_not_imagenet_c(data, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", MODEL, "--imagenet-c", str(data["clean"]), "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "not an ImageNet-C folder" in str(result.exception)


def test_eval_csv_feeds_dynrobust_metrics_with_its_clean_row(data, tmp_path):
    result = _eval("--weights", data["weights"], "--imagenet-c", data["flat"], "--imagenet-val", data["clean"],
                   "-c", CORRUPTIONS, "-s", SEVERITIES, "--out", tmp_path / "runs", "--format", "csv")
    assert result.exit_code == 0, result.output
    csv = tmp_path / "errors.csv"
    csv.write_text(result.stdout)
    records = _records(tmp_path / "runs")
    clean_err = 1 - records[records.corruption == "clean"].correct1.mean()
    metrics = CliRunner().invoke(app, ["metrics", str(csv), "--format", "json"])
    assert metrics.exit_code == 0, metrics.output
    report = json.loads(metrics.stdout)
    assert report["clean_err"] == pytest.approx(clean_err)
    fog = next(r for r in report["per_corruption"] if r["corruption"] == "fog")
    assert fog["mean_err"] == pytest.approx(1 - records[records.corruption == "fog"].correct1.mean())


def test_a_checkpoint_that_does_not_fit_is_one_clear_line(data, tmp_path):
    torch.save(create_model("resnet101").state_dict(), tmp_path / "r101.pth")
    script = Path(sys.executable).with_name("dynrobust")
    result = subprocess.run([str(script), "eval", "--model", MODEL, "--weights", str(tmp_path / "r101.pth"),
                             "--imagenet-c", str(data["flat"]), "-c", "fog", "-s", "1", "--out", str(tmp_path / "o"), "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "unexpected" in result.stderr


def test_worker_processes_give_the_same_records(data, tmp_path):
    for workers in ("0", "2"):
        result = _eval("--weights", data["weights"], "--imagenet-val", data["clean"], "--on-the-fly", "-c", "fog",
                       "-s", "2", "-j", workers, "-b", "2", "--out", tmp_path / f"w{workers}")
        assert result.exit_code == 0, result.output
    a, b = _records(tmp_path / "w0"), _records(tmp_path / "w2")
    assert len(a) == 8
    assert a.drop(columns="run_id").equals(b.drop(columns="run_id"))


def test_amp_and_channels_last_run_on_cpu(data, tmp_path):
    """bfloat16 autocast on CPU changes the logits, not the pipeline: same images, same labels, recorded."""
    base = ("--weights", data["weights"], "--imagenet-c", data["flat"], "-c", "fog", "-s", "1,3")
    assert _eval(*base, "--out", tmp_path / "fp32").exit_code == 0
    result = _eval(*base, "--amp", "--channels-last", "--out", tmp_path / "amp")
    assert result.exit_code == 0, result.output
    fp32, amp = _records(tmp_path / "fp32"), _records(tmp_path / "amp")
    assert fp32[["corruption", "severity", "image_id", "label"]].equals(amp[["corruption", "severity", "image_id", "label"]])
    with ResultsStore(tmp_path / "amp") as store:
        assert json.loads(store.runs().options.iloc[0])["amp"] is True


def test_the_ops_backend_that_ran_is_recorded(tmp_path):
    # A static model records that no dynamic op ran; RedNet records the backend its involutions used.
    from robustbench_dyn import ops

    clean = write_sample_dataset(tmp_path / "clean")
    for model, expected in (("resnet18", "none (no dynamic ops ran)"),
                            ("rednet26", f"{ops.backend_info().name} (cpu)")):
        evaluate(model, imagenet_val=clean, on_the_fly=True, corruptions="gaussian_noise", severities="1",
                 limit=1, batch_size=1, out=tmp_path / model, progress=False)
        with sqlite3.connect(tmp_path / model / "results.sqlite") as db:
            assert db.execute("SELECT ops_backend FROM runs").fetchall() == [(expected,)]


# --- the results store as bad input -------------------------------------------------------------


def _main(args, capsys):
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    from robustbench_dyn.cli import main

    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


class _DiskFillsUp(sqlite3.Connection):
    """A connection whose disk fills up at the third batch of records, as SQLite reports it."""

    batches = 0

    def executemany(self, sql, rows):
        if "INTO records" in sql:
            _DiskFillsUp.batches += 1
            if _DiskFillsUp.batches == 3:
                raise sqlite3.OperationalError("database or disk is full")
        return super().executemany(sql, rows)


def test_a_full_disk_is_one_error_line_and_keeps_the_committed_records(data, tmp_path, capsys, monkeypatch):
    args = ["eval", "--model", MODEL, "--weights", data["weights"], "--imagenet-c", data["flat"], "-c", "fog",
            "-s", "1", "-b", "1", "-q", "--out", tmp_path / "runs"]
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: connect(*a, factory=_DiskFillsUp, **kw))
    code, out, err = _main(args, capsys)
    monkeypatch.undo()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), err
    assert "results.sqlite" in lines[0] and "disk is full" in lines[0] and "kept" in lines[0]
    assert len(_records(tmp_path / "runs")) == 2  # the two batches committed before the disk filled up
    code, out, err = _main(args, capsys)
    assert code == 0, err
    assert "2 evaluated now, 2 already in the store" in out


def _foreign_runs(path):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (name TEXT)")


def _other_tables(path):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE people (name TEXT)")


def _word_schema(path):
    with ResultsStore(path.parent):
        pass
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='one' WHERE key='schema'")


@pytest.mark.parametrize(
    "make, message",
    [
        (_foreign_runs, "not a dynrobust results store (it has no dynrobust meta table; tables: runs)"),
        (_other_tables, "not a dynrobust results store (it has no dynrobust meta table; tables: people)"),
        (_word_schema, "not a dynrobust results store (its schema 'one' is not a dynrobust schema version)"),
    ],
)
def test_an_sqlite_file_that_is_not_a_store_is_refused_untouched(data, tmp_path, capsys, make, message):
    out = tmp_path / "runs"
    out.mkdir()
    make(out / "results.sqlite")
    with sqlite3.connect(out / "results.sqlite") as db:
        before = db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    code, _, err = _main(["eval", "--model", MODEL, "--weights", data["weights"], "--imagenet-c", data["flat"],
                          "-c", "fog", "-s", "1", "-q", "--out", out], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {out / 'results.sqlite'} is {message}", err
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT type, name, sql FROM sqlite_master").fetchall() == before


def test_a_store_that_cannot_be_opened_is_not_called_foreign(data, tmp_path, capsys):
    (tmp_path / "runs" / "results.sqlite").mkdir(parents=True)  # SQLite cannot open it, whatever it holds
    code, _, err = _main(["eval", "--model", MODEL, "--weights", data["weights"], "--imagenet-c", data["flat"],
                          "-c", "fog", "-s", "1", "-q", "--out", tmp_path / "runs"], capsys)
    assert code == 1
    assert err.startswith(f"error: cannot open {tmp_path / 'runs' / 'results.sqlite'}: unable to open"), err
    assert "not a dynrobust results store" not in err
