"""``dynrobust features``: heat maps of a layer's activations, clean vs corrupted (Fig. 4 left of the Bi-volution paper)."""

from __future__ import annotations

from pathlib import Path

import click

from robustbench_dyn.cli.paths import PATH

PLOT_STEM = "features"
SUMMARY_CSV = "features.csv"
MAPS_NPZ = "features.npz"


@click.command("features")
@click.argument("images", nargs=-1, type=PATH)
@click.option("--model", "model_name", required=True, help="Registered model name, e.g. resnet50.")
@click.option("--weights", type=PATH, help="Checkpoint. Without it the weights are random.")
@click.option("--layer", help="Module name, e.g. layer3.5 [default: the last block of stage 3, as the paper].")
@click.option("-c", "--corruption", "corruptions", default="gaussian_noise", show_default=True,
              help="Corruption(s), comma-separated names or groups.")
@click.option("-s", "--severity", type=int, default=3, show_default=True, help="Severity, 1 to 5.")
@click.option("--jpeg", is_flag=True, help="JPEG quality-85 round trip after corrupting, as ImageNet-C files had.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--out", type=PATH, default=Path("features-out"), show_default=True,
              help="Folder for features.png/.svg, features.csv and features.npz.")
@click.option("--list-layers", is_flag=True, help="List the model's layers (module names) and exit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def features_command(images, model_name, weights, layer, corruptions, severity, jpeg, device, out, list_layers, quiet):
    """Heat maps of a layer's mean absolute activation on IMAGE files, clean vs corrupted.

    Each image is resized and cropped the ImageNet-C way (256, 224), corrupted with the canonical
    seed (as eval --on-the-fly), normalised for the model, and the chosen layer's output is averaged
    in absolute value over its channels: one map per image and version, shown side by side on one
    colour scale. Writes OUT/features.png and .svg, OUT/features.csv (mean and max activation and
    the correlation of each corrupted map with the clean one) and OUT/features.npz (the maps).
    """
    import numpy as np

    from robustbench_dyn.errors import DynrobustError
    from robustbench_dyn.features import feature_maps, plot_feature_maps

    if list_layers:
        from robustbench_dyn.models import create_model

        model = create_model(model_name)
        for name, module in model.named_modules():
            if name:
                click.echo(f"{name}  ({type(module).__name__})")
        return
    if not images:
        raise DynrobustError("give at least one IMAGE file")
    if out.exists() and not out.is_dir():
        raise DynrobustError(f"--out {out} exists and is not a folder")
    result = feature_maps(model_name, images, weights=weights, layer=layer, corruptions=corruptions,
                          severity=severity, jpeg=jpeg, device=device, progress=not quiet)
    if weights is None:  # said once the inputs are known to be good, so that a mistake stays one line
        click.secho(f"WARNING: no --weights: {model_name} has RANDOM weights; its features show the architecture's "
                    "response to the input, not what a trained model sees.", fg="red", bold=True, err=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        plots = plot_feature_maps(result, out / PLOT_STEM)
        result.summary.to_csv(out / SUMMARY_CSV, index=False, float_format="%.6g")
        arrays = {f"image{i}_{version}": values for i, item in enumerate(result.images) for version, values in item.maps.items()}
        np.savez_compressed(out / MAPS_NPZ, **arrays)
    except OSError as exc:
        raise DynrobustError(f"cannot write into {out}: {exc.strerror or exc}") from None

    click.echo(f"{model_name}, layer {result.layer}: mean |activation| over channels")
    for row in result.summary.itertuples():
        version = "clean" if row.corruption == "clean" else f"{row.corruption} s{row.severity}"
        click.echo(f"  {Path(row.image).name:<28} {version:<24} {row.height}x{row.width}  mean {row.mean_abs_activation:.4g}"
                   f"  max {row.max_abs_activation:.4g}  correlation with clean {row.correlation_with_clean:.3f}")
    if result.summary["correlation_with_clean"].isna().any():
        click.echo("  nan: the map or its clean one is uniform (a 1x1 map, e.g. after pooling), so the correlation "
                   "is undefined")
    click.echo(f"wrote {', '.join(str(p) for p in plots)}, {out / SUMMARY_CSV}, {out / MAPS_NPZ}")
