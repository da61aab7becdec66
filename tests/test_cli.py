"""The ``dynrobust`` command line: --help, --version, ``corrupt``, ``demo``, exit codes and error lines."""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from robustbench_dyn import __version__
from robustbench_dyn.cli import _MALLOC_SETTINGS, app
from robustbench_dyn.cli.demo import _GAP, _HEADER_HEIGHT, _LABEL_WIDTH, CONTACT_SHEET, THUMBNAIL
from robustbench_dyn.corruptions import CORRUPTION_NAMES
from robustbench_dyn.data.build_imagenet_c import build_imagenet_c, output_file_name
from robustbench_dyn.data.images import load_rgb
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.progress import format_duration, progress_bar
from robustbench_dyn.sample import sample_images, write_sample_dataset


def _console_script() -> str:
    """The installed ``dynrobust`` script of the Python running the tests."""
    script = shutil.which("dynrobust", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the dynrobust console script is not installed next to this Python (pip install -e .)")
    return script


def _run(*args, cwd=None, timeout=120):
    return subprocess.run(
        [_console_script(), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.fixture
def sample_src(tmp_path):
    """The bundled photos as a class-folder dataset, plus one file that is not an image."""
    src = write_sample_dataset(tmp_path / "clean")
    wnid = sample_images()[0].wnid
    (src / wnid / "broken.JPEG").write_text("this is text, not a JPEG\n")
    return src


# --- help and version ---------------------------------------------------------------------------


def test_version_names_the_program_and_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"dynrobust, version {__version__}"


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "corrupt" in result.output and "demo" in result.output


def test_corrupt_help_lists_every_option():
    result = CliRunner().invoke(app, ["corrupt", "--help"])
    assert result.exit_code == 0
    assert "SRC_DIR OUT_DIR" in result.output
    for option in ("--corruptions", "--severities", "--workers", "--limit", "--quiet"):
        assert option in result.output


def test_demo_help_hides_the_testing_option():
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--out" in result.output and "--workers" in result.output
    assert "--corruptions" not in result.output


# --- corrupt ---------------------------------------------------------------------------------------


def test_corrupt_writes_the_tree_and_reports_bad_images(sample_src, tmp_path):
    out = tmp_path / "imagenet-c"
    args = ["corrupt", str(sample_src), str(out), "-c", "fog,pixelate", "-s", "2,5", "-j", "0", "-q"]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    assert len(list(out.rglob("*.jpg"))) == 4 * 2 * 2
    assert sorted(p.name for p in (out / "pixelate").iterdir()) == ["2", "5"]
    assert "images: 4 of 5 done, 1 bad" in result.output
    assert "files: 16 written, 0 skipped as already complete" in result.output
    assert "broken.JPEG" in result.output
    assert str(out) in result.output
    assert "elapsed:" in result.output

    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0
    assert "files: 0 written, 16 skipped as already complete" in rerun.output


def test_corrupt_limit_and_default_corruptions(sample_src, tmp_path):
    out = tmp_path / "imagenet-c"
    args = ["corrupt", str(sample_src), str(out), "--limit", "3", "-s", "1", "-j", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # the first file of each of the 3 first classes; in the cat's class that is broken.JPEG
    assert "images: 2 of 3 done, 1 bad" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(CORRUPTION_NAMES + ("bad_images.txt",))
    written = sorted(p.relative_to(out / "fog" / "1").as_posix() for p in (out / "fog").rglob("*.jpg"))
    assert written == ["n03773504/rocket.jpg", "n03785016/motorcycle.jpg"]
    assert len(list(out.rglob("*.jpg"))) == 2 * 19


def test_corrupt_user_error_raises_dynrobust_error_in_the_app(tmp_path):
    result = CliRunner().invoke(app, ["corrupt", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert isinstance(result.exception, DynrobustError)
    assert "does not exist" in str(result.exception)


# --- the installed console script -----------------------------------------------------------------


def test_console_script_version_and_help():
    version = _run("--version")
    assert version.returncode == 0 and __version__ in version.stdout
    helped = _run("corrupt", "-h")
    assert helped.returncode == 0 and "Usage: dynrobust corrupt" in helped.stdout


def test_console_script_corrupt_succeeds_with_a_bad_image(sample_src, tmp_path):
    out = tmp_path / "imagenet-c"
    result = _run("corrupt", sample_src, out, "-c", "gaussian_noise", "-s", "3", "-j", "2")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "broken.JPEG" in result.stdout and "workers: 2" in result.stdout
    assert len(list(out.rglob("*.jpg"))) == 4
    assert (out / "bad_images.txt").read_text().count("broken.JPEG") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["corrupt", "{tmp}/missing", "{tmp}/out"], "does not exist"),
        (["corrupt", "{src}", "{src}/out"], "inside the source folder"),
        (["corrupt", "{src}", "{tmp}/out", "--limit", "0"], "limit must be"),
        (["corrupt", "{src}", "{tmp}/out", "--workers", "-2"], "workers must be"),
        (["corrupt", "{src}", "{tmp}/out", "-c", "gaussian_nosie"], "Did you mean gaussian_noise"),
        (["corrupt", "{src}", "{tmp}/out", "-s", "3-9"], "severity must be"),
        (["corrupt", "{src}/n02123045", "{tmp}/out"], "no class folders"),
        (["demo", "--out", "{src}/n02123045/chelsea.png"], "is not a folder"),
    ],
)
def test_console_script_user_error_is_one_line_and_exit_1(sample_src, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, src=sample_src) for a in args]
    result = _run(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_corrupt_refuses_class_folders_eval_cannot_label(sample_src, tmp_path):
    wnid = sample_images()[0].wnid
    (sample_src / wnid).rename(sample_src / "cats")
    result = CliRunner().invoke(app, ["corrupt", str(sample_src), str(tmp_path / "out"), "-c", "fog", "-s", "1", "-q"])
    assert result.exit_code != 0 and isinstance(result.exception, DynrobustError)
    assert str(result.exception) == f"{sample_src}: class folders must be named by ImageNet wnids (e.g. n01440764); found cats"
    assert not (tmp_path / "out").exists()


def test_console_script_usage_error_exits_2():
    result = _run("corrupt", "--no-such-option")
    assert result.returncode == 2
    assert "No such option" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "resnet18", "--weights", "{tmp}/missing.pth"], "checkpoint {tmp}/missing.pth does not exist"),
    ],
)
def test_demo_checks_model_and_weights_before_building_anything(tmp_path, args, message):
    result = CliRunner().invoke(app, ["demo", *[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "d")])
    assert result.exit_code != 0 and isinstance(result.exception, DynrobustError)
    assert message.format(tmp=tmp_path) in str(result.exception)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "args, option",
    [
        (["eval", "--model", "resnet18", "--imagenet-c", ""], "--imagenet-c"),
        (["eval", "--model", "resnet18", "--imagenet-c", "{tmp}", "--out", ""], "--out"),
        (["eval", "--model", "resnet18", "--imagenet-c", "{tmp}", "--weights", " "], "--weights"),
        (["corrupt", "{tmp}", ""], "OUT_DIR"),
        (["report", "", "--baseline", "resnet50", "--out", "{tmp}/r"], "SOURCES..."),
    ],
)
def test_an_empty_path_is_a_usage_error_not_the_current_folder(tmp_path, args, option):
    # Path("") is Path("."): an unset shell variable must not make the current folder the dataset or the output
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': an empty path" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_killed_run_resumes_to_the_same_tree(tmp_path):
    src = write_sample_dataset(tmp_path / "clean")
    out = tmp_path / "imagenet-c"
    process = subprocess.Popen(
        [_console_script(), "corrupt", str(src), str(out), "-j", "0", "-c", "blur,weather"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while process.poll() is None and not any(out.rglob("*.jpg")) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.kill()  # SIGKILL: no cleanup of any kind runs
    process.wait()

    resumed = _run("corrupt", src, out, "-j", "0", "-c", "blur,weather")
    assert resumed.returncode == 0, resumed.stderr

    reference = build_imagenet_c(src, tmp_path / "reference", "blur,weather", None, workers=0, progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(reference.out) for p in reference.out.rglob("*") if p.is_file())
    assert len(files) == 4 * 10 * 5
    assert all((out / f).read_bytes() == (reference.out / f).read_bytes() for f in files)


# --- demo ------------------------------------------------------------------------------------------


def _cell(sheet: np.ndarray, row: int, column: int) -> np.ndarray:
    top = 2 * _HEADER_HEIGHT + row * (THUMBNAIL + _GAP)
    left = _LABEL_WIDTH + column * (THUMBNAIL + _GAP)
    return sheet[top : top + THUMBNAIL, left : left + THUMBNAIL]


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX))


def test_demo_command_builds_everything(tmp_path):
    """The real command, all 19 corruptions x 5 severities, through the installed script (evaluated
    with resnet18, a third of the default resnet50's time: the eval path is the same)."""
    out = tmp_path / "demo-out"
    result = _run("demo", "--out", out, "--workers", "2", "--model", "resnet18", timeout=300)

    assert result.returncode == 0, result.stderr
    photos = sample_images()
    assert len(list((out / "clean").rglob("*.*"))) == len(photos)
    outputs = list((out / "imagenet-c").rglob("*.jpg"))
    assert len(outputs) == len(photos) * 19 * 5
    for path in outputs[:10]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (224, 224)
    assert "380 written" in result.stdout and str(out / CONTACT_SHEET) in result.stdout

    sheet = load_rgb(out / CONTACT_SHEET)
    rows, columns = 19, 6
    height = 2 * _HEADER_HEIGHT + rows * (THUMBNAIL + _GAP)
    assert sheet.shape == (height, _LABEL_WIDTH + columns * (THUMBNAIL + _GAP), 3)
    shown = photos[0]
    name = output_file_name(shown.name + shown.path.suffix)
    # row 9 is fog (ImageNet-C order), column 4 is severity 4: the thumbnail of that very file
    fog4 = load_rgb(out / "imagenet-c" / "fog" / "4" / shown.wnid / name)
    assert CORRUPTION_NAMES[9] == "fog"
    np.testing.assert_array_equal(_cell(sheet, 9, 4), _thumbnail(fog4))
    assert not np.array_equal(_cell(sheet, 9, 4), _cell(sheet, 9, 1))


def test_demo_with_fewer_corruptions_and_rerun(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--workers", "0", "--corruptions", "contrast"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert len(list((out / "imagenet-c").rglob("*.jpg"))) == 4 * 5
    sheet = load_rgb(out / CONTACT_SHEET)
    assert sheet.shape[0] == 2 * _HEADER_HEIGHT + 1 * (THUMBNAIL + _GAP)
    # contrast lowers the spread of every channel more at each severity (to 5% of it at severity 5)
    spreads = [float(_cell(sheet, 0, column).reshape(-1, 3).std(axis=0).mean()) for column in range(6)]
    assert spreads == sorted(spreads, reverse=True) and spreads[5] < spreads[0] / 10

    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0
    assert "0 written, 20 skipped" in second.output


# --- the progress bar and durations ---------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_only_on_a_terminal_when_enabled(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(total=3).disable

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress_bar(total=3, enabled=False).disable
    bar = progress_bar(total=3, unit="img")
    assert not bar.disable
    bar.update(3)
    bar.refresh()  # tqdm redraws at most every 0.1 s on its own
    bar.close()
    assert "3/3" in terminal.getvalue()


@pytest.mark.parametrize(
    "seconds, text",
    [(0.04, "0.0 s"), (8.44, "8.4 s"), (59.97, "1 min 00 s"), (185, "3 min 05 s"), (7620, "2 h 07 min")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("given,expected", [(None, "1"), ("0", "0")])
def test_cli_turns_on_huge_pages_for_torch_unless_told_otherwise(given, expected):
    # The setting must be in place before torch is first imported (it is read at its first
    # allocation); a user's own value is kept.
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = "import os, robustbench_dyn.cli; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
    # set at the top of the package, before any command module could have loaded torch
    source = (Path(__file__).resolve().parents[1] / "cli" / "__init__.py").read_text()
    assert source.index('os.environ.setdefault("THP_MEM_ALLOC_ENABLE"') < source.index("_register_commands()")


_MALLINFO = """
import ctypes, sys
from robustbench_dyn.cli import main
try:
    main(["--version"])
except SystemExit:
    pass
libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
mapped = libc.mallinfo2().hblkhd  # bytes in blocks glibc mapped on their own
libc.free(ctypes.c_void_p(block))
print(mapped >= 64 << 20, libc.mallinfo2().fordblks >= 64 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("given,expected", [(None, "False True"), ("65536", "True False")])
def test_cli_keeps_freed_memory_in_the_heap_unless_told_otherwise(given, expected):
    # Measured through glibc itself: after the CLI's entry point, a 64 MB block comes from the heap
    # and stays there, free for reuse, once released; with MALLOC_MMAP_MAX_ set by the user it is
    # mapped on its own and handed back to the system (glibc's default).
    env = {k: v for k, v in os.environ.items() if k not in _MALLOC_SETTINGS + ("GLIBC_TUNABLES",)}
    if given is not None:
        env["MALLOC_MMAP_MAX_"] = given
    out = subprocess.run([sys.executable, "-c", _MALLINFO], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected
