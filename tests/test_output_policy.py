"""The bad-input catalogue of issue 18: every probe a careless or hostile user made, rerun.

Each case asserts the exit status, that the message names the cause, that no traceback is
printed, that every input's bytes are unchanged and that no partial output is left. The
subprocess tests at the end run the real ``memedit`` command: concurrent writers, SIGINT and
SIGKILL at several points of bake and export, and the quiet console.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import folder_digest

from memedit.cli import cli
from memedit.outputs import MARKER_FILE

FAST = ["--steps", "4", "--tau", "2", "--k", "0.05"]
MEMEDIT = [sys.executable, "-m", "memedit.cli"]


snapshot = folder_digest  # sha256 of every file under a folder, hidden ones included


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> Path:
    """Inputs every probe may use, made once: a model, prompts, a subspace, statistics."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_model_dir, root / "model")
    (root / "mem.txt").write_text("a red cat\na blue dog\n")
    result = CliRunner().invoke(cli, ["locate", "--model", str(root / "model"), "--memorized",
                                      str(root / "mem.txt"), "--out", str(root / "subspace"),
                                      "--save-stats", str(root / "stats"), *FAST])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["bake", "--model", str(root / "model"), "--subspace",
                                      str(root / "subspace"), "--out", str(root / "baked")])
    assert result.exit_code == 0, result.output
    return root


@dataclass(frozen=True)
class Probe:
    """One bad input: ``args`` (with {w} for the inputs' folder, {t} for a scratch folder)."""

    name: str
    args: list[str]
    needles: tuple[str, ...]
    setup: Callable[[Path, Path], None] | None = None
    status: int = 2


def _corrupt_model_index(world: Path, tmp: Path) -> None:
    shutil.copytree(world / "model", tmp / "model")
    (tmp / "model" / "model_index.json").write_text('{"unet": ["diffusers", ')


def _list_model_index(world: Path, tmp: Path) -> None:
    shutil.copytree(world / "model", tmp / "model")
    (tmp / "model" / "model_index.json").write_text("[1, 2]")


def _truncated_weights(world: Path, tmp: Path) -> None:
    shutil.copytree(world / "model", tmp / "model")
    weights = tmp / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _unrelated_folder(world: Path, tmp: Path) -> None:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("years of work")


def _memedit_output_with_model_inside(world: Path, tmp: Path) -> None:
    # A folder memedit wrote, that now holds the model: --overwrite must not delete it.
    (tmp / "old").mkdir()
    (tmp / "old" / MARKER_FILE).write_text(json.dumps({"writer": "memedit"}))
    shutil.copytree(world / "model", tmp / "old" / "model")


def _symlink_out(world: Path, tmp: Path) -> None:
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")


def _prompts_inside_out(world: Path, tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / MARKER_FILE).write_text(json.dumps({"writer": "memedit"}))
    (tmp / "run" / "mem.txt").write_text("a red cat\n")


# /sys refuses new folders even to root, where permission bits stop nobody.
UNWRITABLE = "/sys/memedit-test-output" if os.geteuid() == 0 else "/proc/memedit-test-output"

PROBES = [
    Probe("locate-out-is-model", ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt",
                                  "--out", "{w}/model", "--overwrite", *FAST],
          ("is one of this run's inputs",)),
    Probe("locate-out-contains-prompts",
          ["locate", "--model", "{w}/model", "--memorized", "{t}/run/mem.txt", "--out", "{t}/run",
           "--overwrite", *FAST], ("contains the input",), _prompts_inside_out),
    Probe("evaluate-out-is-model",
          ["evaluate", "--model", "{w}/baked", "--memorized", "{w}/mem.txt", "--ordinary",
           "{w}/mem.txt", "--out", "{w}/baked", "--overwrite", "--steps", "2"],
          ("is one of this run's inputs",)),
    Probe("bake-out-is-subspace",
          ["bake", "--model", "{w}/model", "--subspace", "{w}/subspace", "--out",
           "{w}/subspace", "--overwrite"], ("is one of this run's inputs",)),
    Probe("bake-over-unrelated-folder",
          ["bake", "--model", "{w}/model", "--subspace", "{w}/subspace", "--out", "{t}/mine",
           "--overwrite"], ("was not written by memedit",), _unrelated_folder),
    Probe("bake-over-memedit-folder-holding-the-model",
          ["bake", "--model", "{t}/old/model", "--subspace", "{w}/subspace", "--out", "{t}/old",
           "--overwrite"], ("contains the input",), _memedit_output_with_model_inside),
    Probe("out-is-a-symlink",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/link",
           "--overwrite", *FAST], ("symbolic link",), _symlink_out),
    Probe("save-stats-inside-model",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           "--save-stats", "{w}/model/stats", *FAST], ("inside the input",)),
    Probe("save-stats-is-out",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           "--save-stats", "{t}/sub", *FAST], ("is one of this run's inputs",)),
    Probe("save-stats-unwritable",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           "--save-stats", UNWRITABLE, *FAST], ("Cannot write to",)),
    Probe("out-unwritable",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", UNWRITABLE,
           *FAST], ("Cannot write to",)),
    Probe("merge-stats-onto-input",
          ["merge-stats", "{w}/stats/memorized.stats.safetensors", "--out",
           "{w}/stats/memorized.stats.safetensors", "--overwrite"],
          ("is one of this run's inputs",)),
    Probe("merge-stats-same-file-twice",
          ["merge-stats", "{w}/stats/memorized.stats.safetensors",
           "{w}/stats/memorized.stats.safetensors", "--out", "{t}/merged.safetensors"],
          ("count its prompts twice",)),
    Probe("detect-out-is-prompts",
          ["detect", "--model", "{w}/model", "--prompts", "{w}/mem.txt", "--out", "{w}/mem.txt",
           "--overwrite"], ("is one of this run's inputs",)),
    Probe("malformed-model-index",
          ["locate", "--model", "{t}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           *FAST], ("model_index.json is not valid JSON",), _corrupt_model_index),
    Probe("model-index-is-a-list",
          ["locate", "--model", "{t}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           *FAST], ("holds a JSON list",), _list_model_index),
    Probe("bake-truncated-weights",
          ["bake", "--model", "{t}/model", "--subspace", "{w}/subspace", "--out", "{t}/out"],
          ("diffusion_pytorch_model.safetensors is not a readable weight file",
           "truncated"), _truncated_weights),
    Probe("unknown-device",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           "--device", "tpu9", *FAST], ("Unknown device 'tpu9'",)),
    Probe("height-not-multiple-of-8",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           "--height", "30", *FAST], ("--height must be a positive multiple of 8",)),
    Probe("guidance-nan",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           "--guidance-scale", "nan", *FAST], ("--guidance-scale must be a finite number",)),
    Probe("steps-zero",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--out", "{t}/sub",
           "--steps", "0", "--tau", "1"], ("--steps must be at least 1",)),
    Probe("generate-zero-images",
          ["generate", "--model", "{w}/model", "--out", "{t}/img.png", "--num-images", "0", "x"],
          ("--num-images",)),
    Probe("generate-zero-steps",
          ["generate", "--model", "{w}/model", "--out", "{t}/img.png", "--steps", "0", "x"],
          ("--steps must be at least 1",)),
    Probe("generate-width-not-multiple-of-8",
          ["generate", "--model", "{w}/model", "--out", "{t}/img.png", "--width", "33", "x"],
          ("--width must be a positive multiple of 8",)),
    Probe("locate-selects-nothing",
          ["locate", "--model", "{w}/model", "--memorized", "{w}/mem.txt", "--reference",
           "{w}/mem.txt", "--out", "{t}/sub", *FAST], ("No weight was selected", "--allow-empty")),
]


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_bad_input(probe: Probe, world: Path, tmp_path: Path) -> None:
    if probe.setup is not None:
        probe.setup(world, tmp_path)
    before_world, before_tmp = snapshot(world), snapshot(tmp_path)
    args = [a.replace("{w}", str(world)).replace("{t}", str(tmp_path)) for a in probe.args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == probe.status, result.output
    assert "Traceback" not in result.output
    for needle in probe.needles:
        assert needle in result.output, result.output
    assert snapshot(world) == before_world, "an input changed"
    assert snapshot(tmp_path) == before_tmp, "the probe wrote something"
    assert not leftovers(world) and not leftovers(tmp_path)


def test_locate_that_selects_nothing_can_be_allowed(world, tmp_path):
    result = CliRunner().invoke(cli, [
        "locate", "--model", str(world / "model"), "--memorized", str(world / "mem.txt"),
        "--reference", str(world / "mem.txt"), "--out", str(tmp_path / "sub"), "--allow-empty",
        *FAST])
    assert result.exit_code == 0, result.output
    # ... but an empty subspace is never baked into a model that would call itself sanitized.
    result = CliRunner().invoke(cli, ["bake", "--model", str(world / "model"), "--subspace",
                                      str(tmp_path / "sub"), "--out", str(tmp_path / "baked")])
    assert result.exit_code == 2 and "selects no weight" in result.output
    assert not (tmp_path / "baked").exists()


def test_bake_over_current_folder_of_other_files(world, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["bake", "--model", str(world / "model"), "--subspace",
                                      str(world / "subspace"), "--out", ".", "--overwrite"])
    assert result.exit_code == 2 and "was not written by memedit" in result.output
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_memedits_own_output(world, tmp_path):
    args = ["bake", "--model", str(world / "model"), "--subspace", str(world / "subspace"),
            "--out", str(tmp_path / "out")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0
    assert json.loads((tmp_path / "out" / MARKER_FILE).read_text())["kind"] == "sanitized-model"


def test_full_disk_names_the_path_and_free_space(world, tmp_path, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    result = CliRunner().invoke(cli, ["bake", "--model", str(world / "model"), "--subspace",
                                      str(world / "subspace"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"No space left while writing {tmp_path / 'out'}" in result.output
    assert "MB free" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_outputs_follow_the_umask(world, tmp_path):
    old = os.umask(0o027)
    try:
        result = CliRunner().invoke(cli, ["bake", "--model", str(world / "model"), "--subspace",
                                          str(world / "subspace"), "--out", str(tmp_path / "o")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o750
    for path in (tmp_path / "o").rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path


def test_stale_partial_of_a_killed_run_is_named_and_removed(world, tmp_path):
    stale = tmp_path / ".out.partial-abc123"
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "half.safetensors").write_bytes(b"\0" * 2**20)
    result = CliRunner().invoke(cli, ["bake", "--model", str(world / "model"), "--subspace",
                                      str(world / "subspace"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert f"removed {stale} (1.0 MB), left by an interrupted run" in result.output


def test_interrupted_swap_restores_the_previous_output(world, tmp_path):
    """Killed between moving the old output aside and moving the new one in: the old one
    comes back on the next run rather than being lost."""
    good = CliRunner().invoke(cli, ["bake", "--model", str(world / "model"), "--subspace",
                                    str(world / "subspace"), "--out", str(tmp_path / "keep")])
    assert good.exit_code == 0
    aside = tmp_path / ".out.old-xyz"
    aside.mkdir()
    (tmp_path / "keep").rename(aside / "out")
    result = CliRunner().invoke(cli, ["bake", "--model", str(world / "model"), "--subspace",
                                      str(world / "subspace"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "exists already" in result.output
    assert (tmp_path / "out" / MARKER_FILE).is_file() and not aside.exists()


# ------------------------------------------------------------------ the real command, processes


def memedit_process(*args: str | Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([*MEMEDIT, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_two_writers_one_is_refused(world, tmp_path):
    args = ("bake", "--model", world / "model", "--subspace", world / "subspace", "--out",
            tmp_path / "out")
    first, second = memedit_process(*args), memedit_process(*args)
    outcomes = sorted([(p.wait(120), p.communicate()) for p in (first, second)],
                      key=lambda o: o[0])
    (status_a, _), (status_b, (_, err_b)) = outcomes
    assert (status_a, status_b) == (0, 2), outcomes
    assert ("is writing" in err_b and "right now" in err_b) or "exists already" in err_b, err_b
    assert "Traceback" not in err_b
    assert (tmp_path / "out" / MARKER_FILE).is_file() and not leftovers(tmp_path)


def test_console_is_quiet_and_long_prompts_are_not_echoed(world, tmp_path):
    prompts = tmp_path / "long.txt"
    prompts.write_text("a red cat " * 5_000 + "\n")  # 50,000 characters, legal
    process = memedit_process("locate", "--model", world / "model", "--memorized", prompts,
                              "--out", tmp_path / "sub", *FAST)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Multiple distributions" not in err and "truncated" not in err, err
    assert len(err) < 5_000, err


def _wait_for(path_glob: Callable[[], list[Path]], process: subprocess.Popen,
              timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path_glob():
            return True
        time.sleep(0.002)
    return False


def _model_with_slow_copy(world: Path, tmp: Path) -> Path:
    """The tiny model plus two large inert files, so that a bake spends seconds copying:
    one copied first, one copied after the UNet weights (files are copied in sorted order)."""
    model = tmp / "model"
    shutil.copytree(world / "model", model)
    for path in (model / "a_large_file.dat", model / "unet" / "z_large_file.dat"):
        with open(path, "wb") as handle:
            handle.write(os.urandom(2**20) * 128)
    return model


KILL_POINTS = {
    # while the first file is being copied into the partial folder
    "copying": lambda part: list(part.parent.glob(f".{part.name}.partial-*/a_large_file.dat")),
    # after the UNet weights reached the partial folder, before the rename
    "unet-copied": lambda part: list(part.parent.glob(
        f".{part.name}.partial-*/unet/diffusion_pytorch_model.safetensors")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_bake_leaves_nothing_and_the_next_run_succeeds(world, tmp_path, sig, point):
    model = _model_with_slow_copy(world, tmp_path)
    before = snapshot(model)
    out = tmp_path / "out"
    process = memedit_process("bake", "--model", model, "--subspace", world / "subspace",
                              "--out", out)
    assert _wait_for(lambda: KILL_POINTS[point](out), process), process.communicate()
    process.send_signal(signal.SIGSTOP)  # hold it exactly here while the signal is queued
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert process.returncode == 130, err
        assert "interrupted; nothing was written" in err and "Traceback" not in err
        assert not leftovers(tmp_path)
    else:
        assert process.returncode == -signal.SIGKILL
    rerun = memedit_process("bake", "--model", model, "--subspace", world / "subspace",
                            "--out", out)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert ("left by an interrupted run" in err) == (sig == signal.SIGKILL)
    assert not leftovers(tmp_path) and (out / MARKER_FILE).is_file()
    assert snapshot(model) == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_export_leaves_nothing_and_the_next_run_succeeds(world, tmp_path, sig):
    out = tmp_path / "onnx"
    before = snapshot(world / "baked")
    process = memedit_process("export", "--onnx", world / "baked", "--out", out)
    # Killed once the UNet graph is written, while parity still runs.
    assert _wait_for(lambda: list(tmp_path.glob(".onnx.partial-*/unet/model.onnx")), process)
    process.send_signal(signal.SIGSTOP)
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=300)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in err, err
        assert not leftovers(tmp_path)
    rerun = memedit_process("export", "--onnx", world / "baked", "--out", out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert not leftovers(tmp_path) and (out / MARKER_FILE).is_file()
    assert snapshot(world / "baked") == before
