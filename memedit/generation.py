"""The ``generate`` command's call: images for prompts, from an ONNX export run by ONNX Runtime
or from a PyTorch pipeline, written as PNG files under the output policy.

    >>> import memedit
    >>> result = memedit.generate(["a photo of a cat"], out="cat.png", onnx="sanitized-onnx")
    >>> [image.path for image in result.images]
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memedit.errors import MemeditError
from memedit.loading import ModelSource
from memedit.outputs import atomic_write_bytes, check_output
from memedit.sampling import SamplingConfig, generate_images

log = logging.getLogger("memedit")


@dataclass(frozen=True)
class GeneratedImage:
    """One written image and what made it."""

    path: Path
    prompt: str
    seed: int


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    runtime: str  # what ran the model, e.g. "ONNX Runtime on CPU: ..." or "PyTorch on cpu: ..."
    pixels: np.ndarray = field(repr=False)  # [N, H, W, 3] floats in [0, 1], in images' order


def image_paths(out: str | os.PathLike, count: int) -> list[Path]:
    """``out`` for one image; ``NAME-0.png``, ``NAME-1.png``, ... for several. A name without
    a suffix gets ``.png``; another suffix is refused (the files are PNG)."""
    out = Path(out)
    if out.suffix.lower() not in ("", ".png"):
        raise MemeditError(f"{out} does not end in .png, but generate writes PNG images.",
                           f"Pass --out {out.with_suffix('.png')}.")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().clip(0, 255).astype("uint8")).save(buffer, "PNG")
    return buffer.getvalue()


def generate(prompts: Sequence[str], out: str | os.PathLike = "image.png",
             onnx: str | os.PathLike | None = None,
             model: str | os.PathLike | ModelSource | None = None, overwrite: bool = False,
             seed: int = 0, num_images: int = 1, steps: int = 25, guidance_scale: float = 7.5,
             height: int | None = None, width: int | None = None, batch_size: int | None = None,
             provider: str = "auto", threads: int | None = None,
             provider_option: Sequence[str] = (),
             trt_engine_cache: str | os.PathLike | None = None,
             graph_optimization: str = "all", io_binding: bool | None = None,
             static_shapes: bool = False) -> GenerateResult:
    """Generate ``num_images`` images per prompt (seeds ``seed``, ``seed + 1``, ...) and write
    them as PNG files named after ``out``; with ``onnx`` an exported folder runs on ONNX
    Runtime (``provider``, its options, IO binding, static shapes), else the PyTorch ``model``
    (default: the embedded test model). Every output path is checked before the model loads.

    An export whose record shows no passed sanitization audit runs with a warning (on the
    ``memedit`` logger); ``memedit verify-onnx`` checks it.
    """
    prompts = list(prompts)
    if not prompts:
        raise MemeditError("No prompt to generate.", "Pass at least one prompt.")
    if num_images < 1:
        raise MemeditError(f"num_images is {num_images}.", "Ask for at least one image.")
    all_prompts = [p for p in prompts for _ in range(num_images)]
    seeds = [seed + i for _ in prompts for i in range(num_images)]
    config = SamplingConfig(steps=steps, guidance_scale=guidance_scale, seed=seed,
                            batch_size=batch_size or len(all_prompts), height=height,
                            width=width)
    if static_shapes and len(all_prompts) % config.batch_size:
        raise MemeditError(f"--static-shapes fixes the batch at {config.batch_size}, but "
                           f"{len(all_prompts)} images do not split into such batches.",
                           "Pick a --batch-size that divides prompts x --num-images.")
    paths = image_paths(out, len(all_prompts))
    inputs = [onnx, model]
    for path in paths:  # refuse before the slow part
        check_output(path, overwrite, inputs, kind="file")
    if onnx is not None:
        from memedit.export.runtime import generate as generate_onnx
        from memedit.export.runtime import session_settings

        settings = session_settings(onnx, config, threads, provider_option, trt_engine_cache,
                                    graph_optimization, io_binding, static_shapes)
        pixels, choice = generate_onnx(onnx, all_prompts, seeds, config, provider,
                                       settings=settings)
        runtime = f"ONNX Runtime on {choice.label}: {choice.reason}"
    else:
        from memedit.loading import load_pipeline

        pipe, source = load_pipeline(model)
        runtime = f"PyTorch on {pipe.device}: {source.spec}"
        pixels = generate_images(pipe, all_prompts, seeds, config)
    images = []
    for path, image, prompt, image_seed in zip(paths, pixels, all_prompts, seeds, strict=True):
        atomic_write_bytes(path, _png(image), overwrite, inputs)
        images.append(GeneratedImage(path, prompt, image_seed))
    return GenerateResult(images, runtime, pixels)
