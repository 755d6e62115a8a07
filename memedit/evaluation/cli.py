"""Click commands ``evaluate``, ``sweep``, ``detect`` and ``attack`` (registered in
``memedit.cli``): they parse options, call the API of the same name
(:mod:`memedit.evaluation.api`) and print.

They raise :class:`memedit.errors.MemeditError` for anything the user can fix; the top-level
CLI prints it with its hint.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from memedit.errors import MemeditError
from memedit.hub import model_hub_options


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
        click.option("--seeds", "seeds", default=4, show_default=True,
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
        click.option("--k", "k", help="Comma-separated k values: locate once per k on the "
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
        click.option("--threshold", "threshold",
                     help="Comma-separated thresholds for the primary measure "
                          "(default: sscd 0.7,0.5; mse 0.01)."),
        click.option("--gt-aggregate", type=click.Choice(["max", "mean"]), default="max",
                     show_default=True, help="Over a prompt's several training images."),
        click.option("--clip", "clip", type=click.Path(path_type=Path),
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


def _parsed(options: dict) -> dict:
    """The command's options as the API takes them: comma-separated lists become tuples."""
    return options | {"k": _floats(options["k"], "--k"),
                      "threshold": _floats(options["threshold"], "--threshold")}


def update_card_option(func):
    """``--update-card``, refused before anything runs unless the model is a folder memedit
    baked with a card it can update: put it above :func:`model_hub_options`, whose resolving
    of a hub id downloads the model."""
    @click.option("--update-card", is_flag=True,
                  help="Also put this run's table into the Results section of the model's card "
                       "(README.md): only for a model folder memedit baked; checked before the "
                       "run.")
    @functools.wraps(func)
    def wrapper(*args, update_card: bool, **kwargs):
        if update_card:
            from memedit.evaluation.api import check_update_card

            check_update_card(kwargs.get("model"), kwargs.get("out"), kwargs.get("k"))
        return func(*args, update_card=update_card, **kwargs)

    return wrapper


def _report_card(report) -> None:
    if report.card is not None:  # None: not asked, or not the main process of a launched run
        click.echo(f"Updated {report.card}", err=True)


def _print_evaluation(evaluation, as_json: bool) -> None:
    from memedit.evaluation.report import report_json

    if as_json:
        click.echo(report_json(evaluation.report).decode(), nl=False)
    else:
        click.echo(evaluation.table)
    click.echo(f"Wrote {evaluation.out}/report.json", err=True)


@click.command(name="evaluate")
@click.option("--model", help="The sanitized model (with --k: the original). Default: the "
                              "embedded test model.")
@click.option("--baseline", help="The original model, evaluated side by side. Default for a "
                                 "model memedit baked: the original recorded at bake time.")
@update_card_option
@model_hub_options()
@evaluation_options
@sampling_options
def evaluate_command(model, baseline, as_json, update_card, **options):
    """Measure memorization before and after an edit, on held-out memorized prompts.

    Generates every memorized prompt with several fixed seeds and compares each generation
    with its training image(s); runs Wen et al.'s detector; measures utility on ordinary
    prompts; adds the random-mask and NeMo controls. With --k it locates once per k and
    evaluates each (as `memedit sweep`).
    """
    from memedit.evaluation.api import evaluate

    evaluation = evaluate(model, baseline, update_card=update_card, **_parsed(options))
    _print_evaluation(evaluation, as_json)
    _report_card(evaluation)


@click.command(name="sweep")
@click.option("--model", help="The original model. Default: the embedded test model.")
@model_hub_options()
@evaluation_options
@sampling_options
def sweep_command(model, as_json, **options):
    """Locate once per k (--k 0.005,0.01,0.02) on the locate prompts and evaluate each edit,
    its random control and NeMo on held-out prompts; plots rate and utility against k."""
    from memedit.evaluation.api import sweep

    _print_evaluation(sweep(model, **_parsed(options)), as_json)


@click.command(name="detect")
@click.option("--model", help="The model. Default: the embedded test model.")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help="Candidate prompts; a JSONL boolean field `memorized` adds an AUROC.")
@click.option("--top", default=20, show_default=True, help="Rows to print.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the ranking as JSON.")
@click.option("--overwrite", is_flag=True)
@model_hub_options()
@sampling_options
def detect_command(model, prompts, top, out, overwrite, as_json, **options):
    """Rank prompts by Wen et al.'s memorization detector, most suspicious first.

    The score is ||eps(x_t, c) - eps(x_t, "")|| / sqrt(D), averaged over the first
    --detector-steps steps and over --seeds seeds. No training images are needed.
    """
    from memedit.evaluation.api import detect
    from memedit.evaluation.report import detect_table, report_json

    result = detect(model, prompts, out=out, overwrite=overwrite, **options)
    if as_json:
        click.echo(report_json(result).decode(), nl=False)
    else:
        ranking = result["ranking"]
        table = detect_table([row["prompt"] for row in ranking],
                             [row["score"] for row in ranking],
                             [row["first_step"] for row in ranking])
        click.echo("\n".join(table.splitlines()[: top + 2]))
        if "auroc" in result:
            click.echo(f"AUROC (memorized vs not, from the `memorized` field): "
                       f"{result['auroc']:.3f}")
    if out is not None:
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
        click.option("--threshold", "threshold",
                     help="Copy threshold(s), the first one counts (default: sscd 0.7, mse "
                          "0.01); near copies are within twice the first."),
        click.option("--gt-aggregate", type=click.Choice(["max", "mean"]), default="max",
                     show_default=True, help="Over a prompt's several training images."),
        click.option("--steps", default=50, show_default=True,
                     help="Denoising steps of each generation."),
        click.option("--guidance-scale", default=7.5, show_default=True),
        click.option("--batch-size", default=8, show_default=True,
                     help="Images per pipeline call."),
        click.option("--seeds", "seeds", default=4, show_default=True,
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


def _parsed_attack(options: dict) -> dict:
    """The command's options as :func:`memedit.attack` takes them."""
    return {key: value for key, value in options.items() if key not in ("model", "as_json")} | {
        "checkpoints": _checkpoints(options["checkpoints"]),
        "threshold": _floats(options["threshold"], "--threshold")}


@click.command(name="attack")
@update_card_option
@attack_options
@model_hub_options()
def attack_command(update_card: bool, **o):
    """Try to bring removed copies back: optimize each memorized prompt's text embedding
    towards its training image (the Finding Dori attack), every weight frozen.

    Scores the generations from the embedding after each checkpoint as `evaluate` does, and
    runs the same attack against images the model never trained on as a control: if those
    get copied too, the attack is too strong to say anything about memorization.
    """
    from memedit.evaluation.api import attack
    from memedit.evaluation.report import report_json

    attacked = attack(o["model"], update_card=update_card, **_parsed_attack(o))
    if o["as_json"]:
        click.echo(report_json(attacked.report).decode(), nl=False)
    else:
        click.echo(attacked.table)
    click.echo(f"Wrote {o['out']}/report.json", err=True)
    _report_card(attacked)
