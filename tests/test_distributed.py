"""`dynrobust eval` over several ranks (torchrun, gloo on the CPU): shares, merging, resuming."""

import sqlite3
import subprocess
import sys

import pytest
import torch

from robustbench_dyn.data.build_imagenet_c import build_imagenet_c
from robustbench_dyn.distributed import PARTS_FOLDER, Ranks, merge_parts, part_folder
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.evaluate import evaluate
from robustbench_dyn.models import create_model
from robustbench_dyn.sample import write_sample_dataset
from robustbench_dyn.store import ResultsStore, RunIdentity

MODEL = "resnet18"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 clean photos and a broken file (the clean set's last), the photos' ImageNet-C at
    gaussian_noise and fog, severities 1 and 3, and a weights file."""
    root = tmp_path_factory.mktemp("dist")
    clean = write_sample_dataset(root / "clean")
    tree = root / "imagenet-c"
    build_imagenet_c(clean, tree, "gaussian_noise,fog", "1,3", workers=0, progress=False)
    wnid = sorted(p.name for p in clean.iterdir())[-1]
    (clean / wnid / "zz-broken.jpg").write_text("not a JPEG\n")
    torch.manual_seed(1)
    weights = root / "resnet18-test.pth"
    torch.save(create_model(MODEL).state_dict(), weights)
    args = ["--model", MODEL, "--weights", str(weights), "--imagenet-c", str(tree), "--imagenet-val", str(clean),
            "-c", "gaussian_noise,fog", "-s", "1,3", "-b", "2", "-q"]
    return {"root": root, "clean": clean, "tree": tree, "weights": weights, "args": args}


def _records(out):
    with ResultsStore.open_existing(out) as store:
        records, bad, runs = store.records(), store.bad_images(), store.runs()
    records = records.drop(columns="run_id").sort_values(["corruption", "severity", "image_id"])
    bad = bad.drop(columns="run_id").sort_values(["corruption", "severity", "image_id"])
    return records.reset_index(drop=True), bad.reset_index(drop=True), runs


@pytest.fixture(scope="module")
def alone(data):
    """The reference: the whole evaluation in one process."""
    out = data["root"] / "alone"
    result = subprocess.run([sys.executable, "-m", "robustbench_dyn", "eval", *data["args"], "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records, bad, _ = _records(out)
    assert len(records) == 20 and len(bad) == 1  # 4 clean + 4 cells x 4 photos; the broken file
    return records, bad


def _torchrun(ranks, args, out):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "robustbench_dyn", "eval", *args, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


# --- ranks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, Ranks(0, 1, 0)),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, Ranks(0, 1, 0)),
        ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, Ranks(5, 8, 1, 4)),
        ({"WORLD_SIZE": "4", "RANK": "3"}, Ranks(3, 4, 0)),
    ],
)
def test_ranks_are_read_from_torchruns_environment(environ, expected):
    assert Ranks.from_environment(environ) == expected
    assert Ranks.from_environment(environ).distributed == (expected.world_size > 1)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' in the environment is not an integer"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0 in the environment: it must be at least 1"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK=None"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "WORLD_SIZE=2 but RANK='2'"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "WORLD_SIZE=2 but RANK='-1'"),
    ],
)
def test_a_broken_environment_is_one_clear_error(environ, message):
    with pytest.raises(DynrobustError) as raised:
        Ranks.from_environment(environ)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_every_work_unit_belongs_to_exactly_one_rank(world_size):
    shares = [[u for u in range(101) if Ranks(r, world_size, 0).owns(u)] for r in range(world_size)]
    assert sorted(u for share in shares for u in share) == list(range(101))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_each_rank_takes_its_local_gpu():
    assert Ranks(5, 8, 1).device("cuda") == "cuda:1"
    assert Ranks(5, 8, 1).device("cpu") == "cpu"
    assert Ranks(0, 1, 0).device("cuda:3") == "cuda:3"  # a process alone keeps what it was given
    with pytest.raises(DynrobustError, match="would put every rank on one GPU"):
        Ranks(1, 2, 1).device("cuda:0")


# --- torchrun ----------------------------------------------------------------------------------


def test_two_ranks_give_the_records_of_one_process(data, alone, tmp_path):
    out = tmp_path / "two"
    result = _torchrun(2, data["args"], out)
    assert result.returncode == 0, result.stderr
    records, bad, runs = _records(out)
    assert records.equals(alone[0])
    assert bad.equals(alone[1])
    assert not (out / PARTS_FOLDER).exists()  # merged and removed
    assert len(runs) == 1 and runs.finished_at.notna().all()
    assert '"ranks": 2' in runs.options[0]
    # only rank 0 prints the results, for the whole run
    assert result.stdout.count("images: 20 evaluated now, 0 already in the store; 1 bad") == 1, result.stdout


def _done(store_file):
    with sqlite3.connect(store_file) as db:
        return sum(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("records", "bad_images"))


def test_a_stopped_distributed_run_resumes_with_another_number_of_ranks(data, alone, tmp_path):
    out = tmp_path / "stopped"
    # batches of 2, clean first: the broken file is alone in work unit 2, rank 0's second. --strict
    # stops rank 0 there, and torchrun then stops rank 1; rank 0's units 4, 6, 8 and 10 are left
    stopped = _torchrun(2, data["args"] + ["--strict"], out)
    assert stopped.returncode != 0
    assert "zz-broken.jpg: not an image PIL can decode (--strict)" in stopped.stderr
    before = _done(out / "results.sqlite") + _done(part_folder(out, 1) / "results.sqlite")
    assert 3 <= before <= 21 - 8  # rank 0's unit 0 and the broken file; what rank 1 finished
    resumed = subprocess.run([sys.executable, "-m", "robustbench_dyn", "eval", *data["args"], "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"images: {21 - before} evaluated now, {before} already in the store; 1 bad" in resumed.stdout
    records, bad, _ = _records(out)
    assert records.equals(alone[0])
    assert bad.equals(alone[1])
    assert not (out / PARTS_FOLDER).exists()


# --- merging stores ----------------------------------------------------------------------------


def _claimed_store(folder, origin, images):
    identity = RunIdentity(MODEL, "sha", {"crop": 224})
    with ResultsStore(folder) as store:
        run_id = store.open_run(identity, None, {"device": "cpu"})
        store.claim_cells(run_id, [("fog", 1, "imagenet-c", origin)])
        store.commit_batch(run_id, "fog", 1, [(f"n01440764/{i}.JPEG", 0, [0, 1, 2, 3, 4]) for i in images], [])
    return folder


def test_merging_adds_the_parts_records_and_removes_the_parts(tmp_path):
    out = _claimed_store(tmp_path / "out", "/data/c", ["a", "b"])
    _claimed_store(part_folder(out, 1), "/data/c", ["c"])
    _claimed_store(part_folder(out, 12), "/data/c", ["b", "d"])
    with ResultsStore(out) as store:
        assert merge_parts(store, out) == 3
        records = store.records()
    assert sorted(records.image_id) == [f"n01440764/{i}.JPEG" for i in "abcd"]
    assert records.run_id.nunique() == 1
    assert not (out / PARTS_FOLDER).exists()


def test_a_part_from_other_data_is_not_merged(tmp_path):
    out = _claimed_store(tmp_path / "out", "/data/c", ["a"])
    _claimed_store(part_folder(out, 1), "/elsewhere/c", ["b"])
    with ResultsStore(out) as store, pytest.raises(DynrobustError) as raised:
        merge_parts(store, out)
    assert str(raised.value) == (f"{part_folder(out, 1) / 'results.sqlite'} holds fog/1 from /elsewhere/c, but "
                                 f"{out / 'results.sqlite'} holds it from /data/c: results of different data are "
                                 "not merged")
    assert (part_folder(out, 1) / "results.sqlite").exists()  # kept, not lost
    with ResultsStore(out) as store:
        assert len(store.records()) == 1


# --- ranks that do not share --out ---------------------------------------------------------------


class _LonelyGroup:
    """A process group whose other ranks did their share somewhere this rank cannot see."""

    def __init__(self, ranks):
        self.ranks = ranks

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def barrier(self):
        pass

    def gather(self, value):
        return [value] + [(0, 0)] * (self.ranks.world_size - 1)


def _cell_ids(data, corruption, severity):
    """The image ids of one cell of the tree, in the order the plan cuts them into batches."""
    folder = data["tree"] / corruption / str(severity)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))


def _lonely_rank(data, out, monkeypatch, rank, world_size) -> str:
    """The error of rank ``rank`` of ``world_size`` evaluating fog/1 alone (no other rank's files)."""
    monkeypatch.setattr("robustbench_dyn.evaluate.ProcessGroup", _LonelyGroup)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(rank))
    with pytest.raises(DynrobustError) as raised:
        evaluate(MODEL, weights=data["weights"], imagenet_c=data["tree"], corruptions="fog", severities="1",
                 batch_size=2, out=out, progress=False)
    return str(raised.value)


def test_rank_0_refuses_to_finish_without_the_other_ranks_parts(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    message = _lonely_rank(data, out, monkeypatch, rank=0, world_size=3)
    assert message.startswith(f"rank 0 cannot see the results of rank(s) 1, 2 in {out / PARTS_FOLDER}: "
                              "--out must be a folder that every rank sees")
    with ResultsStore.open_existing(out) as store:  # its own share is kept: fog/1's first batch of 2
        assert sorted(store.records().image_id) == _cell_ids(data, "fog", 1)[:2]


def test_a_rank_that_cannot_see_rank_0s_store_says_so(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _lonely_rank(data, out, monkeypatch, rank=1, world_size=2) == (
        f"rank 1: no results store at {out / 'results.sqlite'}; under torchrun, --out must be a folder that every "
        "rank sees (a shared file system), where rank 0 has just opened the store")
