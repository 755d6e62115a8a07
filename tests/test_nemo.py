"""NeMo, faithful: the pure math against brute force, and the loop on the tiny pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from memedit.evaluation.controls import (
    CopyCheck,
    channel_masks,
    channels_off,
    initial_selection,
    nemo_faithful,
    nemo_value_layers,
    reference_statistics,
    refine,
    threshold_schedule,
)
from memedit.evaluation.harness import masks_applied
from memedit.prompts import PromptRecord, PromptSet


def _z_brute(a: float, values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return abs(a - mean) / std


@pytest.mark.parametrize("seed", range(5))
def test_initial_selection_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    reference = {"down": rng.normal(size=(7, 12)), "mid": rng.normal(size=(7, 5))}
    prompt = {name: np.abs(rng.normal(scale=2.0, size=acts.shape[1]))
              for name, acts in reference.items()}
    prompt["down"][3] = prompt["down"][7]  # a tie: the lower index wins the top k
    statistics = reference_statistics(reference)
    for theta, k in [(5.0, 0), (1.5, 2), (0.5, 4), (3.0, 12)]:
        got = initial_selection(prompt, statistics, theta, k)
        for name, acts in prompt.items():
            columns = reference[name].T.tolist()
            outliers = {c for c in range(len(acts)) if _z_brute(acts[c], columns[c]) > theta}
            top = sorted(range(len(acts)), key=lambda c: (-abs(acts[c]), c))[:k]
            assert got[name] == tuple(sorted(outliers | set(top))), (name, theta, k)


def test_z_is_two_sided():
    reference = {"l": np.array([[1.0, 1.0], [3.0, 3.0]])}  # mean 2, std sqrt(2)
    got = initial_selection({"l": np.array([2.0 - 3.0, 2.0 + 3.0])}, reference_statistics(
        reference), theta=2.0, k=0)
    assert got["l"] == (0, 1)  # below the mean counts as much as above


def test_threshold_schedule_is_nemos():
    schedule = threshold_schedule()
    assert schedule[0] == (5.0, 0) and schedule[-1] == (1.25, 15) and len(schedule) == 16
    assert all(a[0] - b[0] == pytest.approx(0.25) and b[1] == a[1] + 1
               for a, b in itertools.pairwise(schedule))
    # NeMo's loop: decrement while above the minimum, stop once it is reached.
    theta, brute = 4.0, []
    while theta > 1.5:
        brute.append(theta)
        theta -= 0.3
    assert [t for t, _ in threshold_schedule(4.0, 0.3, 1.5)] == pytest.approx(brute)
    with pytest.raises(ValueError):
        threshold_schedule(1.0, 0.25, 1.0)


@pytest.mark.parametrize("needed", [{("a", 1)}, {("a", 1), ("b", 4)}, {("b", 0), ("b", 4)}])
def test_refinement_keeps_what_the_oracle_needs(needed):
    # The prompt stops copying exactly when every needed channel is off: the greedy pass must
    # find that set, whatever else the initial selection held.
    selection = {"a": (0, 1, 2), "b": (0, 3, 4), "c": (5,)}
    calls = []

    def clean(trial):
        calls.append(trial)
        return needed <= {(n, c) for n, cs in trial.items() for c in cs}

    refined = refine(selection, clean)
    assert {(n, c) for n, cs in refined.items() for c in cs} == needed
    kept_layers = {n for n, _ in needed}
    # One check per layer, then one per channel of the layers left.
    assert len(calls) == 3 + sum(len(selection[n]) for n in kept_layers)


def test_nemo_layers_and_deactivation_match_masks(tiny_pipe):
    layers = nemo_value_layers(tiny_pipe)
    assert layers and all(n.startswith(("down_blocks.", "mid_block.")) for n in layers)
    name, layer = next(iter(layers.items()))
    x = torch.randn(2, 3, layer.in_features)
    masks = channel_masks(layers, [(name, 1), (name, 5)])
    with torch.no_grad(), channels_off(layers, {name: (1, 5)}):
        hooked = layer(x)
    with torch.no_grad(), masks_applied(tiny_pipe, masks):
        zeroed = layer(x)
    assert torch.equal(hooked[..., [1, 5]], torch.zeros(2, 3, 2))
    torch.testing.assert_close(hooked, zeroed)
    with torch.no_grad():
        assert layer(x)[..., 1].abs().sum() > 0  # both restored


def test_nemo_faithful_loop_on_tiny_pipe(tiny_pipe):
    """The loop end to end, with a check that reads the hooked value layers: a prompt "copies"
    while the channels with the largest activation on it stay on."""
    layers = nemo_value_layers(tiny_pipe)
    memorized = PromptSet("mem", (PromptRecord("a red square"), PromptRecord("zz")), "test")
    reference = PromptSet("ref", tuple(PromptRecord(p) for p in (
        "a blue circle", "a green dog", "two cats", "a house", "the sea")), "test")
    name = next(iter(layers))
    embeds = tiny_pipe.encode_prompt(["a red square"], tiny_pipe.device, 1, False)[0]
    with torch.no_grad():
        acts = layers[name](embeds).abs().mean(dim=1)[0]
    target = int(acts.argmax())

    def level(record):
        with torch.no_grad():
            out = layers[name](tiny_pipe.encode_prompt([record.prompt], tiny_pipe.device, 1,
                                                       False)[0])
        return float(out[..., target].abs().mean()) if record.prompt != "zz" else 0.0

    check = CopyCheck(level, 1e-6, "test check")
    selection = nemo_faithful(tiny_pipe, memorized, reference, check)
    info = selection.settings
    assert info["mode"] == "faithful" and info["method"].startswith("NeMo (simplified: ")
    assert info["prompts_copying_unedited"] == 1 and info["prompts_stopped"] == 1
    # Refinement leaves exactly the one channel the check depends on.
    assert info["unique_channels"] == 1
    key = f"unet/{name}.weight"
    assert set(selection.masks) == {key}
    assert selection.masks[key].sum() == layers[name].in_features
    assert selection.masks[key][target].all()
    skipped = info["per_prompt"][1]
    assert not skipped["copies_unedited"] and skipped["refined_channels"] == 0


def test_detector_ddim_over_every_step(tiny_pipe):
    """--detector-scheduler ddim: DDIM for the detector's run only, every step recorded."""
    from diffusers import EulerDiscreteScheduler

    from memedit.evaluation.detector import DetectorConfig, scheduler_name, text_noise_magnitudes
    from memedit.sampling import SamplingConfig

    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    own = tiny_pipe.scheduler
    sampling = SamplingConfig(steps=4, guidance_scale=5.0)
    ddim = DetectorConfig(None, sampling, "ddim")
    got = text_noise_magnitudes(tiny_pipe, ["a red cat"], [1], ddim)
    assert got.shape == (1, 4) and tiny_pipe.scheduler is own
    assert scheduler_name(tiny_pipe, ddim) == "DDIMScheduler"
    assert scheduler_name(tiny_pipe, DetectorConfig(2, sampling)) == "EulerDiscreteScheduler"
    euler = text_noise_magnitudes(tiny_pipe, ["a red cat"], [1], DetectorConfig(None, sampling))
    assert not np.allclose(got, euler)  # the sampler did change


@pytest.mark.slow
def test_nemo_faithful_on_embedded_model_keeps_what_its_selection_reached():
    """On the embedded model, NeMo's refinement never gives back what its initial selection
    reached: with the refined channels off, each copying prompt is at or below the copy limit
    where the schedule got it there, else at or below the level the schedule reached (its
    own rule), and only down/mid value layers are touched. (On this model the schedule stops
    few prompts, see the README, so the test does not assume it does.)"""
    from memedit import load_pipeline, read_prompts
    from memedit.evaluation.controls import image_copy_check
    from memedit.evaluation.similarity import Scorer
    from memedit.sampling import SamplingConfig
    from memedit.testbed import prompt_file

    pipe, _ = load_pipeline(None, "cpu", "float32")
    memorized = read_prompts(prompt_file("memorized_locate")).subset(range(2))
    reference = read_prompts(prompt_file("ordinary_seen"))
    check = image_copy_check(pipe, SamplingConfig(steps=10), (0,), Scorer("mse"), 0.01)
    selection = nemo_faithful(pipe, memorized, reference, check)
    info = selection.settings
    assert info["prompts_copying_unedited"] >= 1
    assert info["unique_channels"] <= info["channels_initial"] and info["channels_initial"] > 0
    assert all(k.startswith(("unet/down_blocks.", "unet/mid_block.")) for k in selection.masks)
    with masks_applied(pipe, selection.masks):
        for trace, record in zip(info["per_prompt"], memorized.records, strict=True):
            if trace["copies_unedited"]:
                reached = check.limit if trace["stopped_copying"] else trace["level_initial"]
                assert check(record) <= reached + 1e-9, trace
