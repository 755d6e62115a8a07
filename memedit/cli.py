"""The ``memedit`` command line: a thin layer over the Python API (see ``memedit/__init__``).

Every command prints a readable table, or JSON with ``--json`` (stdout stays machine-readable:
progress bars and messages go to stderr). User errors exit with status 2 and a hint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
from tabulate import tabulate

from memedit import distributed
from memedit.errors import MemeditError
from memedit.hub import model_hub_options, push_options
from memedit.outputs import recorded_writes

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's convention for a process ended by SIGINT
EXIT_STOPPED = 143  # ... and by SIGTERM (a launcher stopping the processes of a failed run)
# Libraries whose log lines concern their developers, not a memedit user (import notes such as
# "Multiple distributions found for package optimum", exporter chatter, tokenizer truncation).
THIRD_PARTY_LOGGERS = ("diffusers", "transformers", "optimum", "torch", "onnxruntime",
                       "huggingface_hub", "accelerate")


class UserError(click.ClickException):
    exit_code = EXIT_USER_ERROR


class _NoticeFormatter(logging.Formatter):
    """``memedit: message``; a warning says that it is one (``memedit: warning: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return f"memedit: {kind}{record.getMessage()}"


def configure_console(verbose: bool) -> None:
    """memedit's own notices always reach stderr; third-party warnings only with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoticeFormatter())
    memedit_log = logging.getLogger("memedit")
    memedit_log.handlers[:] = [handler]
    memedit_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    memedit_log.propagate = False
    level = logging.WARNING if verbose else logging.ERROR
    # diffusers and transformers read these when first imported (the commands import them
    # lazily) and configure their loggers from them; set both ways for an already loaded one.
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ[name] = "warning" if verbose else "error"
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for module, setter in (("diffusers.utils.logging", "set_verbosity"),
                           ("transformers.utils.logging", "set_verbosity")):
        if module in sys.modules:
            getattr(sys.modules[module], setter)(level)
    if "onnxruntime" in sys.modules:
        sys.modules["onnxruntime"].set_default_logger_severity(2 if verbose else 3)
    # Tracer, deprecation and future warnings are about the libraries' own code paths.
    warnings.simplefilter("default" if verbose else "ignore")


def _verbose_option(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.ensure_object(dict)["verbose"] = True
        configure_console(True)
    return value


def verbose_option() -> click.Option:
    return click.Option(["--verbose", "-v"], is_flag=True, expose_value=False, is_eager=True,
                        callback=_verbose_option,
                        help="Show third-party warnings and a traceback for internal errors.")


class MemeditGroup(click.Group):
    """One place for what every command shares: --verbose, quiet third-party output, and
    errors as messages. A user error (MemeditError, an unreadable or full disk) exits 2 with
    a hint and no traceback; Ctrl-C exits 130 after the partial output was removed; an
    internal error names itself and shows its traceback only with --verbose."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(p.name == "verbose" for p in cmd.params):
            cmd.params.append(verbose_option())
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        # The group's --verbose was parsed already; a command's own --verbose is parsed
        # inside super().invoke and reconfigures then. Both write into this shared obj.
        settings = ctx.ensure_object(dict)
        configure_console(bool(settings.get("verbose")))
        try:
            # Under `accelerate launch` this joins the other processes first; only the main
            # one prints, and all of them finish together (after it has written the outputs).
            with recorded_writes() as written, distributed.quiet_unless_main():
                result = super().invoke(ctx)
            distributed.barrier(written)
            return result
        except MemeditError as err:
            raise UserError(str(err)) from None
        except distributed.StoppedByLauncher as err:
            click.echo(f"memedit: {err}", err=True)
            raise click.exceptions.Exit(EXIT_STOPPED) from None
        except KeyboardInterrupt:
            click.echo("memedit: interrupted; nothing was written (partial output removed).",
                       err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except OSError as err:
            where = f" ({err.filename})" if err.filename else ""
            raise UserError(f"{err.strerror or err}{where}.\nHint: check the path, its "
                            "permissions and the free space; nothing was written.") from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            if settings.get("verbose"):
                traceback.print_exc()
            click.echo(f"memedit: internal error: {type(err).__name__}: {err}", err=True)
            click.echo("This is a bug in memedit, not in your input. Run again with --verbose "
                       "for the traceback, and report it.", err=True)
            raise click.exceptions.Exit(1) from None


def emit(data: dict, as_json: bool, render) -> None:
    """Print ``data`` as JSON, or through ``render`` (a callable returning text)."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(render(data))


def model_options(func):
    @click.option("--model", default=None, metavar="FOLDER|HUB_ID",
                  help="Diffusers pipeline folder or hub id. Default: the embedded test model.")
    @click.option("--device", default="auto", show_default=True,
                  help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    @click.option("--dtype", default="auto", show_default=True,
                  type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                  help="auto: float16 on CUDA, float32 on CPU.")
    @click.option("--allow-pickle", is_flag=True,
                  help="Also load pickled checkpoints (.bin/.ckpt). Unpickling can run code.")
    @model_hub_options()
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def method_options(func):
    @click.option("--memorized", type=click.Path(path_type=Path), default=None,
                  help="Memorized prompts (.txt, .jsonl with prompt/caption, .csv). Default with "
                       "the embedded model: its locate half.")
    @click.option("--reference", type=click.Path(path_type=Path), default=None,
                  help="Reference prompts. Default: the empty prompt (the authors' choice).")
    @click.option("--memorized-stats", multiple=True, type=click.Path(path_type=Path),
                  help="Use saved statistics instead of --memorized (repeat to merge).")
    @click.option("--reference-stats", multiple=True, type=click.Path(path_type=Path),
                  help="Use saved statistics instead of --reference (repeat to merge).")
    @click.option("--save-stats", type=click.Path(path_type=Path), default=None,
                  help="New folder to save both sets' statistics in (to merge runs later); "
                       "written even if the selection is then refused.")
    @click.option("--targets", default="ff_out", show_default=True,
                  help="Layers to edit, comma-separated: ff_out, ff_in, attn2_k, attn2_v, "
                       "text_mlp.")
    @click.option("--k", "k", type=float, default=0.01, show_default=True,
                  help="Fraction of each layer's inputs kept per output row and step.")
    @click.option("--tau", type=int, default=10, show_default=True,
                  help="Number of first (noisiest) UNet calls aggregated.")
    @click.option("--rho", type=float, default=0.0, show_default=True,
                  help="Keep weights flagged in more than rho*tau calls (0: union).")
    @click.option("--granularity", type=click.Choice(["weight", "neuron"]), default="weight",
                  show_default=True, help="Single weights, or whole input columns (neurons).")
    @click.option("--allow-empty", is_flag=True,
                  help="Write the subspace even if it selects no weight (otherwise an error).")
    @click.option("--target-rate", type=float, default=None,
                  help="Choose k instead of --k: the smallest k of the grid whose edit copies at "
                       "most this share of generations of a validation part of --memorized.")
    @click.option("--utility-budget", type=float, default=0.03, show_default=True,
                  help="With --target-rate: the largest utility drop on --ordinary accepted.")
    @click.option("--validation-fraction", type=float, default=0.3, show_default=True,
                  help="With --target-rate: the last part of --memorized held back to "
                       "validate k (never located on).")
    @click.option("--calibration-ks", default=None,
                  help="With --target-rate: the k grid, comma-separated (default "
                       "0.005,0.01,0.015,0.02,0.03,0.04,0.05,0.07,0.1).")
    @click.option("--calibration-seeds", type=click.IntRange(min=1), default=4,
                  show_default=True,
                  help="With --target-rate: seeds per validation and per ordinary prompt.")
    @click.option("--ordinary", type=click.Path(path_type=Path), default=None,
                  help="With --target-rate: ordinary prompts for the utility cost. Default with "
                       "the embedded model: its seen scenes.")
    @click.option("--clip", "clip_dir", type=click.Path(path_type=Path), default=None,
                  help="With --target-rate: local CLIP model folder; utility = CLIP score.")
    @click.option("--harden-rounds", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Harden the edit against the embedding attack: rounds of attacking the "
                       "edited model on the memorized prompts' training images and zeroing "
                       "what the attack's triggers lean on too (0: off).")
    @click.option("--under-attack", is_flag=True,
                  help="With --target-rate: measure the validation copies under the embedding "
                       "attack (--attack-lr, --attack-steps) against each candidate edit.")
    @click.option("--attack-lr", type=float, default=0.01, show_default=True,
                  help="With --harden-rounds or --under-attack: the attack's Adam learning rate.")
    @click.option("--attack-steps", type=click.IntRange(min=1), default=50,
                  show_default=True,
                  help="With --harden-rounds or --under-attack: the attack's steps.")
    @sampling_options
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def sampling_options(func):
    @click.option("--steps", type=int, default=50, show_default=True,
                  help="Denoising steps of the pipeline's scheduler.")
    @click.option("--guidance-scale", type=float, default=7.5, show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--batch-size", type=int, default=8, show_default=True,
                  help="Prompts per pipeline call.")
    @click.option("--height", type=int, default=None,
                  help="Image height (default: the model's native size).")
    @click.option("--width", type=int, default=None,
                  help="Image width (default: the model's native size).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@click.group(cls=MemeditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memedit")
@click.option("--verbose", "-v", is_flag=True, expose_value=False, is_eager=True,
              callback=_verbose_option,
              help="Show third-party warnings and a traceback for internal errors.")
def cli() -> None:
    """Locate the weights a diffusion model uses to reproduce its training images, and delete
    them (Chavhan et al. 2024). Start with `memedit locate-and-bake --out sanitized`."""


def _locate(opts: dict):
    """Shared by `locate` and `locate-and-bake`: the options as :func:`memedit.locate` takes
    them. Returns (pipe, source, keyword arguments)."""
    from memedit.evaluation.utility import CLIPScorer
    from memedit.loading import load_pipeline
    from memedit.locate import LocateConfig
    from memedit.prompts import read_prompts
    from memedit.sampling import SamplingConfig
    from memedit.targets import parse_target_kinds

    config = LocateConfig(
        targets=parse_target_kinds(opts["targets"]), k=opts["k"], tau=opts["tau"],
        rho=opts["rho"], granularity=opts["granularity"],
        sampling=SamplingConfig(steps=opts["steps"], guidance_scale=opts["guidance_scale"],
                                seed=opts["seed"], batch_size=opts["batch_size"],
                                height=opts["height"], width=opts["width"]))
    config.validate()
    target = _calibration_config(opts)
    if opts["under_attack"] and target is None:
        raise MemeditError("--under-attack is how --target-rate measures copies.",
                           "Pass --target-rate R with it.")

    def prompts(option: str):
        return read_prompts(opts[option], name=option) if opts[option] else None

    options = {"memorized": prompts("memorized"), "reference": prompts("reference"),
               "ordinary": prompts("ordinary"), "config": config, "target": target,
               "hardening": _hardening(opts) if opts["harden_rounds"] else None,
               "clip": CLIPScorer(opts["clip_dir"]) if opts["clip_dir"] else None,
               "allow_empty": opts["allow_empty"],
               "memorized_stats": opts["memorized_stats"] or None,
               "reference_stats": opts["reference_stats"] or None,
               "save_stats": opts["save_stats"], "overwrite": opts["overwrite"],
               "inputs": _inputs(opts)}
    pipe, source = load_pipeline(opts["model"], opts["device"], opts["dtype"],
                                 opts["allow_pickle"])
    return pipe, source, options


def _hardening(opts: dict):
    from memedit.hardening import HardenConfig

    return HardenConfig(opts["harden_rounds"], _locate_attack(opts))


def _locate_attack(opts: dict):
    """The attacker an edit is hardened or calibrated against, scored at its last step."""
    from memedit.evaluation.attack import AttackConfig

    return AttackConfig(lr=opts["attack_lr"], steps=opts["attack_steps"], checkpoints=(),
                        prompt_batch=opts["batch_size"])


def _calibration_config(opts: dict):
    from memedit.calibration import DEFAULT_KS, CalibrationConfig

    if opts["target_rate"] is None:
        return None
    ks = DEFAULT_KS
    if opts["calibration_ks"]:
        try:
            ks = tuple(float(v) for v in opts["calibration_ks"].split(",") if v.strip())
        except ValueError:
            raise MemeditError(f"--calibration-ks must be comma-separated numbers, got "
                               f"{opts['calibration_ks']!r}.",
                               "For example 0.01,0.02,0.03.") from None
    seeds = tuple(range(100, 100 + opts["calibration_seeds"]))
    return CalibrationConfig(opts["target_rate"], ks, opts["utility_budget"],
                             opts["validation_fraction"], seeds, seeds,
                             attack=_locate_attack(opts) if opts["under_attack"] else None)


def _inputs(opts: dict) -> list[Path]:
    """Every path a locate reads: no output may be, hold or lie inside one of them."""
    from memedit.loading import resolve_model

    return [resolve_model(opts["model"], opts["allow_pickle"]).path, opts["memorized"],
            opts["reference"], opts["ordinary"], opts["clip_dir"], *opts["memorized_stats"],
            *opts["reference_stats"]]


@contextlib.contextmanager
def _held_outputs(out: Path, opts: dict) -> Iterator[list[Path]]:
    """Check and lock ``--out`` and ``--save-stats`` before minutes of sampling, not after."""
    from memedit.outputs import hold_output

    inputs = _inputs(opts)
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold_output(out, opts["overwrite"], inputs))
        if opts["save_stats"]:
            stack.enter_context(hold_output(opts["save_stats"], opts["overwrite"],
                                            [*inputs, out]))
        yield inputs


def _subspace_summary(subspace) -> dict:
    return {"method": subspace.manifest["method"], "model": subspace.manifest["model"]["spec"],
            "prompts": subspace.manifest["prompts"], "layers": subspace.layer_counts(),
            "total": subspace.totals()} | (
        {key: subspace.manifest[key] for key in ("calibration", "hardening")
         if key in subspace.manifest})


def _render_subspace(summary: dict) -> str:
    rows = [[key, f"{v['selected']:,}", f"{v['total']:,}", f"{100 * v['fraction']:.3f}%"]
            for key, v in summary["layers"].items()]
    total = summary["total"]
    rows.append(["total", f"{total['selected']:,}", f"{total['total']:,}",
                 f"{100 * total['fraction']:.3f}%"])
    method = summary["method"]
    head = (f"model: {summary['model']}\nmethod: k={method['k']} tau={method['tau']} "
            f"rho={method['rho']} granularity={method['granularity']} "
            f"targets={','.join(method['targets'])}\n")
    text = head + tabulate(rows, headers=["tensor", "zeroed", "of", "fraction"],
                           colalign=("left", "right", "right", "right"))
    if "hardening" in summary:
        record = summary["hardening"]
        attack = record["attack"]
        text += (f"\n\nhardened against the embedding attack (Adam lr {attack['lr']:g}, "
                 f"{attack['steps']} steps) on {record['prompts']['count']} prompts:\n"
                 + tabulate([[r["round"], f"{r['loss_start']:.4f} -> {r['loss_end']:.4f}",
                              f"{r['zeroed_before']:,} -> {r['zeroed_after']:,}"]
                             for r in record["rounds_run"]],
                            headers=["round", "attack loss", "zeroed"]))
    if "calibration" in summary:
        from memedit.calibration import calibration_table

        record = summary["calibration"]
        attack = record.get("under_attack")
        under = "" if attack is None else (f" under attack (Adam lr {attack['lr']:g}, "
                                           f"{attack['steps']} steps)")
        text += (f"\n\nk calibrated on {record['validation']['count']} validation prompts: "
                 f"copies{under} <= {record['target_rate']}, {record['utility']} drop <= "
                 f"{record['utility_budget']}\n" + calibration_table(record))
    return text


@cli.command("locate")
@model_options
@method_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder to write the subspace to (masks.safetensors + subspace.json).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def locate_command(out: Path, as_json: bool, **opts) -> None:
    """Find the memorization subspace and save it (apply it later with `memedit bake`)."""
    from memedit.locate import locate

    with _held_outputs(out, opts):
        pipe, source, options = _locate(opts)
        subspace = locate(pipe, source=source, **options)
        subspace.save(out, overwrite=opts["overwrite"])
    summary = _subspace_summary(subspace) | {"subspace": str(out)}
    emit(summary, as_json, lambda s: _render_subspace(s) + f"\nsubspace written to {out}")


@cli.command("locate-and-bake")
@push_options()
@model_options
@method_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder to write the sanitized pipeline to.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def locate_and_bake_command(out: Path, as_json: bool, push_to_hub, **opts) -> None:
    """Locate the subspace and write the model with it zeroed, in one go."""
    from memedit.locate import locate_and_bake

    with _held_outputs(out, opts):
        pipe, source, options = _locate(opts)
        result = locate_and_bake(pipe, out, source=source, push_to_hub=push_to_hub, **options)
    if result is None:
        return  # the main process bakes (a copy of the model) and reports
    subspace = result.subspace
    summary = _subspace_summary(subspace) | {"sanitized_model": str(result.path),
                                             "edited_files": result.files}
    emit(summary, as_json,
         lambda s: _render_subspace(s) + f"\nsanitized model written to {result.path}")


@cli.command("bake")
@push_options()
@model_hub_options()
@click.option("--model", default=None, metavar="FOLDER|HUB_ID",
              help="The model the subspace was located on. Default: the embedded test model.")
@click.option("--subspace", type=click.Path(path_type=Path), required=True,
              help="A folder written by `memedit locate`.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--allow-pickle", is_flag=True, help="Also read pickled checkpoints.")
@click.option("--json", "as_json", is_flag=True)
def bake_command(model: str | None, subspace: Path, out: Path, overwrite: bool,
                 allow_pickle: bool, as_json: bool, push_to_hub) -> None:
    """Zero a saved subspace in a model and write the sanitized pipeline folder."""
    from memedit.baking import bake
    from memedit.subspace import Subspace

    result = bake(model, Subspace.load(subspace), out, overwrite, allow_pickle,
                  inputs=[subspace], push_to_hub=push_to_hub)
    if result is None:
        return  # another process of a launched run: the main one baked
    data = {"sanitized_model": str(result.path), "source": result.source,
            "zeroed": result.zeroed, "edited_files": result.files,
            "already_sanitized": result.already_sanitized}
    emit(data, as_json, lambda d: tabulate(list(d.items()), tablefmt="plain"))


# What `inspect` shows of a manifest (a damaged one gets a message, not a KeyError).
SUMMARY_FIELDS = ("method.k", "method.tau", "method.rho", "method.granularity",
                  "method.targets", "model.spec", "prompts")


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--original", default=None,
              help="For a sanitized model: the original to verify it against (default: the "
                   "source recorded at bake time, which the model folder itself names).")
@model_hub_options("original")
@click.option("--subspace", "independent", type=click.Path(path_type=Path), default=None,
              help="A copy of the subspace kept outside the model folder: the carried one "
                   "must equal it, and the model is checked against it.")
@click.option("--expect-digest", default=None, metavar="HEX",
              help="The digest `--digest` printed when the subspace was made: the carried "
                   "subspace must still have it.")
@click.option("--digest", "print_digest", is_flag=True,
              help="Only print the subspace's digest (sha256 of masks and manifest), to keep "
                   "somewhere the model folder's writers cannot reach.")
@click.option("--allow-pickle", is_flag=True,
              help="Also read pickled checkpoints (an original with .bin/.ckpt weights).")
@click.option("--no-verify", is_flag=True, help="Only summarise; skip the weight-by-weight check.")
@click.option("--json", "as_json", is_flag=True)
def inspect_command(path: Path, original: str | None, independent: Path | None,
                    expect_digest: str | None, print_digest: bool, allow_pickle: bool,
                    no_verify: bool, as_json: bool) -> None:
    """Summarise a subspace or a sanitized model, and verify it.

    A sanitized model is checked against its manifest (the masks' counts, every edited
    tensor's sha256 after baking, the UNet's other tensors), against --subspace and
    --expect-digest when given, and against its original. The report says what was
    established and what not. Exit status: 0 OK; 1 FAILED (a difference was found); 3 NOT
    VERIFIABLE (nothing found wrong, but the provenance, the original or a record needed is
    missing); 2 user error.
    """
    from memedit.inspection import EXIT_STATUS, inspect
    from memedit.subspace import Subspace

    if print_digest or no_verify:
        subspace = Subspace.load(path)
        if print_digest:
            emit({"path": str(path), "digest": subspace.digest()}, as_json, lambda d: d["digest"])
            return
        subspace.check_fields(SUMMARY_FIELDS)
        emit(_subspace_summary(subspace), as_json, _render_subspace)
        return
    verification = inspect(path, original, independent, expect_digest, allow_pickle)
    summary: dict = {}
    if verification.subspace is not None:
        verification.subspace.check_fields(SUMMARY_FIELDS)
        summary = _subspace_summary(verification.subspace)
    summary["verification"] = verification.to_dict()
    emit(summary, as_json, lambda s: (_render_subspace(s) + "\n\n" if "layers" in s else "")
         + verification.render())
    sys.exit(EXIT_STATUS[verification.verdict])


@cli.command("compare")
@click.argument("first", type=click.Path(path_type=Path))
@click.argument("second", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def compare_command(first: Path, second: Path, as_json: bool) -> None:
    """Per-layer IoU of two subspaces (do different memorized sets find the same weights?)."""
    from memedit.compare import compare

    rows, total = compare(first, second)
    data = {"layers": [{"tensor": r.key, "a": r.selected_a, "b": r.selected_b,
                        "intersection": r.intersection, "iou": r.iou} for r in rows],
            "total": {"a": total.selected_a, "b": total.selected_b,
                      "intersection": total.intersection, "iou": total.iou}}
    emit(data, as_json, lambda d: tabulate(
        [[r["tensor"], r["a"], r["b"], r["intersection"], f"{r['iou']:.3f}"]
         for r in d["layers"]] + [["total", total.selected_a, total.selected_b,
                                   total.intersection, f"{total.iou:.3f}"]],
        headers=["tensor", "A", "B", "A∩B", "IoU"]))


@cli.command("merge-stats")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def merge_stats_command(files: tuple[Path, ...], out: Path, overwrite: bool,
                        as_json: bool) -> None:
    """Merge statistics saved by `locate --save-stats` (runs over other prompts or machines)."""
    from memedit.statistics import merge_stats

    merged = merge_stats(files, out, overwrite)
    data = {"merged": str(out), "files": [str(p) for p in files],
            "num_prompts": merged.num_prompts, "prompt_sets": merged.prompt_sets}
    emit(data, as_json, lambda d: f"{len(files)} files, {d['num_prompts']} prompts -> {out}")


def _register_subcommands() -> None:
    # Evaluation and the ONNX side keep their commands next to their code; heavy imports
    # (optimum, onnxruntime) stay inside the command bodies, so `memedit --help` is quick.
    from memedit.evaluation.cli import (
        attack_command,
        detect_command,
        evaluate_command,
        sweep_command,
    )
    from memedit.export.cli import export_command, generate_command, verify_onnx_command

    for command in (evaluate_command, sweep_command, detect_command, attack_command,
                    export_command, verify_onnx_command, generate_command):
        cli.add_command(command)


_register_subcommands()


def main() -> None:
    cli()


if __name__ == "__main__":  # `python -m memedit.cli`, as launchers such as accelerate run it
    main()
