"""Build an ImageNet-C tree on disk from a clean class-folder dataset (e.g. ImageNet val).

The recipe is that of hendrycks/robustness ``ImageNet-C/create_c/make_imagenet_c.py``: decode,
resize the shorter side to 256 and centre-crop 224 (bilinear, as torchvision), corrupt, and save as
JPEG quality 85 (PIL, ``optimize=True``) under ``<out>/<corruption>/<severity>/<wnid>/<file>``.
Two things differ on purpose:

- the random state of every corrupted image is its canonical seed, a hash of
  (``"<wnid>/<file>"``, corruption, severity), so any subset, worker count or resumed run gives the
  same pixels (the original script used one global seed and the order of the loop);
- the output keeps the source file name when it ends in ``.jpg``/``.jpeg`` (any case, so ImageNet's
  ``.JPEG`` stays); any other extension becomes ``<stem>.jpg``, because the bytes are JPEG.

A run is resumable: every file is written to a hidden temporary file in its final folder and moved
into place with ``os.replace``, so a file under its real name is always complete; a later run skips
complete files and redoes missing or broken ones. Images that cannot be decoded are listed and
skipped; the run goes on.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import numbers
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional


from robustbench_dyn.corruptions import (
    CORRUPTION_NAMES,
    canonical_seed,
    corrupt,
    parse_severities,
    resolve_corruptions,
)
from robustbench_dyn.data.images import encode_jpeg, is_image_file, load_rgb, resize_center_crop
from robustbench_dyn.errors import BadImageError, DynrobustError
from robustbench_dyn.progress import progress_bar

# make_imagenet_c.py: transforms.Resize(256), transforms.CenterCrop(224), save(quality=85, optimize=True)
RESIZE = 256
CROP = 224
JPEG_QUALITY = 85

BAD_IMAGES_FILE = "bad_images.txt"
MAX_DEFAULT_WORKERS = 8

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
# Temporary files start with "." (hidden, and skipped by every reader of the tree) and end in
# ".tmp" (not an image extension), so a half-written file is never taken for an image.
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class SourceImage:
    """One clean image: its id ``"<wnid>/<file>"``, its path, its class folder and its output name."""

    image_id: str
    path: Path
    wnid: str
    output_name: str


@dataclass(frozen=True)
class BadImage:
    """A source image that could not be decoded: its path and why."""

    path: str
    reason: str


@dataclass
class BuildSummary:
    """What a :func:`build_imagenet_c` run did. Counts are numbers of images or files; time in seconds."""

    out: Path
    corruptions: tuple
    severities: tuple
    workers: int
    images: int = 0
    """Source images selected (after ``limit``), bad ones included."""
    images_done: int = 0
    """Selected images whose every requested output file is now complete."""
    images_already_done: int = 0
    """Of ``images_done``, those that needed no work (every file was complete before the run)."""
    files_written: int = 0
    files_skipped: int = 0
    """Output files left as they were because an earlier run had completed them."""
    stale_temp_files_removed: int = 0
    bad_images: list = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def files_expected(self) -> int:
        """Output files the selection asks for: images x corruptions x severities (bad images included)."""
        return self.images * len(self.corruptions) * len(self.severities)

    @property
    def bad_images_file(self) -> Optional[Path]:
        """``<out>/bad_images.txt`` when this run found bad images, else None."""
        return self.out / BAD_IMAGES_FILE if self.bad_images else None


def default_workers() -> int:
    """Number of worker processes used when none is given: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def output_file_name(source_name: str) -> str:
    """Return the output name of a source file: unchanged for .jpg/.jpeg (any case), else ``<stem>.jpg``."""
    if source_name.lower().endswith(_JPEG_SUFFIXES):
        return source_name
    return Path(source_name).stem + ".jpg"


def output_path(out, corruption: str, severity: int, image: SourceImage) -> Path:
    """Return where ``image`` corrupted by ``corruption`` at ``severity`` lives in the tree under ``out``."""
    return Path(out) / corruption / str(severity) / image.wnid / image.output_name


def is_complete_jpeg(path) -> bool:
    """True if ``path`` is a file that starts with the JPEG SOI marker and ends with the EOI marker.

    A file cut short (a full disk, a copy interrupted, a run killed by an older tool) loses its
    EOI marker, so this separates finished outputs from broken ones without decoding them.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
            if head != _JPEG_SOI:
                return False
            handle.seek(-2, os.SEEK_END)
            return handle.read(2) == _JPEG_EOI
    except OSError:  # missing, a folder, unreadable, or shorter than the markers
        return False


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_source_images(src) -> list:
    """List the images of a class-folder dataset ``<src>/<wnid>/<file>``, sorted by image id.

    Class folders are the non-hidden sub-folders of ``src``; images are the files directly inside
    them whose extension is an image extension (sub-folders of a class are not searched). Names are
    sorted by code point. Raises DynrobustError when ``src`` is missing, is not a folder, has no
    class folders (saying so when images sit directly in it), has no images, or when two source
    files would be written under the same output name.
    """
    src = Path(src)
    if not src.exists():
        raise DynrobustError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise DynrobustError(f"source {src} is not a folder: give a folder of class folders <wnid>/<image>")
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as exc:
        raise DynrobustError(f"cannot read source folder {src}: {exc.strerror or exc}") from None
    class_dirs = [e for e in entries if e.is_dir() and not _is_hidden(e.name)]
    if not class_dirs:
        loose = sum(1 for e in entries if e.is_file() and is_image_file(e.name))
        if loose:
            raise DynrobustError(
                f"{src} holds {loose} image(s) directly but no class folders; ImageNet val must first "
                "be sorted into <wnid>/ class folders (e.g. with the valprep.sh script that ships "
                "with the PyTorch ImageNet example)"
            )
        raise DynrobustError(f"{src} has no class folders: expected <wnid>/<image> inside it")

    images = []
    for class_dir in class_dirs:
        by_output = {}
        try:
            # a link whose target is gone is kept, to be reported as a bad image rather than skipped
            files = sorted(e.name for e in os.scandir(class_dir.path) if e.is_file() or e.is_symlink())
        except OSError as exc:
            reason = exc.strerror or exc
            raise DynrobustError(f"cannot read class folder {class_dir.path}: {reason}") from None
        for name in files:
            if _is_hidden(name) or not is_image_file(name):
                continue
            output_name = output_file_name(name)
            if output_name in by_output:
                raise DynrobustError(
                    f"{class_dir.name}/{by_output[output_name]} and {class_dir.name}/{name} would both be "
                    f"written as {output_name} (outputs are JPEG); rename one of them"
                )
            by_output[output_name] = name
            images.append(
                SourceImage(
                    image_id=f"{class_dir.name}/{name}",
                    path=src / class_dir.name / name,
                    wnid=class_dir.name,
                    output_name=output_name,
                )
            )
    if not images:
        hint = ""
        if {d.name for d in class_dirs} & set(CORRUPTION_NAMES):
            hint = " (it looks like an ImageNet-C tree already; give the clean images instead)"
        raise DynrobustError(f"no images found in the class folders of {src}{hint}")
    return images


def select_class_balanced(images: Iterable[SourceImage], limit: Optional[int]) -> list:
    """Return ``limit`` images taken round-robin over the sorted classes, in sorted order per class.

    The first image of every class comes before the second of any, and so on, so a small ``limit``
    covers as many classes as it can and always picks the same files. ``None`` returns every image.
    The result is sorted by image id.
    """
    images = list(images)
    if limit is None or limit >= len(images):
        return sorted(images, key=lambda im: im.image_id)
    by_class = {}
    for image in sorted(images, key=lambda im: im.image_id):
        by_class.setdefault(image.wnid, []).append(image)
    queues = [by_class[wnid] for wnid in sorted(by_class)]
    chosen = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue):
                chosen.append(queue[depth])
                if len(chosen) == limit:
                    break
        depth += 1
    return sorted(chosen, key=lambda im: im.image_id)


def _is_whole_number(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_out_not_in_src(src: Path, out: Path) -> None:
    src_real, out_real = src.resolve(), out.resolve()
    if out_real == src_real or src_real in out_real.parents:
        # the next run would take the corruption folders for classes
        raise DynrobustError(f"output folder {out} is inside the source folder {src}; put it elsewhere")


def _remove_stale_temp_files(out: Path, cells, wnids) -> int:
    """Delete temporary files a killed run left in the folders this run writes; return how many."""
    removed = 0
    for corruption, severity in cells:
        for wnid in wnids:
            folder = out / corruption / str(severity) / wnid
            try:
                entries = list(os.scandir(folder))
            except OSError:  # not created yet
                continue
            for entry in entries:
                if entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(_TEMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
    return removed


def _save_jpeg_atomically(pixels, path: Path) -> None:
    """Encode uint8 (H, W, 3) ``pixels`` as JPEG q85 and move it into ``path`` in one step."""
    temp = path.with_name(f"{_TEMP_PREFIX}{path.name}.{os.getpid()}{_TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as handle:
            handle.write(encode_jpeg(pixels, JPEG_QUALITY))
        # no fsync: a killed process leaves at most a hidden temp file; a power cut that empties a
        # renamed file is caught by is_complete_jpeg on the next run
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


@dataclass(frozen=True)
class _ImageJob:
    image: SourceImage
    out: Path
    cells: tuple


@dataclass(frozen=True)
class _ImageResult:
    image_id: str
    written: int
    skipped: int
    bad: Optional[BadImage]


def _render_image(job: _ImageJob) -> _ImageResult:
    """Produce every missing (corruption, severity) file of one source image, decoding it once."""
    image = job.image
    missing = []
    for corruption, severity in job.cells:
        target = output_path(job.out, corruption, severity, image)
        if not is_complete_jpeg(target):
            missing.append((corruption, severity, target))
    skipped = len(job.cells) - len(missing)
    if not missing:
        return _ImageResult(image.image_id, 0, skipped, None)
    try:
        clean = resize_center_crop(load_rgb(image.path), RESIZE, CROP)
    except BadImageError as exc:
        # returned, not raised: BadImageError does not survive pickling back from a worker
        return _ImageResult(image.image_id, 0, skipped, BadImage(str(image.path), exc.reason))
    written = 0
    for corruption, severity, target in missing:
        seed = canonical_seed(image.image_id, corruption, severity)
        pixels = corrupt(clean, corruption, severity, seed=seed)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _save_jpeg_atomically(pixels, target)
        except OSError as exc:
            raise DynrobustError(f"cannot write {target}: {exc.strerror or exc}") from None
        written += 1
    return _ImageResult(image.image_id, written, skipped, None)


def _init_worker() -> None:
    # Ctrl-C goes to the parent, which stops the pool; workers would otherwise each print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_bad_images_file(out: Path, bad_images) -> None:
    target = out / BAD_IMAGES_FILE
    if not bad_images:
        # the file describes the latest run; an old list would name images that are fine now
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        return
    temp = target.with_name(f"{_TEMP_PREFIX}{target.name}{_TEMP_SUFFIX}")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write("# source images that could not be decoded, one a line: path, a tab, the reason\n")
        for bad in bad_images:
            handle.write(f"{bad.path}\t{bad.reason}\n")
    os.replace(temp, target)


def build_imagenet_c(
    src,
    out,
    corruptions=None,
    severities=None,
    *,
    workers: Optional[int] = None,
    limit: Optional[int] = None,
    progress: bool = True,
) -> BuildSummary:
    """Corrupt the class-folder dataset ``src`` into an ImageNet-C tree under ``out``; return a summary.

    ``corruptions`` names corruptions or groups (``"noise,fog"`` or a list; ``None`` = all 19);
    ``severities`` is ``"1-5"``, ``"2,4"`` or a list of ints (``None`` = 1..5). Every source image
    is decoded once and yields all requested (corruption, severity) files, each seeded by
    ``canonical_seed("<wnid>/<file>", corruption, severity)``. Complete files from an earlier run
    are skipped, so the same call resumes a killed run. Undecodable images are skipped and listed
    in the summary and in ``<out>/bad_images.txt``.

    ``workers``: processes in the pool (``None`` = :func:`default_workers`; 0 or 1 = this process);
    the outputs do not depend on it. ``limit``: take only this many images, class-balanced (see
    :func:`select_class_balanced`); bad images count towards it. ``progress``: show a bar counting
    images when stderr is a terminal.

    Workers are started with "spawn", so a script calling this with ``workers > 1`` needs the usual
    ``if __name__ == "__main__":`` guard. Two runs writing the same ``out`` at once are not supported.
    Raises DynrobustError for a bad ``src`` or ``out`` and for nonsense options.
    """
    started = time.perf_counter()
    if limit is not None and (not _is_whole_number(limit) or limit < 1):
        raise DynrobustError(f"limit must be a whole number of images, at least 1; got {limit!r}")
    if workers is None:
        workers = default_workers()
    if not _is_whole_number(workers) or workers < 0:
        raise DynrobustError(
            f"workers must be 0 (no pool) or a positive number of processes; got {workers!r}"
        )
    corruptions = resolve_corruptions(corruptions)
    severities = parse_severities(severities)
    src, out = Path(src), Path(out)

    images = list_source_images(src)
    _check_out_not_in_src(src, out)
    if out.exists() and not out.is_dir():
        raise DynrobustError(f"output {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DynrobustError(f"cannot create output folder {out}: {exc.strerror or exc}") from None

    selected = select_class_balanced(images, limit)
    cells = tuple((c, s) for c in corruptions for s in severities)
    summary = BuildSummary(
        out=out, corruptions=corruptions, severities=severities, workers=0, images=len(selected)
    )
    wnids = sorted({image.wnid for image in selected})
    summary.stale_temp_files_removed = _remove_stale_temp_files(out, cells, wnids)

    jobs = [_ImageJob(image, out, cells) for image in selected]
    processes = min(int(workers), len(jobs))
    summary.workers = processes if processes > 1 else 0
    bar = progress_bar(total=len(jobs), desc="ImageNet-C", unit="img", enabled=progress)
    try:
        if summary.workers:
            context = multiprocessing.get_context("spawn")
            with context.Pool(processes, initializer=_init_worker) as pool:
                for result in pool.imap_unordered(_render_image, jobs, chunksize=1):
                    _add_result(summary, result, bar)
        else:
            for job in jobs:
                _add_result(summary, _render_image(job), bar)
    finally:
        bar.close()

    summary.bad_images.sort(key=lambda bad: bad.path)
    _write_bad_images_file(out, summary.bad_images)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _add_result(summary: BuildSummary, result: _ImageResult, bar) -> None:
    summary.files_written += result.written
    summary.files_skipped += result.skipped
    if result.bad is not None:
        summary.bad_images.append(result.bad)
        bar.set_postfix_str(f"{len(summary.bad_images)} bad", refresh=False)
    else:
        summary.images_done += 1
        if result.written == 0:
            summary.images_already_done += 1
    bar.update(1)
