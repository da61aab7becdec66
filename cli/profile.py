"""``dynrobust profile``: parameters, MACs, latency, throughput and peak memory of one model."""

from __future__ import annotations

import json

import click

from robustbench_dyn.cli.paths import PATH


def _mib(n_bytes) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.1f} MiB"


def render_table(result) -> str:
    """A :class:`robustbench_dyn.profile.ProfileResult` as labelled lines."""
    r = result
    precision = f"autocast {r.amp}" if r.amp else "float32"
    lines = [
        f"{'model':14s} {r.model}" + ("" if r.weights else "  (random weights)"),
        f"{'device':14s} {r.device} ({r.device_name})" + (f", {r.threads} threads" if r.threads else ""),
        f"{'input':14s} {r.batch_size} x 3 x {r.image_size} x {r.image_size}, {precision}"
        + (", channels_last" if r.channels_last else ""),
        f"{'params':14s} {r.params:,} ({r.params / 1e6:.2f} M)",
        f"{'MACs':14s} {r.macs / 1e9:.3f} G per image (at {r.image_size}x{r.image_size})",
        f"{'latency':14s} {r.latency_ms_median:.2f} ms per batch, median of {r.runs} runs after {r.warmup} warm-up "
        f"(min {r.latency_ms_min:.2f}, max {r.latency_ms_max:.2f})",
        f"{'throughput':14s} {r.images_per_s:.1f} images/s",
        f"{'peak memory':14s} {_mib(r.peak_memory_bytes)}: {r.memory_method}",
        f"{'ops backend':14s} {r.ops_backend}",
    ]
    return "\n".join(lines)


@click.command("profile")
@click.option("--model", "model_name", required=True, help="Registered model name (`dynrobust models` lists them).")
@click.option("--weights", type=PATH,
              help="Checkpoint to load first (strictly); the timing does not depend on it.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("-b", "--batch-size", type=int, default=1, show_default=True)
@click.option("--amp", is_flag=True, help="Autocast: float16 on CUDA, bfloat16 on CPU.")
@click.option("--channels-last", is_flag=True, help="channels_last memory format for model and input.")
@click.option("--image-size", type=int, default=224, show_default=True, help="Square input side in pixels.")
@click.option("--runs", type=int, default=10, show_default=True, help="Timed forward passes (the median is reported).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed forward passes first.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def profile_command(model_name, weights, device, batch_size, amp, channels_last, image_size, runs, warmup, fmt):
    """Measure a model: parameters, MACs (the dynamic ops counted by their own formulas), latency
    (median over --runs timed forward passes after --warmup, in inference mode), images/s and
    peak memory.

    Peak memory on CUDA is torch.cuda.max_memory_allocated during one forward pass, minus what was
    allocated before it (the weights and the input). On CPU it is the peak of live tensor storage
    allocated during one forward pass, tracked tensor by tensor; scratch memory that libraries keep
    outside tensors (oneDNN workspaces) is not seen, and neither is allocator caching.
    """
    from robustbench_dyn.profile import profile_model

    result = profile_model(model_name, weights=weights, device=device, batch_size=batch_size, amp=amp,
                           image_size=image_size, warmup=warmup, runs=runs, channels_last=channels_last)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(render_table(result))
