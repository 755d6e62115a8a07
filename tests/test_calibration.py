"""Calibration chooses the smallest k that meets the target on validation prompts only."""

from __future__ import annotations

import json

import pytest
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


def fake_measure(curve: dict[float, tuple[float, float]]):
    """A _measure stand-in: k (by zeroed count order) -> (copy rate, utility)."""
    calls = []

    def measure(pipe, masks, validation, ordinary, settings, scorer, threshold, clip):
        zeroed = 0 if masks is None else sum(int(m.sum()) for m in masks.values())
        calls.append((zeroed, validation.prompts))
        rate, utility = curve[len(calls) - 1]
        return rate, min(1.0, 2 * rate), 0.01, {"scene utility (all)": utility}

    return measure, calls


# Call 0 measures the original, call i the i-th k of (0.005, 0.01, 0.02, 0.05).
@pytest.mark.parametrize(("curve", "chosen"), [
    ({0: (0.9, 0.5), 1: (0.6, 0.5), 2: (0.3, 0.49), 3: (0.04, 0.48), 4: (0.0, 0.3)}, 0.02),
    ({0: (0.9, 0.5), 1: (0.05, 0.5), 2: (0.0, 0.5), 3: (0.0, 0.5)}, 0.005),
])
def test_chooses_the_smallest_k_that_meets_the_target(tiny_pipe, inputs, monkeypatch, curve,
                                                      chosen):
    memorized, ordinary = inputs
    measure, _ = fake_measure(curve)
    monkeypatch.setattr(calibration, "_measure", measure)
    located, validation = split_validation(memorized, 0.3)
    stats = record_statistics(tiny_pipe, located, CONFIG, progress=False)
    reference = record_statistics(tiny_pipe, memedit.empty_reference(1), CONFIG, progress=False)
    target = CalibrationConfig(0.05, ks=(0.005, 0.01, 0.02, 0.05))
    subspace, result = memedit.calibrate(tiny_pipe, stats, reference, validation, ordinary,
                                         CONFIG, target, progress=False)
    assert result.chosen_k == chosen == subspace.manifest["method"]["k"]
    record = subspace.manifest["calibration"]
    assert record["chosen_k"] == chosen and record["target_rate"] == 0.05
    assert [p["k"] for p in record["curve"]][-1] == chosen
    json.dumps(subspace.manifest)  # the manifest stays plain JSON


def test_refuses_when_no_k_fits_the_utility_budget(tiny_pipe, inputs, monkeypatch):
    memorized, ordinary = inputs
    measure, calls = fake_measure({0: (0.9, 0.5), 1: (0.5, 0.49), 2: (0.2, 0.40)})
    monkeypatch.setattr(calibration, "_measure", measure)
    located, validation = split_validation(memorized, 0.3)
    stats = record_statistics(tiny_pipe, located, CONFIG, progress=False)
    reference = record_statistics(tiny_pipe, memedit.empty_reference(1), CONFIG, progress=False)
    with pytest.raises(MemeditError, match=r"costs 0\.100 scene utility"):
        memedit.calibrate(tiny_pipe, stats, reference, validation, ordinary, CONFIG,
                          CalibrationConfig(0.05, ks=(0.01, 0.02, 0.05)), progress=False)
    assert len(calls) == 3  # stopped at the first k over budget, the larger one not tried


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
