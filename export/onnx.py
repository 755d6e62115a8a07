"""Export a diffusers Stable Diffusion pipeline (sanitized or not) to ONNX with Optimum.

The folder written is exactly the one Optimum's exporter writes for the ``text-to-image``
task (``text_encoder/``, ``unet/``, ``vae_encoder/``, ``vae_decoder/`` each with a
``model.onnx``, plus tokenizer, scheduler and ``model_index.json``), so Optimum's
``ORTDiffusionPipeline`` loads it. A UNet over protobuf's 2 GB limit is written by Optimum as
``model.onnx`` + ``model.onnx_data`` (external data). memedit adds ``memedit/``: the subspace
the model was sanitized with (for later audits) and ``onnx_export.json`` (what was checked).

The pipeline is loaded once by memedit (safetensors only, no safety checker) and handed to
``optimum.exporters.onnx.onnx_export_from_model``, the function ``main_export`` calls after
loading; the same in-memory pipeline then serves as the PyTorch reference for parity and audit.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from memedit.artifacts import PROVENANCE_DIR
from memedit.errors import MemeditError
from memedit.families import family_of

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

EXPORT_RECORD = "onnx_export.json"


@dataclass(frozen=True)
class ExportOptions:
    """How Optimum exports. ``opset=None`` keeps Optimum's default for diffusion models.

    Axes are always dynamic (batch, sequence, height, width, as Optimum declares them):
    Optimum's static option fixes one batch size for every component, but the pipeline runs
    the text encoder and VAE at batch N and the UNet at 2N (classifier-free guidance), and the
    text encoder at the tokenizer's full length, so a static SD export cannot run its pipeline.
    """

    opset: int | None = None
    dtype: str = "fp32"  # fp32 | fp16 (converted after export, on CPU) | bf16 (CUDA export)
    optimum_validation: bool = True  # Optimum's own output check on its dummy inputs
    device: str | None = None  # None: cuda for bf16, else cpu
    optimize: str = "none"  # none | basic | full: ONNX Runtime's fusions (export/optimize.py)
    keep_fp32: tuple[str, ...] = ()  # components left fp32 by --dtype fp16 (e.g. vae_decoder)
    quantize: str = "none"  # none | int8: weight quantization for CPU serving

    def __post_init__(self) -> None:
        from .optimize import component_settings
        from .quantize import QUANTIZATIONS

        component_settings(self.dtype, self.optimize, self.keep_fp32)  # checks the names
        if self.quantize not in QUANTIZATIONS:
            raise MemeditError(f"Unknown quantization {self.quantize!r}.",
                               f"Use one of: {', '.join(QUANTIZATIONS)}.")
        if self.quantize != "none" and self.dtype != "fp32":
            raise MemeditError(f"--quantize {self.quantize} applies to fp32 graphs, not "
                               f"{self.dtype}.", "Drop --dtype, or drop --quantize.")
        if self.dtype == "bf16" and self.optimize != "none":
            raise MemeditError("--optimize applies to fp32/fp16 graphs; ONNX Runtime's "
                               "optimizer does not handle bf16 exports.",
                               "Use --dtype fp16 with --optimize, or --optimize none.")

    @property
    def components(self) -> dict:
        """Per-component settings of the optimization step (``optimize.ComponentSettings``)."""
        from .optimize import component_settings

        return component_settings("fp32" if self.dtype == "bf16" else self.dtype,
                                  self.optimize, self.keep_fp32)


@dataclass
class ExportInfo:
    """What the exporter did: timings, files and Optimum's own validation verdict."""

    seconds: float
    opset: int | None
    dtype: str
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    optimum_validation: str = "skipped"  # passed | skipped | "warning: ..."
    checker_seconds: float = 0.0
    optimize: str = "none"
    quantize: str = "none"
    steps: list[dict] = field(default_factory=list)  # per component: fusions, dtype, seconds
    optimize_seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def export_device(options: ExportOptions) -> str:
    """The torch device of the export. fp16 is converted from the fp32 graph on the CPU
    (export/optimize.py); bf16 is traced by Optimum in bf16, which needs CUDA."""
    device = options.device or ("cuda" if options.dtype == "bf16" else "cpu")
    if options.dtype == "bf16" and (not device.startswith("cuda")
                                    or not torch.cuda.is_available()):
        raise MemeditError(
            "bf16 ONNX export needs a CUDA GPU: ONNX Runtime has no offline bf16 converter, "
            "and on CPU PyTorch cannot trace several bf16 kernels for Optimum.",
            "Use --dtype fp16 (converted on the CPU), or export bf16 on a machine with a "
            "GPU and a CUDA build of torch.",
        )
    return device


class _Collect(logging.Handler):
    """Keeps the warnings Optimum logs when its validation finds differences."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _optimum_warnings() -> Iterator[_Collect]:
    # Optimum downgrades a failed tolerance check to a logged warning; collect it so the
    # report can show it (memedit's own parity check is the one that gates the export).
    collector = _Collect()
    log = logging.getLogger("optimum.exporters.onnx.convert")
    log.addHandler(collector)
    try:
        yield collector
    finally:
        log.removeHandler(collector)


def onnx_files(folder: Path) -> dict[str, int]:
    """Every ONNX file and external-data file under ``folder`` with its size in bytes."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and (p.suffix == ".onnx" or p.name.endswith((".onnx_data", ".data")))}


def check_models(folder: Path) -> None:
    """``onnx.checker`` (full check, with shape inference) on every ``model.onnx``.

    The path form is used so that models with external data (over 2 GB) are checked too.
    """
    import onnx

    for path in sorted(folder.glob("*/model.onnx")):
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            raise MemeditError(f"onnx.checker rejects {path.relative_to(folder)}: {err}",
                               "Report this with the model and the options used.") from None


def export_pipeline(pipe: DiffusionPipeline, folder: Path,
                    options: ExportOptions = ExportOptions()) -> ExportInfo:
    """Export a loaded pipeline with Optimum into ``folder``, then run ``onnx.checker``.

    Optimum picks the graphs from the pipeline's components (SDXL: ``text_encoder_2`` too);
    the model family (``memedit.families``) says which graphs the export must hold."""
    from optimum.exporters.onnx import onnx_export_from_model

    family = family_of(pipe)  # an unknown pipeline is refused before Optimum runs
    device = export_device(options)
    start = time.perf_counter()
    with _optimum_warnings() as warned, torch.no_grad():
        try:
            onnx_export_from_model(
                pipe,
                folder,
                task="text-to-image",
                opset=options.opset,
                device=device,
                no_dynamic_axes=False,
                do_validation=options.optimum_validation,
            )
        except (ValueError, RuntimeError, KeyError) as err:
            raise MemeditError(f"Optimum could not export the {family.label} pipeline: {err}",
                               "Report this with the model and the options used.") from err
    seconds = time.perf_counter() - start
    missing = [graph for graph in family.onnx_graphs
               if not (folder / graph / "model.onnx").is_file()]
    if missing:
        raise MemeditError(f"Optimum's export of this {family.label} pipeline lacks "
                           f"{', '.join(missing)}.",
                           "Check the pipeline's components and the optimum-onnx version.")
    validation = "skipped"
    if options.optimum_validation:
        problems = [m for m in warned.messages if "succeeded with the warning" in m]
        validation = "warning: " + " | ".join(problems) if problems else "passed"
    info = ExportInfo(seconds, options.opset, options.dtype, optimum_validation=validation,
                      optimize=options.optimize, quantize=options.quantize)
    optimize_start = time.perf_counter()
    info.steps = transform(folder, options)
    info.optimize_seconds = time.perf_counter() - optimize_start
    check_start = time.perf_counter()
    check_models(folder)
    info.checker_seconds = time.perf_counter() - check_start
    info.files = onnx_files(folder)
    return info


def transform(folder: Path, options: ExportOptions) -> list[dict]:
    """The step between export and checks: ONNX Runtime's fusions, fp16 conversion and int8
    quantization, per component (``options.components``). What it did, per component."""
    from dataclasses import asdict

    from .optimize import optimize_folder
    from .quantize import quantize_folder

    steps = [asdict(r) for r in optimize_folder(folder, options.components)]
    for component, seconds in quantize_folder(folder, options.quantize).items():
        steps.append({"component": component, "quantize": options.quantize,
                      "seconds": seconds})
    return steps


def read_record(onnx_dir: str | os.PathLike) -> dict:
    """The ``memedit/onnx_export.json`` an export wrote, or ``{}``."""
    path = Path(onnx_dir) / PROVENANCE_DIR / EXPORT_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(folder: Path, record: dict) -> None:
    target = folder / PROVENANCE_DIR
    target.mkdir(parents=True, exist_ok=True)
    (target / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str))
