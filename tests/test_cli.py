"""The command line as a user runs it: JSON output, saved statistics, inspect, compare."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from memedit.cli import cli

FAST = ["--steps", "4", "--tau", "2", "--k", "0.05", "--batch-size", "2"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code in (0, 1), result.output
    return result


def last_json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def test_locate_and_bake_json_then_inspect(tiny_model_dir, tmp_path):
    prompts = tmp_path / "mem.jsonl"
    prompts.write_text('{"prompt": "a red cat"}\n{"caption": "a blue dog"}\n')
    result = run("locate-and-bake", "--model", tiny_model_dir, "--memorized", prompts,
                 "--out", tmp_path / "out", "--json", *FAST)
    summary = last_json(result.stdout)
    assert summary["sanitized_model"] == str(tmp_path / "out")
    assert summary["total"]["selected"] > 0
    assert summary["method"]["k"] == 0.05 and summary["prompts"]["memorized"][0]["count"] == 2
    assert summary["edited_files"] == ["unet/diffusion_pytorch_model.safetensors"]

    inspected = last_json(run("inspect", tmp_path / "out", "--json").stdout)
    assert inspected["verification"]["ok"]
    assert inspected["verification"]["zeroed"] == summary["total"]["selected"]

    # Tamper with one weight that the subspace did not zero: inspect must catch it.
    weights = tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("ff.net.2.bias"))
    state[name] = state[name] + 1.0
    save_file(state, str(weights))
    result = run("inspect", tmp_path / "out")
    assert result.exit_code == 1
    assert f"{name} was modified but is not masked" in result.output


def test_saved_statistics_reproduce_the_subspace(tiny_model_dir, tmp_path):
    prompts = tmp_path / "mem.txt"
    prompts.write_text("a red cat\na blue dog\nthe photo\n")
    run("locate", "--model", tiny_model_dir, "--memorized", prompts, "--out", tmp_path / "a",
        "--save-stats", tmp_path / "stats", *FAST)
    run("locate", "--model", tiny_model_dir, "--out", tmp_path / "b",
        "--memorized-stats", tmp_path / "stats" / "memorized.stats.safetensors",
        "--reference-stats", tmp_path / "stats" / "reference.stats.safetensors", *FAST)
    compared = last_json(run("compare", tmp_path / "a", tmp_path / "b", "--json").stdout)
    assert compared["total"]["iou"] == 1.0

    others = tmp_path / "others.txt"
    others.write_text("a green bird\n")
    run("locate", "--model", tiny_model_dir, "--memorized", others, "--out", tmp_path / "c",
        "--save-stats", tmp_path / "stats-others", *FAST)
    merged = last_json(run("merge-stats", tmp_path / "stats" / "memorized.stats.safetensors",
                           tmp_path / "stats-others" / "memorized.stats.safetensors",
                           "--out", tmp_path / "merged.safetensors", "--json").stdout)
    assert merged["num_prompts"] == 4
    # The same prompts twice would count them twice: refused.
    same = str(tmp_path / "stats" / "memorized.stats.safetensors")
    twice = CliRunner().invoke(cli, ["merge-stats", same, same, "--out",
                                     str(tmp_path / "twice.safetensors")])
    assert twice.exit_code == 2 and "count its prompts twice" in twice.output
    assert not (tmp_path / "twice.safetensors").exists()


def test_locate_several_targets_and_neuron_granularity(tiny_model_dir, tmp_path):
    prompts = tmp_path / "mem.txt"
    prompts.write_text("a red cat\na blue dog\n")
    result = run("locate", "--model", tiny_model_dir, "--memorized", prompts, "--out",
                 tmp_path / "sub", "--targets", "ff_out,attn2_v,text_mlp",
                 "--granularity", "neuron", "--json", *FAST)
    layers = last_json(result.stdout)["layers"]
    assert any(k.endswith("ff.net.2.weight") for k in layers)
    assert any(k.endswith("attn2.to_v.weight") for k in layers)
    assert any(k.startswith("text_encoder/") and k.endswith("mlp.fc2.weight") for k in layers)
    from memedit.subspace import Subspace

    for mask in Subspace.load(tmp_path / "sub").masks.values():
        columns = mask.any(dim=0)
        assert torch.equal(mask, columns.unsqueeze(0).expand_as(mask))
