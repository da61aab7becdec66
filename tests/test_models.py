"""The model registry and the checkpoint loader.

Every registered model gets forward/backward/determinism tests and a parameter-count check against
the paper tables; the checkpoint formats of the official implementations each round-trip exactly.
"""

import hashlib
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.models import (
    ModelConfig,
    Preprocessing,
    create_model,
    list_models,
    load_state_dict,
    load_weights,
    model_config,
    register_model,
    weights_sha256,
)
from robustbench_dyn.models.registry import _REGISTRY, _paper_table

ALL_MODELS = list_models()
WITH_PAPER_PARAMS = [name for name in ALL_MODELS if model_config(name).params_m is not None]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build_on_meta(name, **kwargs):
    """The architecture without allocating or initialising weights (shapes only)."""
    with torch.device("meta"):
        return _REGISTRY[name].builder(**kwargs)


def _count_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- registry


def test_registry_holds_the_baselines():
    for name in ["resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d", "resnet26", "resnet38"]:
        assert name in ALL_MODELS
    assert ALL_MODELS == sorted(ALL_MODELS)
    assert list_models("resnext*") == ["resnext101_32x4d", "resnext50_32x4d"]
    assert list_models("resnet?0*") == ["resnet101", "resnet50"]
    assert list_models("no_such_family*") == []


@pytest.mark.parametrize("name", ALL_MODELS)
def test_config(name):
    config = model_config(name)
    assert isinstance(config, ModelConfig)
    assert config.name == name
    assert config.family
    assert config.num_classes == 1000
    assert config.preprocessing.interpolation in ("bilinear", "bicubic")
    assert config.preprocessing.crop <= config.preprocessing.resize
    # all the rows of one table name: the model's own, or the paper_name it was registered with
    # (aliases such as binet50 = binet50_dcca, ddf_mul_resnet50 = ddf_resnet50)
    table_names = {row.model for row in config.paper_rows}
    assert len(table_names) <= 1
    assert config.paper_rows == tuple(row for row in _paper_table() if row.model in (table_names or {name}))
    if config.paper_rows:
        first = config.paper_rows[0]
        assert (config.params_m, config.gmacs, config.top1, config.source) == (
            first.params_m, first.gmacs, first.top1, first.source)
    with pytest.raises(Exception):  # frozen
        config.num_classes = 10


def test_baseline_configs_are_torchvision_eval_and_paper_numbers():
    for name in ["resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d"]:
        assert model_config(name).preprocessing == Preprocessing(
            resize=256, crop=224, interpolation="bilinear",
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        assert model_config(name).family == "resnet"
    # Bi-volution (AAAI 2022) Table 1.
    assert (model_config("resnet101").params_m, model_config("resnet101").gmacs, model_config("resnet101").top1) == (
        44.6, 7.9, 78.5)
    assert model_config("resnext101_32x4d").params_m == 44.2
    assert model_config("resnet50").source == "bivolution-aaai2022 Table 1"
    # DCDC Table I names resnet26.
    assert model_config("resnet26").source.startswith("dcdc")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_determinism(name):
    torch.manual_seed(0)
    model = create_model(name)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.dynrobust_config == model_config(name)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()
    assert torch.equal(out, model(x))  # eval mode: no batch statistics, no dropout
    assert not torch.equal(out[0], out[1])  # the output depends on the input
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


# Paper rows that no construction of the model can meet; docs/models.md gives the arithmetic.
PAPER_PARAMS_UNREACHABLE = {
    "binet38_dc": "Bi-volution Table 1's 13.2M (BiNet-38 dc) and 17.6M (BiNet-50 dc) cannot both hold for one block design",
}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=PAPER_PARAMS_UNREACHABLE[name]))
    if name in PAPER_PARAMS_UNREACHABLE else name
    for name in WITH_PAPER_PARAMS])
def test_parameter_count_within_2_percent_of_paper(name):
    measured = _count_params(_build_on_meta(name)) / 1e6
    paper = model_config(name).params_m
    assert abs(measured - paper) / paper < 0.02, f"{name}: {measured:.2f}M vs paper {paper}M"


def test_parameter_counts_equal_torchvision_published():
    # torchvision model docs (weights tables): exact counts.
    published = {
        "resnet18": 11_689_512,
        "resnet50": 25_557_032,
        "resnet101": 44_549_160,
        "resnext50_32x4d": 25_028_904,
    }
    for name, count in published.items():
        assert _count_params(_build_on_meta(name)) == count, name


def test_resnext101_32x4d_layout():
    # ResNeXt paper: 32 groups of width 4 in stage 1 -> bottleneck width 128, doubling per stage.
    state = _build_on_meta("resnext101_32x4d").state_dict()
    assert state["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)
    assert state["layer4.0.conv2.weight"].shape == (1024, 32, 3, 3)
    assert sum(k.startswith("layer3.") and k.endswith(".conv1.weight") for k in state) == 23
    assert state["fc.weight"].shape == (1000, 2048)


def test_baselines_use_torchvision_names():
    import torchvision

    for name in ["resnet18", "resnet50", "resnet101", "resnext50_32x4d"]:
        ours = {k: tuple(v.shape) for k, v in _build_on_meta(name).state_dict().items()}
        with torch.device("meta"):
            theirs = getattr(torchvision.models, name)(weights=None)
        assert ours == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}, name


def _gmacs_at_224(model):
    """Multiply-accumulates of the convolutions and linear layers at 1x3x224x224, in 10^9 (independent count)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model(torch.empty(1, 3, 224, 224, device="meta"))
    for handle in handles:
        handle.remove()
    return total / 1e9


@pytest.mark.parametrize("name", [n for n in WITH_PAPER_PARAMS if model_config(n).family == "resnet"])
def test_static_baseline_gmacs_match_paper(name):
    # Only static convolutions: hooks on Conv2d/Linear count every MAC of these models.
    measured = _gmacs_at_224(_build_on_meta(name))
    paper = model_config(name).gmacs
    assert abs(measured - paper) / paper < 0.03, f"{name}: {measured:.3f} GMACs vs paper {paper}"


def test_unknown_model_names_close_matches():
    with pytest.raises(DynrobustError, match=r"unknown model 'resnet5'.*resnet50"):
        create_model("resnet5")
    with pytest.raises(DynrobustError, match="resnext50_32x4d"):
        model_config("resnext50_32x8d")
    with pytest.raises(DynrobustError, match="unknown model"):
        create_model("definitely_not_a_model_xyz")


def test_unknown_kwargs_are_a_clear_error():
    with pytest.raises(DynrobustError, match=r"does not take 'depth'.*num_classes"):
        create_model("resnet50", depth=18)


def test_num_classes():
    model = create_model("resnet26", num_classes=10)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert model.dynrobust_config.num_classes == 10
    assert model_config("resnet26").num_classes == 1000


def test_duplicate_registration_is_refused():
    def resnet50():
        raise AssertionError("never built")

    with pytest.raises(RuntimeError, match="registered twice"):
        register_model(resnet50)


# ---------------------------------------------------------------- checkpoints

ARCH = "resnet26"  # the smallest bottleneck ResNet: same classes and names as resnet50, quicker to save


@pytest.fixture(scope="module")
def source():
    """A model with random weights and non-default BatchNorm statistics, an input and its output."""
    torch.manual_seed(1)
    model = create_model(ARCH)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1234)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def _fresh(seed=2):
    torch.manual_seed(seed)
    return create_model(ARCH)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _sgd_state(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return optimizer.state_dict()


def _write(tmp_path, fmt, state):
    """Write ``state`` in one of the formats the official implementations release; return the path."""
    if fmt == "torchvision_bare":
        path = tmp_path / "resnet.pth"
        torch.save(state, path)
    elif fmt == "timm":
        path = tmp_path / "model_best.pth.tar"
        ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
        torch.save({"epoch": 299, "arch": ARCH, "state_dict": state, "state_dict_ema": ema}, path)
    elif fmt == "model_wrapper":
        path = tmp_path / "checkpoint.pth"
        torch.save({"model": state, "epoch": 3}, path)
    elif fmt == "dataparallel_odconv":
        path = tmp_path / "od_checkpoint.pth.tar"
        torch.save({"epoch": 100, "state_dict": {"module." + k: v for k, v in state.items()},
                    "acc": torch.tensor(76.5), "best_acc": 76.5, "optimizer": _sgd_state(_fresh(5))}, path)
    elif fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "safetensors_other_suffix":
        path = tmp_path / "model.bin"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "mmcls":
        path = tmp_path / "rednet_epoch_100.pth"
        wrapped = {("head." + k if k.startswith("fc.") else "backbone." + k): v for k, v in state.items()}
        meta = {"mmcls_version": "0.12.0", "epoch": 100, "iter": 500400, "CLASSES": ["tench", "goldfish"],
                "config": "model = dict(type='ImageClassifier')"}
        torch.save({"meta": meta, "state_dict": wrapped}, path)
    elif fmt == "torch_compile":
        path = tmp_path / "compiled.pt"
        torch.save({"_orig_mod." + k: v for k, v in state.items()}, path)
    else:
        raise ValueError(fmt)
    return path


FORMATS = ["torchvision_bare", "timm", "model_wrapper", "dataparallel_odconv", "safetensors",
           "safetensors_other_suffix", "mmcls", "torch_compile"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_round_trip(tmp_path, source, fmt):
    model, x, y = source
    path = _write(tmp_path, fmt, _state(model))
    with torch.no_grad():
        assert not torch.equal(_fresh()(x), y)  # a fresh model differs, so equality below means loaded
    state = load_state_dict(path)
    assert set(state) == set(model.state_dict())
    loaded = create_model(ARCH, weights=path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    other = _fresh(3)
    assert not load_weights(other, path)  # an empty mismatch
    with torch.no_grad():
        assert torch.equal(other.eval()(x), y)


def test_timm_ema_is_taken_only_when_asked(tmp_path, source):
    model, x, y = source
    path = _write(tmp_path, "timm", _state(model))
    state = load_state_dict(path)
    ema = load_state_dict(path, ema=True)
    name = "layer1.0.conv1.weight"
    assert torch.equal(state[name], model.state_dict()[name])
    assert torch.equal(ema[name], model.state_dict()[name] * 0.5)


def test_old_torchvision_checkpoint_without_num_batches_tracked(tmp_path, source):
    model, x, y = source
    state = {k: v for k, v in _state(model).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    with torch.no_grad():
        assert torch.equal(create_model(ARCH, weights=path)(x), y)


def test_mismatch_names_missing_unexpected_and_shape(tmp_path, source):
    model, x, y = source
    state = _state(model)
    del state["layer2.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(10, 2048)
    path = tmp_path / "bad.pth"
    torch.save(state, path)

    fresh = _fresh()
    before = _state(fresh)
    with pytest.raises(DynrobustError) as raised:
        load_weights(fresh, path)
    message = str(raised.value)
    assert "1 missing key" in message and "layer2.0.conv1.weight" in message
    assert "1 unexpected key" in message and "extra.weight" in message
    assert "1 shape mismatch" in message and "fc.weight [10, 2048] vs [1000, 2048]" in message
    assert "hint: the checkpoint's classifier has 10 classes, the model's 1000: dynrobust evaluates ImageNet's" in message
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # strict failure changes nothing

    with pytest.raises(DynrobustError, match="extra.weight"):
        create_model(ARCH, weights=path)

    with pytest.warns(UserWarning, match="loaded partially"):
        mismatch = load_weights(fresh, path, strict=False)
    assert mismatch.missing_keys == ("layer2.0.conv1.weight",)
    assert mismatch.unexpected_keys == ("extra.weight",)
    assert mismatch.shape_mismatches == (("fc.weight", (10, 2048), (1000, 2048)),)
    assert torch.equal(fresh.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert torch.equal(fresh.state_dict()["fc.weight"], before["fc.weight"])
    assert torch.equal(fresh.state_dict()["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])


def test_long_mismatch_lists_are_cut_with_counts(tmp_path):
    big = _build_on_meta("resnet50").state_dict()
    small = _fresh()
    extra = sorted(set(big) - set(small.state_dict()))
    assert len(extra) > 8
    path = tmp_path / "resnet50_shaped.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in big.items()}, path)
    with pytest.raises(DynrobustError) as raised:
        load_weights(small, path)
    message = str(raised.value)
    assert f"{len(extra)} unexpected keys" in message
    assert f"... and {len(extra) - 3} more" in message
    assert max(map(len, message.splitlines())) < 200


def test_no_class_count_hint_when_the_counts_agree(tmp_path):
    # resnet50's classifier (1000 x 2048) into resnet18 (1000 x 512): the widths differ, not the classes
    model = create_model("resnet18")
    state = {**model.state_dict(), "fc.weight": torch.zeros(1000, 2048)}
    torch.save(state, tmp_path / "wide_fc.pth")
    with pytest.raises(DynrobustError) as raised:
        load_weights(model, tmp_path / "wide_fc.pth")
    message = str(raised.value)
    assert "fc.weight [1000, 2048] vs [1000, 512]" in message
    assert "classes" not in message and "num_classes" not in message


def test_shape_mismatches_one_per_line_cut_after_three(tmp_path):
    # resnet18's weights into resnet50: 24 tensors of the same name differ in shape; each shown one
    # has a line of its own (two shapes make a long entry), the rest are counted
    torch.save(create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    want = create_model("resnet50").state_dict()
    with pytest.raises(DynrobustError) as raised:
        load_weights(create_model("resnet50"), tmp_path / "r18.pth")
    lines = str(raised.value).splitlines()
    have = torch.load(tmp_path / "r18.pth", weights_only=True)
    differ = [k for k in want if k in have and have[k].shape != want[k].shape]
    head = lines.index(f"  {len(differ)} shape mismatches (checkpoint vs model):")
    for line, key in zip(lines[head + 1:head + 4], differ):
        assert line == f"    {key} {list(have[key].shape)} vs {list(want[key].shape)}"
    assert lines[head + 4] == f"    ... and {len(differ) - 3} more"
    assert max(map(len, lines)) < 200


class ConfigObject:
    """Stands for any custom class an unsafe checkpoint might pickle."""

    def __init__(self):
        self.lr = 0.1


class SystemPayload:
    """Pickles as a call of os.system; building the pickle never runs it, loading would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.bias": torch.zeros(1000)}, "hook": SystemPayload(marker)}, path)
    with pytest.raises(DynrobustError, match=r"not a plain weights file.*system"):
        load_state_dict(path)
    with pytest.raises(DynrobustError, match="not a plain weights file"):
        create_model(ARCH, weights=path)
    raw = tmp_path / "evil.pkl"  # a plain pickle, not torch.save's format
    with open(raw, "wb") as f:
        pickle.dump(SystemPayload(marker), f, protocol=2)
    with pytest.raises(DynrobustError):
        load_state_dict(raw)
    assert not marker.exists()


def test_pickle_with_custom_class_is_refused(tmp_path):
    path = tmp_path / "with_config.pth"
    torch.save({"state_dict": {"fc.bias": torch.zeros(1000)}, "args": ConfigObject()}, path)
    with pytest.raises(DynrobustError, match=r"not a plain weights file.*ConfigObject"):
        load_state_dict(path)


def test_bad_files_give_clear_errors(tmp_path, source):
    model, _, _ = source
    cases = {}
    cases["does not exist"] = tmp_path / "missing.pth"
    (tmp_path / "folder.pth").mkdir()
    cases["is a directory"] = tmp_path / "folder.pth"
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["is empty"] = tmp_path / "empty.pth"
    (tmp_path / "garbage.pth").write_bytes(bytes(range(256)) * 40)
    cases["not a PyTorch or safetensors weights file"] = tmp_path / "garbage.pth"
    (tmp_path / "notes.pth").write_text("these are not weights\n" * 20)
    cases["not a PyTorch or safetensors weights file "] = tmp_path / "notes.pth"
    good = tmp_path / "good.pth"
    torch.save(_state(model), good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = tmp_path / "truncated.pth"
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cases["not a valid safetensors file"] = tmp_path / "bad.safetensors"
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    cases["holds a Tensor, not a state dict"] = tmp_path / "tensor.pth"
    torch.save({"epoch": 3, "best_acc": 70.1}, tmp_path / "no_weights.pth")
    cases["holds no state dict"] = tmp_path / "no_weights.pth"
    torch.save({"state_dict": {}}, tmp_path / "empty_state.pth")
    cases["holds no state dict "] = tmp_path / "empty_state.pth"
    for phrase, path in cases.items():
        with pytest.raises(DynrobustError) as raised:
            load_state_dict(path)
        assert phrase.strip() in str(raised.value), (path.name, str(raised.value))
        assert str(path) in str(raised.value)
        with pytest.raises(DynrobustError):
            create_model(ARCH, weights=path)


def test_weights_sha256(tmp_path, source):
    model, _, _ = source
    path = tmp_path / "w.pth"
    torch.save(_state(model), path)
    assert weights_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights_sha256(str(path)) == weights_sha256(path)
    with pytest.raises(DynrobustError, match="does not exist"):
        weights_sha256(tmp_path / "nope.pth")
