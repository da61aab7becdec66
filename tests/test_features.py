"""``dynrobust features`` (Fig. 4 left): heat maps against a forward pass written out by hand."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from robustbench_dyn.cli import main
from robustbench_dyn.corruptions import canonical_seed, corrupt
from robustbench_dyn.data.images import load_rgb, resize_center_crop
from robustbench_dyn.features import feature_maps
from robustbench_dyn.models import create_model
from robustbench_dyn.sample import sample_images, write_sample_dataset


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A bundled photo in its ImageNet class folder, so its id is eval's '<wnid>/<file>'."""
    root = write_sample_dataset(tmp_path_factory.mktemp("clean"))
    image = sample_images()[0]
    return root / image.wnid / (image.name + image.path.suffix)


@pytest.fixture(scope="module")
def result(photo):
    return feature_maps("resnet18", [photo], corruptions="gaussian_noise,impulse_noise", severity=2, progress=False)


def test_inputs_are_evals_on_the_fly_pixels(photo, result):
    item = result.images[0]
    crop = resize_center_crop(load_rgb(photo))
    np.testing.assert_array_equal(item.inputs["clean"], crop)
    image_id = f"{photo.parent.name}/{photo.name}"
    expected = corrupt(crop, "impulse_noise", 2, seed=canonical_seed(image_id, "impulse_noise", 2))
    np.testing.assert_array_equal(item.inputs["impulse_noise"], expected)


def test_maps_equal_a_hand_written_forward_pass(result):
    """Default layer: the last block of stage 3 (the paper's); map = mean |activation| over channels."""
    assert result.layer == "layer3.1"  # resnet18 has two blocks per stage
    torch.manual_seed(0)  # eval's random initialisation
    model = create_model("resnet18").eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    item = result.images[0]
    for version in ("clean", "gaussian_noise"):
        x = torch.from_numpy(item.inputs[version]).permute(2, 0, 1)[None].float() / 255.0
        x = (x - mean) / std
        with torch.no_grad():
            h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            h = model.layer3(model.layer2(model.layer1(h)))
        expected = h.abs().mean(dim=1)[0].numpy()
        assert item.maps[version].shape == (14, 14)
        np.testing.assert_allclose(item.maps[version], expected, rtol=1e-4, atol=1e-5)
    summary = result.summary.set_index("corruption")
    assert summary.loc["clean", "correlation_with_clean"] == 1.0
    flat_clean, flat_noisy = item.maps["clean"].ravel(), item.maps["gaussian_noise"].ravel()
    assert summary.loc["gaussian_noise", "correlation_with_clean"] == pytest.approx(
        np.corrcoef(flat_clean, flat_noisy)[0, 1], abs=1e-5)
    assert summary.loc["gaussian_noise", "mean_abs_activation"] == pytest.approx(float(flat_noisy.mean()), rel=1e-5)


def test_a_named_layer(photo):
    other = feature_maps("resnet18", [photo], layer="layer2.0", corruptions="shot_noise", progress=False)
    assert other.images[0].maps["clean"].shape == (28, 28)
    assert list(other.summary["corruption"]) == ["clean", "shot_noise"]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["features", *map(str, args)])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_cli_writes_the_figure_and_numbers(photo, tmp_path, capsys):
    code, out, err = run_cli(["--model", "resnet18", "--layer", "layer3.1", photo, "--corruption", "shot_noise",
                              "--out", tmp_path, "-q"], capsys)
    assert code == 0, err
    assert "RANDOM weights" in err
    with Image.open(tmp_path / "features.png") as png:
        png.load()
        assert png.size[0] > 400
        assert _colours(png) > 50
    assert ET.parse(tmp_path / "features.svg").getroot().tag.endswith("svg")
    summary = pd.read_csv(tmp_path / "features.csv")
    assert list(summary["corruption"]) == ["clean", "shot_noise"]
    maps = np.load(tmp_path / "features.npz")
    assert maps["image0_clean"].shape == (14, 14)
    assert float(maps["image0_shot_noise"].mean()) == pytest.approx(summary["mean_abs_activation"].iloc[1], rel=1e-5)
    assert "correlation is undefined" not in out


def test_cli_explains_an_undefined_correlation(photo, tmp_path, capsys):
    # avgpool's map is 1x1: its correlation with the clean map is 0/0, and the output says why
    code, out, err = run_cli(["--model", "resnet18", "--layer", "avgpool", photo, "--corruption", "shot_noise",
                              "--out", tmp_path, "-q"], capsys)
    assert code == 0, err
    assert pd.isna(pd.read_csv(tmp_path / "features.csv")["correlation_with_clean"].iloc[1])
    assert "nan: the map or its clean one is uniform (a 1x1 map, e.g. after pooling)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "resnet18", "--layer", "layer9", "{photo}"], "no layer 'layer9'"),
        (["--model", "resnet18", "--layer", "fc", "{photo}"], "not a feature map"),
        (["--model", "resnet18", "{tmp}/nothing.png"], "cannot read the file"),
        (["--model", "resnet18", "{tmp}/text.jpg"], "not an image"),
        (["--model", "nonet", "{photo}"], "nonet"),
        (["--model", "resnet18", "{photo}", "--corruption", "haze"], "unknown corruption"),
        (["--model", "resnet18", "{photo}", "--severity", "0"], "severity"),
        (["--model", "resnet18"], "give at least one IMAGE"),
        # worded for features, which has no --dataset option and no spectrum
        (["--model", "resnet18", "{tmp}"], "is a folder, not an image: give image files"),
        (["--model", "resnet18", "{tmp}/dot.png"], "the image is 1x1 px; a feature map needs at least 32 px"),
    ],
)
def test_bad_input_is_one_error_line(photo, tmp_path, capsys, args, message):
    (tmp_path / "text.jpg").write_text("hello")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    filled = [a.format(photo=photo, tmp=tmp_path) for a in args]
    code, out, err = run_cli(filled + ["--out", tmp_path / "out", "-q"], capsys)
    assert code == 1
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:"), err
    assert message in errors[0]
    assert "Traceback" not in err


def _colours(image) -> int:
    """How many distinct colours an image has (capped at 65536): a blank figure has one or two."""
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    return 1 << 16 if colours is None else len(colours)
