"""Calibration: choose k from the copy rate a user can accept, instead of guessing it.

How far one k goes depends on the model (the embedded model's builds differ by seed), so
``locate-and-bake --target-rate R`` measures it. The statistics are recorded once (they do not
depend on k, as in ``sweep``); then for each k of a grid, smallest first, the selected edit is
applied in memory and judged on a *validation* part of the memorized prompts, split off the
prompts it is located on, never the held-out ones a later ``evaluate`` reports: the smallest k
whose validation copy rate is at most R is chosen, provided its cost in utility on ordinary
prompts stays within a budget. Otherwise nothing is written and the curve says why.

Copies are cheap to measure (a few validation prompts); utility is not (it needs many ordinary
generations to be outside the noise of a 0.03 budget), so it is measured for the original and
for the chosen k only: a larger k zeroes a superset of the weights, so when the smallest k that
removes the copies costs too much, no larger one is tried.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from memedit.errors import MemeditError
from memedit.evaluation.attack import AttackConfig, attack_group, frozen, prompt_embeddings
from memedit.evaluation.harness import (
    EvalSettings,
    check_ground_truths,
    masks_applied,
    score_group,
    split_memorized,
)
from memedit.evaluation.similarity import Scorer
from memedit.evaluation.utility import CLIPScorer, headline, scene_scorer
from memedit.locate import LocateConfig, select_subspace
from memedit.prompts import PromptSet
from memedit.sampling import generate_images
from memedit.statistics import ActivationStats
from memedit.subspace import Subspace

DEFAULT_KS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1)


@dataclass(frozen=True)
class CalibrationConfig:
    """What "sanitized enough" means, and how it is measured.

    ``target_rate``: the highest copy rate accepted on the validation prompts (share of
    generations within the copy threshold of their training image). ``utility_budget``: the
    largest drop in the utility figure (scene utility with the embedded model's scenes, else
    the CLIP score) from the original that is accepted. ``seeds``: per validation prompt;
    ``ordinary_seeds``: per ordinary prompt (the utility is compared image by image, paired
    by prompt and seed, and its standard error reported).
    """

    target_rate: float
    ks: tuple[float, ...] = DEFAULT_KS
    utility_budget: float = 0.03
    validation_fraction: float = 0.3
    seeds: tuple[int, ...] = (100, 101, 102, 103)
    ordinary_seeds: tuple[int, ...] = (100, 101, 102, 103)
    threshold: float = 0.01  # pixel MSE, as `evaluate`'s default measure
    # With an attack, the copy rate is measured under it: the validation prompts' embeddings
    # are optimized towards their own training images against each candidate edit.
    attack: AttackConfig | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.target_rate < 1:
            raise MemeditError(f"--target-rate must be in [0, 1), got {self.target_rate}.",
                               "It is the copy rate you accept, e.g. 0.05.")
        if not self.ks or any(not 0 < k <= 1 for k in self.ks) or list(self.ks) != sorted(
                set(self.ks)):
            raise MemeditError(f"The k grid must be increasing values in (0, 1], got "
                               f"{list(self.ks)}.", "For example 0.005,0.01,0.02,0.03.")
        if self.utility_budget < 0:
            raise MemeditError(f"--utility-budget must be >= 0, got {self.utility_budget}.",
                               "It is the utility drop you accept, e.g. 0.03.")
        if not 0 < self.validation_fraction < 1:
            raise MemeditError(f"--validation-fraction must be in (0, 1), got "
                               f"{self.validation_fraction}.", "For example 0.3.")
        if not self.seeds or not self.ordinary_seeds:
            raise MemeditError("Calibration needs at least one seed.",
                               "Pass --calibration-seeds 4.")




@dataclass(frozen=True)
class CalibrationPoint:
    """One k on the curve (k = 0 is the original model). Utility is measured for the
    original and the k that meets the target only (None elsewhere)."""

    k: float
    zeroed: int
    copy_rate: float
    near_copy_rate: float  # within twice the threshold: what an attacker starts from
    median_mse: float
    utility: float | None = None
    utility_drop: float | None = None  # original minus this k, paired image by image
    utility_drop_se: float | None = None


@dataclass
class Calibration:
    """The curve, the choice and everything that decided it (stored in the manifest)."""

    config: CalibrationConfig
    utility_name: str
    validation: dict
    points: list[CalibrationPoint] = field(default_factory=list)
    chosen_k: float | None = None

    def to_dict(self) -> dict:
        return {"target_rate": self.config.target_rate,
                "utility_budget": self.config.utility_budget,
                "utility": self.utility_name, "measure": f"pixel MSE < {self.config.threshold}",
                "under_attack": None if self.config.attack is None
                else self.config.attack.describe(),
                "seeds": list(self.config.seeds),
                "ordinary_seeds": list(self.config.ordinary_seeds), "ks": list(self.config.ks),
                "validation": self.validation, "chosen_k": self.chosen_k,
                "curve": [asdict(p) for p in self.points]}

    def table(self) -> str:
        return calibration_table(self.to_dict())


def calibration_table(record: dict) -> str:
    """The curve of a calibration record (as stored in a manifest) as a readable table."""
    from tabulate import tabulate

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [["original" if p["k"] == 0 else f"{p['k']:g}", f"{p['zeroed']:,}",
             f"{p['copy_rate']:.2f}", f"{p['near_copy_rate']:.2f}", f"{p['median_mse']:.4f}",
             number(p["utility"], ".3f"),
             "-" if p["utility_drop"] is None or p["k"] == 0 else
             f"{p['utility_drop']:+.3f} ± {p['utility_drop_se']:.3f}",
             "<- chosen" if p["k"] == record["chosen_k"] else ""]
            for p in record["curve"]]
    copies = "copies" if record.get("under_attack") is None else "copies under attack"
    return tabulate(rows, headers=["k", "zeroed", copies, "near", "median MSE",
                                   record["utility"], "drop ± s.e.", ""])


def split_validation(memorized: PromptSet, fraction: float) -> tuple[PromptSet, PromptSet]:
    """The last ``fraction`` of the memorized prompts validates; the rest is located on."""
    return split_memorized(memorized, 1 - fraction)


def copy_rates(pipe, masks, validation: PromptSet, settings: EvalSettings, scorer: Scorer,
               threshold: float,
               attack: AttackConfig | None = None) -> tuple[float, float, float]:
    """Copy rate, near-copy rate and median pixel MSE of the validation generations: from
    the prompts, or with ``attack`` from the embeddings the attack found against the edit."""
    with masks_applied(pipe, masks):
        if attack is None:
            prompts = [p for p in validation.prompts for _ in settings.seeds]
            seeds = [s for _ in validation.prompts for s in settings.seeds]
            images = generate_images(pipe, prompts, seeds, settings.sampling)
            scores = score_group(images, validation, settings, {"mse": scorer})
        else:
            with frozen(pipe):
                run = attack_group(pipe, validation, "target", attack, settings,
                                   {"mse": scorer}, None, prompt_embeddings(pipe, [""]),
                                   scored=(attack.steps,))
            scores = run.scores[attack.steps]
    table = np.array([row["mse"] for row in scores["per_prompt"]])
    return (float((table < threshold).mean()), float((table < 2 * threshold).mean()),
            float(np.median(table)))


def utility_values(pipe, masks, ordinary: PromptSet, settings: EvalSettings,
                   clip: CLIPScorer | None) -> tuple[str, np.ndarray] | None:
    """Per ordinary generation (prompt-major, ``settings.ordinary_seeds``), the utility
    figure: the scene score where every prompt carries a scene and a scorer exists, else the
    CLIP score with ``clip``; None when neither can be measured."""
    scorer = scene_scorer()
    scenes = scorer is not None and all(r.extra.get("scene") for r in ordinary.records)
    if not scenes and clip is None:
        return None
    records = [r for r in ordinary.records for _ in settings.ordinary_seeds]
    seeds = [s for _ in ordinary.records for s in settings.ordinary_seeds]
    with masks_applied(pipe, masks):
        images = generate_images(pipe, [r.prompt for r in records], seeds, settings.sampling)
    if scenes:
        scored = [scorer(image, r.extra["scene"]) for image, r in zip(images, records,
                                                                       strict=True)]
        key = headline(scored[0])
        return f"scene utility ({key})", np.array([float(s[key]) for s in scored])
    return "CLIP score", clip.scores(list(images), [r.prompt for r in records],
                                     settings.sampling.batch_size)


def calibrate(pipe, memorized: ActivationStats, reference: ActivationStats,
              validation: PromptSet, ordinary: PromptSet, config: LocateConfig,
              calibration: CalibrationConfig, source=None, clip: CLIPScorer | None = None,
              progress: bool = True,
              stored: dict[str, torch.Tensor] | None = None) -> tuple[Subspace, Calibration]:
    """The subspace at the smallest k of the grid that meets the target within the budget.
    ``stored``: the targeted weights as :func:`memedit.locate.stored_weights` read them, where
    the caller has them (else each k's selection reads them).

    Raises MemeditError, with the measured curve in the message, when no k does.
    """
    from tqdm.auto import tqdm

    settings = EvalSettings(sampling=config.sampling, seeds=calibration.seeds,
                            ordinary_seeds=calibration.ordinary_seeds, measure="mse",
                            thresholds=(calibration.threshold,), progress=False)
    scorer = Scorer("mse")
    if not check_ground_truths({"validation": validation}, scorer):
        raise MemeditError("Calibration measures copies of the validation prompts' training "
                           "images, and they name none.",
                           "Pass memorized prompts as JSONL with an `image` field per prompt.")
    original = utility_values(pipe, None, ordinary, settings, clip)
    if original is None:
        raise MemeditError("Calibration needs a utility measure on the ordinary prompts: "
                           "scenes (the embedded model's prompts) or a CLIP model.",
                           "Pass ordinary prompts with `scene` fields, or --clip FOLDER.")
    name, before = original
    result = Calibration(calibration, name, {"name": validation.name, "count": len(validation),
                                             "sha256": validation.sha256,
                                             "ordinary": ordinary.name,
                                             "ordinary_sha256": ordinary.sha256})
    result.points.append(CalibrationPoint(0.0, 0, *copy_rates(pipe, None, validation, settings,
                                                           scorer, calibration.threshold,
                                                           calibration.attack),
                                          float(before.mean()), 0.0, 0.0))
    chosen = None
    for k in tqdm(calibration.ks, desc="calibrating k", unit="k", disable=not progress):
        subspace = select_subspace(pipe, memorized, reference, replace(config, k=k), source,
                                   allow_empty=True, stored=stored)
        point = CalibrationPoint(k, subspace.num_selected,
                                 *copy_rates(pipe, subspace.masks, validation, settings, scorer,
                                             calibration.threshold, calibration.attack))
        if point.copy_rate <= calibration.target_rate:
            after = utility_values(pipe, subspace.masks, ordinary, settings, clip)[1]
            drop = before - after
            point = replace(point, utility=float(after.mean()), utility_drop=float(drop.mean()),
                            utility_drop_se=float(drop.std(ddof=1) / np.sqrt(len(drop))))
            chosen = subspace
        result.points.append(point)
        if chosen is not None:
            break
    last = result.points[-1]
    if chosen is None or last.utility_drop > calibration.utility_budget:
        why = (f"the largest k = {last.k:g} still copies {last.copy_rate:.2f}" if chosen is None
               else f"the smallest k that does, {last.k:g}, costs {last.utility_drop:.3f} "
                    f"(± {last.utility_drop_se:.3f}) {name}, over the budget of "
                    f"{calibration.utility_budget}")
        raise MemeditError(
            f"No k reaches a copy rate of {calibration.target_rate} on the "
            f"{len(validation)} validation prompts within the utility budget: {why}.\n"
            + result.table(),
            "Accept a higher --target-rate or --utility-budget, add targets (--targets "
            "ff_out,ff_in), or extend the grid (--calibration-ks).")
    result.chosen_k = k
    chosen.manifest["calibration"] = result.to_dict()
    return chosen, result
