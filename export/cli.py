"""Click commands ``export``, ``verify-onnx`` and ``generate``: a thin layer over the API.

They are standalone ``@click.command()`` functions (``export_command``,
``verify_onnx_command``, ``generate_command``) that ``memedit.cli`` registers. Exit status:
0 when everything passed, 1 when parity or the sanitization audit failed (the report is
printed first), 2 for a user error (:class:`MemeditError`, turned into message and hint by
the ``memedit`` command group, as for every command), 3 when nothing failed but the
sanitization is not verifiable (no subspace, or its provenance or hashes are missing).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import click

from memedit.hub import model_hub_options, push_options


def _threshold_options(command):
    """Parity thresholds and inputs shared by export and verify-onnx."""
    options = [
        click.option("--max-abs", type=float, default=1e-3, show_default=True,
                     help="Largest allowed |ONNX - PyTorch| of any component output."),
        click.option("--mean-abs", type=float, default=1e-4, show_default=True,
                     help="Largest allowed mean |ONNX - PyTorch| of a component output."),
        click.option("--image-max-abs", type=float, default=2e-2, show_default=True,
                     help="Largest allowed pixel difference of the full image (pixels in [0, 1])."),
        click.option("--min-psnr", type=float, default=40.0, show_default=True,
                     help="Smallest allowed PSNR (dB) of the full image."),
        click.option("--prompt", default="a photo of a red cat", show_default=True,
                     help="Prompt of the parity run."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--steps", type=int, default=10, show_default=True,
                     help="Denoising steps of the full-image parity run."),
        click.option("--threads", type=int, default=None,
                     help="ONNX Runtime intra-op threads (default: ORT's choice)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _parity_args(kwargs):
    from .parity import ParityInputs, Thresholds

    thresholds = Thresholds(kwargs.pop("max_abs"), kwargs.pop("mean_abs"),
                            kwargs.pop("image_max_abs"), kwargs.pop("min_psnr"))
    inputs = ParityInputs(kwargs.pop("prompt"), kwargs.pop("seed"), kwargs.pop("steps"))
    return thresholds, inputs


def _emit(report, as_json: bool) -> None:
    click.echo(json.dumps(report.to_dict(), indent=2, default=str) if as_json else report.table())


EXIT_FAILED, EXIT_NOT_VERIFIABLE = 1, 3


def _run_checked(action, as_json: bool):
    """Run an export/verify action; print the report; exit 1 if it failed, 3 if the
    sanitization could not be verified."""
    from .api import NOT_VERIFIABLE, VerificationFailed, failure

    try:
        report = action()
        problem = None if report.passed else failure(report)
    except VerificationFailed as raised:
        report, problem = raised.report, raised
    _emit(report, as_json)
    if problem is not None:
        click.echo(f"Error: {problem.message}", err=True)
        if problem.hint:
            click.echo(f"Hint: {problem.hint}", err=True)
        raise click.exceptions.Exit(EXIT_FAILED)
    if report.verdict == NOT_VERIFIABLE:
        click.echo(f"Not verifiable: {report.not_established[0]}.", err=True)
        click.echo("Hint: pass --subspace with the subspace `memedit locate` wrote (kept outside "
                   "the model folder), or re-export the model that `memedit bake` wrote.",
                   err=True)
        raise click.exceptions.Exit(EXIT_NOT_VERIFIABLE)
    return report


@click.command("export")
@push_options()
@model_hub_options()
@click.option("--onnx", "model", required=True, metavar="MODEL_DIR",
              help="Export this diffusers pipeline (sanitized or not) to ONNX.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="New folder for the ONNX pipeline (Optimum's layout).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--subspace", type=click.Path(exists=True, path_type=Path),
              help="Audit against this subspace (default: the one a baked model carries).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: Optimum's).")
@click.option("--fp16", is_flag=True, help="Export in float16 (needs a CUDA GPU).")
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="Check ONNX Runtime against PyTorch after export.")
@click.option("--optimum-validation/--no-optimum-validation", default=True, show_default=True,
              help="Also run Optimum's own validation on dummy inputs.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled (.bin/.ckpt) weights.")
@_threshold_options
def export_command(model, out, overwrite, subspace, opset, fp16, parity,
                   optimum_validation, allow_pickle, as_json, threads, **kwargs):
    """Export MODEL_DIR to ONNX with Optimum, audit the zeroed weights, check parity.

    Exit status: 0 passed; 1 audit or parity failed (nothing written); 2 user error; 3
    written, but the audit could not be tied to the subspace's recorded hashes.
    """
    from .api import export_onnx
    from .onnx import ExportOptions

    thresholds, inputs = _parity_args(kwargs)
    options = ExportOptions(opset, fp16, optimum_validation)
    _run_checked(lambda: export_onnx(model, out, options, overwrite, subspace, parity,
                                     thresholds, inputs, threads, allow_pickle), as_json)


@click.command("verify-onnx")
@model_hub_options()
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", default=None,
              help="The PyTorch pipeline it was exported from (default: recorded at export).")
@click.option("--subspace", type=click.Path(exists=True, path_type=Path),
              help="Audit against this subspace (default: the copy stored at export).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="ONNX Runtime execution provider.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled (.bin/.ckpt) weights.")
@_threshold_options
def verify_onnx_command(onnx_dir, model, subspace, provider, allow_pickle, as_json, threads,
                        **kwargs):
    """Check an exported ONNX_DIR against its PyTorch model: parity and sanitization audit.

    The audit checks the masks against the manifest's counts, the PyTorch tensors against its
    sha256 after baking, and every zeroed weight in the graph; --subspace (a copy kept outside
    both folders) must equal the subspace the export stored. Exit status: 0 passed; 1 FAILED;
    2 user error; 3 NOT VERIFIABLE (nothing failed, but there is no subspace to audit
    against, or the export's record, its stored subspace or the manifest's hashes are
    missing).
    """
    from .api import verify_onnx

    thresholds, inputs = _parity_args(kwargs)
    _run_checked(lambda: verify_onnx(onnx_dir, model, subspace, thresholds, inputs, True,
                                     provider, threads, allow_pickle), as_json)


@click.command("generate")
@model_hub_options()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--onnx", "onnx_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Run this exported ONNX folder with ONNX Runtime.")
@click.option("--model", default=None,
              help="Run this PyTorch pipeline instead (default: the embedded test model).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("image.png"),
              show_default=True, help="PNG path; with several prompts/seeds, NAME-N.png.")
@click.option("--overwrite", is_flag=True, help="Replace existing images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per prompt (seeds seed, seed+1, ...).")
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="ONNX Runtime execution provider (with --onnx).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
def generate_command(prompts, onnx_dir, model, out, overwrite, seed, num_images, steps,
                     guidance_scale, height, width, provider, threads):
    """Generate images for PROMPTS with an ONNX export (--onnx) or a PyTorch model.

    An export whose record (memedit/onnx_export.json) is missing or shows no passed
    sanitization audit runs with a warning; `memedit verify-onnx` checks it.
    """
    from PIL import Image

    from memedit.outputs import atomic_write_bytes, check_output
    from memedit.sampling import SamplingConfig, generate_images

    config = SamplingConfig(steps=steps, guidance_scale=guidance_scale, seed=seed,
                            batch_size=1, height=height, width=width)
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [seed + i for _ in prompts for i in range(num_images)]
    paths = ([out] if len(all_prompts) == 1 else
             [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
              for i in range(len(all_prompts))])
    read = [onnx_dir, model]
    for path in paths:  # refuse before the slow part
        check_output(path, overwrite, read, kind="file")
    running = contextlib.nullcontext()
    if onnx_dir is not None:
        from .runtime import audit_warning, load_ort_pipeline, ort_failures

        warning = audit_warning(onnx_dir)
        if warning is not None:
            click.echo(f"Warning: {warning}", err=True)
        pipe, choice = load_ort_pipeline(onnx_dir, provider, threads)
        click.echo(f"ONNX Runtime on {choice.label}: {choice.reason}", err=True)
        running = ort_failures(onnx_dir)
    else:
        from memedit.loading import load_pipeline

        pipe, source = load_pipeline(model)
        click.echo(f"PyTorch on {pipe.device}: {source.spec}", err=True)
    with running:
        images = generate_images(pipe, all_prompts, seeds, config)
    for path, image, prompt, image_seed in zip(paths, images, all_prompts, seeds, strict=True):
        buffer = io.BytesIO()
        Image.fromarray((image * 255).round().clip(0, 255).astype("uint8")).save(buffer, "PNG")
        atomic_write_bytes(path, buffer.getvalue(), overwrite, read)
        click.echo(f"{path}  seed {image_seed}  {prompt!r}")
