"""Hooked statistics against a hook-free brute force; streaming, stopping, merging."""

from __future__ import annotations

import pytest
import torch

from memedit.errors import MemeditError
from memedit.hooks import ActivationRecorder
from memedit.locate import LocateConfig, record_statistics, unet_calls_per_image
from memedit.prompts import PromptSet
from memedit.sampling import SamplingConfig
from memedit.statistics import ActivationStats, merge_stats
from memedit.targets import find_target_layers

PROMPTS = ["a red cat", "a blue dog", "the photo of a cat", "a painting"]


def config(**kwargs) -> LocateConfig:
    sampling = SamplingConfig(steps=6, guidance_scale=7.5, seed=3, batch_size=3)
    return LocateConfig(**({"tau": 4, "sampling": sampling} | kwargs))


def brute_force_sumsq(pipe, prompts, cfg, layer_names):
    """Run each prompt alone through the full loop, capturing raw inputs by replacing forward
    (no hooks), then sum normalised squares row by row in float64."""
    captured: dict[str, list] = {name: [] for name in layer_names}
    calls = {"n": 0}
    unet_forward = pipe.unet.forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        return unet_forward(*args, **kwargs)

    originals = {}
    for name in layer_names:
        module = pipe.unet.get_submodule(name)
        originals[name] = module.forward

        def capture(x, _name=name, _forward=module.forward):
            captured[_name].append((calls["n"] - 1, x.detach().clone()))
            return _forward(x)

        module.forward = capture
    pipe.unet.forward = counting_forward
    try:
        for prompt in prompts:
            calls["n"] = 0
            pipe(prompt, num_inference_steps=cfg.sampling.steps,
                 guidance_scale=cfg.sampling.guidance_scale,
                 generator=torch.Generator().manual_seed(cfg.sampling.seed), output_type="latent")
    finally:
        pipe.unet.forward = unet_forward
        for name, forward in originals.items():
            pipe.unet.get_submodule(name).forward = forward
    result = {}
    for name, items in captured.items():
        width = items[0][1].shape[-1]
        sums = torch.zeros(cfg.tau, width, dtype=torch.float64)
        for call, x in items:
            if call >= cfg.tau:
                continue
            for row in x.reshape(-1, width).double():
                sums[call] += (row / row.norm()) ** 2
        result[f"unet/{name}.weight"] = sums
    return result


def test_statistics_equal_brute_force_reference(tiny_pipe):
    cfg = config()
    stats = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS), cfg, progress=False)
    names = [layer.module_name for layer, _ in find_target_layers(tiny_pipe, cfg.targets)]
    expected = brute_force_sumsq(tiny_pipe, PROMPTS, cfg, names)
    assert stats.sumsq.keys() == expected.keys()
    for key, value in expected.items():
        assert stats.sumsq[key].dtype == torch.float32
        torch.testing.assert_close(stats.sumsq[key].double(), value, rtol=2e-5, atol=1e-6)


def test_denoising_stops_after_tau_unet_calls(tiny_pipe):
    cfg = config(tau=2)
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS), cfg, progress=False)
    finally:
        handle.remove()
    batches = 2  # 4 prompts in batches of 3
    assert unet_calls_per_image(tiny_pipe, cfg.sampling.steps) == 6
    # The pre-hook that stops the loop sees the (tau+1)-th call start, which never computes.
    assert len(calls) == batches * (cfg.tau + 1)


def test_memory_is_one_vector_per_call_and_layer(tiny_pipe):
    cfg = config()
    layers = find_target_layers(tiny_pipe, cfg.targets)
    recorder = ActivationRecorder(tiny_pipe, layers, cfg.tau)
    sizes = {key: tuple(v.shape) for key, v in recorder.sumsq.items()}
    stats = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS * 3), cfg, progress=False)
    assert {key: tuple(v.shape) for key, v in stats.sumsq.items()} == sizes
    assert all(shape[0] == cfg.tau for shape in sizes.values())


def test_batching_does_not_change_statistics(tiny_pipe):
    one = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS),
                            config(sampling=SamplingConfig(steps=6, seed=3, batch_size=1)),
                            progress=False)
    four = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS),
                             config(sampling=SamplingConfig(steps=6, seed=3, batch_size=4)),
                             progress=False)
    for key in one.sumsq:
        torch.testing.assert_close(one.sumsq[key], four.sumsq[key], rtol=1e-5, atol=1e-6)


def test_merged_statistics_equal_one_run(tiny_pipe, tmp_path):
    cfg = config()
    whole = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS), cfg, progress=False)
    first = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS[:3]), cfg, progress=False)
    second = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS[3:]), cfg,
                               progress=False)
    first.save(tmp_path / "a.safetensors")
    second.save(tmp_path / "b.safetensors")
    merged = merge_stats([ActivationStats.load(tmp_path / "a.safetensors"),
                          ActivationStats.load(tmp_path / "b.safetensors")])
    assert merged.num_prompts == whole.num_prompts == 4
    assert len(merged.prompt_sets) == 2
    for key in whole.sumsq:
        torch.testing.assert_close(merged.sumsq[key], whole.sumsq[key], rtol=1e-6, atol=1e-6)


def test_statistics_of_other_settings_do_not_merge(tiny_pipe):
    a = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS[:1]), config(),
                          progress=False)
    b = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS[:1]),
                          config(sampling=SamplingConfig(steps=8, seed=3)), progress=False)
    with pytest.raises(MemeditError, match="different settings"):
        a.merge(b)


def test_text_encoder_target_records_one_slot(tiny_pipe):
    cfg = config(targets=("text_mlp",))
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        stats = record_statistics(tiny_pipe, PromptSet.from_prompts(PROMPTS[:2]), cfg,
                                  progress=False)
    finally:
        handle.remove()
    assert len(stats.sumsq) == 3  # three CLIP layers
    assert all(v.shape[0] == 1 and v.sum() > 0 for v in stats.sumsq.values())
    assert len(calls) == 1  # stopped before the first UNet call computed anything
