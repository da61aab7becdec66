"""The evaluation runner: images -> (corruption) -> preprocessing -> model -> per-image records.

Work is split into chunks of ``batch_size`` images of one (corruption, severity) cell, always cut at
the same places (the cell's images sorted by id), so a rerun after a crash or ``kill -9`` evaluates
exactly the batches that were lost and the results equal those of an uninterrupted run. Each chunk
is committed to the SQLite store in one transaction. Under torchrun the chunks are shared out among
the ranks (:mod:`robustbench_dyn.distributed`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustbench_dyn import ops
from robustbench_dyn.corruptions import CORRUPTION_NAMES, canonical_seed, corrupt, parse_severities, resolve_corruptions
from robustbench_dyn.data import build_imagenet_c as imagenet_c_recipe
from robustbench_dyn.data.images import decode_jpeg, encode_jpeg, load_rgb, resize_center_crop
from robustbench_dyn.data.imagenet import labelled_images, locate_imagenet_c
from robustbench_dyn.distributed import PARTS_FOLDER, ProcessGroup, Ranks, merge_parts, part_folder
from robustbench_dyn.errors import BadImageError, DynrobustError
from robustbench_dyn.profile import to_channels_last
from robustbench_dyn.progress import progress_bar
from robustbench_dyn.store import CLEAN, STORE_NAME, ResultsStore, RunIdentity

RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class Cell:
    """One (corruption, severity) of an evaluation, its images and where its pixels come from.

    ``source`` is ``"imagenet-c"`` (files of an ImageNet-C tree, used as stored), ``"clean"``
    (clean images, preprocessed with the model's resize and crop) or ``"on-the-fly"`` (clean
    images made into ImageNet-C by the engine).
    """

    corruption: str
    severity: int
    images: tuple
    source: str
    origin: str


@dataclass
class EvalSummary:
    """What :func:`evaluate` did and found. Errors are fractions."""

    run_id: int
    store: Path
    model: str
    weights: str | None
    cells: list
    errors: object = None  # DataFrame: corruption, severity, images, top1_err, top5_err
    images_evaluated: int = 0
    images_already_done: int = 0
    bad_images: object = None  # DataFrame of this run's bad images
    elapsed_s: float = 0.0
    device: str = "cpu"
    notes: list = field(default_factory=list)
    rank: int = 0  # of a distributed run (torchrun): only rank 0's summary has the errors and counts


class _ImageStream(torch.utils.data.Dataset):
    """Decodes, corrupts (on the fly) and crops one image per item; returns uint8 HWC or a reason."""

    def __init__(self, items, config, jpeg_round_trip: bool):
        self.items = items  # list of (Cell, LabelledImage)
        self.config = config
        self.jpeg_round_trip = jpeg_round_trip

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        cell, image = self.items[index]
        try:
            pixels = load_rgb(image.path)
        except BadImageError as exc:
            return index, None, exc.reason
        crop = self.config.crop
        if cell.source == "clean":
            pixels = resize_center_crop(pixels, self.config.resize, crop, self.config.interpolation)
        elif cell.source == "on-the-fly":
            pixels = resize_center_crop(pixels, imagenet_c_recipe.RESIZE, imagenet_c_recipe.CROP)
            seed = canonical_seed(image.image_id, cell.corruption, cell.severity)
            pixels = corrupt(pixels, cell.corruption, cell.severity, seed=seed)
            if self.jpeg_round_trip:  # as the files of ImageNet-C (and of `dynrobust corrupt`) were saved
                pixels = decode_jpeg(encode_jpeg(pixels, imagenet_c_recipe.JPEG_QUALITY))
        if pixels.shape[:2] != (crop, crop):
            # ImageNet-C files are 224x224 and are used as stored; other sizes are cropped like clean images
            pixels = resize_center_crop(pixels, self.config.resize, crop, self.config.interpolation)
        return index, np.ascontiguousarray(pixels), None


def _collate(batch):
    good = [(i, pixels) for i, pixels, _ in batch if pixels is not None]
    bad = [(i, reason) for i, pixels, reason in batch if pixels is None]
    stacked = torch.from_numpy(np.stack([p for _, p in good])) if good else None
    return [i for i, _ in good], stacked, bad


def _only_cells(frame, wanted):
    """The rows of ``wanted`` cells, clean first, then corruptions in ImageNet-C order, by severity."""
    mask = np.array([(c, s) in wanted for c, s in zip(frame.corruption, frame.severity)], dtype=bool)
    order = {name: i for i, name in enumerate((CLEAN,) + CORRUPTION_NAMES)}
    frame = frame.loc[mask]
    rank = np.array([order[c] for c in frame.corruption], dtype=int)
    return frame.iloc[np.lexsort((frame.severity.to_numpy(), rank))].reset_index(drop=True)


def _worker_init(_):
    torch.set_num_threads(1)  # the main process owns the cores for the model


def _check_options(batch_size, limit, workers, device):
    if batch_size < 1:
        raise DynrobustError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise DynrobustError(f"--limit must be at least 1, got {limit}")
    if workers is not None and workers < 0:
        raise DynrobustError(f"--workers must be 0 or more, got {workers}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DynrobustError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DynrobustError("--device cuda asked for, but torch sees no CUDA GPU on this machine")


def plan_cells(imagenet_c, imagenet_val, on_the_fly, corruptions, severities, limit) -> list:
    """The cells to evaluate: clean first (when a clean set is given), then corruptions x severities."""
    if imagenet_c is None and imagenet_val is None:
        raise DynrobustError("give --imagenet-c DIR, --imagenet-val DIR, or both")
    if on_the_fly and imagenet_val is None:
        raise DynrobustError("--on-the-fly corrupts the clean set: give it with --imagenet-val DIR")
    if on_the_fly and imagenet_c is not None:
        raise DynrobustError("--on-the-fly replaces --imagenet-c: give one of them")
    corruptions = resolve_corruptions(corruptions)
    severities = parse_severities(severities)
    cells = []
    clean = None
    if imagenet_val is not None:
        clean = tuple(labelled_images(imagenet_val, limit))
        cells.append(Cell(CLEAN, 0, clean, "clean", str(Path(imagenet_val).resolve())))
    if on_the_fly:
        origin = f"on-the-fly from {Path(imagenet_val).resolve()}"
        cells += [Cell(c, s, clean, "on-the-fly", origin) for c in corruptions for s in severities]
    elif imagenet_c is not None:
        located = locate_imagenet_c(imagenet_c, corruptions, severities)
        root = str(Path(imagenet_c).resolve())
        for (c, s), folder in located.items():
            cells.append(Cell(c, s, tuple(labelled_images(folder, limit)), "imagenet-c", root))
    return cells


def _share(cells, batch_size: int, done: set, ranks: Ranks):
    """This rank's work: (items, units, already). The plan cuts every cell's images into batches
    (work units) at fixed places; the rank owns units by their index in the whole plan, done or not,
    so that its share does not depend on what an earlier run finished. ``items``: the (cell, image)
    pairs still to evaluate; ``units``: (cell, [item indices]), one batch each; ``already``: images
    of the share that ``done`` holds."""
    items, units = [], []
    already = 0
    index = 0
    for cell in cells:
        for start in range(0, len(cell.images), batch_size):
            index += 1
            if not ranks.owns(index - 1):
                continue
            todo = [im for im in cell.images[start : start + batch_size]
                    if (cell.corruption, cell.severity, im.image_id) not in done]
            already += min(batch_size, len(cell.images) - start) - len(todo)
            if todo:
                units.append((cell, list(range(len(items), len(items) + len(todo)))))
                items += [(cell, im) for im in todo]
    return items, units, already


def _done_in_main_store(out, identity: RunIdentity, ranks: Ranks) -> set:
    """What rank 0's store (``out``) holds of the run, as a rank > 0 sees it."""
    try:
        with ResultsStore.open_existing(out) as main:
            return main.done_images(main.find_run(identity))
    except DynrobustError as exc:
        raise DynrobustError(f"rank {ranks.rank}: {exc}; under torchrun, --out must be a folder that every rank sees "
                             "(a shared file system), where rank 0 has just opened the store") from None


def _ops_backend(used: dict) -> str:
    """What the runs table records as the ops backend: which implementation of DDF/involution ran
    (``used``: from :func:`robustbench_dyn.ops.record_backends`)."""
    if not used:
        return "none (no dynamic ops ran)"
    return ", ".join(f"{name} ({device})" for device, name in sorted(used.items()))


def evaluate(
    model_name: str,
    *,
    weights=None,
    imagenet_c=None,
    imagenet_val=None,
    on_the_fly: bool = False,
    jpeg_round_trip: bool = True,
    corruptions=None,
    severities=None,
    limit: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    out="runs",
    strict: bool = False,
    progress: bool = True,
) -> EvalSummary:
    """Evaluate ``model_name`` on ImageNet-C cells and/or clean images; return an :class:`EvalSummary`.

    Results go to ``<out>/results.sqlite``; calling again with the same arguments resumes (only
    missing chunks are evaluated). Without ``weights`` the model is randomly initialised (seed 0),
    and the summary says so. ``workers=None`` means 0 on CPU (decoding in the main process costs a
    few % of a CPU forward) and min(8, CPUs) on CUDA (CPUs per rank under torchrun). Raises
    DynrobustError for bad options, paths, layouts and checkpoints; a bad image is recorded and
    skipped, or with ``strict`` ends the run after the chunks already evaluated are committed.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) this is one rank of a distributed run:
    see :mod:`robustbench_dyn.distributed`. Rank 0's summary covers the whole run; another rank's
    has its own counts and no errors.
    """
    from robustbench_dyn.models import create_model, model_config
    from robustbench_dyn.models.checkpoint import weights_sha256

    started = time.perf_counter()
    ranks = Ranks.from_environment()
    device = ranks.device(device)
    _check_options(batch_size, limit, workers, device)
    if not jpeg_round_trip and not on_the_fly:
        raise DynrobustError("--no-jpeg applies to --on-the-fly only: the files of an ImageNet-C tree, and the clean "
                             "images, are evaluated as they are stored")
    config = model_config(model_name).preprocessing
    if workers is None:
        workers = 0 if device == "cpu" else min(8, max(1, (os.cpu_count() or 1) // ranks.local_world_size))
    # the checkpoint first: a bad one should fail before a long scan of the dataset
    torch.manual_seed(RANDOM_INIT_SEED)
    model = create_model(model_name, weights=weights)
    model.eval().to(device)
    if channels_last:
        model = to_channels_last(model)  # model.to(memory_format=...) refuses ODConv's 5-D kernels
    cells = plan_cells(imagenet_c, imagenet_val, on_the_fly, corruptions, severities, limit)

    notes = []
    if weights is None:
        sha = f"random-init-seed{RANDOM_INIT_SEED}"
        notes.append(
            f"NO WEIGHTS GIVEN: {model_name} is randomly initialised (seed {RANDOM_INIT_SEED}); its "
            "errors say nothing about the architecture. Pass --weights FILE for real numbers."
        )
    else:
        sha = weights_sha256(weights)
    preprocessing = {
        "clean": {"resize": config.resize, "crop": config.crop, "interpolation": config.interpolation},
        "corrupted": "ImageNet-C 224x224 as stored" if not on_the_fly else {
            "recipe": "resize 256, crop 224, dynrobust corruption engine v1, canonical seeds",
            "jpeg_quality": imagenet_c_recipe.JPEG_QUALITY if jpeg_round_trip else None,
        },
        "mean": list(config.mean),
        "std": list(config.std),
    }
    # the data is not part of the run's identity (adding the clean set later extends the same
    # run); each cell's origin is recorded and checked by the store instead
    identity = RunIdentity(model=model_name, weights_sha256=sha, preprocessing=preprocessing)

    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1) * 255

    run_context = {
        "ops_backend": _ops_backend({}),
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "options": {"batch_size": batch_size, "amp": amp, "channels_last": channels_last, "limit": limit},
    }
    if ranks.distributed:
        run_context["options"]["ranks"] = ranks.world_size
    weights_text = None if weights is None else str(weights)
    claims = [(c.corruption, c.severity, c.source, c.origin) for c in cells]
    with ProcessGroup(ranks) as group:
        if ranks.rank > 0:
            group.barrier()  # until rank 0 has merged what a stopped run left and opened the run (below)
        with ResultsStore(out if ranks.rank == 0 else part_folder(out, ranks.rank)) as store:
            if ranks.rank == 0:
                merge_parts(store, out)  # the parts of an earlier run that was stopped
            run_id = store.open_run(identity, weights_text, run_context)
            store.claim_cells(run_id, claims)
            if ranks.rank == 0:
                group.barrier()  # now the other ranks may open their parts and read this store
            done = store.done_images(run_id)
            if ranks.rank > 0:
                done |= _done_in_main_store(out, identity, ranks)
            items, units, already = _share(cells, batch_size, done, ranks)
            summary = EvalSummary(run_id, Path(out) / STORE_NAME, model_name, weights_text, cells,
                                  images_already_done=already, device=device, notes=notes, rank=ranks.rank)
            saved_in = str(store.path)
            if ranks.rank > 0:
                saved_in += f" (merged into {summary.store} by the next run)"
            loader = torch.utils.data.DataLoader(
                _ImageStream(items, config, jpeg_round_trip),
                batch_sampler=[unit[1] for unit in units],
                num_workers=workers,
                collate_fn=_collate,
                pin_memory=device.startswith("cuda"),
                worker_init_fn=_worker_init if workers else None,
            )
            autocast = torch.autocast(
                device_type="cuda" if device.startswith("cuda") else "cpu",
                dtype=torch.float16 if device.startswith("cuda") else torch.bfloat16,
                enabled=amp,
            )
            shown = model_name if not ranks.distributed else f"{model_name} (rank 0 of {ranks.world_size})"
            bar = progress_bar(total=len(items), desc=shown, unit="img", enabled=progress and ranks.rank == 0)
            with ops.record_backends() as ops_used:
                try:
                    for (cell, _), (indices, pixels, bad) in zip(units, loader):
                        bar.set_postfix_str(f"{cell.corruption}/{cell.severity}" if cell.severity else cell.corruption,
                                            refresh=False)
                        records = []
                        if pixels is not None:
                            x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
                            x = (x - mean) / std
                            if channels_last:
                                x = x.contiguous(memory_format=torch.channels_last)
                            with torch.inference_mode(), autocast:
                                logits = model(x)
                            top5 = logits.float().topk(5, dim=1).indices.cpu().tolist()
                            for i, predicted in zip(indices, top5):
                                image = items[i][1]
                                records.append((image.image_id, image.label, predicted))
                        bad_rows = [(items[i][1].image_id, str(items[i][1].path), reason) for i, reason in bad]
                        if records and run_context["ops_backend"] != _ops_backend(ops_used):
                            # the first batch through a dynamic model shows which ops backend ran
                            run_context["ops_backend"] = _ops_backend(ops_used)
                            store.open_run(identity, weights_text, run_context)
                        store.commit_batch(run_id, cell.corruption, cell.severity, records, bad_rows)
                        summary.images_evaluated += len(records)
                        bar.update(len(records) + len(bad_rows))
                        if bad_rows and strict:
                            raise DynrobustError(
                                f"bad image {bad_rows[0][1]}: {bad_rows[0][2]} (--strict); the "
                                f"{summary.images_evaluated} images evaluated so far are saved in {saved_in}"
                            )
                finally:
                    bar.close()
            if ranks.rank > 0:
                store.close()  # its part is complete: rank 0 merges it after the gather below
            counts = group.gather((summary.images_evaluated, summary.images_already_done))
            if ranks.rank == 0:
                unseen = [r for r in range(1, ranks.world_size) if not (part_folder(out, r) / STORE_NAME).is_file()]
                if unseen:
                    raise DynrobustError(
                        f"rank 0 cannot see the results of rank(s) {', '.join(map(str, unseen))} in "
                        f"{Path(out) / PARTS_FOLDER}: --out must be a folder that every rank sees (a shared file "
                        "system); each rank's results stay in its own OUT/parts/rank-<r>, copy them there and run "
                        "the command again to merge them")
                merge_parts(store, out)
                store.mark_finished(run_id)
                summary.images_evaluated = sum(evaluated for evaluated, _ in counts)
                summary.images_already_done = sum(known for _, known in counts)
                wanted = {(c.corruption, c.severity) for c in cells}
                summary.errors = _only_cells(store.cell_errors(run_id), wanted)
                summary.bad_images = _only_cells(store.bad_images(run_id), wanted)
    summary.elapsed_s = time.perf_counter() - started
    return summary
