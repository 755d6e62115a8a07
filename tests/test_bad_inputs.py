"""Every bad input gets a clear error that names the problem and the fix (API and CLI)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import memedit
from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.sampling import SamplingConfig
from memedit.testing import save_tiny_pipeline

FAST = ["--steps", "4", "--tau", "2", "--k", "0.05"]


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "mem.txt"
    path.write_text("a red cat\na blue dog\n")
    return path


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "does not exist"), (b"", "is empty"), (b"\xff\xfe\xfa caf\xe9\n", "not UTF-8"),
     (b"\n   \n\t\n", "every line is blank")],
    ids=["missing", "empty", "not-utf8", "blank-lines"],
)
def test_bad_prompt_files(tiny_model_dir, tmp_path, content, needle):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MemeditError, match=needle):
        memedit.read_prompts(path)
    assert_user_error(run("locate", "--model", tiny_model_dir, "--memorized", path,
                          "--out", tmp_path / "sub", *FAST), needle)


@pytest.mark.parametrize("k", ["0", "-0.1", "1.5"])
def test_k_outside_unit_interval(tiny_model_dir, prompts, tmp_path, k):
    result = run("locate", "--model", tiny_model_dir, "--memorized", prompts, "--out",
                 tmp_path / "sub", "--steps", "4", "--tau", "2", "--k", k)
    assert_user_error(result, "k must be in (0, 1]")


def test_tau_larger_than_steps(tiny_model_dir, prompts, tmp_path):
    result = run("locate", "--model", tiny_model_dir, "--memorized", prompts, "--out",
                 tmp_path / "sub", "--steps", "4", "--tau", "9")
    assert_user_error(result, "tau = 9 exceeds the 4 UNet calls", "--tau")


def test_folder_that_is_not_a_pipeline(prompts, tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "config.json").write_text("{}")
    result = run("locate-and-bake", "--model", tmp_path / "notamodel", "--memorized", prompts,
                 "--out", tmp_path / "out", *FAST)
    assert_user_error(result, "not a diffusers pipeline folder", "model_index.json")
    assert_user_error(run("locate-and-bake", "--model", tmp_path / "nope", "--memorized",
                          prompts, "--out", tmp_path / "out"), "does not exist")


def test_unet_without_transformer_blocks(prompts, tmp_path):
    folder = save_tiny_pipeline(tmp_path / "plain", with_transformer_blocks=False)
    result = run("locate-and-bake", "--model", folder, "--memorized", prompts, "--out",
                 tmp_path / "out", *FAST)
    assert_user_error(result, "no transformer blocks", "BasicTransformerBlock")


def test_pickled_checkpoint_is_refused_unless_allowed(tiny_model_dir, prompts, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    result = run("locate-and-bake", "--model", folder, "--memorized", prompts, "--out",
                 tmp_path / "out", *FAST)
    assert_user_error(result, "pickled", "--allow-pickle")
    result = run("locate-and-bake", "--model", folder, "--memorized", prompts, "--out",
                 tmp_path / "out", "--allow-pickle", *FAST)
    assert result.exit_code == 0, result.output
    # The output is safe to load: the pickle became safetensors.
    assert (tmp_path / "out/unet/diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "out/unet/diffusion_pytorch_model.bin").exists()


def test_hub_id_missing_from_cache_offline(prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run("locate-and-bake", "--model", "nobody/not-a-model", "--memorized", prompts,
                 "--out", tmp_path / "out", *FAST)
    assert_user_error(result, "not in the local Hugging Face cache", "HF_HUB_OFFLINE")


def test_subspace_for_another_model(tiny_model_dir, prompts, tmp_path):
    assert run("locate", "--model", tiny_model_dir, "--memorized", prompts, "--out",
               tmp_path / "sub", *FAST).exit_code == 0
    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    result = run("bake", "--model", other, "--subspace", tmp_path / "sub", "--out",
                 tmp_path / "out")
    assert_user_error(result, "differs from the weights the subspace was located on")
    manifest = json.loads((tmp_path / "sub" / "subspace.json").read_text())
    assert manifest["model"]["spec"] == str(tiny_model_dir)
    assert not (tmp_path / "out").exists()


def test_output_inside_the_source_model(tiny_model_dir, prompts, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    result = run("locate-and-bake", "--model", folder, "--memorized", prompts, "--out",
                 folder / "sanitized", *FAST)
    assert_user_error(result, "inside the input")
    result = run("locate-and-bake", "--model", folder, "--memorized", prompts, "--out",
                 tmp_path, "--overwrite", *FAST)
    assert_user_error(result, "contains the input")
    assert (folder / "model_index.json").is_file()


def test_existing_output(tiny_model_dir, prompts, tmp_path):
    (tmp_path / "out").mkdir()
    result = run("locate-and-bake", "--model", tiny_model_dir, "--memorized", prompts,
                 "--out", tmp_path / "out", *FAST)
    assert_user_error(result, "exists already", "--overwrite")


def test_read_only_output_location(tiny_model_dir, prompts, tmp_path):
    if os.geteuid() == 0:
        # Permission bits do not stop root; sysfs refuses new folders even to root.
        location = Path("/sys/memedit-test-output")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        location = locked / "out"
    result = run("locate-and-bake", "--model", tiny_model_dir, "--memorized", prompts,
                 "--out", location, *FAST)
    assert_user_error(result, "Cannot write to")


def test_unknown_target_and_bad_jsonl(tiny_model_dir, prompts, tmp_path):
    result = run("locate", "--model", tiny_model_dir, "--memorized", prompts, "--out",
                 tmp_path / "sub", "--targets", "ff_out,bogus", *FAST)
    assert_user_error(result, "Unknown target bogus")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": broken}\n')
    with pytest.raises(MemeditError, match="line 2: not valid JSON"):
        memedit.read_prompts(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"title": "x"}\n')
    with pytest.raises(MemeditError, match="no prompt field"):
        memedit.read_prompts(nofield)


def test_not_a_subspace_folder(tmp_path):
    result = run("bake", "--subspace", tmp_path, "--out", tmp_path / "out",
                 "--model", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_api_raises_on_tau_beyond_steps(tiny_pipe):
    config = memedit.LocateConfig(tau=20, sampling=SamplingConfig(steps=5))
    with pytest.raises(MemeditError, match="exceeds"):
        memedit.locate(tiny_pipe, memedit.PromptSet.from_prompts(["x"]), config=config,
                       progress=False)
