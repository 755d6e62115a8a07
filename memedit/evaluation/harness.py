"""Evaluate and sweep: generate, score and compare model variants on the same prompts and seeds.

A *variant* is one set of weights: the original model, the sanitized model, or the original
with a mask applied in memory (a located subspace at some k, a random mask of the same size,
NeMo's channels). Every variant sees the same prompts, the same seeds and the same sampler, so
differences between rows come from the weights alone.

Memorized prompts come in *groups*: ``locate`` (the prompts the edit was located on) and
``heldout`` (prompts it never saw). The held-out group is the figure that matters: an edit that
only removes the prompts it was located on has found those prompts, not a shared subspace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from memedit import distributed
from memedit.errors import MemeditError
from memedit.evaluation.controls import (
    detector_copy_check,
    image_copy_check,
    nemo_faithful,
    nemo_masks,
    random_like,
)
from memedit.evaluation.detector import (
    DetectorConfig,
    auroc,
    detector_scores,
    noise_magnitudes,
    scheduler_name,
)
from memedit.evaluation.similarity import MEASURES, Scorer, aggregate_ground_truths, resize
from memedit.evaluation.utility import CLIPScorer, drift, scene_scorer, scene_utility
from memedit.locate import LocateConfig, record_statistics, select_subspace
from memedit.prompts import PromptSet, empty_reference
from memedit.sampling import SamplingConfig, generate_images
from memedit.subspace import Subspace, parameter

# Evaluation seeds start away from the locate seed (0) so that evaluation also uses noise the
# edit never saw.
DEFAULT_SEEDS = (100, 101, 102, 103)


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides a number in the report (all of it is written to the JSON)."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seeds: tuple[int, ...] = DEFAULT_SEEDS  # per memorized prompt
    ordinary_seeds: tuple[int, ...] = DEFAULT_SEEDS[:1]  # per ordinary prompt
    measure: str = "mse"
    thresholds: tuple[float, ...] | None = None  # None: the measure's defaults
    gt_aggregate: str = "max"
    detector_steps: int | None = 5  # None: every step
    detector_scheduler: str = "pipeline"  # or "ddim", as Wen et al.
    grid_prompts: int = 4
    progress: bool = True
    # The embedding attack each variant also faces on every memorized group (None: not run);
    # a memedit.evaluation.attack.AttackConfig.
    attack: object | None = None

    @property
    def resolved_thresholds(self) -> tuple[float, ...]:
        if self.thresholds is not None:
            return tuple(self.thresholds)
        return MEASURES[self.measure].default_thresholds

    def describe(self) -> dict:
        measure = MEASURES[self.measure]
        return {
            "sampling": {"steps": self.sampling.steps,
                         "guidance_scale": self.sampling.guidance_scale,
                         "batch_size": self.sampling.batch_size,
                         "height": self.sampling.height, "width": self.sampling.width},
            "seeds_memorized": list(self.seeds),
            "seeds_ordinary": list(self.ordinary_seeds),
            "similarity": {
                "measure": measure.name, "definition": measure.description,
                "direction": "higher = more similar" if measure.higher_is_similar
                else "lower = more similar",
                "thresholds": list(self.resolved_thresholds),
                "memorized_if": f"score {measure.symbol} threshold",
                "secondary": [m for m in ("mse", "ssim") if m != measure.name],
            },
            "aggregation": {
                "ground_truths": f"{self.gt_aggregate} over a prompt's training images "
                                 "(max = most similar one)",
                "generation_rate": "share of all generations (prompt x seed) that are memorized",
                "prompt_rate": "share of prompts with at least one memorized seed",
                "prompts": "mean and median over prompts of the per-prompt mean over seeds",
            },
            "attack": None if self.attack is None else self.attack.describe(),
            "detector": {
                "name": "Wen et al. 2024: ||eps(x_t, c) - eps(x_t, '')|| / sqrt(D)",
                "steps": "all" if self.detector_steps is None else self.detector_steps,
                "scheduler": "DDIM (Wen et al.'s set-up)" if self.detector_scheduler == "ddim"
                else "the pipeline's own (class per variant: detector.scheduler)",
                "per_prompt": "mean over the first steps, then over the memorized seeds "
                              "(for ordinary prompts too)",
                "auroc": "memorized (positive) vs ordinary prompts, per-prompt scores",
            },
        }


@dataclass
class Variant:
    """One set of weights to evaluate: ``masks`` are applied to ``pipe`` while it is scored."""

    name: str
    kind: str  # original | sanitized | model (not baked by memedit) | located | random | nemo
    pipe: object
    masks: dict[str, torch.Tensor] | None = None
    k: float | None = None
    info: dict = field(default_factory=dict)
    baked: Subspace | None = None  # the subspace a sanitized folder was baked with

    def size(self) -> dict | None:
        if self.masks is not None:
            return Subspace(self.masks, {}).totals()
        return self.baked.totals() if self.baked is not None else None


@dataclass
class VariantResult:
    """Every figure of one variant; ``images`` keeps only what the grid and drift need."""

    name: str
    kind: str
    k: float | None
    size: dict | None
    memorization: dict[str, dict]
    detector: dict
    utility: dict
    info: dict = field(default_factory=dict)
    grid_images: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)
    ordinary_images: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "k": self.k, "zeroed": self.size,
                "memorization": self.memorization, "detector": self.detector,
                "utility": self.utility, "info": self.info}


@dataclass
class EvaluationResult:
    settings: EvalSettings
    groups: dict[str, PromptSet]
    ordinary: PromptSet
    variants: list[VariantResult]
    notes: list[str] = field(default_factory=list)
    context: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- checks


def check_ground_truths(groups: dict[str, PromptSet], scorer: Scorer | None) -> bool:
    """Validate the memorized prompts' training images before any sampling.

    Returns whether similarity can be measured (every memorized prompt names images). Prompts
    that name images next to prompts that do not are an error: the files do not line up.
    """
    records = [(name, i, r) for name, group in groups.items() for i, r in enumerate(group.records)]
    with_images = [entry for entry in records if entry[2].images]
    if not with_images:
        return False
    missing = [entry for entry in records if not entry[2].images]
    if missing:
        where = ", ".join(f"{groups[n].name} #{i + 1} ({r.prompt[:40]!r})"
                          for n, i, r in missing[:5])
        raise MemeditError(
            f"{len(missing)} memorized prompt(s) name no training image while the others do: "
            f"{where}.",
            "Give every memorized prompt its training image(s) (JSONL `image` field, paths "
            "relative to the file), or none of them to measure with the detector only.")
    if scorer is not None:
        scorer.check_readable([p for _, _, r in records for p in r.images])
    return True


def held_out_overlap(locate_set: PromptSet | None, heldout: PromptSet) -> list[str]:
    """Prompts present in both the locate and the held-out group (they are not held out)."""
    if locate_set is None:
        return []
    return sorted(set(locate_set.prompts) & set(heldout.prompts))


def split_memorized(memorized: PromptSet, locate_fraction: float) -> tuple[PromptSet, PromptSet]:
    """First ``locate_fraction`` of the file to locate on, the rest held out (file order, so
    the split is reproducible and visible)."""
    n = len(memorized)
    cut = round(n * locate_fraction)
    if not 0 < cut < n:
        raise MemeditError(
            f"Splitting {n} memorized prompts at {locate_fraction} leaves one part empty.",
            "Use more prompts, another --locate-fraction, or pass --locate-prompts.")
    return (memorized.subset(range(cut), f"{memorized.name}[:{cut}]"),
            memorized.subset(range(cut, n), f"{memorized.name}[{cut}:]"))


# ---------------------------------------------------------------------------- pieces


@contextlib.contextmanager
def masks_applied(pipe, masks: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Zero ``masks`` in a loaded pipeline for the duration of the block, then restore the
    weights exactly (only the masked values are kept aside, so this is cheap)."""
    if not masks:
        yield
        return
    saved = {}
    for key, mask in masks.items():
        param = parameter(pipe, key)
        saved[key] = (param, mask.to(param.device), param.data[mask.to(param.device)].clone())
    Subspace(masks, {}).apply(pipe)
    try:
        yield
    finally:
        for param, mask, values in saved.values():
            param.data[mask] = values


def _repeat(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    """Every prompt with every seed, prompt-major (prompt 0 seed 0, prompt 0 seed 1, ...)."""
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "median": float(np.median(values))}


def memorization_summary(per_generation: np.ndarray, measure: str,
                         thresholds: Sequence[float]) -> dict:
    """Rates and aggregates from a ``[prompts, seeds]`` array of scores (pure function)."""
    spec = MEASURES[measure]
    per_prompt = per_generation.mean(axis=1)
    out = {"prompts": int(per_generation.shape[0]),
           "generations": int(per_generation.size)} | _summary(per_prompt)
    rates = {}
    for threshold in thresholds:
        hit = spec.is_memorized(per_generation, threshold)
        rate = float(hit.mean())
        # Binomial standard error over generations (seeds of one prompt are not independent,
        # so read it as a lower bound on the uncertainty).
        rates[str(threshold)] = {"generation_rate": rate,
                                 "generation_rate_se": float(np.sqrt(rate * (1 - rate)
                                                                     / hit.size)),
                                 "prompt_rate": float(hit.any(axis=1).mean())}
    if rates:
        out["rates"] = rates
    return out


def _progress(settings: EvalSettings, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="image", leave=False,
                disable=not settings.progress or not distributed.state().is_main)


def score_group(images: np.ndarray, group: PromptSet, settings: EvalSettings,
                scorers: dict[str, Scorer]) -> dict:
    """Similarity of each generation to its prompt's training images, for every measure."""
    seeds = len(settings.seeds)
    result: dict = {"prompt_set": group.name, "measures": {}}
    per_prompt_rows = [{"prompt": r.prompt, "images": [str(p) for p in r.images]}
                       for r in group.records]
    for name, scorer in scorers.items():
        table = np.zeros((len(group), seeds))
        for i, record in enumerate(group.records):
            for j in range(seeds):
                values = scorer.scores(images[i * seeds + j], record.images)
                table[i, j] = aggregate_ground_truths(values, scorer.measure,
                                                      settings.gt_aggregate)
        thresholds = settings.resolved_thresholds if name == settings.measure else ()
        result["measures"][name] = memorization_summary(table, name, thresholds)
        for row, values in zip(per_prompt_rows, table, strict=True):
            row[name] = [float(v) for v in values]
    result["per_prompt"] = per_prompt_rows
    return result


def evaluate_variant(variant: Variant, groups: dict[str, PromptSet], ordinary: PromptSet,
                     settings: EvalSettings, scorers: dict[str, Scorer],
                     clip: CLIPScorer | None = None,
                     original_ordinary: np.ndarray | None = None,
                     grid_count: int = 0) -> VariantResult:
    """Generate and score one variant on every group and the ordinary prompts."""
    pipe, sampling = variant.pipe, settings.sampling
    memorization, grid = {}, {}
    detector_cfg = DetectorConfig(settings.detector_steps, sampling, settings.detector_scheduler)
    detector: dict = {"scheduler": scheduler_name(pipe, detector_cfg), "per_prompt": {}}
    with masks_applied(pipe, variant.masks):
        for name, group in groups.items():
            if scorers:
                prompts, seeds = _repeat(group.prompts, settings.seeds)
                with _progress(settings, len(prompts), f"{variant.name}: {name}") as bar:
                    images = generate_images(pipe, prompts, seeds, sampling, bar)
                memorization[name] = score_group(images, group, settings, scorers)
                if settings.attack is not None:
                    memorization[name]["under_attack"] = _under_attack(
                        pipe, group, settings, scorers, f"{variant.name}: attack {name}")
                if name == "heldout" or len(groups) == 1 or not grid:
                    grid = {"group": name, "images": [images[i * len(settings.seeds)]
                            for i in range(min(grid_count, len(group)))]}
            detector["per_prompt"][name] = _detect(pipe, group, settings.seeds, detector_cfg,
                                                   settings, f"{variant.name}: detect {name}")
        prompts, seeds = _repeat(ordinary.prompts, settings.ordinary_seeds)
        with _progress(settings, len(prompts), f"{variant.name}: ordinary") as bar:
            ordinary_images = generate_images(pipe, prompts, seeds, sampling, bar)
        # The detector gives ordinary prompts as many seeds as memorized ones, so that both
        # sides of the AUROC average over the same number of samples.
        detector["per_prompt"]["ordinary"] = _detect(pipe, ordinary, settings.seeds,
                                                     detector_cfg, settings,
                                                     f"{variant.name}: detect ordinary")
        utility = _utility(ordinary_images, ordinary, settings, clip, original_ordinary)
    detector |= _detector_summary(detector["per_prompt"], groups)
    return VariantResult(variant.name, variant.kind, variant.k, variant.size(), memorization,
                         detector, utility, variant.info, grid, ordinary_images)


def _under_attack(pipe, group: PromptSet, settings: EvalSettings, scorers: dict[str, Scorer],
                  desc: str) -> dict:
    """Copies after the embedding attack on this variant (weights frozen, as applied now)."""
    from memedit.evaluation.attack import (
        attack_group,
        copy_thresholds,
        frozen,
        prompt_embeddings,
    )

    config = settings.attack
    near = copy_thresholds(settings)[1]  # near copies: what a stronger attack starts from
    quiet = replace(settings, progress=False,
                    thresholds=tuple(dict.fromkeys((*settings.resolved_thresholds, near))))
    with frozen(pipe), tqdm(total=1, desc=desc, unit="group", leave=False,
                            disable=not settings.progress) as bar:
        run = attack_group(pipe, group, "target", config, quiet, scorers, None,
                           prompt_embeddings(pipe, [""]), scored=(config.steps,))
        bar.update(1)
    return {"attack": config.describe(), "steps": config.steps,
            "measures": run.scores[config.steps]["measures"],
            "seconds": run.seconds}


def _detect(pipe, prompts: PromptSet, seeds: Sequence[int], config: DetectorConfig,
            settings: EvalSettings, desc: str) -> dict:
    texts, seed_list = _repeat(prompts.prompts, seeds)
    with _progress(settings, len(texts), desc) as bar:
        magnitudes = noise_magnitudes(pipe, texts, seed_list, config, bar)
    per_step = magnitudes.reshape(len(prompts), len(seeds), -1).mean(axis=1)
    return {"prompts": prompts.prompts,
            "score": detector_scores(per_step).tolist(),
            "first_step": detector_scores(per_step, 1).tolist(),
            "per_step": per_step.tolist()}


def _detector_summary(per_prompt: dict[str, dict], groups: dict[str, PromptSet]) -> dict:
    ordinary = per_prompt["ordinary"]
    out: dict = {"mean_score": {name: float(np.mean(v["score"])) for name, v in per_prompt.items()}}
    out["auroc"] = {name: auroc(per_prompt[name]["score"], ordinary["score"]) for name in groups}
    out["auroc_first_step"] = {name: auroc(per_prompt[name]["first_step"], ordinary["first_step"])
                               for name in groups}
    if len(groups) > 1:
        every = [s for name in groups for s in per_prompt[name]["score"]]
        out["auroc"]["all"] = auroc(every, ordinary["score"])
    return out


def _utility(images: np.ndarray, ordinary: PromptSet, settings: EvalSettings,
             clip: CLIPScorer | None, original: np.ndarray | None) -> dict:
    records = [r for r in ordinary.records for _ in settings.ordinary_seeds]
    out: dict = {"generations": len(records)}
    if clip is not None:
        scores = clip.scores(list(images), [r.prompt for r in records],
                             settings.sampling.batch_size)
        out["clip_score"] = _summary(scores) | {"model": str(clip.folder)}
    scene = scene_utility(list(images), records)
    if scene is not None:
        out["scene"] = scene
    if original is not None:
        moved = drift(list(images), list(original))
        out["drift_from_original"] = {name: _summary(v) for name, v in moved.items()}
    return out


def _scorers(settings: EvalSettings, sscd) -> dict[str, Scorer]:
    """The primary measure first, then the built-in ones as secondary figures."""
    names = [settings.measure] + [m for m in ("mse", "ssim") if m != settings.measure]
    return {name: Scorer(name, sscd if name == "sscd" else None) for name in names}


# ---------------------------------------------------------------------------- entry points


@dataclass
class Inputs:
    """What both entry points share: prompts, measures and utility models."""

    memorized: PromptSet
    ordinary: PromptSet
    locate_prompts: PromptSet | None = None
    sscd: object | None = None  # memedit.evaluation.similarity.SSCD
    clip: CLIPScorer | None = None

    def groups(self) -> dict[str, PromptSet]:
        if self.locate_prompts is None:
            return {"heldout": self.memorized}
        return {"locate": self.locate_prompts, "heldout": self.memorized}


def _prepare(inputs: Inputs, settings: EvalSettings) -> tuple[dict, dict, list[str], dict]:
    if settings.measure == "sscd" and inputs.sscd is None:
        raise MemeditError("--measure sscd needs the SSCD model.", "Pass --sscd PATH.")
    if not settings.seeds or not settings.ordinary_seeds:
        raise MemeditError("At least one seed is needed.", "Pass --seeds 1 or more.")
    groups = inputs.groups()
    scorers = _scorers(settings, inputs.sscd)
    notes = []
    if not check_ground_truths(groups, scorers[settings.measure]):
        scorers = {}
        notes.append("The memorized prompts name no training images: similarity and "
                     "memorization rates are not measured, only the detector.")
    overlap = held_out_overlap(inputs.locate_prompts, inputs.memorized)
    if overlap:
        notes.append(f"{len(overlap)} held-out prompt(s) are also in the locate set, so the "
                     f"held-out figures are not fully held out: {overlap[:3]}")
    if inputs.ordinary.records and all(r.extra.get("scene") for r in inputs.ordinary.records) \
            and scene_scorer() is None:
        notes.append("The ordinary prompts carry scenes but this build has no scene scorer.")
    if scorers and settings.measure == "mse":
        nearest = nearest_distinct_pair(scorers["mse"], groups)
        if nearest is not None and settings.resolved_thresholds and \
                max(settings.resolved_thresholds) >= nearest:
            notes.append(f"The MSE threshold {max(settings.resolved_thresholds)} is not below "
                         f"the distance between the two closest distinct training images "
                         f"({nearest:.4f}): a generation could count as a copy of either.")
        calibration = {"nearest_distinct_training_pair_mse": nearest}
    else:
        calibration = {}
    return groups, scorers, notes, calibration


def nearest_distinct_pair(scorer: Scorer, groups: dict[str, PromptSet],
                          limit: int = 200) -> float | None:
    """The smallest pixel MSE between two different training images (at the first image's
    size): a copy threshold must sit well below it. ``None`` for one image or over ``limit``."""
    paths = list(dict.fromkeys(p for g in groups.values() for r in g.records for p in r.images))
    if not 1 < len(paths) <= limit:
        return None
    first = scorer.training_image(paths[0])
    h, w = first.shape[:2]
    images = np.stack([resize(scorer.training_image(p), h, w) for p in paths]).reshape(
        len(paths), -1).astype(np.float64)
    squared = (images ** 2).sum(axis=1)
    # ||a - b||^2 = |a|^2 + |b|^2 - 2ab, for every pair at once.
    distances = (squared[:, None] + squared[None, :] - 2 * images @ images.T) / images.shape[1]
    distances[np.diag_indices(len(paths))] = np.inf
    return float(max(distances.min(), 0.0))


def evaluate(model_pipe, inputs: Inputs, settings: EvalSettings, baseline_pipe=None,
             model_subspace: Subspace | None = None, controls: Sequence[str] = (),
             nemo_options: dict | None = None,
             others: Sequence[tuple[str, Subspace]] = ()) -> EvaluationResult:
    """Evaluate a sanitized model, next to the original and controls when given.

    Controls are applied to the original (``baseline_pipe``): ``random`` needs the subspace
    the sanitized model was baked with (``model_subspace``, read from the baked folder);
    ``nemo`` is located on the locate prompts (or the memorized ones if none are given) with
    ``nemo_options["reference"]`` (default: the ordinary prompts) as reference.
    ``others`` are more edits of the same original, by name (say, a hardened one), applied to
    ``baseline_pipe`` in memory, each with a random mask of its own size when ``random`` is
    among the controls.
    """
    groups, scorers, notes, calibration = _prepare(inputs, settings)
    variants: list[Variant] = []
    if baseline_pipe is not None:
        variants.append(Variant("original", "original", baseline_pipe))
    # A folder memedit did not bake is evaluated as it is, under a name that says so.
    name = "sanitized" if model_subspace is not None else "model"
    variants.append(Variant(name, name, model_pipe, baked=model_subspace,
                            info=_baked_info(model_subspace)))
    notes += _located_on_notes(model_subspace, inputs)
    if others and baseline_pipe is None:
        raise MemeditError("Other edits are applied to the original model.",
                           "Pass --baseline ORIGINAL.")
    variants += [Variant(name, "sanitized", baseline_pipe, other.masks, baked=other,
                         info=_baked_info(other)) for name, other in others]
    for control in controls:
        if baseline_pipe is None:
            raise MemeditError(f"The {control} control is applied to the original model.",
                               "Pass --baseline ORIGINAL.")
        if control == "random":
            if model_subspace is None:
                raise MemeditError("The random control needs the subspace the model was baked "
                                   "with, and the model folder has none (memedit/).",
                                   "Evaluate a model written by `memedit bake`.")
            variants.append(Variant("random", "random", baseline_pipe,
                                    random_like(model_subspace.masks, seed=0),
                                    info={"seed": 0, "matched_to": "sanitized"}))
            variants += [Variant(f"random ({name})", "random", baseline_pipe,
                                 random_like(other.masks, seed=0),
                                 info={"seed": 0, "matched_to": name})
                         for name, other in others]
        elif control == "nemo":
            variants.append(_nemo_variant(baseline_pipe, inputs, nemo_options or {}, settings,
                                          scorers))
        else:
            raise MemeditError(f"Unknown control {control!r}.", "Use random and/or nemo.")
    results = _run_variants(variants, groups, inputs, settings, scorers)
    return EvaluationResult(settings, groups, inputs.ordinary, results, notes, calibration)


def sweep(pipe, inputs: Inputs, settings: EvalSettings, ks: Sequence[float],
          locate_config: LocateConfig, reference: PromptSet | None = None,
          controls: Sequence[str] = ("random", "nemo"),
          nemo_options: dict | None = None) -> EvaluationResult:
    """Locate once per k on the locate prompts, and evaluate each edit (and its random
    control) in memory on the original ``pipe``, next to the original itself."""
    if inputs.locate_prompts is None:
        raise MemeditError("A sweep locates on its own prompts and needs them.",
                           "Pass --locate-prompts FILE, or let --locate-fraction split "
                           "--memorized.")
    groups, scorers, notes, calibration = _prepare(inputs, settings)
    variants = [Variant("original", "original", pipe)]
    # Statistics do not depend on k: record them once, select once per k.
    stats_mem = record_statistics(pipe, inputs.locate_prompts, locate_config,
                                  progress=settings.progress)
    stats_ref = record_statistics(pipe, reference or empty_reference(1), locate_config,
                                  progress=settings.progress)
    for k in ks:
        subspace = select_subspace(pipe, stats_mem, stats_ref, replace(locate_config, k=k))
        variants.append(Variant(f"located k={k:g}", "located", pipe, subspace.masks, k,
                                info={"method": subspace.manifest.get("method", {})}))
        if "random" in controls:
            variants.append(Variant(f"random k={k:g}", "random", pipe,
                                    random_like(subspace.masks, seed=0), k,
                                    info={"seed": 0, "matched_to": f"located k={k:g}"}))
    if "nemo" in controls:
        variants.append(_nemo_variant(pipe, inputs, nemo_options or {}, settings, scorers))
    results = _run_variants(variants, groups, inputs, settings, scorers)
    return EvaluationResult(settings, groups, inputs.ordinary, results, notes,
                            calibration | {"locate": {"ks": list(ks), "tau": locate_config.tau,
                                        "rho": locate_config.rho,
                                        "targets": list(locate_config.targets),
                                        "granularity": locate_config.granularity,
                                        "reference": reference.name if reference else "empty "
                                        "prompt", "seed": locate_config.sampling.seed}})


def _baked_info(subspace: Subspace | None) -> dict:
    if subspace is None:
        return {}
    manifest = subspace.manifest
    return {"method": manifest.get("method", {}), "located_on": manifest.get("prompts", {})}


def _located_on_notes(subspace: Subspace | None, inputs: Inputs) -> list[str]:
    """Compare the prompt sets the baked subspace records with the ones evaluated."""
    if subspace is None:
        return []
    recorded = {entry.get("sha256") for entry in
                subspace.manifest.get("prompts", {}).get("memorized", [])}
    notes = []
    if inputs.memorized.sha256 in recorded:
        notes.append("The held-out prompts are the very set this model was located on: the "
                     "'heldout' figures are not held out.")
    if inputs.locate_prompts is not None and recorded and \
            inputs.locate_prompts.sha256 not in recorded:
        notes.append("--locate-prompts differs from the prompt set recorded in the model's "
                     "subspace manifest.")
    return notes


def _nemo_variant(pipe, inputs: Inputs, options: dict, settings: EvalSettings,
                  scorers: dict[str, Scorer]) -> Variant:
    """NeMo on the locate prompts. ``options``: ``mode`` (``simplified``, the default, or
    ``faithful``), ``reference``; simplified: ``z_threshold``, ``max_per_prompt``; faithful:
    ``seeds`` and ``steps``, the budget of each copy check in its loop (evaluate's measure and
    first threshold where the prompts have training images, else the detector)."""
    prompts = inputs.locate_prompts or inputs.memorized
    reference = options.get("reference") or inputs.ordinary
    if options.get("mode", "simplified") == "simplified":
        selection = nemo_masks(pipe, prompts, reference,
                               **{k: options[k] for k in ("z_threshold", "max_per_prompt")
                                  if k in options})
    else:
        sampling = replace(settings.sampling, steps=options.get("steps", 20))
        seeds = tuple(range(options.get("seeds", 2)))  # from 0: away from evaluation's seeds
        if scorers and settings.resolved_thresholds:
            check = image_copy_check(pipe, sampling, seeds, scorers[settings.measure],
                                     settings.resolved_thresholds[0], settings.gt_aggregate)
        else:
            check = detector_copy_check(
                pipe, DetectorConfig(settings.detector_steps, sampling,
                                     settings.detector_scheduler), seeds, reference)
        with tqdm(total=len(prompts), desc="NeMo", unit="prompt",
                  disable=not settings.progress, leave=False) as bar:
            selection = nemo_faithful(pipe, prompts, reference, check, progress=bar)
    info = selection.settings | {"memorized_prompts": prompts.name}
    return Variant("nemo", "nemo", pipe, selection.masks, info=info)


def _run_variants(variants: list[Variant], groups: dict[str, PromptSet], inputs: Inputs,
                  settings: EvalSettings, scorers: dict[str, Scorer]) -> list[VariantResult]:
    results: list[VariantResult] = []
    original_ordinary = None
    for variant in variants:
        grid_count = settings.grid_prompts if scorers else 0
        result = evaluate_variant(variant, groups, inputs.ordinary, settings, scorers,
                                  inputs.clip, original_ordinary, grid_count)
        if variant.kind == "original":
            original_ordinary = result.ordinary_images
        else:
            result.ordinary_images = None  # only the original's are needed (for drift)
        results.append(result)
    return results
