"""Calibration: choose k from the copy rate a user can accept, instead of guessing it.

How far one k goes depends on the model (the embedded model's builds differ by seed), so
``locate-and-bake --target-rate R`` measures it. The statistics are recorded once (they do not
depend on k, as in ``sweep``); then for each k of a grid, smallest first, the selected edit is
applied in memory and judged on a *validation* part of the memorized prompts, split off the
prompts it is located on, never the held-out ones a later ``evaluate`` reports: the smallest k
whose validation copy rate is at most R is chosen, provided its cost in utility on ordinary
prompts stays within a budget. Otherwise nothing is written and the curve says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from memedit.errors import MemeditError
from memedit.evaluation.harness import (
    EvalSettings,
    check_ground_truths,
    masks_applied,
    score_group,
    split_memorized,
    utility_figures,
)
from memedit.evaluation.similarity import Scorer
from memedit.evaluation.utility import CLIPScorer
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
    the CLIP score) from the original that is accepted. ``seeds``: per validation prompt.
    """

    target_rate: float
    ks: tuple[float, ...] = DEFAULT_KS
    utility_budget: float = 0.03
    validation_fraction: float = 0.3
    seeds: tuple[int, ...] = (100, 101, 102, 103)
    threshold: float = 0.01  # pixel MSE, as `evaluate`'s default measure

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
        if not self.seeds:
            raise MemeditError("Calibration needs at least one seed.", "Pass --seeds 4.")


@dataclass(frozen=True)
class CalibrationPoint:
    """One k on the curve (k = 0 is the original model)."""

    k: float
    zeroed: int
    copy_rate: float
    near_copy_rate: float  # within twice the threshold: what an attacker starts from
    median_mse: float
    utility: float
    utility_drop: float


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
                "seeds": list(self.config.seeds), "ks": list(self.config.ks),
                "validation": self.validation, "chosen_k": self.chosen_k,
                "curve": [asdict(p) for p in self.points]}

    def table(self) -> str:
        return calibration_table(self.to_dict())


def calibration_table(record: dict) -> str:
    """The curve of a calibration record (as stored in a manifest) as a readable table."""
    from tabulate import tabulate

    rows = [["original" if p["k"] == 0 else f"{p['k']:g}", f"{p['zeroed']:,}",
             f"{p['copy_rate']:.2f}", f"{p['near_copy_rate']:.2f}", f"{p['median_mse']:.4f}",
             f"{p['utility']:.3f}", f"{p['utility_drop']:+.3f}",
             "<- chosen" if p["k"] == record["chosen_k"] else ""]
            for p in record["curve"]]
    return tabulate(rows, headers=["k", "zeroed", "copies", "near copies", "median MSE",
                                   record["utility"], "drop", ""])


def split_validation(memorized: PromptSet, fraction: float) -> tuple[PromptSet, PromptSet]:
    """The last ``fraction`` of the memorized prompts validates; the rest is located on."""
    return split_memorized(memorized, 1 - fraction)


def _measure(pipe, masks, validation: PromptSet, ordinary: PromptSet, settings: EvalSettings,
             scorer: Scorer, threshold: float,
             clip: CLIPScorer | None) -> tuple[float, float, float, dict]:
    """Validation copy rate, near-copy rate, median MSE, and the utility figures."""
    with masks_applied(pipe, masks):
        prompts = [p for p in validation.prompts for _ in settings.seeds]
        seeds = [s for _ in validation.prompts for s in settings.seeds]
        images = generate_images(pipe, prompts, seeds, settings.sampling)
        scores = score_group(images, validation, settings, {"mse": scorer})
        ordinary_prompts = [p for p in ordinary.prompts for _ in settings.ordinary_seeds]
        ordinary_seeds = [s for _ in ordinary.prompts for s in settings.ordinary_seeds]
        ordinary_images = generate_images(pipe, ordinary_prompts, ordinary_seeds,
                                          settings.sampling)
    table = np.array([row["mse"] for row in scores["per_prompt"]])
    figures = utility_figures(ordinary_images, ordinary, settings, clip)
    return (float((table < threshold).mean()), float((table < 2 * threshold).mean()),
            float(np.median(table)), figures)


def calibrate(pipe, memorized: ActivationStats, reference: ActivationStats,
              validation: PromptSet, ordinary: PromptSet, config: LocateConfig,
              calibration: CalibrationConfig, source=None, clip: CLIPScorer | None = None,
              progress: bool = True) -> tuple[Subspace, Calibration]:
    """The subspace at the smallest k of the grid that meets the target within the budget.

    Raises MemeditError, with the measured curve in the message, when no k does.
    """
    from tqdm.auto import tqdm

    settings = EvalSettings(sampling=config.sampling, seeds=calibration.seeds,
                            ordinary_seeds=calibration.seeds[:1], measure="mse",
                            thresholds=(calibration.threshold,), progress=False)
    scorer = Scorer("mse")
    if not check_ground_truths({"validation": validation}, scorer):
        raise MemeditError("Calibration measures copies of the validation prompts' training "
                           "images, and they name none.",
                           "Pass memorized prompts as JSONL with an `image` field per prompt.")
    result = Calibration(calibration, "", {"name": validation.name, "count": len(validation),
                                           "sha256": validation.sha256,
                                           "ordinary": ordinary.name,
                                           "ordinary_sha256": ordinary.sha256})
    bar = tqdm(total=len(calibration.ks) + 1, desc="calibrating k", unit="k",
               disable=not progress)
    rate, near, median, figures = _measure(pipe, None, validation, ordinary, settings, scorer,
                                           calibration.threshold, clip)
    if not figures:
        raise MemeditError("Calibration needs a utility measure on the ordinary prompts: "
                           "scenes (the embedded model's prompts) or a CLIP model.",
                           "Pass ordinary prompts with `scene` fields, or --clip FOLDER.")
    result.utility_name, original_utility = next(iter(figures.items()))
    result.points.append(CalibrationPoint(0.0, 0, rate, near, median, original_utility, 0.0))
    bar.update(1)
    chosen = None
    for k in calibration.ks:
        subspace = select_subspace(pipe, memorized, reference, replace(config, k=k), source,
                                   allow_empty=True)
        rate, near, median, figures = _measure(pipe, subspace.masks, validation, ordinary,
                                               settings, scorer, calibration.threshold, clip)
        utility = figures[result.utility_name]
        result.points.append(CalibrationPoint(k, subspace.num_selected, rate, near, median,
                                              utility, utility - original_utility))
        bar.update(1)
        if original_utility - utility > calibration.utility_budget:
            break  # a larger k zeroes a superset of these weights: not tried
        if rate <= calibration.target_rate:
            chosen = subspace
            break
    bar.close()
    if chosen is None:
        last = result.points[-1]
        why = (f"k = {last.k:g} already costs {original_utility - last.utility:.3f} "
               f"{result.utility_name}, over the budget of {calibration.utility_budget}"
               if original_utility - last.utility > calibration.utility_budget else
               f"the largest k = {last.k:g} still copies {last.copy_rate:.2f}")
        raise MemeditError(
            f"No k reaches a copy rate of {calibration.target_rate} on the "
            f"{len(validation)} validation prompts within the utility budget: {why}.\n"
            + result.table(),
            "Accept a higher --target-rate or --utility-budget, add targets (--targets "
            "ff_out,ff_in), or extend the grid (--calibration-ks).")
    result.chosen_k = chosen.manifest["method"]["k"]
    chosen.manifest["calibration"] = result.to_dict()
    return chosen, result
