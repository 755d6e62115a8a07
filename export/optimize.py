"""Production variants of an export: ONNX Runtime's Stable Diffusion fusions and fp16.

This is the step between Optimum's export and memedit's checks: it rewrites each component's
``model.onnx`` in place (in the export's temporary folder), and the audit and parity then run
on the files it wrote, so a transformation that moved, packed, cast or lost a zeroed weight is
caught before anything is published.

What each ``--optimize`` level asks of ``onnxruntime.transformers.optimizer.optimize_model``
(model types ``unet``, ``clip``, ``vae``, as its Stable Diffusion script uses them):

- ``none``: Optimum's graph as exported.
- ``basic``: the fusions ONNX Runtime's CPU provider can run: LayerNormalization,
  SkipLayerNormalization, QuickGelu, and attention as ``Attention`` (self-attention, Q/K/V
  stacked into one initializer) and unpacked ``MultiHeadAttention`` (cross-attention).
- ``full``: everything the Stable Diffusion CUDA recipe enables: channels-last ``NhwcConv``,
  ``GroupNorm``/``SkipGroupNorm``, ``BiasSplitGelu``, ``BiasAdd`` and packed Q/K/V
  (self-attention) and K/V (cross-attention) in ``MultiHeadAttention``. These are CUDA
  kernels: the CPU provider refuses the graph (``NhwcConv``: no CPU kernel; packed QKV:
  "not implemented for CPU"), so its parity needs the CUDA provider.

``--dtype fp16`` converts the (fused) fp32 graph with ONNX Runtime's
``convert_float_to_float16`` on the CPU, keeping the graph's inputs and outputs fp32 (so the
same Optimum pipeline feeds it) and any component named in ``keep_fp32`` entirely fp32 (the
VAE decoder overflows in fp16 for some models). ``bf16`` has no offline converter in ONNX
Runtime: it is exported natively by Optimum on a CUDA device (see ``export_device``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memedit.errors import MemeditError

DTYPES = ("fp32", "fp16", "bf16")
OPTIMIZE_LEVELS = ("none", "basic", "full")
# ONNX Runtime's optimizer model type for each component folder Optimum writes.
MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "text_encoder_2": "clip",
               "vae_encoder": "vae", "vae_decoder": "vae"}
PROTOBUF_LIMIT = 2**31 - 2**20  # protobuf's 2 GB limit, with room for the graph itself


@dataclass(frozen=True)
class ComponentSettings:
    """What is done to one component's graph (Optimum's per-component exporter style)."""

    optimize: str = "none"
    dtype: str = "fp32"


@dataclass
class ComponentReport:
    """What was done to one component, as recorded in the export's report."""

    component: str
    optimize: str
    dtype: str
    fused: dict[str, int] = field(default_factory=dict)  # fused operator -> count
    seconds: float = 0.0


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise MemeditError(f"Unknown {name} {value!r}.", f"Use one of: {', '.join(allowed)}.")


def component_settings(dtype: str, optimize: str,
                       keep_fp32: tuple[str, ...] = ()) -> dict[str, ComponentSettings]:
    """Per-component settings: ``dtype``/``optimize`` everywhere, fp32 for ``keep_fp32``."""
    check_choice("dtype", dtype, DTYPES)
    check_choice("optimization level", optimize, OPTIMIZE_LEVELS)
    for name in keep_fp32:
        check_choice("component to keep in fp32", name, tuple(MODEL_TYPES))
    return {name: ComponentSettings(optimize, "fp32" if name in keep_fp32 else dtype)
            for name in MODEL_TYPES}


def needs_cuda(settings: dict[str, ComponentSettings]) -> str | None:
    """Why the CPU provider cannot run these graphs (None: it can)."""
    if any(s.optimize == "full" for s in settings.values()):
        return ("--optimize full writes CUDA-only operators (NhwcConv, GroupNorm, packed "
                "QKV attention) that the CPU provider cannot run")
    return None


# Fused operators with CUDA kernels only: a graph holding one cannot run on the CPU provider.
CUDA_ONLY_OPS = frozenset({"NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu",
                           "BiasAdd"})


def cuda_only_ops(folder: Path) -> dict[str, list[str]]:
    """Per component of an export folder, the CUDA-only operators its graph uses."""
    from .audit import read_structure

    found = {}
    for path in sorted(folder.glob("*/model.onnx")):
        graph = read_structure(path).graph
        ops = sorted({node.op_type for node in graph.node} & CUDA_ONLY_OPS)
        if ops:
            found[path.parent.name] = ops
    return found


def fusion_options(model_type: str, level: str):
    """ONNX Runtime's ``FusionOptions`` for ``level`` (see the module docstring)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if level == "basic" and model_type in ("unet", "vae"):
        options.enable_nhwc_conv = False
        options.enable_group_norm = False
        options.enable_skip_group_norm = False
        options.enable_bias_splitgelu = False
        options.enable_bias_add = False
        options.enable_packed_qkv = False
        options.enable_packed_kv = False
    return options


@contextlib.contextmanager
def _numpy2_num_heads() -> Iterator[None]:
    """ONNX Runtime 1.32's UNet attention fusion calls ``int()`` on a shape-[1] array, which
    NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"); every
    PyTorch-2 UNet export hits it. Read the same value with ``.item()`` while optimizing."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path)
    from fusion_attention_unet import FusionAttentionUnet  # ORT imports it under this name

    original = FusionAttentionUnet.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if not is_torch2:
            return original(self, reshape_q, is_torch2)
        parent = self.model.get_parent(reshape_q, 1)
        if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
            return 0
        value = self.model.get_constant_value(parent.input[2])
        heads = int(value.reshape(-1)[0]) if isinstance(value, np.ndarray) and value.size == 1 \
            else 0
        return max(heads, 0)

    FusionAttentionUnet.get_num_heads = get_num_heads
    try:
        yield
    finally:
        FusionAttentionUnet.get_num_heads = original


def _tensor_bytes(model) -> int:
    """Bytes of the graph's initializers, counted without serializing it (protobuf cannot
    serialize a message past 2 GB, which is what ``ByteSize`` would try)."""
    import onnx

    total = 0
    for tensor in model.model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def _save(model, path: Path) -> None:
    """Write ``model`` (fully in memory) over ``path``: one external-data file past
    protobuf's limit. The old graph's external data goes only once the new one is written,
    so no stale weights stay in the folder and a failed write loses nothing."""
    large = _tensor_bytes(model) > PROTOBUF_LIMIT
    staged = path.with_name("staged-" + path.name)
    model.save_model_to_file(str(staged), use_external_data_format=large,
                             all_tensors_to_one_file=True)
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
    staged.rename(path)  # its external data keeps the name it was written with


def optimize_component(path: Path, component: str, settings: ComponentSettings
                       ) -> ComponentReport:
    """Fuse and/or convert one ``model.onnx`` in place."""
    from onnxruntime.transformers.optimizer import optimize_model

    start = time.perf_counter()
    report = ComponentReport(component, settings.optimize, settings.dtype)
    if settings.optimize == "none" and settings.dtype != "fp16":
        return report
    model_type = MODEL_TYPES[component]
    level = settings.optimize if settings.optimize != "none" else None
    quiet = logging.getLogger("onnxruntime.transformers")
    previous = quiet.level
    quiet.setLevel(logging.ERROR)  # its per-fusion INFO/WARNING lines are not the user's
    try:
        with _numpy2_num_heads():
            model = optimize_model(
                str(path), model_type=model_type, opt_level=0, use_gpu=level == "full",
                optimization_options=fusion_options(model_type, level or "basic"),
                only_onnxruntime=False, verbose=False) if level else _plain(path)
            if level:
                report.fused = {k: v for k, v in model.get_fused_operator_statistics().items()
                                if v}
            if settings.dtype == "fp16":
                # Inputs/outputs stay fp32 so the same pipeline feeds the graph; casts at
                # the edges are ONNX Runtime's own converter's.
                model.convert_float_to_float16(keep_io_types=True)
            _save(model, path)
    except (ValueError, AssertionError, KeyError, IndexError, TypeError) as err:
        raise MemeditError(
            f"ONNX Runtime's optimizer failed on {component} ({type(err).__name__}: {err}).",
            "Export with --optimize none (or basic), or report the model and options.") from err
    finally:
        quiet.setLevel(previous)
    report.seconds = time.perf_counter() - start
    return report


def _plain(path: Path):
    """The graph wrapped in ONNX Runtime's ``OnnxModel`` without any fusion (for fp16 only)."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    return OnnxModel(onnx.load(str(path)))


def optimize_folder(folder: Path, settings: dict[str, ComponentSettings]
                    ) -> list[ComponentReport]:
    """Apply ``settings`` to each component folder present in ``folder``."""
    reports = []
    for component, setting in settings.items():
        path = folder / component / "model.onnx"
        if path.is_file() and (setting.optimize != "none" or setting.dtype == "fp16"):
            reports.append(optimize_component(path, component, setting))
    return reports
