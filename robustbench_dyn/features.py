"""Feature heat maps of a layer, clean vs corrupted (Fig. 4, left, of the Bi-volution paper).

The paper shows, for images of the ImageNet validation set, the features of the last block of the
third stage of a ResNet-50 backbone, without and with noise. Here the heat map of an image at a
layer is the mean absolute activation over the layer's channels, one value per spatial position
(a 14x14 map for stage 3 at 224 px). Images go through the same path as on-the-fly eval: resize 256,
centre crop 224 (the ImageNet-C recipe), corruption with the canonical seed, the model's crop and
normalisation.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from robustbench_dyn.corruptions import check_severity, resolve_corruptions
from robustbench_dyn.errors import DynrobustError

DEFAULT_CORRUPTIONS = ("gaussian_noise",)
DEFAULT_SEVERITY = 3


def default_layer(model) -> str:
    """The paper's layer: the last block of stage 3 (``layer3.<last>`` in torchvision's names).

    Raises DynrobustError for a model without a ``layer3`` stage (name a layer with --layer)."""
    stage = getattr(model, "layer3", None)
    if stage is None:
        raise DynrobustError("this model has no 'layer3' stage; name a layer with --layer (see --list-layers)")
    try:
        return f"layer3.{len(stage) - 1}"
    except TypeError:
        return "layer3"


def find_layer(model, name: str):
    """The sub-module called ``name`` (as ``model.named_modules()`` names it); raises DynrobustError
    with close names when there is none."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=4, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    blocks = [n for n in modules if n.count(".") == 1 and n.startswith("layer")]
    examples = ", ".join(blocks[-3:] or list(modules)[:3])
    raise DynrobustError(f"the model has no layer {name!r}.{hint} Layers look like {examples}; --list-layers lists them")


@dataclass
class FeatureMaps:
    """Heat maps of one image: ``inputs`` maps each version (``"clean"`` or a corruption) to the
    uint8 (H, W, 3) image the model saw; ``maps`` to the mean absolute activation (float32, (h, w),
    in the layer's activation units)."""

    image_id: str
    path: Path
    inputs: dict
    maps: dict


@dataclass
class FeatureResult:
    """What :func:`feature_maps` computed: the layer, its feature maps per image, and a summary
    table (image, corruption, severity, height, width, mean_abs_activation, max_abs_activation,
    correlation_with_clean: Pearson correlation of the map with the clean one, a number in [-1, 1])."""

    model: str
    layer: str
    severity: int
    random_weights: bool
    images: list
    summary: pd.DataFrame


def feature_maps(
    model_name: str,
    images,
    *,
    weights=None,
    layer: str | None = None,
    corruptions=None,
    severity: int = DEFAULT_SEVERITY,
    jpeg: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> FeatureResult:
    """Heat maps of ``layer`` of ``model_name`` on each image, clean and under each corruption.

    ``images``: image files (a bad one raises a DynrobustError naming it); ``layer``: a module name
    (default: the last block of stage 3); ``corruptions``: names or groups (default gaussian_noise);
    ``severity``: 1-5. Without ``weights`` the model has random weights (seed 0, as eval).
    """
    import torch

    from robustbench_dyn.corruptions import canonical_seed, corrupt
    from robustbench_dyn.data import build_imagenet_c as recipe
    from robustbench_dyn.data.images import decode_jpeg, encode_jpeg, resize_center_crop
    from robustbench_dyn.evaluate import RANDOM_INIT_SEED
    from robustbench_dyn.models import create_model, model_config
    from robustbench_dyn.progress import progress_bar
    from robustbench_dyn.spectrum import load_image

    names = resolve_corruptions(DEFAULT_CORRUPTIONS if corruptions is None else corruptions)
    severity = check_severity(severity)
    images = [Path(p) for p in images]
    if not images:
        raise DynrobustError("give at least one IMAGE file")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DynrobustError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DynrobustError("--device cuda asked for, but torch sees no CUDA GPU on this machine")
    # bad files fail before the model is built
    loaded = [load_image(p, "imagenet-c", needed_by="a feature map", folder_hint=": give image files, e.g. DIR/*.JPEG")
              for p in images]
    config = model_config(model_name).preprocessing
    torch.manual_seed(RANDOM_INIT_SEED)
    model = create_model(model_name, weights=weights).eval().to(device)
    layer = layer or default_layer(model)
    module = find_layer(model, layer)

    captured = {}

    def keep(_module, _inputs, output):
        captured["output"] = output

    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1) * 255
    handle = module.register_forward_hook(keep)
    results, rows = [], []
    bar = progress_bar(total=len(loaded), desc=f"{model_name} {layer}", unit="img", enabled=progress)
    try:
        for image in loaded:
            inputs = {"clean": image.pixels}
            for name in names:
                pixels = corrupt(image.pixels, name, severity, seed=canonical_seed(image.image_id, name, severity))
                if jpeg:
                    pixels = decode_jpeg(encode_jpeg(pixels, recipe.JPEG_QUALITY))
                inputs[name] = pixels
            batch = []
            for pixels in inputs.values():
                if pixels.shape[:2] != (config.crop, config.crop):
                    pixels = resize_center_crop(pixels, config.resize, config.crop, config.interpolation)
                batch.append(pixels)
            x = torch.from_numpy(np.stack(batch)).to(device).permute(0, 3, 1, 2).float()
            with torch.inference_mode():
                model((x - mean) / std)
            output = captured.pop("output", None)
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                try:
                    example = f" such as {default_layer(model)}"
                except DynrobustError:
                    example = ""
                raise DynrobustError(
                    f"layer {layer!r} gives {shape}, not a feature map (N, C, H, W); pick a convolutional "
                    f"block{example} (--list-layers lists them)"
                )
            heat = output.float().abs().mean(dim=1).cpu().numpy().astype(np.float32)
            maps = dict(zip(inputs, heat))
            results.append(FeatureMaps(image.image_id, image.path, inputs, maps))
            clean = maps["clean"].ravel().astype(np.float64)
            for version, values in maps.items():
                flat = values.ravel().astype(np.float64)
                correlation = 1.0 if version == "clean" else _pearson(clean, flat)
                rows.append({
                    "image": str(image.path),
                    "corruption": version,
                    "severity": 0 if version == "clean" else severity,
                    "layer": layer,
                    "height": values.shape[0],
                    "width": values.shape[1],
                    "mean_abs_activation": float(flat.mean()),
                    "max_abs_activation": float(flat.max()),
                    "correlation_with_clean": correlation,
                })
            bar.update(1)
    finally:
        handle.remove()
        bar.close()
    return FeatureResult(model_name, layer, severity, weights is None, results, pd.DataFrame(rows))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flattened maps; NaN when either is constant."""
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def plot_feature_maps(result: FeatureResult, path_stem) -> list:
    """Rows: images; columns: the clean input and its heat map, then each corrupted input and its
    heat map, the maps of a row on one colour scale (0 to the row's largest value). Writes PNG and
    SVG; returns their paths."""
    import matplotlib

    from robustbench_dyn.report.figures import FIGURE_STYLE, new_figure, save_figure

    versions = list(result.images[0].maps)
    columns = 2 * len(versions)
    rows = len(result.images)
    with matplotlib.rc_context(FIGURE_STYLE):
        figure = new_figure(1.9 * columns + 0.8, 2.0 * rows + 0.6)
        axes = figure.subplots(rows, columns, squeeze=False)
        for r, item in enumerate(result.images):
            top = max(float(m.max()) for m in item.maps.values()) or 1.0
            shown = None
            for k, version in enumerate(versions):
                image_axis, map_axis = axes[r, 2 * k], axes[r, 2 * k + 1]
                image_axis.imshow(item.inputs[version])
                shown = map_axis.imshow(item.maps[version], cmap="inferno", vmin=0.0, vmax=top, interpolation="nearest")
                label = "clean" if version == "clean" else f"{version} s{result.severity}"
                image_axis.set_title(f"{label}" + ("" if r else " (input)"))
                map_axis.set_title(f"{label}" + ("" if r else " (features)"))
                for axis in (image_axis, map_axis):
                    axis.set_xticks([])
                    axis.set_yticks([])
                    axis.spines[:].set_visible(False)
            axes[r, 0].set_ylabel(Path(item.path).name, fontsize=8)
            figure.colorbar(shown, ax=list(axes[r, :]), shrink=0.85, label="mean |activation|")
        weights = "RANDOM weights" if result.random_weights else "weights from a checkpoint"
        figure.suptitle(f"{result.model}, {result.layer}: mean absolute activation over channels ({weights})")
        return save_figure(figure, path_stem)
