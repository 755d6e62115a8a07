"""``memedit.evaluate``, ``memedit.sweep``, ``memedit.detect`` and ``memedit.attack``: what the
commands of the same names do, as one call each. The commands only parse their options into
these calls and print.

Options are named as the commands name them (``--nemo-mode`` is ``nemo_mode``, ``--seeds`` the
number of seeds per prompt); lists the command takes comma-separated (``--k``,
``--threshold``) are sequences here. Models are folders or hub ids, prompts are files: the same
defaults apply (the embedded test model and its prompt files when ``model`` is None or was
baked from it; the original recorded at bake time as the baseline of a baked model).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from memedit.artifacts import EMBEDDED_SPEC
from memedit.errors import MemeditError
from memedit.evaluation.harness import EvalSettings, EvaluationResult
from memedit.outputs import hold_output
from memedit.prompts import PromptSet
from memedit.sampling import SamplingConfig

PathLike = str | os.PathLike
CONTROLS = ("random", "nemo")


@dataclass(frozen=True)
class GenerationOptions:
    """The options of every command that generates (``evaluate``, ``sweep``, ``detect``,
    ``attack``)."""

    steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 8
    seeds: int = 4  # per memorized prompt; the detector uses them too
    seed_start: int = 100  # seeds are consecutive, away from the locate seed (0)
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    quiet: bool = False

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(steps=self.steps, guidance_scale=self.guidance_scale,
                              batch_size=self.batch_size, height=self.height, width=self.width)

    def seed_values(self) -> tuple[int, ...]:
        return seed_range(self.seeds, self.seed_start)


@dataclass(frozen=True)
class SamplingOptions(GenerationOptions):
    """The options of the commands that also run the detector (``evaluate``, ``sweep``,
    ``detect``)."""

    detector_steps: int | None = None  # None: 5, or every step with detector_scheduler="ddim"
    detector_scheduler: str = "pipeline"

    def resolved_detector_steps(self) -> int | None:
        """``None`` (every step) for Wen et al.'s DDIM set-up unless the user chose a number."""
        if self.detector_steps is not None:
            return self.detector_steps
        return None if self.detector_scheduler == "ddim" else 5


@dataclass(frozen=True)
class ScoringOptions(GenerationOptions):
    """The options of the commands that score generations against training images
    (``evaluate``, ``sweep``, ``attack``), and where they write."""

    out: PathLike | None = None  # the report's folder
    overwrite: bool = False
    update_card: bool = False  # also put the table into the model's card (a model memedit baked)
    memorized: PathLike | None = None  # prompts with their training images
    measure: str = "auto"
    sscd: PathLike | None = None
    threshold: Sequence[float] | None = None
    gt_aggregate: str = "max"
    grid_prompts: int = 4

    def resolved_measure(self) -> str:
        """``auto``: SSCD where its model is given, else MSE."""
        if self.measure == "auto":
            return "sscd" if self.sscd else "mse"
        return self.measure

    def scoring_settings(self, **more) -> EvalSettings:
        return EvalSettings(
            sampling=self.sampling(), seeds=self.seed_values(), measure=self.resolved_measure(),
            thresholds=None if self.threshold is None else tuple(self.threshold),
            gt_aggregate=self.gt_aggregate, grid_prompts=self.grid_prompts,
            progress=not self.quiet, **more)


@dataclass(frozen=True)
class EvaluationOptions(SamplingOptions, ScoringOptions):
    """The options of ``evaluate`` and ``sweep`` (``memedit evaluate --help`` explains each)."""

    ordinary: PathLike | None = None
    locate_prompts: PathLike | None = None
    locate_fraction: float = 0.5
    k: Sequence[float] | None = None  # locate once per k and evaluate each (a sweep)
    reference: PathLike | None = None
    tau: int = 10
    locate_seed: int = 0
    targets: str | Sequence[str] = "ff_out"
    controls: str | Sequence[str] = "auto"  # "auto", "none", or some of random, nemo
    nemo_mode: str = "simplified"
    nemo_seeds: int = 2
    nemo_steps: int = 20
    nemo_z: float = 3.0
    nemo_max: int = 10
    nemo_reference: PathLike | None = None
    ordinary_seeds: int = 1
    clip: PathLike | None = None
    also: Sequence[PathLike] = ()
    attack_steps: int = 0
    attack_lr: float = 0.01

    def settings(self) -> EvalSettings:
        return self.scoring_settings(
            ordinary_seeds=seed_range(self.ordinary_seeds, self.seed_start),
            detector_steps=self.resolved_detector_steps(),
            detector_scheduler=self.detector_scheduler, attack=self.attack_config())

    def attack_config(self):
        """The attack column: the published attack on y, scored at its last step."""
        from memedit.evaluation.attack import AttackConfig

        if not self.attack_steps:
            return None
        # Prompts are attacked a batch at a time: each has its own noise generator, so the
        # result is the same as one at a time, only faster.
        return AttackConfig(lr=self.attack_lr, steps=self.attack_steps, checkpoints=(),
                            prompt_batch=self.batch_size)

    def control_names(self) -> tuple[str, ...] | None:
        """The controls asked for; ``None`` means "auto" (every control the inputs allow)."""
        if isinstance(self.controls, str):
            if self.controls == "auto":
                return None
            if self.controls == "none":
                return ()
            names = tuple(c.strip() for c in self.controls.split(",") if c.strip())
        else:
            names = tuple(self.controls)
        unknown = [c for c in names if c not in CONTROLS]
        if unknown:
            raise MemeditError(f"Unknown control {', '.join(unknown)}.",
                               "Use random, nemo, none or auto.")
        return names

    def inputs(self, model, baseline) -> list:
        """The paths an evaluation reads (models, prompt files, scorers): its output spares
        them."""
        origin = (bake_source(model) or {}).get("path")  # the baseline a baked model implies
        return [model, baseline, origin, *self.also, self.memorized, self.ordinary,
                self.locate_prompts, self.reference, self.nemo_reference, self.sscd, self.clip]


@dataclass(frozen=True)
class AttackOptions(ScoringOptions):
    """The options of ``attack`` (``memedit attack --help`` explains each)."""

    control: PathLike | None = None
    start: str = "prompt"
    start_prompts: PathLike | None = None
    lr: float = 0.1
    attack_steps: int = 50
    pairs: int = 8
    checkpoints: Sequence[int] | None = None
    attack_seed: int = 0
    prompt_batch: int = 1
    control_limit: float = 0.1


@dataclass
class EvaluationReport:
    """What ``evaluate`` and ``sweep`` write: ``report`` is report.json, ``table`` table.txt."""

    report: dict
    table: str
    result: EvaluationResult = field(repr=False)
    out: Path | None = None
    card: Path | None = None  # the model card updated (``update_card``)


@dataclass
class AttackReport:
    """What ``attack`` writes: ``report`` is report.json (as it reads back: non-finite numbers
    are None), ``table`` table.txt; ``out`` the folder, when one was written."""

    report: dict
    table: str
    out: Path | None = None
    card: Path | None = None  # the model card updated (``update_card``)


def seed_range(count: int, start: int) -> tuple[int, ...]:
    if count < 1:
        raise MemeditError("--seeds must be at least 1.", "Pass the number of seeds per prompt.")
    return tuple(range(start, start + count))


def bake_source(model) -> dict | None:
    """Where a memedit-baked ``model`` came from (``spec``, ``path``), else ``None``."""
    from memedit.inspection import provenance

    if model is None or not Path(model).is_dir():
        return None
    info = provenance(Path(model))
    return info.get("source") if info else None


def is_embedded(model) -> bool:
    """The embedded test model, or a model baked from it."""
    return model is None or (bake_source(model) or {}).get("spec") == EMBEDDED_SPEC


def _embedded_defaults(model, options: EvaluationOptions) -> EvaluationOptions:
    """The embedded test model's prompt files where the user gave none: for the embedded
    model itself, and for a model baked from it."""
    wanted = {"memorized": "memorized_heldout", "ordinary": "ordinary_unseen",
              "locate_prompts": "memorized_locate", "nemo_reference": "ordinary_seen"}
    missing = [key for key in wanted if getattr(options, key) is None]
    if options.memorized is not None and "locate_prompts" in missing:
        missing.remove("locate_prompts")  # the user's own memorized set: split it, not ours
    if not missing:
        return options
    if not is_embedded(model):
        if {"memorized", "ordinary"} & set(missing):
            raise MemeditError("--memorized and --ordinary are required for a model other "
                               "than the embedded one.",
                               "Pass a JSONL of memorized prompts with their training images, "
                               "and a file of ordinary prompts.")
        return options
    try:
        from memedit.testbed import prompt_file
    except ImportError:
        raise MemeditError("This build has no embedded test model prompts.",
                           "Pass --model, --memorized and --ordinary.") from None
    return replace(options, **{key: prompt_file(wanted[key]) for key in missing})


def _other_edit(path, baseline_source):
    """The subspace of another model baked from the evaluated one's original (``also``)."""
    from memedit.baking import check_model_matches
    from memedit.subspace import Subspace

    if baseline_source is None:
        raise MemeditError("--also applies other edits to the original, and there is none.",
                           "Pass --baseline ORIGINAL (or evaluate a model memedit baked).")
    subspace = Subspace.load(path)
    # Its edited tensors must be the original's before the edit: it is an edit of this model.
    check_model_matches(baseline_source, subspace, baseline_source.allow_pickle)
    return subspace


def check_update_card(model, out: PathLike | None, k: Sequence[float] | None = None) -> None:
    """Refuse ``update_card`` before any work where it cannot be done: the card takes the
    report written to ``out``, of a model folder memedit baked, not of in-memory edits."""
    from memedit.card import check_card_updatable

    if k is not None:
        raise MemeditError("--update-card with --k: the edits a sweep measures are made in "
                           "memory, not the model folder's own.", "Drop --k or --update-card.")
    if out is None:
        raise MemeditError("--update-card puts the report into the model's card, but no report "
                           "folder is written.", "Pass --out REPORT_FOLDER.")
    check_card_updatable(model)


def _card(model, options: ScoringOptions, out: Path | None) -> Path | None:
    """The card updated with the report in ``out`` (None: not asked, or not the main
    process of a launched run)."""
    if not options.update_card:
        return None
    from memedit.card import update_card

    return update_card(model, out)


def evaluate(model: PathLike | None = None, baseline: PathLike | None = None,
             **options) -> EvaluationReport:
    """Measure memorization before and after an edit, as ``memedit evaluate`` does.

    ``model`` is the sanitized model (with ``k``: the original), ``baseline`` the original
    (default for a model memedit baked: the original recorded at bake time). ``options`` are
    :class:`EvaluationOptions`; with ``out`` the report is written there as the command
    writes it, and with ``update_card`` its table goes into the model's card too.
    """
    options = EvaluationOptions(**options)
    if options.update_card:
        check_update_card(model, options.out, options.k)
    evaluation = _run(model, baseline, options, sweep_mode=False)
    evaluation.card = _card(model, options, evaluation.out)
    return evaluation


def sweep(model: PathLike | None = None, **options) -> EvaluationReport:
    """Locate once per k (``k=(0.005, 0.01, 0.02)``) on the locate prompts and evaluate each
    edit, its random control and NeMo, as ``memedit sweep`` does."""
    return _run(model, None, EvaluationOptions(**options), sweep_mode=True)


def _run(model, baseline, options: EvaluationOptions, sweep_mode: bool) -> EvaluationReport:
    if sweep_mode and options.k is None:
        raise MemeditError("A sweep needs the k values.", "Pass --k 0.005,0.01,0.02.")
    if options.k is not None and not options.k:
        raise MemeditError("--k is empty.", "Give at least one number.")
    if options.k is not None and baseline is not None:
        raise MemeditError("With --k, --model is the original and every edit is applied to it "
                           "in memory, so --baseline has no role.",
                           "Drop --baseline, or drop --k to evaluate a baked model.")
    if options.k is not None and options.also:
        raise MemeditError("With --k every edit is located in memory; --also adds baked ones "
                           "to an evaluate.", "Drop --also, or drop --k.")
    if options.out is None:
        return _evaluate(model, baseline, options)
    with hold_output(options.out, options.overwrite, options.inputs(model, baseline)):
        return _evaluate(model, baseline, options)


def _evaluate(model, baseline, options: EvaluationOptions) -> EvaluationReport:
    from memedit.evaluation import figures, report
    from memedit.evaluation.harness import Inputs, split_memorized
    from memedit.evaluation.harness import evaluate as evaluate_variants
    from memedit.evaluation.harness import sweep as sweep_variants
    from memedit.evaluation.similarity import SSCD
    from memedit.evaluation.utility import CLIPScorer
    from memedit.loading import load_pipeline
    from memedit.locate import LocateConfig
    from memedit.outputs import atomic_output_dir
    from memedit.prompts import read_prompts
    from memedit.subspace import Subspace
    from memedit.targets import parse_target_kinds

    settings = options.settings()
    controls = options.control_names()
    options = _embedded_defaults(model, options)
    memorized = read_prompts(options.memorized, "memorized")
    ordinary = read_prompts(options.ordinary, "ordinary")
    locate_prompts = (read_prompts(options.locate_prompts, "locate")
                      if options.locate_prompts else None)
    if options.k is not None and locate_prompts is None:
        locate_prompts, memorized = split_memorized(memorized, options.locate_fraction)
    sscd = SSCD(options.sscd) if options.sscd else None
    clip = CLIPScorer(options.clip) if options.clip else None
    inputs = Inputs(memorized, ordinary, locate_prompts, sscd, clip)
    nemo = {"mode": options.nemo_mode, "seeds": options.nemo_seeds,
            "steps": options.nemo_steps,
            "z_threshold": options.nemo_z, "max_per_prompt": options.nemo_max,
            "reference": read_prompts(options.nemo_reference, "nemo-reference")
            if options.nemo_reference else None}
    load = functools.partial(load_pipeline, device=options.device, dtype=options.dtype,
                             allow_pickle=options.allow_pickle)
    if options.k is not None:
        # Sweep: model is the original; every edit is applied in memory.
        pipe, source = load(model)
        config = LocateConfig(targets=parse_target_kinds(options.targets), tau=options.tau,
                              sampling=replace(settings.sampling, seed=options.locate_seed))
        reference = read_prompts(options.reference, "reference") \
            if options.reference else None
        result = sweep_variants(pipe, inputs, settings, tuple(options.k), config, reference,
                                CONTROLS if controls is None else controls, nemo)
        context = {"model": source.spec}
    else:
        pipe, source = load(model)
        origin = bake_source(model)
        if baseline is None and origin is not None and Path(origin["path"]).is_dir():
            baseline = origin["path"]  # the original recorded at bake time
        baseline_pipe, baseline_source = load(baseline) if baseline else (None, None)
        try:
            subspace = Subspace.load(source.path)
        except MemeditError:
            subspace = None  # not a memedit-baked folder: no random control to match
        if controls is None:
            controls = tuple(c for c, ok in (("random", subspace is not None),
                                             ("nemo", True)) if ok and baseline_pipe)
        others = [(Path(path).name, _other_edit(path, baseline_source))
                  for path in options.also]
        result = evaluate_variants(pipe, inputs, settings, baseline_pipe, subspace, controls,
                                   nemo, others)
        context = {"model": source.spec,
                   "baseline": baseline_source.spec if baseline_source else None}
    data = report.build_report(result, context)
    text = report.table(result)
    evaluation = EvaluationReport(data, text, result)
    if options.out is None:
        return evaluation
    # The training images are inputs too: the report may not replace a folder that holds them.
    images = [path for group in (memorized, locate_prompts) if group is not None
              for record in group.records for path in record.images]
    with atomic_output_dir(options.out, options.overwrite,
                           [*options.inputs(model, baseline), *images], "evaluation") as tmp:
        (tmp / "report.json").write_bytes(report.report_json(data))
        (tmp / "table.txt").write_text(text + "\n")
        grid = figures.image_grid(result)
        if grid is not None:
            (tmp / "grid.png").write_bytes(grid)
        plot = figures.sweep_plot(result)
        if plot is not None:
            (tmp / "sweep.png").write_bytes(plot)
    evaluation.out = Path(options.out)
    return evaluation


def detect(model: PathLike | None = None, prompts: PathLike | PromptSet | None = None, *,
           out: PathLike | None = None, overwrite: bool = False, **options) -> dict:
    """Rank ``prompts`` by Wen et al.'s memorization detector, most suspicious first, as
    ``memedit detect`` does; ``options`` are :class:`SamplingOptions`.

    Returns the ranking report (``ranking``: one row per prompt, highest score first;
    ``auroc`` when every prompt has a boolean ``memorized`` field); with ``out`` it is also
    written there as JSON.
    """
    from tqdm.auto import tqdm

    from memedit.evaluation.detector import (
        DetectorConfig,
        auroc,
        detector_scores,
        noise_magnitudes,
        scheduler_name,
    )
    from memedit.evaluation.report import report_json
    from memedit.loading import load_pipeline
    from memedit.outputs import atomic_write_bytes, check_output
    from memedit.prompts import read_prompts

    if prompts is None:
        raise MemeditError("detect needs the candidate prompts.", "Pass --prompts FILE.")
    settings = SamplingOptions(**options)
    prompts_file = None if isinstance(prompts, PromptSet) else prompts
    inputs = [model, prompts_file]
    if out is not None:
        check_output(out, overwrite, inputs, kind="file")
    prompt_set = prompts if isinstance(prompts, PromptSet) else read_prompts(prompts)
    seeds = settings.seed_values()
    sampling = settings.sampling()
    config = DetectorConfig(settings.resolved_detector_steps(), sampling,
                            settings.detector_scheduler)
    pipe, source = load_pipeline(model, settings.device, settings.dtype, settings.allow_pickle)
    texts = [p for p in prompt_set.prompts for _ in seeds]
    with tqdm(total=len(texts), desc="detect", unit="prompt", disable=settings.quiet) as bar:
        magnitudes = noise_magnitudes(pipe, texts, [s for _ in prompt_set.prompts
                                                    for s in seeds], config, bar)
    per_step = magnitudes.reshape(len(prompt_set), len(seeds), -1).mean(axis=1)
    scores = detector_scores(per_step).tolist()
    first = detector_scores(per_step, 1).tolist()
    labels = [r.extra.get("memorized") for r in prompt_set.records]
    result = {"model": source.spec,
              "prompts": {"source": prompt_set.source, "count": len(prompt_set),
                          "sha256": prompt_set.sha256},
              "settings": {"steps": sampling.steps, "guidance_scale": sampling.guidance_scale,
                           "seeds": list(seeds),
                           "detector_steps": "all" if config.steps is None else config.steps,
                           "detector_scheduler": scheduler_name(pipe, config),
                           "score": "||eps(x_t,c) - eps(x_t,'')|| / sqrt(D), mean over the "
                                    "first steps and the seeds"},
              "ranking": sorted(({"prompt": p, "score": s, "first_step": f, "per_step": st,
                                  "memorized": lab}
                                 for p, s, f, st, lab in zip(prompt_set.prompts, scores, first,
                                                             per_step.tolist(), labels,
                                                             strict=True)),
                                key=lambda row: -row["score"])}
    if all(isinstance(lab, bool) for lab in labels) and len(set(labels)) == 2:
        result["auroc"] = auroc([s for s, lab in zip(scores, labels, strict=True) if lab],
                                [s for s, lab in zip(scores, labels, strict=True) if not lab])
    if out is not None:
        atomic_write_bytes(out, report_json(result), overwrite, inputs)
    return result


def attack(model: PathLike | None = None, **options) -> AttackReport:
    """Try to bring removed copies back with the embedding attack, as ``memedit attack``
    does: ``model`` (default: the embedded test model) is loaded, each memorized prompt's
    text embedding optimized towards its training image, every weight frozen, and scored at
    each checkpoint; the same attack on images the model never trained on is the control
    (for the embedded model, drawn by memedit). ``options`` are :class:`AttackOptions`;
    returns the report and its table, written to ``out`` (with the figures) when given.

    :func:`memedit.evaluation.attack.attack` is the same attack on a loaded pipeline.
    """
    from memedit.evaluation import attack as attacks
    from memedit.evaluation.report import report_json
    from memedit.evaluation.similarity import SSCD
    from memedit.loading import load_pipeline
    from memedit.outputs import atomic_output_dir
    from memedit.prompts import read_prompts

    o = AttackOptions(**options)
    if o.update_card:
        check_update_card(model, o.out)
    config = attacks.AttackConfig(
        lr=o.lr, steps=o.attack_steps, pairs=o.pairs,
        checkpoints=None if o.checkpoints is None else tuple(o.checkpoints), start=o.start,
        seed=o.attack_seed, prompt_batch=o.prompt_batch, control_limit=o.control_limit)
    settings = o.scoring_settings()
    origin = bake_source(model)
    embedded = is_embedded(model)
    if embedded:
        from memedit.testbed import prompt_file

        o = replace(o, memorized=o.memorized or prompt_file("memorized_heldout"))
        if config.start == "ordinary":
            o = replace(o, start_prompts=o.start_prompts or prompt_file("ordinary_seen"))
    elif o.memorized is None:
        raise MemeditError("--memorized is required for a model other than the embedded one.",
                           "Pass a JSONL of memorized prompts with their training images.")
    inputs = [model, o.memorized, o.control, o.start_prompts, o.sscd]
    memorized = read_prompts(o.memorized, "memorized")
    control = read_prompts(o.control, "control") if o.control else None
    start = read_prompts(o.start_prompts, "start") if o.start_prompts else None
    sscd = SSCD(o.sscd) if o.sscd else None
    images = [p for group in (memorized, control) if group is not None
              for record in group.records for p in record.images]
    with contextlib.ExitStack() as stack:
        if o.out is not None:
            stack.enter_context(hold_output(o.out, o.overwrite, inputs))
        pipe, source = load_pipeline(model, o.device, o.dtype, o.allow_pickle)
        context = {"model": source.spec, "baked_from": origin}
        if o.out is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            folder = stack.enter_context(atomic_output_dir(o.out, o.overwrite,
                                                           [*inputs, *images], "attack"))
        if control is None and embedded:
            # Drawn into the output being written; the report names where they end up.
            control = attacks.testbed_control(
                memorized, folder / "control_images",
                "drawn in memory (no --out)" if o.out is None
                else str(Path(o.out) / "control_images"))
        result = attacks.attack(pipe, memorized, config, settings, control, start, sscd)
        data = (attacks.build_report(result, context) if o.out is None
                else attacks.write_outputs(result, folder, context))
    # The report as report.json holds it (non-finite numbers are null there).
    out = None if o.out is None else Path(o.out)
    return AttackReport(json.loads(report_json(data)), attacks.table(result), out,
                        _card(model, o, out))

