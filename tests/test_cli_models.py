"""``dynrobust models`` and ``dynrobust profile``: outputs checked against the registry and an
independent measurement, the cost cache, and user errors (exit 1, one line, no traceback)."""

import json

import pytest
import torch

import robustbench_dyn.profile as profile_module
from robustbench_dyn.cli import main
from robustbench_dyn.models import list_models, model_config
from robustbench_dyn.ops import backend_info
from robustbench_dyn.profile import _LiveTensorBytes, build_on_meta, count_parameters, model_macs


@pytest.fixture(autouse=True)
def cost_cache(tmp_path, monkeypatch):
    """A private cost cache per test (the user's is never touched)."""
    path = tmp_path / "cache" / "model_costs.json"
    monkeypatch.setattr(profile_module, "cost_cache_file", lambda: path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)


def _run(args, capsys):
    """Run the console-script entry point in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def _one_error_line(code, out, err, *phrases):
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


# ------------------------------------------------------------------------------------ models


def test_models_json_matches_registry_and_independent_measurement(capsys, cost_cache):
    code, out, err = _run(["models", "od_resnet18*", "--format", "json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["od_resnet18_1x", "od_resnet18_2x", "od_resnet18_4x"]
    assert "measuring parameters and MACs of 3 models" in err
    for row in rows:
        config = model_config(row["name"])
        model = build_on_meta(row["name"])
        assert row["params"] == count_parameters(model)
        assert row["macs"] == model_macs(model)
        assert row["params_m"] == pytest.approx(row["params"] / 1e6)
        assert row["gmacs"] == pytest.approx(row["macs"] / 1e9)
        assert row["family"] == config.family == "odconv"
        assert (row["paper_params_m"], row["paper_gmacs"], row["paper_top1"], row["paper_source"]) == (
            config.params_m, config.gmacs, config.top1, config.source)
        assert row["ops_backend"] == "-"  # ODConv is built from torch's own convolutions
    assert rows[0]["paper_params_m"] == 11.94 and rows[1]["paper_params_m"] is None
    assert cost_cache.is_file()


def test_models_reads_its_cache_and_remeasures_stale_entries(capsys, cost_cache):
    code, out, _ = _run(["models", "resnet1?", "--format", "json"], capsys)
    measured = json.loads(out)[0]["params"]
    assert measured == 11_689_512
    cache = json.loads(cost_cache.read_text())
    cache["resnet18@224"]["params"] = 1  # a planted value: shows whether the cache is read
    cost_cache.write_text(json.dumps(cache))
    code, out, err = _run(["models", "resnet1?", "--format", "json"], capsys)
    assert json.loads(out)[0]["params"] == 1 and "measuring" not in err
    cache["resnet18@224"]["code"] = "code of another version"
    cost_cache.write_text(json.dumps(cache))
    code, out, err = _run(["models", "resnet1?", "--format", "json"], capsys)
    assert json.loads(out)[0]["params"] == measured and "measuring parameters and MACs of 1 model " in err
    cost_cache.write_text("{not json")
    code, out, _ = _run(["models", "resnet1?", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)[0]["params"] == measured


def test_models_table_and_substring_pattern(capsys):
    code, out, _ = _run(["models", "cdc_resnet2"], capsys)  # no wildcard: a substring
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["model", "family", "params", "M", "paper", "GMACs", "paper", "top-1", "%", "ops"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == [n for n in list_models() if "cdc_resnet2" in n] == ["dcdc_resnet26"]
    row = dict(zip(names, (line.split() for line in lines[1:])))["dcdc_resnet26"]
    # measured 9.35 M / 1.718 G next to DCDC Table I's 9.36 M / 1.71 G / 77.4 %
    assert row[1:] == ["dcdc", "9.35", "9.36", "1.718", "1.710", "77.40", backend_info().name]


def test_models_pattern_matching_nothing_is_an_error(capsys):
    code, out, err = _run(["models", "nothing_like_this*"], capsys)
    _one_error_line(code, out, err, "no model matches 'nothing_like_this*'", "models are registered")
    assert out == ""


# ------------------------------------------------------------------------------------ profile


def test_profile_json(capsys):
    args = ["profile", "--model", "od_resnet18_1x", "--image-size", "64", "--batch-size", "2", "--runs", "3",
            "--warmup", "1", "--channels-last", "--format", "json"]
    code, out, err = _run(args, capsys)
    assert code == 0, err
    result = json.loads(out)
    model = build_on_meta("od_resnet18_1x")
    assert result["model"] == "od_resnet18_1x" and result["weights"] is None
    assert result["params"] == count_parameters(model)
    assert result["macs"] == model_macs(model, image_size=64)
    assert (result["device"], result["batch_size"], result["image_size"], result["runs"], result["warmup"]) == (
        "cpu", 2, 64, 3, 1)
    assert result["amp"] is None and result["ops_backend"] == "-" and result["channels_last"] is True
    assert 0 < result["latency_ms_min"] <= result["latency_ms_median"] <= result["latency_ms_max"]
    assert result["images_per_s"] == pytest.approx(2000.0 / result["latency_ms_median"])
    # the stem's output alone is 2 x 64 x 32 x 32 float32 values, and it is alive with the next layer's
    assert result["peak_memory_bytes"] >= 2 * 64 * 32 * 32 * 4
    assert "tensor" in result["memory_method"]


def test_profile_table_with_amp_on_cpu_and_dynamic_ops(capsys):
    code, out, err = _run(["profile", "--model", "dcdc_resnet26", "--image-size", "64", "--runs", "1", "--warmup", "0",
                           "--amp"], capsys)
    assert code == 0, err
    text = {line[:14].strip(): line[14:].strip() for line in out.strip().splitlines()}
    assert "autocast bfloat16" in text["input"] and "1 x 3 x 64 x 64" in text["input"]
    assert text["ops backend"] == backend_info().name
    assert text["peak memory"].endswith("MiB: peak live tensor storage allocated during one forward pass, tracked "
                                        "per tensor (weights and input excluded; library scratch outside tensors "
                                        "not seen)")
    assert "median of 1 runs after 0 warm-up" in text["latency"]
    assert "random weights" in text["model"]


@pytest.mark.parametrize("args,phrases", [
    (["--model", "no_such_net"], ["unknown model 'no_such_net'"]),
    (["--model", "resnet18", "--batch-size", "0"], ["--batch-size must be at least 1"]),
    (["--model", "resnet18", "--image-size", "16"], ["--image-size must be at least 32"]),
    (["--model", "resnet18", "--runs", "0"], ["--runs must be at least 1"]),
    (["--model", "resnet18", "--device", "tpu"], ["--device must be cpu, cuda or cuda:N"]),
    (["--model", "resnet18", "--weights", "/nonexistent/w.pth"], ["does not exist"]),
])
def test_profile_user_errors(capsys, args, phrases):
    _one_error_line(*_run(["profile", *args], capsys), *phrases)


def test_profile_input_too_large_for_memory(capsys):
    # 1000 x 3 x 100000 x 100000 float32 is 109 TiB: the allocator refuses it at once
    _one_error_line(*_run(["profile", "--model", "resnet18", "-b", "1000", "--image-size", "100000"], capsys),
                    "the input batch (1000 x 3 x 100000 x 100000 float32, 111,758.7 GiB) does not fit in memory",
                    "--batch-size", "--image-size")


def test_profile_forward_out_of_memory(capsys, monkeypatch):
    conv = torch.nn.Conv2d._conv_forward

    def refuse(self, x, weight, bias):  # as torch's CPU allocator fails on a too large activation
        if x.device.type == "cpu":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 25600000000 bytes. Error code 12 (Cannot allocate memory)")
        return conv(self, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", refuse)
    _one_error_line(*_run(["profile", "--model", "resnet18", "--image-size", "64", "--runs", "1"], capsys),
                    "resnet18 on a 1 x 3 x 64 x 64 input does not fit in memory (RAM) (DefaultCPUAllocator: can't "
                    "allocate memory: you tried to allocate 25600000000 bytes", "--batch-size")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_profile_cuda_without_gpu(capsys):
    _one_error_line(*_run(["profile", "--model", "resnet18", "--device", "cuda"], capsys), "no CUDA GPU")


def test_live_tensor_tracker_counts_peak_storage():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
                              torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    existing = {t.untyped_storage().data_ptr() for t in (*net.parameters(), x)}
    tracker = _LiveTensorBytes(existing)
    with torch.inference_mode(), tracker:
        y = net(x)
    first, second = 2 * 8 * 16 * 16 * 4, 2 * 4 * 16 * 16 * 4
    # the first conv's output (ReLU works in place) is alive while the second writes its own
    assert first + second <= tracker.peak < first + second + 4096
    assert tracker.current == second  # only y is still alive
    del y
    assert tracker.current == 0
