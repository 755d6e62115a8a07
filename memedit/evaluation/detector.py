"""Wen et al.'s training-free memorization detector (ICLR 2024).

A memorized prompt pulls the sample towards one image from the first steps on, so the
text-conditional part of the noise prediction, ``eps(x_t, c) - eps(x_t, "")``, is unusually
large early in sampling. The score of a prompt is its magnitude averaged over the first
``steps`` denoising steps of the ordinary sampling trajectory.

We report the RMS (the L2 norm divided by sqrt(D), D = latent size) so scores compare across
resolutions; the ranking, and so the AUROC, is the same as with Wen et al.'s plain L2 norm.

Wen et al. ran it with DDIM (``DDIMScheduler.from_config`` of the pipeline's scheduler) and
tracked every one of the 50 steps: ``scheduler="ddim"`` reproduces that; the default keeps the
pipeline's own scheduler, so that the detector sees the trajectory evaluation generates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memedit.errors import MemeditError
from memedit.hooks import ActivationRecorder, StopDenoising
from memedit.sampling import SamplingConfig, batches, gather_batches, run_pipeline

SCHEDULERS = ("pipeline", "ddim")


@dataclass(frozen=True)
class DetectorConfig:
    """``steps``: how many of the first denoising steps are averaged (Wen et al. report that
    the first step alone already separates well; more steps are steadier); ``None``: all.
    ``scheduler``: ``pipeline`` (the pipeline's own) or ``ddim`` (as Wen et al.)."""

    steps: int | None = 5
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scheduler: str = "pipeline"

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise MemeditError(f"Unknown detector scheduler {self.scheduler!r}.",
                               f"Use one of {', '.join(SCHEDULERS)}.")


def scheduler_name(pipe, config: DetectorConfig) -> str:
    """The scheduler class the detector samples with, for the report."""
    return "DDIMScheduler" if config.scheduler == "ddim" else type(pipe.scheduler).__name__


@contextlib.contextmanager
def detector_scheduler(pipe, config: DetectorConfig) -> Iterator[None]:
    """Swap in DDIM for the block when asked (Wen et al.'s set-up), then restore the
    pipeline's own scheduler object."""
    if config.scheduler == "pipeline":
        yield
        return
    from diffusers import DDIMScheduler

    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        yield
    finally:
        pipe.scheduler = original


def text_noise_magnitudes(pipe, prompts: Sequence[str], seeds: Sequence[int],
                          config: DetectorConfig, progress=None) -> np.ndarray:
    """``||eps(x_t, c) - eps(x_t, "")|| / sqrt(D)`` for each prompt and each of the first
    ``config.steps`` steps: float array ``[N, steps]``.

    Runs the pipeline itself (same scheduler, guidance and seeded noise as generation) and
    reads the UNet's two classifier-free-guidance halves with a forward hook; sampling stops
    before the first UNet call it does not need, and the VAE is never run.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    sampling = config.sampling
    if sampling.guidance_scale <= 1.0:
        raise MemeditError(
            "The detector needs classifier-free guidance (guidance scale > 1): it measures the "
            "gap between the conditional and unconditional noise predictions.",
            "Use a guidance scale above 1 (the default is 7.5).")
    steps = sampling.steps if config.steps is None else min(config.steps, sampling.steps)
    if steps < 1:
        raise MemeditError("The detector needs at least one step.",
                           "Pass --detector-steps 1 or more.")

    out: list[np.ndarray] = []
    current: list[torch.Tensor] = []

    def record(_module, _inputs, output):
        eps = output[0] if isinstance(output, tuple) else output.sample
        uncond, cond = eps.float().chunk(2)
        gap = (cond - uncond).flatten(1)
        current.append(gap.pow(2).mean(dim=1).sqrt().cpu())

    # The recorder with no layers only counts UNet calls and leaves the loop after `steps`,
    # the same mechanism locating uses.
    stopper = ActivationRecorder(pipe, [], steps)
    with detector_scheduler(pipe, config):
        handle = pipe.unet.register_forward_hook(record)
        try:
            for batch in batches(list(zip(prompts, seeds, strict=True)), sampling.batch_size):
                current.clear()
                stopper.start_pipeline_call()
                with stopper, torch.no_grad(), contextlib.suppress(StopDenoising):
                    run_pipeline(pipe, [p for p, _ in batch], [s for _, s in batch], sampling,
                                 output_type="latent")
                out.append(torch.stack(current, dim=1).numpy())
                if progress is not None:
                    progress.update(len(batch))
        finally:
            handle.remove()
    return np.concatenate(out, axis=0)


def noise_magnitudes(pipe, prompts: Sequence[str], seeds: Sequence[int],
                     config: DetectorConfig, progress=None) -> np.ndarray:
    """:func:`text_noise_magnitudes`, its batches shared out over the processes of a launched
    run (the same batches as one process, gathered in order: the same numbers)."""
    def measure(batch: list[tuple[str, int]]) -> np.ndarray:
        return text_noise_magnitudes(pipe, [p for p, _ in batch], [s for _, s in batch], config)

    return gather_batches(measure, list(zip(prompts, seeds, strict=True)),
                          config.sampling.batch_size, progress)


def detector_scores(magnitudes: np.ndarray, steps: int | None = None) -> np.ndarray:
    """Mean magnitude over the first ``steps`` steps (all recorded steps when ``None``)."""
    magnitudes = np.asarray(magnitudes, dtype=np.float64)
    return magnitudes[:, : steps or magnitudes.shape[1]].mean(axis=1)


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve for "positives score higher": the probability that a random
    positive outscores a random negative, ties counting one half. ``None`` if a side is empty.
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    # Mann-Whitney U from pairwise comparisons: exact, and the sets here are small.
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))
