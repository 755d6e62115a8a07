"""Click commands ``export``, ``verify-onnx`` and ``generate``: a thin layer over the API.

They are standalone ``@click.command()`` functions (``export_command``,
``verify_onnx_command``, ``generate_command``) that ``memedit.cli`` registers. Exit status:
0 when everything passed, 1 when parity or the sanitization audit failed (the report is
printed first), 2 for a user error (:class:`MemeditError`, turned into message and hint by
the ``memedit`` command group, as for every command), 3 when nothing failed but the
sanitization is not verifiable (no subspace, or its provenance or hashes are missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from memedit.hub import model_hub_options, push_options


def _threshold_options(command):
    """Parity thresholds and inputs shared by export and verify-onnx."""
    options = [
        click.option("--max-abs", type=float, default=None,
                     help="Largest allowed |ONNX - PyTorch| of any component output "
                          "(default per precision: fp32 1e-3, fp16 5e-2, int8 0.5, bf16 0.2)."),
        click.option("--mean-abs", type=float, default=None,
                     help="Largest allowed mean |ONNX - PyTorch| of a component output "
                          "(fp32 1e-4, fp16 5e-3, int8 5e-2, bf16 2e-2)."),
        click.option("--image-max-abs", type=float, default=None,
                     help="Largest allowed pixel difference of the full image (pixels in "
                          "[0, 1]; fp32 0.02, fp16 0.1, int8 0.1, bf16 0.2)."),
        click.option("--min-psnr", type=float, default=None,
                     help="Smallest allowed PSNR (dB) of the full image (fp32 40, fp16/int8 30, "
                          "bf16 25)."),
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


def _parity_args(kwargs, base=None):
    """Thresholds (the limits given, the others from ``base``, else fp32's; None when none
    is given and there is no ``base``: the API picks the export's precision's) and inputs."""
    from dataclasses import replace

    from .parity import ParityInputs, Thresholds

    given = {name: kwargs.pop(flag) for name, flag in (
        ("max_abs", "max_abs"), ("mean_abs", "mean_abs"), ("image_max_abs", "image_max_abs"),
        ("image_psnr_db", "min_psnr"))}
    given = {name: value for name, value in given.items() if value is not None}
    thresholds = replace(base or Thresholds(), **given) if given or base else None
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
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Stored precision [default: fp32]. fp16: converted from the fp32 graph by "
                   "ONNX Runtime, on CPU, inputs/outputs kept fp32. bf16: traced by Optimum "
                   "on a CUDA GPU.")
@click.option("--fp16", is_flag=True, help="Same as --dtype fp16.")
@click.option("--optimize", type=click.Choice(["none", "basic", "full"]), default="none",
              show_default=True,
              help="ONNX Runtime's Stable Diffusion fusions. basic: those the CPU provider "
                   "runs (attention, LayerNorm). full: the CUDA recipe (NhwcConv, GroupNorm, "
                   "packed QKV); its parity needs CUDA.")
@click.option("--keep-fp32", multiple=True,
              type=click.Choice(["unet", "text_encoder", "text_encoder_2", "vae_encoder",
                                 "vae_decoder"]),
              help="With --dtype fp16, leave this component fp32 (repeatable; e.g. "
                   "vae_decoder, which overflows in fp16 for some models).")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none",
              show_default=True,
              help="int8 weights (symmetric, ONNX Runtime's dynamic quantizer) for CPU "
                   "serving of the UNet and text encoder.")
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="Check ONNX Runtime against PyTorch after export.")
@click.option("--optimum-validation/--no-optimum-validation", default=True, show_default=True,
              help="Also run Optimum's own validation on dummy inputs.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled (.bin/.ckpt) weights.")
@_threshold_options
def export_command(model, out, overwrite, subspace, opset, dtype, fp16, optimize, keep_fp32,
                   quantize, parity, optimum_validation, allow_pickle, as_json, threads,
                   push_to_hub, **kwargs):
    """Export MODEL_DIR to ONNX with Optimum, audit the zeroed weights, check parity.

    Exit status: 0 passed; 1 audit or parity failed (nothing written); 2 user error; 3
    written, but the audit could not be tied to the subspace's recorded hashes.
    """
    from memedit.errors import MemeditError

    from .api import export_onnx
    from .onnx import ExportOptions
    from .parity import default_thresholds

    if fp16 and dtype not in (None, "fp16"):
        raise MemeditError(f"--fp16 contradicts --dtype {dtype}.", "Pass only --dtype.")
    dtype = "fp16" if fp16 else dtype or "fp32"
    options = ExportOptions(opset, dtype, optimum_validation, optimize=optimize,
                            keep_fp32=tuple(keep_fp32), quantize=quantize)
    thresholds, inputs = _parity_args(kwargs, default_thresholds(dtype, quantize))
    _run_checked(lambda: export_onnx(model, out, options, overwrite, subspace, parity,
                                     thresholds, inputs, threads, allow_pickle, push_to_hub),
                 as_json)


@click.command("verify-onnx")
@model_hub_options()
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", default=None,
              help="The PyTorch pipeline it was exported from (default: recorded at export).")
@click.option("--subspace", type=click.Path(exists=True, path_type=Path),
              help="Audit against this subspace (default: the copy stored at export).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              default="auto", show_default=True, help="ONNX Runtime execution provider.")
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
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              default="auto", show_default=True,
              help="ONNX Runtime execution provider (with --onnx).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--provider-option", "provider_option", multiple=True, metavar="KEY=VALUE",
              help="An option of the provider asked for (repeatable), e.g. "
                   "trt_fp16_enable=True or device_id=0.")
@click.option("--trt-engine-cache", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="TensorRT engine cache folder (trt_engine_cache_enable).")
@click.option("--graph-optimization", type=click.Choice(["disable", "basic", "extended", "all"]),
              default="all", show_default=True, help="ONNX Runtime session graph optimizations.")
@click.option("--io-binding/--no-io-binding", default=None,
              help="Bind inputs/outputs to the device [default: on for CUDA/TensorRT].")
@click.option("--static-shapes", is_flag=True,
              help="Fix batch, height and width of the graphs at session load (to this call's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per pipeline call [default: all prompts x --num-images in one].")
def generate_command(prompts, onnx_dir, model, out, overwrite, seed, num_images, steps,
                     guidance_scale, height, width, provider, threads, provider_option,
                     trt_engine_cache, graph_optimization, io_binding, static_shapes,
                     batch_size):
    """Generate images for PROMPTS with an ONNX export (--onnx) or a PyTorch model.

    An export whose record (memedit/onnx_export.json) is missing or shows no passed
    sanitization audit runs with a warning; `memedit verify-onnx` checks it.
    """
    from memedit.generation import generate

    result = generate(prompts, out, onnx_dir, model, overwrite, seed, num_images, steps,
                      guidance_scale, height, width, batch_size, provider, threads,
                      provider_option, trt_engine_cache, graph_optimization, io_binding,
                      static_shapes)
    click.echo(result.runtime, err=True)
    for image in result.images:
        click.echo(f"{image.path}  seed {image.seed}  {image.prompt!r}")
