"""Run an exported folder with ONNX Runtime through Optimum's diffusion pipeline.

Choosing the execution provider: ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` (and
reports ``get_device() == "GPU"``) even on a machine without a GPU, and a session asked for
CUDA there silently falls back to CPU. So the only trustworthy test is to create a session
with CUDA requested and read ``session.get_providers()``. The decision itself is the pure
function :func:`decide_provider`, so it is testable without a GPU.

Running an export is not verifying it: :func:`audit_warning` reads the record the export
wrote and says when it vouches for no passed sanitization audit (``generate`` warns then).
A graph that is corrupt or not the one its folder needs is reported as a
:class:`MemeditError`, at load or at run time, never as a traceback from ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memedit.errors import MemeditError
from memedit.sampling import SamplingConfig, generate_images

from .onnx import EXPORT_RECORD, PROVENANCE_DIR, read_record

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_INSTALL_HINT = ("Install the GPU build in place of the CPU one: `pip uninstall -y onnxruntime "
                    "&& pip install onnxruntime-gpu==1.31.1` (the `memedit[gpu]` extra), with "
                    "CUDA and cuDNN libraries that match it.")


@dataclass(frozen=True)
class ProviderChoice:
    """The execution provider memedit uses, and why (printed to the user)."""

    provider: str
    reason: str

    @property
    def label(self) -> str:
        return "CUDA" if self.provider == CUDA else "CPU"


def decide_provider(available: Sequence[str], session_providers: Sequence[str] | None,
                    requested: str = "auto") -> ProviderChoice:
    """Pick CUDA only if a session asked for CUDA really got it; else CPU.

    ``available`` is ``onnxruntime.get_available_providers()``; ``session_providers`` is
    ``get_providers()`` of a probe session created with CUDA first (``None`` if no probe was
    made). ``requested`` is ``auto``, ``cpu`` or ``cuda``; ``cuda`` that cannot be honoured is
    an error rather than a silent CPU run.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise MemeditError(f"Unknown provider {requested!r}.", "Use auto, cpu or cuda.")
    if requested == "cpu":
        return ProviderChoice(CPU, "CPU was asked for")
    if CUDA not in available:
        if requested == "cuda":
            raise MemeditError("CUDA was asked for, but this onnxruntime has no CUDA provider "
                               "(the CPU package is installed).", GPU_INSTALL_HINT)
        return ProviderChoice(CPU, "onnxruntime has no CUDA provider (CPU package)")
    if session_providers is not None and CUDA in session_providers:
        return ProviderChoice(CUDA, "onnxruntime-gpu created a CUDA session")
    message = ("onnxruntime-gpu lists CUDA, but a session asked for CUDA ran on CPU "
               "(no GPU, or CUDA/cuDNN libraries missing)")
    if requested == "cuda":
        raise MemeditError(message + ".", "Check `nvidia-smi` and the CUDA/cuDNN versions "
                           "onnxruntime-gpu needs, or use --provider cpu.")
    return ProviderChoice(CPU, message)


def probe_session_providers() -> list[str]:
    """Create a one-node session with CUDA requested; return the providers it really uses."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failed CUDA load is expected on CPU-only machines
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=[CUDA, CPU])
    except Exception:  # a broken CUDA install can raise instead of falling back
        return []
    return list(session.get_providers())


def choose_provider(requested: str = "auto") -> ProviderChoice:
    """:func:`decide_provider` on this machine (probes only if CUDA is listed)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    probe = probe_session_providers() if CUDA in available and requested != "cpu" else None
    return decide_provider(available, probe, requested)


def session_options(threads: int | None = None):
    """ORT session options; ``threads`` sets intra-op threads (1 for tests and benchmarks)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def audit_warning(onnx_dir: str | os.PathLike) -> str | None:
    """A warning when the export record of ``onnx_dir`` vouches for no passed sanitization
    audit, else None.

    The record sits in the folder it describes, so a passed one is a claim, not a proof:
    ``memedit verify-onnx`` re-runs the audit against the PyTorch model.
    """
    reason = _unaudited(onnx_dir)
    return None if reason is None else (
        f"{onnx_dir}: {reason}. Check it with `memedit verify-onnx {onnx_dir}`.")


def _unaudited(onnx_dir: str | os.PathLike) -> str | None:
    record_path = f"{PROVENANCE_DIR}/{EXPORT_RECORD}"
    try:
        record = read_record(onnx_dir)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"its export record ({record_path}) is unreadable"
    if not record:
        return (f"it has no export record ({record_path}): whether its sanitization was "
                "audited is unknown")
    report = record.get("report") if isinstance(record, dict) else None
    audit = report.get("audit") if isinstance(report, dict) else None
    if not isinstance(audit, dict):
        return "its export ran no sanitization audit (the model carried no memedit subspace)"
    if audit.get("passed") is not True:
        return "its export record says the sanitization audit did not pass"
    if audit.get("unverified"):
        return ("its export record says the audit could not be tied to the subspace's recorded "
                "hashes")
    return None


def ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's exception types (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf,
            state.NoSuchFile, state.NotImplemented, state.RuntimeException)


@contextlib.contextmanager
def ort_failures(onnx_dir: Path) -> Iterator[None]:
    """Turn ONNX Runtime's errors on ``onnx_dir`` (corrupt or mismatched graphs) into a
    MemeditError that names the folder and the way out."""
    try:
        yield
    except ort_errors() as err:
        raise MemeditError(
            f"ONNX Runtime cannot run {onnx_dir}: a graph is corrupt or does not fit the "
            f"pipeline ({type(err).__name__}: {str(err).splitlines()[0]}).",
            f"Export the model again, or check the folder with `memedit verify-onnx {onnx_dir}`."
        ) from None


def _check_folder(onnx_dir: Path) -> None:
    if not (onnx_dir / "model_index.json").is_file() or not (onnx_dir / "unet" /
                                                              "model.onnx").is_file():
        raise MemeditError(f"{onnx_dir} is not an ONNX pipeline folder (no model_index.json "
                           "or unet/model.onnx).",
                           "Pass the folder written by `memedit export --onnx`.")


def load_ort_pipeline(onnx_dir: str | os.PathLike, provider: str = "auto",
                      threads: int | None = None):
    """Optimum's ``ORTDiffusionPipeline`` on ``onnx_dir``; returns ``(pipeline, choice)``."""
    from optimum.onnxruntime import ORTDiffusionPipeline

    onnx_dir = Path(onnx_dir)
    _check_folder(onnx_dir)
    choice = choose_provider(provider)
    try:
        with ort_failures(onnx_dir):
            pipe = ORTDiffusionPipeline.from_pretrained(
                onnx_dir, provider=choice.provider, session_options=session_options(threads),
                export=False, local_files_only=True)
    # Optimum indexes each graph's inputs by name while it builds the pipeline: a graph in
    # the wrong folder (a text encoder as unet/model.onnx) surfaces as a KeyError.
    except (OSError, ValueError, KeyError) as err:
        raise MemeditError(f"Optimum could not load {onnx_dir}: {type(err).__name__}: {err}",
                           "Re-export it with `memedit export --onnx`.") from None
    if choice.provider == CUDA and CUDA not in pipe.unet.session.get_providers():
        # The probe passed but the real model did not get CUDA (e.g. out of GPU memory).
        choice = ProviderChoice(CPU, "the UNet session fell back to CPU")
    pipe.set_progress_bar_config(disable=True)
    return pipe, choice


def generate(onnx_dir: str | os.PathLike, prompts: Sequence[str], seeds: Sequence[int],
             config: SamplingConfig | None = None, provider: str = "auto",
             threads: int | None = None) -> tuple[np.ndarray, ProviderChoice]:
    """Images for ``prompts[i]`` with ``seeds[i]`` from an exported folder, with ONNX Runtime.

    Same seeding as memedit's PyTorch sampling (per-prompt CPU generators), so an image can be
    compared with the PyTorch model's. Returns float images [N, H, W, 3] in [0, 1].
    """
    config = config or SamplingConfig(steps=25)
    warning = audit_warning(onnx_dir)
    if warning is not None:
        logging.getLogger(__name__).warning("%s", warning)
    pipe, choice = load_ort_pipeline(onnx_dir, provider, threads)
    with ort_failures(Path(onnx_dir)):
        return generate_images(pipe, list(prompts), list(seeds), config), choice
