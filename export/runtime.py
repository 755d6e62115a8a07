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
TENSORRT = "TensorrtExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")
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
        return {CUDA: "CUDA", TENSORRT: "TensorRT"}.get(self.provider, "CPU")

    @property
    def providers(self) -> list[str]:
        """The provider list a session gets: TensorRT falls back to CUDA for the nodes it
        does not take, CUDA to CPU (ONNX Runtime's order of preference)."""
        return {TENSORRT: [TENSORRT, CUDA, CPU], CUDA: [CUDA, CPU]}.get(self.provider, [CPU])


def decide_provider(available: Sequence[str], session_providers: Sequence[str] | None,
                    requested: str = "auto") -> ProviderChoice:
    """Pick CUDA only if a session asked for CUDA really got it; else CPU.

    ``available`` is ``onnxruntime.get_available_providers()``; ``session_providers`` is
    ``get_providers()`` of a probe session created with CUDA first (``None`` if no probe was
    made). ``requested`` is ``auto``, ``cpu``, ``cuda`` or ``tensorrt``; ``cuda`` or
    ``tensorrt`` that cannot be honoured is an error rather than a silent CPU run (TensorRT
    needs a working CUDA session too: it runs on top of it).
    """
    if requested not in PROVIDERS:
        raise MemeditError(f"Unknown provider {requested!r}.", f"Use {', '.join(PROVIDERS)}.")
    if requested == "cpu":
        return ProviderChoice(CPU, "CPU was asked for")
    if requested == "tensorrt":
        if TENSORRT not in available:
            raise MemeditError("TensorRT was asked for, but this onnxruntime has no TensorRT "
                               "provider.", GPU_INSTALL_HINT + " TensorRT's libraries too.")
        cuda = decide_provider(available, session_providers, "cuda")
        return ProviderChoice(TENSORRT, f"TensorRT over CUDA ({cuda.reason})")
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


@dataclass(frozen=True)
class StaticShapes:
    """Free dimensions fixed when the sessions load (no static export needed): the batch of
    prompts per call, the image size in pixels, whether the UNet runs the CFG batch (2x)."""

    batch: int
    height: int
    width: int
    guidance: bool = True

    def __post_init__(self) -> None:
        if self.batch < 1 or self.height < 8 or self.width < 8:
            raise MemeditError(f"Static shapes need batch >= 1 and a size >= 8 pixels, got "
                               f"batch {self.batch}, {self.height}x{self.width}.",
                               "Pass the batch, height and width of the calls you will make.")

    def overrides(self, component: str, scale: int, sequence: int) -> dict[str, int]:
        """ONNX Runtime free-dimension overrides for one component's graph (Optimum's axis
        names); ``scale`` is the VAE's downscale factor, ``sequence`` the tokenizer length."""
        latent = {"height": self.height // scale, "width": self.width // scale}
        if component.startswith("text_encoder"):
            return {"batch_size": self.batch, "sequence_length": sequence}
        if component == "unet":
            return {"batch_size": self.batch * (2 if self.guidance else 1),
                    "sequence_length": sequence} | latent
        if component == "vae_decoder":
            return {"batch_size": self.batch, "latent_height": latent["height"],
                    "latent_width": latent["width"]}
        return {"batch_size": self.batch, "sample_height": self.height,
                "sample_width": self.width}


@dataclass(frozen=True)
class SessionSettings:
    """How ONNX Runtime sessions are made: threads, graph optimization level, provider
    options (e.g. TensorRT's ``trt_engine_cache_path``), IO binding (None: Optimum's choice,
    on for CUDA), and free dimensions fixed at load."""

    threads: int | None = None
    graph_optimization: str = "all"
    provider_options: tuple[tuple[str, str], ...] = ()
    io_binding: bool | None = None
    static: StaticShapes | None = None

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATION:
            raise MemeditError(f"Unknown graph optimization level {self.graph_optimization!r}.",
                               f"Use {', '.join(GRAPH_OPTIMIZATION)}.")
        if self.threads is not None and self.threads < 1:
            raise MemeditError(f"--threads must be at least 1, got {self.threads}.",
                               "Pass the number of CPU threads ONNX Runtime may use.")


def image_size(onnx_dir: Path) -> int:
    """The pipeline's default image side in pixels (UNet sample size x VAE scale factor)."""
    unet = json.loads((onnx_dir / "unet" / "config.json").read_text())
    vae = onnx_dir / "vae_decoder" / "config.json"
    blocks = json.loads(vae.read_text()).get("block_out_channels", [0] * 4) \
        if vae.is_file() else [0] * 4
    size = unet.get("sample_size", 64)
    return (size if isinstance(size, int) else size[0]) * 2 ** (len(blocks) - 1)


def session_settings(onnx_dir: str | os.PathLike, config: SamplingConfig,
                     threads: int | None = None, options: Sequence[str] = (),
                     trt_engine_cache: str | os.PathLike | None = None,
                     graph_optimization: str = "all", io_binding: bool | None = None,
                     static: bool = False) -> SessionSettings:
    """Settings from the command line's words: ``KEY=VALUE`` provider options, the TensorRT
    engine cache folder, and static shapes fixed to the batch and size of ``config``."""
    pairs = []
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise MemeditError(f"Provider option {option!r} is not KEY=VALUE.",
                               "Write e.g. --provider-option trt_fp16_enable=True.")
        pairs.append((key, value))
    if trt_engine_cache is not None:
        pairs += [("trt_engine_cache_enable", "True"),
                  ("trt_engine_cache_path", str(Path(trt_engine_cache).expanduser()))]
    shapes = None
    if static:
        side = image_size(Path(onnx_dir))
        shapes = StaticShapes(config.batch_size, config.height or side, config.width or side,
                              config.guidance_scale > 1)
    return SessionSettings(threads, graph_optimization, tuple(pairs), io_binding, shapes)


def session_options(threads: int | None = None, graph_optimization: str = "all",
                    overrides: dict[str, int] | None = None):
    """ORT session options; ``threads`` sets intra-op threads (1 for tests and benchmarks),
    ``overrides`` fixes free dimensions by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[graph_optimization]
    for name, value in (overrides or {}).items():
        options.add_free_dimension_override_by_name(name, value)
    return options


def provider_options(choice: ProviderChoice, settings: SessionSettings) -> list[dict]:
    """One options dict per provider of ``choice.providers``: the user's go to the first
    (the one asked for), the fallbacks get none."""
    given = dict(settings.provider_options)
    if given and choice.provider == CPU:
        raise MemeditError(f"Provider options ({', '.join(given)}) were given, but the "
                           "pipeline runs on the CPU provider.",
                           "Drop --provider-option/--trt-engine-cache, or ask for --provider "
                           "cuda or tensorrt.")
    return [given] + [{} for _ in choice.providers[1:]]


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


def _static_sessions(onnx_dir: Path, choice: ProviderChoice, settings: SessionSettings,
                     options: list[dict]) -> dict:
    """One session per component, each with its own free-dimension overrides (the text
    encoder's batch is N where the UNet's is 2N, so one set cannot serve all graphs)."""
    import onnxruntime as ort

    static = settings.static
    config = json.loads((onnx_dir / "vae_decoder" / "config.json").read_text()) \
        if (onnx_dir / "vae_decoder" / "config.json").is_file() else {}
    scale = 2 ** (len(config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    tokenizer = onnx_dir / "tokenizer" / "tokenizer_config.json"
    sequence = json.loads(tokenizer.read_text()).get("model_max_length", 77) \
        if tokenizer.is_file() else 77
    sessions = {}
    for path in sorted(onnx_dir.glob("*/model.onnx")):
        component = path.parent.name
        overrides = static.overrides(component, scale, sequence)
        sessions[f"{component}_session"] = ort.InferenceSession(
            path, session_options(settings.threads, settings.graph_optimization, overrides),
            providers=choice.providers, provider_options=options)
    return sessions


def check_runnable(onnx_dir: Path, choice: ProviderChoice) -> None:
    """Refuse, with the way out, graphs the chosen provider cannot run (CUDA-only fused
    operators on the CPU provider), before ONNX Runtime fails mid-load."""
    from .optimize import cuda_only_ops

    if choice.provider != CPU:
        return
    blocked = cuda_only_ops(onnx_dir)
    if blocked:
        raise MemeditError(
            f"The CPU provider cannot run {onnx_dir}: it uses CUDA-only fused operators ("
            + "; ".join(f"{c}: {', '.join(ops)}" for c, ops in blocked.items())
            + f"), and ONNX Runtime runs on CPU here ({choice.reason}).",
            "Run it with --provider cuda or tensorrt on a GPU, or re-export with --optimize "
            "basic for CPU serving.")


def load_ort_pipeline(onnx_dir: str | os.PathLike, provider: str = "auto",
                      threads: int | None = None, settings: SessionSettings | None = None):
    """Optimum's ``ORTDiffusionPipeline`` on ``onnx_dir``; returns ``(pipeline, choice)``.

    ``settings`` (threads, provider options, IO binding, static shapes) takes precedence
    over ``threads``, which is the short form for ``SessionSettings(threads=...)``."""
    from optimum.onnxruntime import ORTDiffusionPipeline

    onnx_dir = Path(onnx_dir)
    _check_folder(onnx_dir)
    settings = settings or SessionSettings(threads=threads)
    choice = choose_provider(provider)
    check_runnable(onnx_dir, choice)
    options = provider_options(choice, settings)
    try:
        with ort_failures(onnx_dir):
            sessions = _static_sessions(onnx_dir, choice, settings, options) \
                if settings.static else {}
            pipe = ORTDiffusionPipeline.from_pretrained(
                onnx_dir, providers=choice.providers, provider_options=options,
                session_options=session_options(settings.threads, settings.graph_optimization),
                use_io_binding=settings.io_binding, export=False, local_files_only=True,
                **sessions)
    # Optimum indexes each graph's inputs by name while it builds the pipeline: a graph in
    # the wrong folder (a text encoder as unet/model.onnx) surfaces as a KeyError.
    except (OSError, ValueError, KeyError) as err:
        raise MemeditError(f"Optimum could not load {onnx_dir}: {type(err).__name__}: {err}",
                           "Re-export it with `memedit export --onnx`.") from None
    if choice.provider != CPU and choice.provider not in pipe.unet.session.get_providers():
        # The probe passed but the real model did not get it (e.g. out of GPU memory).
        choice = ProviderChoice(CPU, f"the UNet session fell back to CPU from {choice.label}")
    pipe.set_progress_bar_config(disable=True)
    return pipe, choice


def generate(onnx_dir: str | os.PathLike, prompts: Sequence[str], seeds: Sequence[int],
             config: SamplingConfig | None = None, provider: str = "auto",
             threads: int | None = None, settings: SessionSettings | None = None
             ) -> tuple[np.ndarray, ProviderChoice]:
    """Images for ``prompts[i]`` with ``seeds[i]`` from an exported folder, with ONNX Runtime.

    Same seeding as memedit's PyTorch sampling (per-prompt CPU generators), so an image can be
    compared with the PyTorch model's, and so a batch of prompts in one call gives the images
    each prompt gives alone. Returns float images [N, H, W, 3] in [0, 1].
    """
    config = config or SamplingConfig(steps=25)
    warning = audit_warning(onnx_dir)
    if warning is not None:
        logging.getLogger(__name__).warning("%s", warning)
    pipe, choice = load_ort_pipeline(onnx_dir, provider, threads, settings)
    with ort_failures(Path(onnx_dir)):
        return generate_images(pipe, list(prompts), list(seeds), config), choice
