"""Calibration chooses the smallest k that meets the target on validation prompts only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import memedit
from memedit import calibration
from memedit.calibration import CalibrationConfig, split_validation
from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.locate import LocateConfig, record_statistics
from memedit.prompts import read_prompts
from memedit.sampling import SamplingConfig
from memedit.testbed import prompt_file

CONFIG = LocateConfig(k=0.05, tau=2, sampling=SamplingConfig(steps=4, batch_size=8))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The embedded model's prompt files, on the tiny pipeline (shapes only: fast)."""
    memorized = read_prompts(prompt_file("memorized_locate"))
    ordinary = read_prompts(prompt_file("ordinary_seen")).subset(range(4), "ordinary")
    return memorized, ordinary


def fake_measures(monkeypatch, rates: list[float], utilities: dict[int, float]):
    """Stand-ins for the two measurements: the n-th copy measurement gives ``rates[n]`` (n = 0
    is the original); the utility of the original is 0.5, of the chosen k ``utilities[n]``."""
    calls = {"copies": 0, "utility": []}

    def copies(pipe, masks, validation, settings, scorer, threshold, attack):
        rate = rates[calls["copies"]]
        calls["copies"] += 1
        return rate, min(1.0, 2 * rate), 0.01

    def utility(pipe, masks, ordinary, settings, clip):
        calls["utility"].append(calls["copies"] - 1)
        value = 0.5 if masks is None else utilities[calls["copies"] - 1]
        return "scene utility (overall)", np.full(8, value) + np.linspace(-0.01, 0.01, 8)

    monkeypatch.setattr(calibration, "copy_rates", copies)
    monkeypatch.setattr(calibration, "utility_values", utility)
    return calls


@pytest.fixture()
def statistics(tiny_pipe, inputs):
    memorized, _ = inputs
    located, validation = split_validation(memorized, 0.3)
    stats = record_statistics(tiny_pipe, located, CONFIG, progress=False)
    reference = record_statistics(tiny_pipe, memedit.empty_reference(1), CONFIG, progress=False)
    return stats, reference, validation


# Copy measurement 0 is the original, n the n-th k of (0.005, 0.01, 0.02, 0.05).
@pytest.mark.parametrize(("rates", "chosen"), [
    ([0.9, 0.6, 0.3, 0.04, 0.0], 0.02),
    ([0.9, 0.05, 0.0, 0.0, 0.0], 0.005),
])
def test_chooses_the_smallest_k_that_meets_the_target(tiny_pipe, inputs, statistics,
                                                      monkeypatch, rates, chosen):
    calls = fake_measures(monkeypatch, rates, {n: 0.49 for n in range(5)})
    stats, reference, validation = statistics
    target = CalibrationConfig(0.05, ks=(0.005, 0.01, 0.02, 0.05))
    subspace, result = memedit.calibrate(tiny_pipe, stats, reference, validation, inputs[1],
                                         CONFIG, target, progress=False)
    assert result.chosen_k == chosen == subspace.manifest["method"]["k"]
    # Utility is measured for the original and the chosen k only: it is the costly part.
    assert calls["utility"] == [-1, target.ks.index(chosen) + 1]
    record = subspace.manifest["calibration"]
    assert record["chosen_k"] == chosen and record["target_rate"] == 0.05
    assert record["curve"][-1]["utility_drop"] == pytest.approx(0.01)
    assert record["curve"][-1]["utility_drop_se"] == pytest.approx(0.0)
    assert "<- chosen" in result.table()
    json.dumps(subspace.manifest)  # the manifest stays plain JSON


def test_refuses_when_the_smallest_k_that_works_costs_too_much(tiny_pipe, inputs, statistics,
                                                               monkeypatch):
    calls = fake_measures(monkeypatch, [0.9, 0.5, 0.0, 0.0], {2: 0.40})
    stats, reference, validation = statistics
    with pytest.raises(MemeditError, match=r"0\.01, costs 0\.100 \(± 0\.000\) scene"):
        memedit.calibrate(tiny_pipe, stats, reference, validation, inputs[1], CONFIG,
                          CalibrationConfig(0.05, ks=(0.005, 0.01, 0.05)), progress=False)
    assert calls["copies"] == 3  # no larger k is tried


def test_refuses_when_no_k_removes_the_copies(tiny_pipe, inputs, statistics, monkeypatch):
    fake_measures(monkeypatch, [0.9, 0.8, 0.7], {})
    stats, reference, validation = statistics
    with pytest.raises(MemeditError, match=r"the largest k = 0\.02 still copies 0\.70"):
        memedit.calibrate(tiny_pipe, stats, reference, validation, inputs[1], CONFIG,
                          CalibrationConfig(0.05, ks=(0.01, 0.02)), progress=False)


def test_never_reads_the_held_out_prompts(tiny_pipe, inputs, monkeypatch):
    """Every prompt calibration generates is a validation or ordinary prompt; the located
    prompts, and the held-out file, never appear."""
    memorized, ordinary = inputs
    heldout = set(read_prompts(prompt_file("memorized_heldout")).prompts)
    seen = []
    real = calibration.generate_images

    def spy(pipe, prompts, seeds, config, progress=None):
        seen.extend(prompts)
        return real(pipe, prompts, seeds, config, progress)

    monkeypatch.setattr(calibration, "generate_images", spy)
    target = CalibrationConfig(0.5, ks=(0.05,), utility_budget=1.0, seeds=(1,))
    located, validation = split_validation(memorized, target.validation_fraction)
    subspace = memedit.locate(tiny_pipe, memorized, config=CONFIG, target=target,
                              ordinary=ordinary.subset(range(2)), progress=False)
    assert seen and not set(seen) & heldout
    assert not set(seen) & set(located.prompts)
    assert set(seen) <= set(validation.prompts) | set(ordinary.prompts)
    assert subspace.manifest["calibration"]["validation"]["sha256"] == validation.sha256


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"target_rate": 1.5}, "--target-rate must be in"),
    ({"target_rate": 0.1, "ks": (0.02, 0.01)}, "increasing"),
    ({"target_rate": 0.1, "utility_budget": -1}, "--utility-budget"),
    ({"target_rate": 0.1, "validation_fraction": 1.0}, "--validation-fraction"),
])
def test_bad_calibration_settings(kwargs, needle):
    with pytest.raises(MemeditError, match=needle):
        CalibrationConfig(**kwargs)


def test_cli_target_rate_needs_prompts_with_images(tiny_model_dir, tmp_path):
    prompts = tmp_path / "mem.txt"
    prompts.write_text("a red cat\na blue dog\nthe photo\nof a dog\n")
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("a cat\n")
    result = CliRunner().invoke(cli, [
        "locate-and-bake", "--model", str(tiny_model_dir), "--memorized", str(prompts),
        "--ordinary", str(ordinary), "--target-rate", "0.05", "--out", str(tmp_path / "out"),
        "--steps", "4", "--tau", "2"])
    assert result.exit_code == 2, result.output
    assert "name none" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_copies_under_attack_leave_the_weights_as_they_were(tiny_pipe, inputs):
    """--under-attack measures the validation copies from the attack's embeddings, against
    the candidate edit applied in memory; nothing of either stays behind."""
    from memedit.evaluation.attack import AttackConfig
    from memedit.evaluation.harness import EvalSettings
    from memedit.evaluation.similarity import Scorer

    memorized, _ = inputs
    validation = memorized.subset(range(2), "validation")
    before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    masks = {key: torch.rand(p.shape) < 0.05 for key, p in (
        ("unet/" + n, p) for n, p in tiny_pipe.unet.named_parameters()
        if n.endswith("ff.net.2.weight"))}
    settings = EvalSettings(sampling=SamplingConfig(steps=4), seeds=(1,), progress=False)
    attack = AttackConfig(lr=0.05, steps=2, pairs=1, checkpoints=())
    rate, near, median = calibration.copy_rates(tiny_pipe, masks, validation, settings,
                                                Scorer("mse"), 0.01, attack)
    assert 0 <= rate <= near <= 1 and median > 0
    for name, param in tiny_pipe.unet.named_parameters():
        assert torch.equal(param, before[name]) and param.grad is None, name
