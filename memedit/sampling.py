"""Batched, seed-exact sampling with the pipeline's own scheduler.

Every prompt gets its own ``torch.Generator`` seeded with its seed, so an image does not depend
on the batch it was drawn in: locating, evaluating and exporting all see the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memedit.distributed import map_batches
from memedit.errors import MemeditError
from memedit.prompts import quiet_tokenizer_warnings

# Every Stable Diffusion family's pipeline refuses image sizes that are not multiples of 8.
SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn. Defaults are the authors' (50 steps, guidance 7.5, seed 0)."""

    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 8
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        # Checked where the config is made, so a bad value fails before any model loads.
        if self.steps < 1:
            raise MemeditError(f"--steps must be at least 1, got {self.steps}.",
                               "Stable Diffusion uses 25-50 denoising steps.")
        if self.batch_size < 1:
            raise MemeditError(f"--batch-size must be at least 1, got {self.batch_size}.",
                               "Pass how many prompts one pipeline call draws, e.g. 8.")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise MemeditError(f"--guidance-scale must be a finite number >= 0, got "
                               f"{self.guidance_scale}.", "Stable Diffusion's default is 7.5.")
        for name, value in (("height", self.height), ("width", self.width)):
            if value is not None and (value < SIZE_MULTIPLE or value % SIZE_MULTIPLE):
                raise MemeditError(
                    f"--{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}.",
                    f"Stable Diffusion's VAE works on multiples of {SIZE_MULTIPLE}: try "
                    f"{max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)}.")


def batches(items: Sequence, size: int) -> Iterator[list]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def generators(pipe, seeds: Sequence[int]) -> list[torch.Generator]:
    # CPU generators give the same noise on every device; diffusers moves the latents.
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def run_pipeline(pipe, prompts: Sequence[str] | None, seeds: Sequence[int],
                 config: SamplingConfig, output_type: str = "np", **kwargs):
    """One pipeline call on a batch of prompts with per-prompt seeds (``prompts`` None: the
    caller passes ``prompt_embeds`` instead).

    A prompt past the tokenizer's 77 tokens is legal (it is truncated) but must not be quoted
    back on stderr, once per batch."""
    with quiet_tokenizer_warnings():
        return pipe(
            prompt=None if prompts is None else list(prompts),
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            generator=generators(pipe, seeds),
            height=config.height,
            width=config.width,
            output_type=output_type,
            **kwargs,
        )


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], config: SamplingConfig,
                    progress=None) -> np.ndarray:
    """Images for ``prompts[i]`` with ``seeds[i]``: float array [N, H, W, 3] in [0, 1]
    (shared out over the processes of a launched run, see :mod:`memedit.distributed`)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")

    def draw(batch: list[tuple[str, int]]) -> np.ndarray:
        result = run_pipeline(pipe, [p for p, _ in batch], [s for _, s in batch], config)
        return result.images

    return gather_batches(draw, list(zip(prompts, seeds, strict=True)), config.batch_size,
                          progress)


def gather_batches(fn: Callable[[list], np.ndarray], items: Sequence, batch_size: int,
                   progress=None) -> np.ndarray:
    """``fn`` over ``items`` in batches of ``batch_size``, its arrays concatenated in order:
    under a launcher each process runs its share of the batches (the same batches as one
    process, so the same numbers) and every process gets all of them back (see
    :func:`memedit.distributed.map_batches`)."""
    def run(batch: list) -> np.ndarray:
        # C order and float32 whatever ``fn`` returns (a pipeline gives a channel-first
        # view): numpy reduces in memory order, so a score of the same values must not depend
        # on a layout that sending them between processes would change.
        return np.ascontiguousarray(fn(batch), dtype=np.float32)

    return np.concatenate(map_batches(run, list(batches(items, batch_size)), progress), axis=0)
