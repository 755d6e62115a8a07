"""Optional int8 weight quantization for CPU serving (ONNX Runtime's dynamic quantizer).

``onnxruntime.quantization.quantize_dynamic`` stores each MatMul weight as int8 with a scale
(``W ≈ scale · (q − zero_point)``) and quantizes activations at run time (``MatMulInteger``).
memedit asks for **symmetric** weights (``WeightSymmetric``: zero point 0), so a weight that
was zeroed quantizes to ``q = 0`` and dequantizes to exactly 0; the audit checks that on the
int8 tensor itself (see ``audit.py``). Only MatMuls with a constant weight are quantized
(``MatMulConstBOnly``): the attention's activation-by-activation MatMuls stay float.

The quantizer names its outputs ``<weight>_quantized``, ``<weight>_scale`` and
``<weight>_zero_point``; the audit reads the scale and zero point by those names.
"""

from __future__ import annotations

import time
from pathlib import Path

from memedit.errors import MemeditError

QUANTIZATIONS = ("none", "int8")
# How the quantizer names an int8 weight and its dequantization parameters (the audit's keys).
QUANTIZED_SUFFIX, SCALE_SUFFIX, ZERO_POINT_SUFFIX = "_quantized", "_scale", "_zero_point"
# The components whose MatMuls carry the weights memedit edits (UNet FFN/cross-attention,
# CLIP MLP). The VAE is convolutional: dynamic quantization would not touch it.
QUANTIZED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def quantize_component(path: Path) -> float:
    """Quantize one ``model.onnx`` in place; returns the seconds it took."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    output = path.with_name("model.int8.onnx")
    fp32_bytes = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    try:
        # The fp32 graph's external data (if any) keeps its name until the int8 graph
        # replaces it. Convolutions stay fp32, so an int8 UNet from a graph past 2 GB can
        # still be past 2 GB: it is written with external data too.
        quantize_dynamic(path, output, weight_type=QuantType.QInt8, per_channel=False,
                         op_types_to_quantize=["MatMul"],
                         use_external_data_format=fp32_bytes > 2**31 - 2**20,
                         extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True})
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as err:
        raise MemeditError(f"ONNX Runtime's quantizer failed on {path.parent.name} ({err}).",
                           "Export without --quantize, or report the model.") from err
    for old in path.parent.glob(path.name + "*"):  # model.onnx and its fp32 external data
        old.unlink()
    output.rename(path)
    return time.perf_counter() - start


def quantize_folder(folder: Path, quantization: str) -> dict[str, float]:
    """int8-quantize the UNet and text encoder(s) of ``folder``: component -> seconds."""
    if quantization not in QUANTIZATIONS:
        raise MemeditError(f"Unknown quantization {quantization!r}.",
                           f"Use one of: {', '.join(QUANTIZATIONS)}.")
    if quantization == "none":
        return {}
    return {name: quantize_component(folder / name / "model.onnx")
            for name in QUANTIZED_COMPONENTS if (folder / name / "model.onnx").is_file()}
