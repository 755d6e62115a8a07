"""Click commands ``evaluate``, ``sweep`` and ``detect`` (registered in ``memedit.cli``).

They raise :class:`memedit.errors.MemeditError` for anything the user can fix; the top-level
CLI prints it with its hint.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import click

from memedit.errors import MemeditError
from memedit.outputs import hold_output


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MemeditError(f"{what} must be comma-separated numbers, got {text!r}.",
                           f"For example {what} 0.005,0.01,0.02.") from None
    if not values:
        raise MemeditError(f"{what} is empty.", "Give at least one number.")
    return values


def _seeds(count: int, start: int) -> tuple[int, ...]:
    if count < 1:
        raise MemeditError("--seeds must be at least 1.", "Pass the number of seeds per prompt.")
    return tuple(range(start, start + count))


def _size_options() -> list:
    return [click.option("--height", type=int, default=None,
                         help="Image height (default: the model's native size)."),
            click.option("--width", type=int, default=None,
                         help="Image width (default: the model's native size).")]


def _run_options() -> list:
    """Where a command runs and what it prints: shared by every command that samples."""
    return [click.option("--json", "as_json", is_flag=True,
                         help="Print the JSON report on stdout instead of the table."),
            click.option("--device", default="auto", show_default=True),
            click.option("--dtype", default="auto", show_default=True),
            click.option("--allow-pickle", is_flag=True,
                         help="Load pickled checkpoints (unsafe)."),
            click.option("--quiet", is_flag=True, help="No progress bars.")]


def sampling_options(func):
    """Options shared by every command that samples."""
    options = [
        click.option("--steps", default=50, show_default=True, help="Denoising steps."),
        click.option("--guidance-scale", default=7.5, show_default=True,
                     help="Classifier-free guidance scale."),
        click.option("--batch-size", default=8, show_default=True),
        click.option("--seeds", "seed_count", default=4, show_default=True,
                     help="Seeds per memorized prompt (the detector uses them too)."),
        click.option("--seed-start", default=100, show_default=True,
                     help="First seed; seeds are consecutive. Away from the locate seed (0)."),
        click.option("--detector-steps", type=int, default=None,
                     help="First denoising steps the detector averages over (default: 5; "
                          "every step with --detector-scheduler ddim)."),
        click.option("--detector-scheduler", type=click.Choice(["pipeline", "ddim"]),
                     default="pipeline", show_default=True,
                     help="The detector's sampler: the pipeline's own, or DDIM over every "
                          "step as Wen et al. ran it."),
        *_size_options(),
        *_run_options(),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def evaluation_options(func):
    """Options of ``evaluate`` and ``sweep``."""
    options = [
        click.option("--memorized", type=click.Path(path_type=Path),
                     help="Memorized prompts to report as held out (JSONL with `image` "
                          "fields for similarity). Default with the embedded model: its "
                          "held-out half."),
        click.option("--ordinary", type=click.Path(path_type=Path),
                     help="Ordinary prompts, for utility and as the detector's negatives. "
                          "Default with the embedded model: its unseen scenes."),
        click.option("--locate-prompts", type=click.Path(path_type=Path),
                     help="The prompts the edit was located on, reported separately. "
                          "Default with the embedded model: its locate half."),
        click.option("--locate-fraction", default=0.5, show_default=True,
                     help="With --k and no --locate-prompts: locate on this first part of "
                          "--memorized, hold out the rest."),
        click.option("--k", "ks", help="Comma-separated k values: locate once per k on the "
                                       "locate prompts and evaluate each (a sweep)."),
        click.option("--reference", type=click.Path(path_type=Path),
                     help="Sweep: reference prompts for locating (default: the empty prompt)."),
        click.option("--tau", default=10, show_default=True, help="Sweep: locate's tau."),
        click.option("--locate-seed", default=0, show_default=True,
                     help="Sweep: the seed every locate prompt is sampled with."),
        click.option("--targets", default="ff_out", show_default=True,
                     help="Sweep: locate's target layers."),
        click.option("--controls", default="auto", show_default=True,
                     help="random,nemo | none | auto (every control the inputs allow)."),
        click.option("--nemo-mode", type=click.Choice(["simplified", "faithful"]),
                     default="simplified", show_default=True,
                     help="NeMo control. faithful: NeMo's 7 down/mid value layers, two-sided "
                          "|z| plus per-layer top k, theta 5 down by 0.25 until the prompt "
                          "stops copying, then per-layer and per-channel refinement, with "
                          "generations in the loop (its copy check is evaluate's measure on "
                          "--nemo-seeds x --nemo-steps, not NeMo's first-step MS-SSIM). "
                          "simplified: outlier channels only, no check or refinement. "
                          "The default stays simplified because faithful is costly: hundreds "
                          "of generations a prompt, 17 min (976 checks) on the embedded model's 10 "
                          "locate prompts (2 CPU cores, 2 seeds x 20 steps) against seconds."),
        click.option("--nemo-seeds", default=2, show_default=True,
                     help="NeMo faithful: seeds (0, 1, ...) of every copy check in its loop."),
        click.option("--nemo-steps", default=20, show_default=True,
                     help="NeMo faithful: denoising steps of every copy check in its loop."),
        click.option("--nemo-z", default=3.0, show_default=True,
                     help="NeMo simplified: z-score above which a to_v channel is an outlier."),
        click.option("--nemo-max", default=10, show_default=True,
                     help="NeMo simplified: at most this many channels per memorized prompt."),
        click.option("--nemo-reference", type=click.Path(path_type=Path),
                     help="NeMo: ordinary prompts its z-scores are taken against (default: "
                          "--ordinary; with the embedded model: its seen scenes)."),
        click.option("--ordinary-seeds", default=1, show_default=True,
                     help="Seeds per ordinary prompt."),
        click.option("--measure", type=click.Choice(["auto", "sscd", "mse", "ssim"]),
                     default="auto", show_default=True,
                     help="Primary similarity: auto = sscd with --sscd, else mse."),
        click.option("--sscd", type=click.Path(path_type=Path),
                     help="SSCD TorchScript file (sscd_disc_mixup.torchscript.pt)."),
        click.option("--threshold", "thresholds",
                     help="Comma-separated thresholds for the primary measure "
                          "(default: sscd 0.7,0.5; mse 0.01)."),
        click.option("--gt-aggregate", type=click.Choice(["max", "mean"]), default="max",
                     show_default=True, help="Over a prompt's several training images."),
        click.option("--clip", "clip_dir", type=click.Path(path_type=Path),
                     help="Local CLIP model folder for the CLIP score."),
        click.option("--grid-prompts", default=4, show_default=True),
        click.option("--also", multiple=True, type=click.Path(path_type=Path),
                     help="evaluate: another model baked from the same original (e.g. a "
                          "hardened edit), evaluated side by side (repeat for several)."),
        click.option("--attack-steps", type=click.IntRange(min=0), default=0,
                     show_default=True,
                     help="Also attack every variant with the embedding attack (memedit attack) "
                          "for this many Adam steps and report copies under attack (0: off)."),
        click.option("--attack-lr", type=float, default=0.01, show_default=True,
                     help="The attack's learning rate (0.01 brings the default edit's copies "
                          "back on the embedded model; the published 0.1 overshoots its small "
                          "text encoder)."),
        click.option("--out", required=True, type=click.Path(path_type=Path),
                     help="Folder for report.json, table.txt, grid.png, sweep.png."),
        click.option("--overwrite", is_flag=True),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _settings(options: dict, measure: str):
    from memedit.evaluation.harness import EvalSettings
    from memedit.sampling import SamplingConfig

    sampling = SamplingConfig(steps=options["steps"], guidance_scale=options["guidance_scale"],
                              batch_size=options["batch_size"], height=options["height"],
                              width=options["width"])
    return EvalSettings(
        sampling=sampling,
        seeds=_seeds(options["seed_count"], options["seed_start"]),
        ordinary_seeds=_seeds(options["ordinary_seeds"], options["seed_start"]),
        measure=measure,
        thresholds=_floats(options["thresholds"], "--threshold"),
        gt_aggregate=options["gt_aggregate"],
        detector_steps=_detector_steps(options),
        detector_scheduler=options["detector_scheduler"],
        grid_prompts=options["grid_prompts"],
        progress=not options["quiet"],
        attack=_attack_config(options),
    )


def _attack_config(options: dict):
    """evaluate/sweep's attack column: the published attack on y, scored at its last step."""
    from memedit.evaluation.attack import AttackConfig

    if not options["attack_steps"]:
        return None
    # Prompts are attacked a batch at a time: each has its own noise generator, so the
    # result is the same as one at a time, only faster.
    return AttackConfig(lr=options["attack_lr"], steps=options["attack_steps"], checkpoints=(),
                        prompt_batch=options["batch_size"])


def _detector_steps(options: dict) -> int | None:
    """``None`` (every step) for Wen et al.'s DDIM set-up unless the user chose a number."""
    if options["detector_steps"] is not None:
        return options["detector_steps"]
    return None if options["detector_scheduler"] == "ddim" else 5


def _controls(text: str) -> tuple[str, ...] | None:
    """``None`` means "auto"."""
    if text == "auto":
        return None
    if text == "none":
        return ()
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in names if c not in ("random", "nemo")]
    if unknown:
        raise MemeditError(f"Unknown control {', '.join(unknown)}.",
                           "Use random, nemo, none or auto.")
    return names


def _bake_source(model) -> dict | None:
    """Where a memedit-baked ``model`` came from (``spec``, ``path``), else ``None``."""
    from memedit.inspection import provenance

    if model is None or not Path(model).is_dir():
        return None
    info = provenance(Path(model))
    return info.get("source") if info else None


def _embedded_defaults(model, options: dict) -> None:
    """Fill in the embedded test model's prompt files where the user gave none: for the
    embedded model itself, and for a model baked from it."""
    source = _bake_source(model)
    if source is not None and source.get("spec") == "memedit-testbed":
        model = None
    wanted = {"memorized": "memorized_heldout", "ordinary": "ordinary_unseen",
              "locate_prompts": "memorized_locate", "nemo_reference": "ordinary_seen"}
    missing = [key for key in wanted if options[key] is None]
    if options["memorized"] is not None and "locate_prompts" in missing:
        missing.remove("locate_prompts")  # the user's own memorized set: split it, not ours
    if not missing:
        return
    if model is not None:
        if {"memorized", "ordinary"} & set(missing):
            raise MemeditError("--memorized and --ordinary are required for a model other "
                               "than the embedded one.",
                               "Pass a JSONL of memorized prompts with their training images, "
                               "and a file of ordinary prompts.")
        return
    try:
        from memedit.testbed import prompt_file
    except ImportError:
        raise MemeditError("This build has no embedded test model prompts.",
                           "Pass --model, --memorized and --ordinary.") from None
    for key in missing:
        options[key] = prompt_file(wanted[key])


def _inputs(model, baseline, options: dict) -> list:
    """The paths an evaluation reads (models, prompt files, scorers): its output spares them."""
    origin = (_bake_source(model) or {}).get("path")  # the baseline a baked model implies
    return [model, baseline, origin, *options.get("also", ()), *(options.get(key) for key in (
        "memorized", "ordinary", "locate_prompts", "reference", "nemo_reference", "sscd",
        "clip_dir"))]


def _other_edit(path, baseline_source):
    """The subspace of another model baked from the evaluated one's original (``--also``)."""
    from memedit.baking import check_model_matches
    from memedit.subspace import Subspace

    if baseline_source is None:
        raise MemeditError("--also applies other edits to the original, and there is none.",
                           "Pass --baseline ORIGINAL (or evaluate a model memedit baked).")
    subspace = Subspace.load(path)
    # Its edited tensors must be the original's before the edit: it is an edit of this model.
    check_model_matches(baseline_source, subspace, baseline_source.allow_pickle)
    return subspace


def run_evaluation(model, baseline, options: dict, sweep_mode: bool) -> None:
    """Shared body of ``evaluate`` and ``sweep``."""
    from memedit.evaluation import figures, report
    from memedit.evaluation.harness import Inputs, evaluate, split_memorized, sweep
    from memedit.evaluation.similarity import SSCD
    from memedit.evaluation.utility import CLIPScorer
    from memedit.loading import load_pipeline
    from memedit.locate import LocateConfig
    from memedit.outputs import atomic_output_dir
    from memedit.prompts import read_prompts
    from memedit.subspace import Subspace
    from memedit.targets import parse_target_kinds

    ks = _floats(options["ks"], "--k")
    if sweep_mode and ks is None:
        raise MemeditError("A sweep needs the k values.", "Pass --k 0.005,0.01,0.02.")
    if ks is not None and baseline is not None:
        raise MemeditError("With --k, --model is the original and every edit is applied to it "
                           "in memory, so --baseline has no role.",
                           "Drop --baseline, or drop --k to evaluate a baked model.")
    if ks is not None and options["also"]:
        raise MemeditError("With --k every edit is located in memory; --also adds baked ones "
                           "to an evaluate.", "Drop --also, or drop --k.")
    out = options["out"]
    measure = options["measure"]
    if measure == "auto":
        measure = "sscd" if options["sscd"] else "mse"
    settings = _settings(options, measure)
    _embedded_defaults(model, options)
    memorized = read_prompts(options["memorized"], "memorized")
    ordinary = read_prompts(options["ordinary"], "ordinary")
    locate_prompts = (read_prompts(options["locate_prompts"], "locate")
                      if options["locate_prompts"] else None)
    if ks is not None and locate_prompts is None:
        locate_prompts, memorized = split_memorized(memorized, options["locate_fraction"])
    device = options["device"]
    sscd = SSCD(options["sscd"]) if options["sscd"] else None
    clip = CLIPScorer(options["clip_dir"]) if options["clip_dir"] else None
    inputs = Inputs(memorized, ordinary, locate_prompts, sscd, clip)
    controls = _controls(options["controls"])
    nemo = {"mode": options["nemo_mode"], "seeds": options["nemo_seeds"],
            "steps": options["nemo_steps"],
            "z_threshold": options["nemo_z"], "max_per_prompt": options["nemo_max"],
            "reference": read_prompts(options["nemo_reference"], "nemo-reference")
            if options["nemo_reference"] else None}
    load = functools.partial(load_pipeline, device=device, dtype=options["dtype"],
                             allow_pickle=options["allow_pickle"])
    if ks is not None:
        # Sweep: --model is the original; every edit is applied in memory.
        pipe, source = load(model)
        config = LocateConfig(targets=parse_target_kinds(options["targets"]),
                              tau=options["tau"],
                              sampling=replace(settings.sampling, seed=options["locate_seed"]))
        reference = read_prompts(options["reference"], "reference") \
            if options["reference"] else None
        result = sweep(pipe, inputs, settings, ks, config, reference,
                       ("random", "nemo") if controls is None else controls, nemo)
        context = {"model": source.spec}
    else:
        pipe, source = load(model)
        origin = _bake_source(model)
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
                  for path in options["also"]]
        result = evaluate(pipe, inputs, settings, baseline_pipe, subspace, controls, nemo,
                          others)
        context = {"model": source.spec,
                   "baseline": baseline_source.spec if baseline_source else None}
    data = report.build_report(result, context)
    text = report.table(result)
    # The training images are inputs too: the report may not replace a folder that holds them.
    images = [path for group in (memorized, locate_prompts) if group is not None
              for record in group.records for path in record.images]
    with atomic_output_dir(out, options["overwrite"], [*_inputs(model, baseline, options),
                                                      *images], "evaluation") as tmp:
        (tmp / "report.json").write_bytes(report.report_json(data))
        (tmp / "table.txt").write_text(text + "\n")
        grid = figures.image_grid(result)
        if grid is not None:
            (tmp / "grid.png").write_bytes(grid)
        plot = figures.sweep_plot(result)
        if plot is not None:
            (tmp / "sweep.png").write_bytes(plot)
    if options["as_json"]:
        click.echo(report.report_json(data).decode(), nl=False)
    else:
        click.echo(text)
    click.echo(f"Wrote {out}/report.json", err=True)


@click.command(name="evaluate")
@click.option("--model", help="The sanitized model (with --k: the original). Default: the "
                              "embedded test model.")
@click.option("--baseline", help="The original model, evaluated side by side. Default for a "
                                 "model memedit baked: the original recorded at bake time.")
@evaluation_options
@sampling_options
def evaluate_command(model, baseline, **options):
    """Measure memorization before and after an edit, on held-out memorized prompts.

    Generates every memorized prompt with several fixed seeds and compares each generation
    with its training image(s); runs Wen et al.'s detector; measures utility on ordinary
    prompts; adds the random-mask and NeMo controls. With --k it locates once per k and
    evaluates each (as `memedit sweep`).
    """
    with hold_output(options["out"], options["overwrite"], _inputs(model, baseline, options)):
        run_evaluation(model, baseline, options, sweep_mode=False)


@click.command(name="sweep")
@click.option("--model", help="The original model. Default: the embedded test model.")
@evaluation_options
@sampling_options
def sweep_command(model, **options):
    """Locate once per k (--k 0.005,0.01,0.02) on the locate prompts and evaluate each edit,
    its random control and NeMo on held-out prompts; plots rate and utility against k."""
    with hold_output(options["out"], options["overwrite"], _inputs(model, None, options)):
        run_evaluation(model, None, options, sweep_mode=True)


@click.command(name="detect")
@click.option("--model", help="The model. Default: the embedded test model.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(path_type=Path),
              help="Candidate prompts; a JSONL boolean field `memorized` adds an AUROC.")
@click.option("--top", default=20, show_default=True, help="Rows to print.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the ranking as JSON.")
@click.option("--overwrite", is_flag=True)
@sampling_options
def detect_command(model, prompts_file, top, out, overwrite, **options):
    """Rank prompts by Wen et al.'s memorization detector, most suspicious first.

    The score is ||eps(x_t, c) - eps(x_t, "")|| / sqrt(D), averaged over the first
    --detector-steps steps and over --seeds seeds. No training images are needed.
    """
    from tqdm.auto import tqdm

    from memedit.evaluation.detector import (
        DetectorConfig,
        auroc,
        detector_scores,
        scheduler_name,
        text_noise_magnitudes,
    )
    from memedit.evaluation.report import detect_table, report_json
    from memedit.loading import load_pipeline
    from memedit.outputs import atomic_write_bytes, check_output
    from memedit.prompts import read_prompts
    from memedit.sampling import SamplingConfig

    if out is not None:
        check_output(out, overwrite, [model, prompts_file], kind="file")
    prompts = read_prompts(prompts_file)
    seeds = _seeds(options["seed_count"], options["seed_start"])
    sampling = SamplingConfig(steps=options["steps"], guidance_scale=options["guidance_scale"],
                              batch_size=options["batch_size"], height=options["height"],
                              width=options["width"])
    config = DetectorConfig(_detector_steps(options), sampling, options["detector_scheduler"])
    pipe, source = load_pipeline(model, options["device"], options["dtype"],
                                 options["allow_pickle"])
    texts = [p for p in prompts.prompts for _ in seeds]
    with tqdm(total=len(texts), desc="detect", unit="prompt", disable=options["quiet"]) as bar:
        magnitudes = text_noise_magnitudes(pipe, texts, [s for _ in prompts.prompts
                                                         for s in seeds], config, bar)
    per_step = magnitudes.reshape(len(prompts), len(seeds), -1).mean(axis=1)
    scores = detector_scores(per_step).tolist()
    first = detector_scores(per_step, 1).tolist()
    labels = [r.extra.get("memorized") for r in prompts.records]
    result = {"model": source.spec, "prompts": {"source": prompts.source, "count": len(prompts),
                                                "sha256": prompts.sha256},
              "settings": {"steps": sampling.steps, "guidance_scale": sampling.guidance_scale,
                           "seeds": list(seeds),
                           "detector_steps": "all" if config.steps is None else config.steps,
                           "detector_scheduler": scheduler_name(pipe, config),
                           "score": "||eps(x_t,c) - eps(x_t,'')|| / sqrt(D), mean over the "
                                    "first steps and the seeds"},
              "ranking": sorted(({"prompt": p, "score": s, "first_step": f, "per_step": st,
                                  "memorized": lab}
                                 for p, s, f, st, lab in zip(prompts.prompts, scores, first,
                                                             per_step.tolist(), labels,
                                                             strict=True)),
                                key=lambda row: -row["score"])}
    if all(isinstance(lab, bool) for lab in labels) and len(set(labels)) == 2:
        result["auroc"] = auroc([s for s, lab in zip(scores, labels, strict=True) if lab],
                                [s for s, lab in zip(scores, labels, strict=True) if not lab])
    if options["as_json"]:
        click.echo(report_json(result).decode(), nl=False)
    else:
        table = detect_table(prompts.prompts, scores, first)
        click.echo("\n".join(table.splitlines()[: top + 2]))
        if "auroc" in result:
            click.echo(f"AUROC (memorized vs not, from the `memorized` field): "
                       f"{result['auroc']:.3f}")
    if out is not None:
        atomic_write_bytes(out, report_json(result), overwrite, [model, prompts_file])
        click.echo(f"Wrote {out}", err=True)


def attack_options(func):
    """Options of ``attack``: the attack's budget and start, then scoring and sampling."""
    path = click.Path(path_type=Path)
    options = [
        click.option("--model", help="The model to attack: an original or a sanitized (baked) "
                                     "one. Default: the embedded test model."),
        click.option("--memorized", type=path,
                     help="Memorized prompts with their training images (JSONL `image` "
                          "field). Default with the embedded model: its held-out half."),
        click.option("--control", type=path,
                     help="Prompts with images the model never trained on (same format): "
                          "the same attack must not copy them. Default with the embedded "
                          "model: its memorized scenes over never-trained backgrounds."),
        click.option("--start", default="prompt", show_default=True,
                     help="Where y starts: prompt (its own embedding), random (N(0, I)) or "
                          "ordinary (an ordinary prompt's embedding)."),
        click.option("--start-prompts", type=path,
                     help="Ordinary prompts for --start ordinary. Default with the embedded "
                          "model: its seen scenes."),
        click.option("--lr", default=0.1, show_default=True, help="Adam learning rate."),
        click.option("--attack-steps", default=50, show_default=True,
                     help="Adam steps on y."),
        click.option("--pairs", default=8, show_default=True,
                     help="Noise/timestep pairs a step."),
        click.option("--checkpoints",
                     help="Comma-separated step counts to generate from and score; 0 and "
                          "--attack-steps always are. Default: 1,10,25,50 up to "
                          "--attack-steps."),
        click.option("--attack-seed", default=0, show_default=True,
                     help="Seed of the attack's noise (prompt i uses seed + i)."),
        click.option("--prompt-batch", default=1, show_default=True,
                     help="Prompts optimized together: faster on a small model, more memory."),
        click.option("--control-limit", default=0.1, show_default=True,
                     help="Control copy rate above which the report calls the attack too "
                          "strong to mean anything."),
        click.option("--measure", type=click.Choice(["auto", "sscd", "mse", "ssim"]),
                     default="auto", show_default=True,
                     help="Similarity, as in evaluate: auto = sscd with --sscd, else mse."),
        click.option("--sscd", type=path,
                     help="SSCD TorchScript file (sscd_disc_mixup.torchscript.pt)."),
        click.option("--threshold", "thresholds",
                     help="Copy threshold(s), the first one counts (default: sscd 0.7, mse "
                          "0.01); near copies are within twice the first."),
        click.option("--gt-aggregate", type=click.Choice(["max", "mean"]), default="max",
                     show_default=True, help="Over a prompt's several training images."),
        click.option("--steps", default=50, show_default=True,
                     help="Denoising steps of each generation."),
        click.option("--guidance-scale", default=7.5, show_default=True),
        click.option("--batch-size", default=8, show_default=True,
                     help="Images per pipeline call."),
        click.option("--seeds", "seed_count", default=4, show_default=True,
                     help="Generation seeds per prompt and checkpoint."),
        click.option("--seed-start", default=100, show_default=True,
                     help="First generation seed; seeds are consecutive."),
        *_size_options(),
        click.option("--grid-prompts", default=4, show_default=True,
                     help="Prompts shown in grid.png (target and control each)."),
        click.option("--out", required=True, type=path,
                     help="Folder for report.json, table.txt, curve.png, grid.png."),
        click.option("--overwrite", is_flag=True),
        *_run_options(),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _checkpoints(text: str | None) -> tuple[int, ...] | None:
    values = _floats(text, "--checkpoints")
    if values is not None and any(v != int(v) for v in values):
        raise MemeditError(f"--checkpoints are step counts, got {text!r}.",
                           "For example --checkpoints 1,10,25,50.")
    return None if values is None else tuple(int(v) for v in values)


@click.command(name="attack")
@attack_options
def attack_command(**o):
    """Try to bring removed copies back: optimize each memorized prompt's text embedding
    towards its training image (the Finding Dori attack), every weight frozen.

    Scores the generations from the embedding after each checkpoint as `evaluate` does, and
    runs the same attack against images the model never trained on as a control: if those
    get copied too, the attack is too strong to say anything about memorization.
    """
    from memedit.evaluation.attack import AttackConfig, attack, testbed_control, write_outputs
    from memedit.evaluation.harness import EvalSettings
    from memedit.evaluation.report import report_json
    from memedit.evaluation.similarity import SSCD
    from memedit.loading import load_pipeline
    from memedit.outputs import atomic_output_dir
    from memedit.prompts import read_prompts
    from memedit.sampling import SamplingConfig

    config = AttackConfig(lr=o["lr"], steps=o["attack_steps"], pairs=o["pairs"],
                          checkpoints=_checkpoints(o["checkpoints"]), start=o["start"],
                          seed=o["attack_seed"], prompt_batch=o["prompt_batch"],
                          control_limit=o["control_limit"])
    measure = o["measure"] if o["measure"] != "auto" else "sscd" if o["sscd"] else "mse"
    settings = EvalSettings(
        sampling=SamplingConfig(steps=o["steps"], guidance_scale=o["guidance_scale"],
                                batch_size=o["batch_size"], height=o["height"],
                                width=o["width"]),
        seeds=_seeds(o["seed_count"], o["seed_start"]), measure=measure,
        thresholds=_floats(o["thresholds"], "--threshold"), gt_aggregate=o["gt_aggregate"],
        grid_prompts=o["grid_prompts"], progress=not o["quiet"])
    origin = _bake_source(o["model"])
    embedded = o["model"] is None or (origin or {}).get("spec") == "memedit-testbed"
    if embedded:
        from memedit.testbed import prompt_file

        o["memorized"] = o["memorized"] or prompt_file("memorized_heldout")
        if config.start == "ordinary":
            o["start_prompts"] = o["start_prompts"] or prompt_file("ordinary_seen")
    elif o["memorized"] is None:
        raise MemeditError("--memorized is required for a model other than the embedded one.",
                           "Pass a JSONL of memorized prompts with their training images.")
    inputs = [o["model"], o["memorized"], o["control"], o["start_prompts"], o["sscd"]]
    with hold_output(o["out"], o["overwrite"], inputs):
        memorized = read_prompts(o["memorized"], "memorized")
        control = read_prompts(o["control"], "control") if o["control"] else None
        start = read_prompts(o["start_prompts"], "start") if o["start_prompts"] else None
        sscd = SSCD(o["sscd"]) if o["sscd"] else None
        pipe, source = load_pipeline(o["model"], o["device"], o["dtype"], o["allow_pickle"])
        images = [p for group in (memorized, control) if group is not None
                  for record in group.records for p in record.images]
        with atomic_output_dir(o["out"], o["overwrite"], [*inputs, *images], "attack") as tmp:
            if control is None and embedded:
                control = testbed_control(memorized, tmp / "control_images")
            result = attack(pipe, memorized, config, settings, control, start, sscd)
            data = write_outputs(result, tmp, {"model": source.spec, "baked_from": origin})
    if o["as_json"]:
        click.echo(report_json(data).decode(), nl=False)
    else:
        click.echo((Path(o["out"]) / "table.txt").read_text(), nl=False)
    click.echo(f"Wrote {o['out']}/report.json", err=True)
