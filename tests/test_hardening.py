"""Hardening grows the located edit by what the embedding attack leans on, and nothing else."""

from __future__ import annotations

import pytest
import torch

import memedit
from memedit.errors import MemeditError
from memedit.evaluation.attack import AttackConfig
from memedit.hardening import HardenConfig, harden
from memedit.locate import LocateConfig, record_embedding_statistics, record_statistics
from memedit.prompts import read_prompts
from memedit.sampling import SamplingConfig
from memedit.testbed import prompt_file

CONFIG = LocateConfig(k=0.02, tau=2, sampling=SamplingConfig(steps=4, batch_size=8))
QUICK = HardenConfig(rounds=2, attack=AttackConfig(lr=0.05, steps=3, pairs=2, checkpoints=()))


@pytest.fixture()
def located(tiny_pipe):
    memorized = read_prompts(prompt_file("memorized_locate")).subset(range(4), "mem4")
    stats = record_statistics(tiny_pipe, memorized, CONFIG, progress=False)
    reference = record_statistics(tiny_pipe, memedit.empty_reference(1), CONFIG, progress=False)
    return memorized, stats, reference


def test_hardened_edit_contains_the_plain_one_and_records_its_rounds(tiny_pipe, located):
    memorized, stats, reference = located
    before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    plain = memedit.select_subspace(tiny_pipe, stats, reference, CONFIG)
    hardened = harden(tiny_pipe, memorized, stats, reference, CONFIG, QUICK, progress=False)
    for key, mask in plain.masks.items():
        assert bool((hardened.masks[key] | mask).eq(hardened.masks[key]).all()), key
    rounds = hardened.manifest["hardening"]["rounds_run"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["zeroed_before"] == plain.num_selected
    assert rounds[-1]["zeroed_after"] == hardened.num_selected >= plain.num_selected
    assert hardened.manifest["hardening"]["prompts"]["sha256"] == memorized.sha256
    # The attack and the edit were applied in memory only: every weight is as it was.
    for name, param in tiny_pipe.unet.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None


def test_embedding_statistics_match_prompt_statistics_for_the_prompts_own_embeddings(
        tiny_pipe, located):
    """Recording from y = the text encoder's output is recording from the prompt."""
    memorized, stats, _ = located
    embeds = tiny_pipe.encode_prompt(memorized.prompts, tiny_pipe.device, 1, False)[0]
    from_embeds = record_embedding_statistics(tiny_pipe, embeds, "y", CONFIG, progress=False)
    for key, value in stats.sumsq.items():
        assert torch.allclose(from_embeds.sumsq[key], value, rtol=1e-4, atol=1e-6), key
    assert from_embeds.num_prompts == len(memorized)


def test_text_encoder_targets_cannot_be_hardened(tiny_pipe):
    config = LocateConfig(targets=("text_mlp",), k=0.02, tau=1,
                          sampling=SamplingConfig(steps=4))
    embeds = torch.zeros(1, 77, tiny_pipe.text_encoder.config.hidden_size)
    with pytest.raises(MemeditError, match="bypass the text encoder"):
        record_embedding_statistics(tiny_pipe, embeds, "y", config, progress=False)


def test_prompts_without_training_images_are_refused(tiny_pipe, located):
    _, stats, reference = located
    bare = memedit.PromptSet.from_prompts(["a red cat"])
    with pytest.raises(MemeditError, match="name no training image"):
        harden(tiny_pipe, bare, stats, reference, CONFIG, QUICK, progress=False)


def test_bad_rounds():
    with pytest.raises(MemeditError, match="--harden-rounds must be at least 1"):
        HardenConfig(rounds=0)
