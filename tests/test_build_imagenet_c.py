"""Building an ImageNet-C tree: layout, pixels, resume, bad images, --limit, workers, validation."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustbench_dyn.corruptions import canonical_seed, corrupt
from robustbench_dyn.data.build_imagenet_c import (
    BAD_IMAGES_FILE,
    build_imagenet_c,
    is_complete_jpeg,
    list_source_images,
    output_file_name,
    select_class_balanced,
)
from robustbench_dyn.data.images import load_rgb, resize_center_crop
from robustbench_dyn.errors import DynrobustError

CORRUPTIONS = ("gaussian_noise", "fog")
SEVERITIES = (1, 3)

# class -> files, written in this (unsorted) order; sizes differ so the resize and crop matter
DATASET = {
    "n01440764": ["c.JPEG", "a.JPEG", "b.JPEG"],
    "n02102040": ["photo.png"],
    "n03000684": ["y.jpeg", "x.JPEG"],
}
SIZES = [(300, 260), (240, 333), (500, 375), (260, 260), (281, 413), (320, 240)]


def _photo(rng, width, height) -> np.ndarray:
    # smooth colour gradients plus texture: JPEG-friendly, and every corruption changes it visibly
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=2)
    texture = rng.normal(0, 12, size=(height, width, 3))
    return np.clip(base + texture, 0, 255).astype(np.uint8)


def make_dataset(root: Path, dataset=DATASET, seed=0) -> Path:
    """Write a class-folder dataset of generated photos under ``root``; return ``root``."""
    rng = np.random.default_rng(seed)
    index = 0
    for wnid, names in dataset.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for name in names:
            width, height = SIZES[index % len(SIZES)]
            index += 1
            image = Image.fromarray(_photo(rng, width, height))
            if name.lower().endswith((".jpg", ".jpeg")):
                image.save(root / wnid / name, format="JPEG", quality=95)
            else:
                image.save(root / wnid / name)
    return root


def _tree(out: Path) -> dict:
    """Every file under ``out`` (relative posix path -> bytes), hidden ones included."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _expected_paths(dataset=DATASET, corruptions=CORRUPTIONS, severities=SEVERITIES) -> set:
    return {
        f"{c}/{s}/{wnid}/{output_file_name(name)}"
        for c in corruptions
        for s in severities
        for wnid, names in dataset.items()
        for name in names
    }


def _build(src, out, **kwargs):
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("progress", False)
    return build_imagenet_c(src, out, CORRUPTIONS, SEVERITIES, **kwargs)


def _jpeg_q85(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85, optimize=True)
    return buffer.getvalue()


@pytest.fixture
def src(tmp_path):
    return make_dataset(tmp_path / "clean")


def test_output_file_name_keeps_jpeg_names_and_renames_others():
    assert output_file_name("ILSVRC2012_val_00000293.JPEG") == "ILSVRC2012_val_00000293.JPEG"
    assert output_file_name("a.jpeg") == "a.jpeg"
    assert output_file_name("a.JpG") == "a.JpG"
    assert output_file_name("photo.png") == "photo.jpg"
    assert output_file_name("scan.v2.TIFF") == "scan.v2.jpg"


def test_layout_is_corruption_severity_class_file(src, tmp_path):
    out = tmp_path / "imagenet-c"
    summary = _build(src, out)

    assert set(_tree(out)) == _expected_paths()
    assert summary.images == summary.images_done == 6
    assert summary.files_written == summary.files_expected == 6 * 2 * 2
    assert summary.files_skipped == 0 and summary.bad_images == []
    assert summary.corruptions == CORRUPTIONS and summary.severities == SEVERITIES
    with Image.open(out / "fog" / "3" / "n02102040" / "photo.jpg") as written:
        assert written.format == "JPEG" and written.size == (224, 224)


def test_corruption_groups_and_severity_ranges_are_expanded(src, tmp_path):
    out = tmp_path / "imagenet-c"
    summary = build_imagenet_c(src, out, "noise", "4-5", workers=0, limit=1, progress=False)

    noise = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
    assert summary.corruptions == noise and summary.severities == (4, 5)
    assert sorted(p.name for p in out.iterdir()) == sorted(noise)
    assert sorted(p.name for p in (out / "shot_noise").iterdir()) == ["4", "5"]


@pytest.mark.parametrize(
    "image_id, corruption, severity",
    [
        ("n01440764/a.JPEG", "gaussian_noise", 3),
        ("n02102040/photo.png", "fog", 1),
        ("n03000684/y.jpeg", "fog", 3),
    ],
)
def test_pixels_equal_an_independent_computation(src, tmp_path, image_id, corruption, severity):
    out = tmp_path / "imagenet-c"
    _build(src, out)
    wnid, name = image_id.split("/")
    written = out / corruption / str(severity) / wnid / output_file_name(name)

    clean = resize_center_crop(load_rgb(src / wnid / name), 256, 224)
    expected = corrupt(clean, corruption, severity, seed=canonical_seed(image_id, corruption, severity))
    assert written.read_bytes() == _jpeg_q85(expected)
    # the same corruption seeded from another id gives other bytes, so the comparison above can fail
    other = corrupt(clean, corruption, severity, seed=canonical_seed(image_id + "x", corruption, severity))
    assert _jpeg_q85(other) != written.read_bytes()


def test_resume_redoes_only_missing_and_broken_files(src, tmp_path):
    out = tmp_path / "imagenet-c"
    _build(src, out)
    before = _tree(out)
    old = 1_000_000_000  # a fixed old mtime (2001): any rewrite shows, whatever the clock resolution
    for path in out.rglob("*.*"):
        os.utime(path, ns=(old * 10**9, old * 10**9))

    deleted = out / "fog" / "1" / "n01440764" / "b.JPEG"
    truncated = out / "gaussian_noise" / "3" / "n03000684" / "x.JPEG"
    deleted.unlink()
    truncated.write_bytes(before["gaussian_noise/3/n03000684/x.JPEG"][:-300])
    assert not is_complete_jpeg(truncated)

    summary = _build(src, out)

    assert summary.files_written == 2
    assert summary.files_skipped == len(before) - 2
    assert summary.images_done == 6 and summary.images_already_done == 4
    assert _tree(out) == before
    for path in out.rglob("*.*"):
        relative = path.relative_to(out)
        if path in (deleted, truncated):
            assert path.stat().st_mtime_ns != old * 10**9, relative
        else:
            assert path.stat().st_mtime_ns == old * 10**9, relative


def test_stale_temp_files_of_a_killed_run_are_removed_and_not_counted(src, tmp_path):
    out = tmp_path / "imagenet-c"
    _build(src, out)
    before = _tree(out)
    # a run killed while writing: the final file never appeared, its temp file did
    folder = out / "fog" / "3" / "n01440764"
    (folder / "a.JPEG").unlink()
    (folder / ".a.JPEG.4242.tmp").write_bytes(before["fog/3/n01440764/a.JPEG"][:500])
    (out / "gaussian_noise" / "1" / "n02102040" / ".photo.jpg.77.tmp").write_bytes(b"")

    summary = _build(src, out)

    assert summary.stale_temp_files_removed == 2
    assert summary.files_written == 1
    assert summary.files_skipped == len(before) - 1
    assert _tree(out) == before  # no hidden file left, nothing else changed


def test_is_complete_jpeg(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_q85(np.full((40, 40, 3), 128, np.uint8)))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:-1])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    png = tmp_path / "image.jpg"
    Image.new("RGB", (40, 40)).save(png, format="PNG")

    assert is_complete_jpeg(good)
    assert not is_complete_jpeg(cut)
    assert not is_complete_jpeg(empty)
    assert not is_complete_jpeg(png)
    assert not is_complete_jpeg(tmp_path / "missing.jpg")
    assert not is_complete_jpeg(tmp_path)


def test_bad_images_are_listed_and_skipped(src, tmp_path):
    zero = src / "n01440764" / "zero.JPEG"
    zero.write_bytes(b"")
    truncated = src / "n02102040" / "truncated.JPEG"
    truncated.write_bytes((src / "n01440764" / "a.JPEG").read_bytes()[:2000])
    text = src / "n03000684" / "notes.JPEG"
    text.write_text("not a picture\n")
    out = tmp_path / "imagenet-c"

    summary = _build(src, out)

    assert [bad.path for bad in summary.bad_images] == sorted(map(str, (zero, truncated, text)))
    assert all(bad.reason for bad in summary.bad_images)
    assert summary.images == 9 and summary.images_done == 6
    assert summary.files_written == 6 * 4
    tree = _tree(out)
    assert set(tree) == _expected_paths() | {BAD_IMAGES_FILE}
    lines = tree[BAD_IMAGES_FILE].decode().splitlines()
    listed = [line.split("\t")[0] for line in lines if not line.startswith("#")]
    assert listed == sorted(map(str, (zero, truncated, text)))
    assert summary.bad_images_file == out / BAD_IMAGES_FILE

    # a rerun finds them again (they never got outputs); once they are gone, so is the list
    assert len(_build(src, out).bad_images) == 3
    for path in (zero, truncated, text):
        path.unlink()
    again = _build(src, out)
    assert again.bad_images == [] and again.files_written == 0
    assert not (out / BAD_IMAGES_FILE).exists()


def test_limit_takes_images_round_robin_over_sorted_classes(tmp_path):
    dataset = {
        "n03": ["q.JPEG", "p.JPEG"],
        "n01": ["c.JPEG", "b.JPEG", "a.JPEG"],
        "n02": ["z.JPEG"],
    }
    src = make_dataset(tmp_path / "clean", dataset)
    images = list_source_images(src)
    assert [im.image_id for im in images] == [
        "n01/a.JPEG", "n01/b.JPEG", "n01/c.JPEG", "n02/z.JPEG", "n03/p.JPEG", "n03/q.JPEG"
    ]

    def chosen(limit):
        return [im.image_id for im in select_class_balanced(images, limit)]

    assert chosen(1) == ["n01/a.JPEG"]
    assert chosen(3) == ["n01/a.JPEG", "n02/z.JPEG", "n03/p.JPEG"]
    assert chosen(4) == ["n01/a.JPEG", "n01/b.JPEG", "n02/z.JPEG", "n03/p.JPEG"]
    # n02 has run out: the second round goes on without it
    assert chosen(5) == ["n01/a.JPEG", "n01/b.JPEG", "n02/z.JPEG", "n03/p.JPEG", "n03/q.JPEG"]
    assert chosen(99) == chosen(None) == [im.image_id for im in images]
    assert chosen(4) == [im.image_id for im in select_class_balanced(list(reversed(images)), 4)]

    out = tmp_path / "imagenet-c"
    summary = build_imagenet_c(src, out, "fog", "2", workers=0, limit=4, progress=False)
    assert summary.images == 4 and summary.files_written == 4
    written = sorted(p.relative_to(out / "fog" / "2").as_posix() for p in out.rglob("*.JPEG"))
    assert written == ["n01/a.JPEG", "n01/b.JPEG", "n02/z.JPEG", "n03/p.JPEG"]


def test_two_workers_write_the_same_bytes_as_one_process(src, tmp_path):
    in_process = _build(src, tmp_path / "serial", workers=0)
    pooled = _build(src, tmp_path / "pooled", workers=2)

    assert in_process.workers == 0 and pooled.workers == 2
    serial_tree = _tree(tmp_path / "serial")
    assert serial_tree == _tree(tmp_path / "pooled")
    assert len(serial_tree) == 6 * 4


def test_pooled_run_reports_bad_images_too(src, tmp_path):
    (src / "n01440764" / "zero.JPEG").write_bytes(b"")
    summary = _build(src, tmp_path / "imagenet-c", workers=2)
    assert [Path(bad.path).name for bad in summary.bad_images] == ["zero.JPEG"]
    assert summary.files_written == 6 * 4


def test_images_straight_in_src_ask_for_class_folders(tmp_path):
    src = tmp_path / "val"
    src.mkdir()
    for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"):
        Image.new("RGB", (64, 64)).save(src / name, format="JPEG")
    with pytest.raises(DynrobustError, match=r"2 image\(s\) directly but no class folders.*ImageNet val"):
        _build(src, tmp_path / "out")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("file", "is not a folder"),
        ("empty", "has no class folders"),
        ("no_images", "no images found"),
        ("collision", "would both be written as a.jpg"),
    ],
)
def test_unusable_src_is_one_clear_error(tmp_path, case, message):
    src = tmp_path / "clean"
    if case == "file":
        src.write_text("x")
    elif case == "empty":
        src.mkdir()
    elif case == "no_images":
        (src / "n01").mkdir(parents=True)
        (src / "n01" / "readme.txt").write_text("x")
    elif case == "collision":
        make_dataset(src, {"n01": ["a.png", "a.jpg"]})
    with pytest.raises(DynrobustError, match=message):
        _build(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_inside_src_is_refused(src):
    with pytest.raises(DynrobustError, match="inside the source folder"):
        _build(src, src / "imagenet-c")
    with pytest.raises(DynrobustError, match="inside the source folder"):
        _build(src, src)
    assert sorted(p.name for p in src.iterdir()) == sorted(DATASET)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"limit": 0}, "limit must be"),
        ({"limit": -3}, "limit must be"),
        ({"limit": 2.5}, "limit must be"),
        ({"workers": -1}, "workers must be"),
        ({"workers": True}, "workers must be"),
    ],
)
def test_nonsense_options_are_refused(src, tmp_path, options, message):
    with pytest.raises(DynrobustError, match=message):
        build_imagenet_c(src, tmp_path / "out", "fog", "1", progress=False, **options)


def test_unknown_corruption_and_bad_severity_are_refused(src, tmp_path):
    with pytest.raises(DynrobustError, match="unknown corruption"):
        build_imagenet_c(src, tmp_path / "out", "fgo", "1", workers=0, progress=False)
    with pytest.raises(DynrobustError, match="severity"):
        build_imagenet_c(src, tmp_path / "out", "fog", "0-6", workers=0, progress=False)
