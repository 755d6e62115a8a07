"""A hardened locate: a weight-zeroing edit meant to hold when the attacker optimizes the text
conditioning instead of typing a prompt.

Pruning what the memorized prompts lean on cuts the path those prompts take to their images;
the embedding attack (``memedit.evaluation.attack``, Finding Dori) finds another path through
weights the prompts never used. Hardening closes the paths the attack finds, in rounds:

1. locate as usual and take the edit;
2. attack the *edited* model on the locate prompts, towards their own training images, with
   every weight frozen: the optimized conditionings are triggers the edit left open;
3. record which FFN inputs those triggers lean on in the original model
   (``record_embedding_statistics``), add them to the memorized statistics (sums add), select
   again with the same k, and keep the union with the edit so far.

Only the locate prompts and their training images are read: the held-out prompts stay held
out. The result is an ordinary subspace (bakeable, exportable, audited); its manifest records
every round (attack budget, loss reached, weights added).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from memedit.errors import MemeditError
from memedit.evaluation.attack import (
    AttackConfig,
    check_targets,
    frozen,
    optimize_in_chunks,
    prompt_embeddings,
    target_latents,
)
from memedit.evaluation.harness import masks_applied
from memedit.locate import (
    LocateConfig,
    build_manifest,
    fingerprint,
    record_embedding_statistics,
    select_subspace,
    stored_weights,
)
from memedit.prompts import PromptSet
from memedit.statistics import ActivationStats
from memedit.subspace import Subspace
from memedit.targets import find_target_layers


def _hardening_attack() -> AttackConfig:
    # The budget that brings the default edit's copies back on the embedded model (lr 0.1
    # overshoots its small text encoder; see shared/attack.md), scored at the end only.
    return AttackConfig(lr=0.01, steps=50, checkpoints=())


@dataclass(frozen=True)
class HardenConfig:
    """``rounds`` of attack-and-relocate; ``attack`` is the attacker hardened against."""

    rounds: int = 2
    attack: AttackConfig = field(default_factory=_hardening_attack)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise MemeditError(f"--harden-rounds must be at least 1, got {self.rounds}.",
                               "Each round attacks the edit once and closes what it found.")

    def describe(self) -> dict:
        return {"rounds": self.rounds, "attack": self.attack.describe()}


def harden(pipe, memorized: PromptSet, stats_mem: ActivationStats, stats_ref: ActivationStats,
           config: LocateConfig, hardening: HardenConfig | None = None, source=None,
           progress: bool = True, stored: dict[str, torch.Tensor] | None = None) -> Subspace:
    """The subspace of ``config`` on ``stats_mem``/``stats_ref``, grown over
    ``hardening.rounds`` rounds by the weights the embedding attack's triggers lean on.

    ``memorized`` are the prompts ``stats_mem`` was recorded on, each with its training image.
    """
    hardening = hardening or HardenConfig()
    check_targets(memorized)
    if stored is None:  # read once: every round's selection and the manifest hash them
        stored = stored_weights(pipe, source, [layer.key for layer, _ in
                                               find_target_layers(pipe, config.targets)])
    masks = select_subspace(pipe, stats_mem, stats_ref, config, source, stored=stored).masks
    y_prompt = prompt_embeddings(pipe, memorized.prompts)
    z0 = target_latents(pipe, memorized, config.sampling)
    rounds = []
    for number in tqdm(range(1, hardening.rounds + 1), desc="hardening", unit="round",
                       disable=not progress):
        with frozen(pipe), masks_applied(pipe, masks):
            snapshots, losses = optimize_in_chunks(
                pipe, len(memorized), z0, hardening.attack,
                hardening.attack.seed + number * 1000, lambda chunk, _gens: y_prompt[chunk])
        # Recorded on the original weights, as the located statistics are: they add up, and
        # the Wanda scores weigh the original |W| by them.
        stats_attack = record_embedding_statistics(
            pipe, snapshots[hardening.attack.steps], f"attack-round-{number}", config, source,
            progress=False, model_hash=fingerprint(stored))
        stats_mem = stats_mem.merge(stats_attack)
        grown = select_subspace(pipe, stats_mem, stats_ref, config, source, stored=stored).masks
        before = sum(int(m.sum()) for m in masks.values())
        masks = {key: masks[key] | grown[key] for key in masks}
        after = sum(int(m.sum()) for m in masks.values())
        rounds.append({"round": number, "loss_start": float(losses[:, 0].mean()),
                       "loss_end": float(losses[:, -1].mean()), "zeroed_before": before,
                       "zeroed_after": after})
    manifest = build_manifest(pipe, source, masks, config, stats_mem, stats_ref, stored)
    manifest["hardening"] = hardening.describe() | {
        "prompts": {"name": memorized.name, "count": len(memorized),
                    "sha256": memorized.sha256},
        "rounds_run": rounds}
    return Subspace(masks, manifest)
