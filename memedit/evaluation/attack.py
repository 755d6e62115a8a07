"""The embedding attack ("Finding Dori", arXiv 2507.16880): does an edit delete a memorized
image, or only the path one prompt takes to it?

For each memorized prompt with a known training image, the text conditioning ``y`` that the
UNet's cross-attention reads (the text encoder's output, ``[77, d]``; for SDXL also the pooled
embedding the UNet reads, see :mod:`memedit.families`) is optimized with Adam
to minimise the ordinary denoising loss of that training image, every weight frozen. The
optimized ``y`` then drives classifier-free-guided generation (the empty prompt as the
unconditional branch), scored with the evaluation's own measures and thresholds. The same
attack aimed at images the model never trained on is the control: if it makes copies of
those too, the budget is strong enough to draw whatever it is aimed at, and the target's
copy rate says nothing about memorization (attack.md, "Scaling down").
"""

from __future__ import annotations

import contextlib
import io
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from memedit import distributed
from memedit.errors import MemeditError
from memedit.evaluation.harness import (
    EvalSettings,
    _repeat,
    _scorers,
    check_ground_truths,
    score_group,
)
from memedit.evaluation.similarity import MEASURES, Measure, load_image, resize, to_pil
from memedit.families import (
    encode_conditioning,
    pipeline_conditioning,
    prediction_type,
    unet_conditioning,
)
from memedit.prompts import PromptRecord, PromptSet
from memedit.sampling import SamplingConfig, batches, gather_batches, generators

START_MODES = ("prompt", "random", "ordinary")
DEFAULT_CHECKPOINTS = (1, 10, 25, 50)
REPORT_FORMAT = "memedit-attack"
REPORT_VERSION = 1


@dataclass(frozen=True)
class AttackConfig:
    """The attack's budget and start. Defaults are the published ones (Adam, lr 0.1, 8 noise /
    timestep pairs a step, 50 steps, start at the prompt's own embedding).

    ``checkpoints``: the step counts whose embeddings are generated from and scored, besides
    step 0 (before the attack) and ``steps`` (always scored); ``None`` takes those of
    :data:`DEFAULT_CHECKPOINTS` within ``steps``. ``prompt_batch`` prompts are optimized
    together (each has its own noise generator, seeded ``seed + its index``, so the result
    does not depend on the batching). ``control_limit``: the control copy rate above which the
    report says the attack is too strong to mean anything.
    """

    lr: float = 0.1
    steps: int = 50
    pairs: int = 8
    checkpoints: tuple[int, ...] | None = None
    start: str = "prompt"
    seed: int = 0
    prompt_batch: int = 1
    control_limit: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise MemeditError(f"The attack needs at least one step, got {self.steps}.",
                               "Pass --attack-steps 1 or more (published: 50).")
        if not self.lr > 0:
            raise MemeditError(f"The learning rate must be positive, got {self.lr}.",
                               "Pass --lr > 0 (published: 0.1).")
        if self.pairs < 1:
            raise MemeditError(f"Each step needs at least one noise/timestep pair, got "
                               f"{self.pairs}.", "Pass --pairs 1 or more (published: 8).")
        if self.prompt_batch < 1:
            raise MemeditError(f"--prompt-batch must be at least 1, got {self.prompt_batch}.",
                               "Pass the number of prompts optimized together.")
        if self.start not in START_MODES:
            raise MemeditError(f"Unknown attack start {self.start!r}.",
                               f"Use one of {', '.join(START_MODES)}.")
        if not 0 <= self.control_limit <= 1:
            raise MemeditError(f"The control limit is a rate in [0, 1], got "
                               f"{self.control_limit}.", "Pass --control-limit 0.1, say.")
        if self.checkpoints is None:
            wanted = tuple(c for c in DEFAULT_CHECKPOINTS if c <= self.steps)
        else:
            wanted = tuple(int(c) for c in self.checkpoints)
            wrong = [c for c in wanted if not 0 <= c <= self.steps]
            if wrong:
                raise MemeditError(
                    f"Checkpoint(s) {', '.join(map(str, wrong))} lie outside the attack's "
                    f"0..{self.steps} steps.",
                    "Pass --checkpoints within --attack-steps, or raise --attack-steps.")
        # Frozen dataclass: store the resolved list once, so every reader sees the same one.
        object.__setattr__(self, "checkpoints", tuple(sorted({0, *wanted, self.steps})))

    def describe(self) -> dict:
        return {"method": "Finding Dori embedding attack (arXiv 2507.16880): Adam on the text "
                          "conditioning y only, denoising loss of the training image",
                "lr": self.lr, "steps": self.steps, "pairs_per_step": self.pairs,
                "checkpoints": list(self.checkpoints), "start": self.start, "seed": self.seed,
                "prompt_batch": self.prompt_batch, "control_limit": self.control_limit}


@dataclass
class AttackRun:
    """One prompt set attacked: scores at each checkpoint, the loss curve, the grid images."""

    role: str  # "target" (training images) or "control" (images never trained on)
    group: PromptSet
    scores: dict[int, dict]  # step count -> score_group() output
    losses: np.ndarray  # [prompts, steps], mean over the step's pairs
    drift: np.ndarray  # [prompts, checkpoints]: ||y - y_prompt|| / ||y_prompt||
    grid: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class AttackResult:
    config: AttackConfig
    settings: EvalSettings
    target: AttackRun
    control: AttackRun | None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- thresholds


def near_threshold(measure: Measure, threshold: float) -> float:
    """"Within twice the threshold": twice the distance for a distance (MSE), twice the
    distance from a perfect copy for a similarity that tops out at 1 (SSCD 0.7 -> 0.4)."""
    near = 1 - 2 * (1 - threshold) if measure.higher_is_similar else 2 * threshold
    return round(near, 12)  # 1 - 2 * 0.3 is 0.3999..., which would not read as 0.4


def copy_thresholds(settings: EvalSettings) -> tuple[float, float]:
    """The copy threshold (the primary measure's first) and its near-copy threshold."""
    thresholds = settings.resolved_thresholds
    if not thresholds:
        raise MemeditError(f"The {settings.measure} measure has no copy threshold, so the "
                           "attack's copy rate is undefined.",
                           "Pass --threshold, or use --measure mse or sscd.")
    return thresholds[0], near_threshold(MEASURES[settings.measure], thresholds[0])


# ---------------------------------------------------------------------------- the attack


@contextlib.contextmanager
def frozen(pipe) -> Iterator[None]:
    """No parameter of the pipeline takes a gradient inside the block; the flags are restored
    afterwards (a loaded pipeline leaves them on, and the caller may rely on that)."""
    params = [p for module in pipe.components.values() if isinstance(module, torch.nn.Module)
              for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def native_size(pipe, sampling: SamplingConfig) -> tuple[int, int]:
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return sampling.height or native, sampling.width or native


def target_latents(pipe, group: PromptSet, sampling: SamplingConfig) -> torch.Tensor:
    """VAE latents of each prompt's (first) training image at the generation size, encoded
    ``sampling.batch_size`` at a time: what the attack steers each prompt's y towards."""
    height, width = native_size(pipe, sampling)
    images = [resize(load_image(r.images[0]), height, width) for r in group.records]
    return torch.cat([encode_images(pipe, chunk)
                      for chunk in batches(images, sampling.batch_size)])


def prompt_embeddings(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """The conditioning the UNet reads for each prompt, ``[N, T, d]`` float32 (the attack's
    y): the text encoder's output (SD 1.x/2.x, T = 77); for SDXL both encoders' states and the
    pooled embedding as one more row (see :mod:`memedit.families`)."""
    return encode_conditioning(pipe, prompts)


@torch.no_grad()
def encode_images(pipe, images: Sequence[np.ndarray]) -> torch.Tensor:
    """VAE latents of ``[H, W, 3]`` images in [0, 1]: ``latent_dist.mean * scaling_factor``."""
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2 - 1
    pixels = pixels.to(pipe.device, pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist.mean.float() * pipe.vae.config.scaling_factor


def training_scheduler(pipe):
    """The noise schedule the UNet was trained with. A sampler's own ``add_noise`` need not be
    it (Euler-type samplers add unscaled noise, x0 + sigma * eps), so rebuild DDPM from the
    pipeline's scheduler config: same betas, same prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def denoising_loss(pipe, scheduler, y: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """Per-prompt denoising loss ``[P]``: ``y [P, T, d]``, ``z0 [P, C, h, w]``, ``eps
    [P, K, C, h, w]`` and ``t [P, K]`` (K noise/timestep pairs per prompt); the target is the
    noise, or the velocity for a v-prediction model."""
    prompts, pairs = t.shape
    z0 = z0.repeat_interleave(pairs, dim=0)
    eps, t = eps.flatten(0, 1), t.flatten()
    z_t = scheduler.add_noise(z0, eps, t)
    kind = prediction_type(pipe)
    if kind == "epsilon":
        target = eps
    elif kind == "v_prediction":
        target = scheduler.get_velocity(z0, eps, t)
    else:
        raise MemeditError(f"The scheduler predicts {kind!r}; the attack supports epsilon and "
                           "v_prediction models.", "Attack a Stable Diffusion 1.x/2.x/XL model.")
    unet = pipe.unet
    height, width = (side * pipe.vae_scale_factor for side in z0.shape[-2:])
    conditioning = unet_conditioning(pipe, y.repeat_interleave(pairs, dim=0), height, width)
    pred = unet(z_t.to(unet.dtype), t.to(unet.device), **conditioning).sample
    return ((pred.float() - target) ** 2).reshape(prompts, -1).mean(dim=1)


def draw_pairs(gens: Sequence[torch.Generator], pairs: int, latent_shape: tuple[int, ...],
               timesteps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` (eps, t) per prompt, each prompt from its own generator, t ~ U{0..T-1}."""
    eps = torch.stack([torch.randn((pairs, *latent_shape), generator=g) for g in gens])
    t = torch.stack([torch.randint(0, timesteps, (pairs,), generator=g) for g in gens])
    return eps.to(device), t.to(device)


def optimize_embeddings(pipe, y_start: torch.Tensor, z0: torch.Tensor, config: AttackConfig,
                        gens: Sequence[torch.Generator], progress=None
                        ) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    """Adam on ``y`` only, from ``y_start [P, T, d]`` towards the latents ``z0``.

    Returns the embedding after each checkpoint's step count (CPU float32, step 0 = the
    start) and the loss of every step ``[P, steps]``. The caller freezes the pipeline.
    """
    scheduler = training_scheduler(pipe)
    y = y_start.detach().clone().to(pipe.device).requires_grad_(True)
    optimizer = torch.optim.Adam([y], lr=config.lr)
    snapshots = {0: y.detach().cpu().clone()}
    losses = np.zeros((len(y), config.steps))
    with torch.enable_grad():
        for step in range(1, config.steps + 1):
            eps, t = draw_pairs(gens, config.pairs, tuple(z0.shape[1:]),
                                scheduler.config.num_train_timesteps, pipe.device)
            loss = denoising_loss(pipe, scheduler, y, z0, eps, t)
            optimizer.zero_grad(set_to_none=True)
            # A sum of per-prompt means: each prompt's y gets exactly its own gradient, and
            # Adam's update is per element, so prompts batched together do not interact.
            loss.sum().backward()
            optimizer.step()
            losses[:, step - 1] = loss.detach().cpu().numpy()
            if step in config.checkpoints:
                snapshots[step] = y.detach().cpu().clone()
            if progress is not None:
                progress.update(1)
    return snapshots, losses


def optimize_in_chunks(pipe, count: int, z0: torch.Tensor, config: AttackConfig, seed: int,
                       start: Callable[[list[int], list[torch.Generator]], torch.Tensor],
                       progress=None) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    """:func:`optimize_embeddings` for prompts ``0 .. count - 1`` in chunks of
    ``config.prompt_batch``, prompt ``i`` with its own generator seeded ``seed + i`` and the
    start ``start(chunk, generators)``; ``z0`` holds every prompt's latents. Under a launcher
    the chunks are shared out over the processes (a chunk runs the same on any of them) and
    every process gets all results in prompt order: the embeddings at each checkpoint
    ``[count, T, d]`` and the losses ``[count, steps]``. ``progress`` advances by steps."""
    def optimize(chunk: list[int]) -> tuple[dict[int, torch.Tensor], np.ndarray]:
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in chunk]
        return optimize_embeddings(pipe, start(chunk, gens), z0[chunk], config, gens, progress)

    snapshots: dict[int, list[torch.Tensor]] = {}
    losses = []
    chunks = list(batches(range(count), config.prompt_batch))
    for (chunk_snaps, chunk_losses), computed_here in distributed.ordered_map(optimize, chunks):
        for step, y in chunk_snaps.items():
            snapshots.setdefault(step, []).append(y)
        losses.append(chunk_losses)
        if not computed_here and progress is not None:
            progress.update(config.steps)
    return {step: torch.cat(parts) for step, parts in snapshots.items()}, np.concatenate(losses)


def generate_from_embeddings(pipe, embeds: torch.Tensor, negative: torch.Tensor,
                             seeds: Sequence[int], settings: EvalSettings,
                             progress=None) -> np.ndarray:
    """Images for ``embeds[i]`` with ``seeds[i]`` (classifier-free guidance against
    ``negative``, the empty prompt's embedding): ``[N, H, W, 3]`` in [0, 1]."""
    sampling = settings.sampling
    out = []
    for batch in batches(list(zip(embeds, seeds, strict=True)), sampling.batch_size):
        conditioning = pipeline_conditioning(pipe, torch.stack([e for e, _ in batch]),
                                             negative.expand(len(batch), -1, -1))
        result = pipe(**conditioning,
                      num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                      generator=generators(pipe, [s for _, s in batch]), height=sampling.height,
                      width=sampling.width, output_type="np")
        out.append(np.asarray(result.images, dtype=np.float32))
        if progress is not None:
            progress.update(len(batch))
    return np.concatenate(out, axis=0)


def start_embeddings(pipe, indices: Sequence[int], config: AttackConfig,
                     start_prompts: PromptSet | None, y_prompt: torch.Tensor,
                     gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Where the optimization of prompts ``indices`` (their own y: ``y_prompt``) starts:
    that y, N(0, I) of its shape (each prompt's from its own generator), or the y of an
    ordinary prompt (prompt i starts from ordinary prompt i, cycling)."""
    if config.start == "prompt":
        return y_prompt
    if config.start == "random":
        return torch.stack([torch.randn(tuple(y_prompt.shape[1:]), generator=g) for g in gens])
    if start_prompts is None or not len(start_prompts):
        raise MemeditError("--start ordinary needs ordinary prompts to start from.",
                           "Pass --start-prompts FILE (not memorized prompts).")
    texts = [start_prompts.prompts[i % len(start_prompts)] for i in indices]
    return prompt_embeddings(pipe, texts)


def check_targets(group: PromptSet) -> None:
    """Every attacked prompt needs the training image it is attacked towards."""
    missing = [(i, r) for i, r in enumerate(group.records) if not r.images]
    if missing:
        where = ", ".join(f"#{i + 1} ({r.prompt[:40]!r})" for i, r in missing[:5])
        raise MemeditError(
            f"{len(missing)} prompt(s) of {group.name} name no training image: {where}.",
            "The attack optimizes towards a known training image: give every prompt an "
            "`image` field (a JSONL path relative to the file).")


def attack_group(pipe, group: PromptSet, role: str, config: AttackConfig,
                 settings: EvalSettings, scorers: dict, start_prompts: PromptSet | None,
                 negative: torch.Tensor, scored: Sequence[int] | None = None) -> AttackRun:
    """Attack every prompt of ``group`` towards its (first) training image, then generate
    from the embedding at each checkpoint and score it like ``evaluate`` does.

    ``scored``: the checkpoints to generate from (default: all). A caller that needs only the
    end, as ``evaluate``'s column and calibration, passes ``(config.steps,)``: step 0 would
    only repeat the generations it has already scored, and no grid is drawn then."""
    show = settings.progress and distributed.state().is_main
    y_prompt = prompt_embeddings(pipe, group.prompts)
    z0_all = target_latents(pipe, group, settings.sampling)
    started = time.perf_counter()
    chunks = -(-len(group) // config.prompt_batch)
    with tqdm(total=config.steps * chunks, desc=f"attack {role}", unit="step",
              disable=not show, leave=False) as bar:
        by_step, losses = optimize_in_chunks(
            pipe, len(group), z0_all, config, config.seed,
            lambda chunk, gens: start_embeddings(pipe, chunk, config, start_prompts,
                                                 y_prompt[chunk], gens), bar)
    optimized = time.perf_counter()
    reference = y_prompt.cpu()
    drift = np.stack([((by_step[c] - reference).flatten(1).norm(dim=1)
                       / reference.flatten(1).norm(dim=1)).numpy() for c in config.checkpoints],
                     axis=1)
    negative_cpu = negative.cpu()
    scores, grid = {}, {}
    rows = min(settings.grid_prompts, len(group))
    seeds = settings.seeds
    steps = config.checkpoints if scored is None else tuple(scored)
    with tqdm(total=len(steps) * len(group) * len(seeds), desc=f"generate {role}",
              unit="image", disable=not show, leave=False) as bar:
        for step in steps:
            embeds = by_step[step].repeat_interleave(len(seeds), dim=0)
            pairs = list(zip(embeds, _repeat(group.prompts, seeds)[1], strict=True))
            images = gather_batches(
                lambda batch: generate_from_embeddings(
                    pipe, torch.stack([e for e, _ in batch]), negative_cpu,
                    [s for _, s in batch], settings),
                pairs, settings.sampling.batch_size, bar)
            scores[step] = score_group(images, group, settings, scorers)
            first_seed = [images[i * len(seeds)] for i in range(rows)]
            if step == 0 and config.start == "prompt":
                grid["original"] = first_seed
            if step == config.steps:
                grid["attacked"] = first_seed
    if "original" not in grid and scored is None:  # another start: draw the prompts instead
        grid["original"] = list(generate_from_embeddings(
            pipe, y_prompt[:rows].cpu(), negative_cpu, [seeds[0]] * rows, settings))
    generated = time.perf_counter()
    return AttackRun(role, group, scores, losses, drift, grid,
                     {"optimize": optimized - started, "generate": generated - optimized})


def attack(pipe, memorized: PromptSet, config: AttackConfig | None = None,
           settings: EvalSettings | None = None, control: PromptSet | None = None,
           start_prompts: PromptSet | None = None, sscd=None) -> AttackResult:
    """Run the embedding attack on ``memorized`` (and on ``control``, prompts whose images the
    model never trained on), every pipeline weight frozen and left bit-for-bit unchanged.

    ``settings`` are the evaluation's (sampling, seeds, measure and thresholds, grid rows);
    ``start_prompts`` are the ordinary prompts a ``start="ordinary"`` attack starts from;
    ``sscd`` is a :class:`memedit.evaluation.similarity.SSCD` for ``measure="sscd"``.
    """
    config = config or AttackConfig()
    settings = settings or EvalSettings()
    if not settings.seeds:
        raise MemeditError("At least one seed is needed.", "Pass --seeds 1 or more.")
    _, near = copy_thresholds(settings)
    # Score with the copy and near-copy thresholds on top of the measure's own.
    settings = replace(settings, thresholds=tuple(dict.fromkeys(
        (*settings.resolved_thresholds, near))))
    scorers = _scorers(settings, sscd)
    groups = {"target": memorized} | ({"control": control} if control is not None else {})
    for group in groups.values():
        check_targets(group)
    check_ground_truths(groups, scorers[settings.measure])  # reads every image up front
    notes = []
    if control is None:
        notes.append("No control was run: nothing shows whether this budget only brings back "
                     "memorized images or draws any image it is aimed at. Pass --control with "
                     "prompts whose images the model never trained on.")
    negative = prompt_embeddings(pipe, [""])
    with frozen(pipe):
        runs = {role: attack_group(pipe, group, role, config, settings, scorers,
                                   start_prompts, negative) for role, group in groups.items()}
    result = AttackResult(config, settings, runs["target"], runs.get("control"), notes)
    exceeded = control_exceeded(result)
    if exceeded is not None:
        result.notes.insert(0, (
            f"WARNING: the attack copies images the model never trained on (control copy rate "
            f"{exceeded[1]:.2f} at {exceeded[0]} steps > {config.control_limit}): at this "
            f"budget it draws what it is aimed at, so its copy rates say nothing about "
            f"memorization. Lower --lr or --attack-steps."))
    return result


# ---------------------------------------------------------------------------- controls


def testbed_control(memorized: PromptSet, folder: Path,
                    source: str | None = None) -> PromptSet | None:
    """The embedded model's control: each memorized caption with the same scene drawn over a
    background it never trained on (``scenes.memorized_images(seed=999)``), written as PNGs
    into ``folder``. Prompts that are not the embedded model's memorized captions get none;
    ``None`` when none is one. ``source`` is where the images will be for the report (the
    final output, when ``folder`` is the output's folder still being written)."""
    from memedit.testbed import scenes

    images = scenes.memorized_images(seed=999)
    index = {caption: i for i, caption in enumerate(scenes.MEMORIZED_CAPTIONS)}
    records = []
    for record in memorized.records:
        i = index.get(record.prompt)
        if i is None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"control_{i:02d}.png"
        to_pil(images[i]).save(path)
        records.append(PromptRecord(record.prompt, (path,), {"control_for": i}))
    if not records:
        return None
    return PromptSet(f"{memorized.name} (control: never-trained backgrounds)", tuple(records),
                     source or str(folder))


# ---------------------------------------------------------------------------- summaries


def checkpoint_rows(run: AttackRun, settings: EvalSettings) -> list[dict]:
    """Totals per checkpoint: copy and near-copy rates over all generations, and the median
    over prompts of the per-prompt mean score (the evaluation's aggregation)."""
    copy, near = copy_thresholds(settings)
    rows = []
    for step, scores in run.scores.items():
        data = scores["measures"][settings.measure]
        rates = data["rates"]
        rows.append({"steps": step,
                     "copy_rate": rates[str(copy)]["generation_rate"],
                     "copy_rate_se": rates[str(copy)]["generation_rate_se"],
                     "prompt_copy_rate": rates[str(copy)]["prompt_rate"],
                     "near_copy_rate": rates[str(near)]["generation_rate"],
                     "median": data["median"], "mean": data["mean"],
                     "secondary": {name: {"median": m["median"], "mean": m["mean"]}
                                   for name, m in scores["measures"].items()
                                   if name != settings.measure}})
    return rows


def prompt_rows(run: AttackRun, settings: EvalSettings, base: Path | None = None) -> list[dict]:
    """Per prompt and checkpoint: copy and near-copy rates over its seeds, the median score
    over its seeds, and how far the embedding moved from the prompt's own."""
    copy, near = copy_thresholds(settings)
    measure = MEASURES[settings.measure]
    rows = []
    for i, record in enumerate(run.group.records):
        checkpoints = []
        for k, (step, scores) in enumerate(run.scores.items()):
            values = np.asarray(scores["per_prompt"][i][settings.measure])
            checkpoints.append({"steps": step,
                                "copy_rate": float(measure.is_memorized(values, copy).mean()),
                                "near_copy_rate": float(measure.is_memorized(values, near).mean()),
                                "median": float(np.median(values)),
                                "scores": values.tolist(),
                                "embedding_drift": float(run.drift[i, k])})
        rows.append({"prompt": record.prompt,
                     "images": [_shown(p, base) for p in record.images],
                     "loss": run.losses[i].tolist(), "checkpoints": checkpoints})
    return rows


def _shown(path: Path, base: Path | None) -> str:
    """A path as the report shows it: relative to the output folder when inside it."""
    if base is not None and Path(path).is_relative_to(base):
        return str(Path(path).relative_to(base))
    return str(path)


def control_exceeded(result: AttackResult) -> tuple[int, float] | None:
    """The first checkpoint (steps, rate) at which the control's copy rate passes the limit."""
    if result.control is None:
        return None
    for row in checkpoint_rows(result.control, result.settings):
        if row["copy_rate"] > result.config.control_limit:
            return row["steps"], row["copy_rate"]
    return None


def build_report(result: AttackResult, context: dict | None = None,
                 base: Path | None = None) -> dict:
    """Everything as plain JSON: settings, prompt sets, totals and per-prompt figures per
    checkpoint for the target and the control, the control's verdict and timings."""
    import platform
    from datetime import datetime, timezone

    from memedit import __version__

    settings = result.settings
    copy, near = copy_thresholds(settings)
    runs = {"target": result.target} | ({"control": result.control} if result.control else {})
    exceeded = control_exceeded(result)
    # The attack has no ordinary prompts and runs no detector: leave out their settings.
    described = {key: value for key, value in settings.describe().items()
                 if key not in ("seeds_ordinary", "detector")}
    return {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION,
        "memedit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "attack": result.config.describe(),
        "settings": described | {"copy": {"threshold": copy, "near_copy_threshold": near,
                                          "near_copy": "within twice the threshold (for a "
                                          "similarity: twice the distance from 1)"}},
        "context": context or {},
        "prompt_sets": {role: {"name": run.group.name, "source": run.group.source,
                               "count": len(run.group), "sha256": run.group.sha256}
                        for role, run in runs.items()},
        "control_run": result.control is not None,
        "control_too_strong": None if result.control is None else exceeded is not None,
        "control_exceeded_at": None if exceeded is None else {"steps": exceeded[0],
                                                               "copy_rate": exceeded[1]},
        "totals": {role: checkpoint_rows(run, settings) for role, run in runs.items()},
        "per_prompt": {role: prompt_rows(run, settings, base) for role, run in runs.items()},
        "seconds": {role: run.seconds | {
            "optimize_per_prompt_step": run.seconds["optimize"]
            / (len(run.group) * result.config.steps)} for role, run in runs.items()},
        "notes": result.notes,
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: AttackResult) -> str:
    """The terminal table: totals per checkpoint (target and control side by side), then the
    target's prompts before and after the attack, then the notes (warnings first)."""
    from tabulate import tabulate

    settings, config = result.settings, result.config
    copy, near = copy_thresholds(settings)
    measure = settings.measure
    direction = MEASURES[measure].symbol
    target = checkpoint_rows(result.target, settings)
    control = checkpoint_rows(result.control, settings) if result.control else None
    headers = ["steps", "copies", "near", f"median {measure}"]
    if control is not None:
        headers += ["control copies", "near", f"median {measure}"]
    rows = []
    for k, row in enumerate(target):
        cells = [row["steps"], _fmt(row["copy_rate"]), _fmt(row["near_copy_rate"]),
                 _fmt(row["median"], 4)]
        if control is not None:
            c = control[k]
            cells += [_fmt(c["copy_rate"]), _fmt(c["near_copy_rate"]), _fmt(c["median"], 4)]
        rows.append(cells)
    sampling = settings.sampling
    lines = [
        f"embedding attack: start {config.start}, Adam lr {config.lr:g}, {config.pairs} noise/"
        f"timestep pairs a step, {config.steps} steps, seed {config.seed}; generation "
        f"{sampling.steps} steps, guidance {sampling.guidance_scale:g}, seeds "
        f"{','.join(map(str, settings.seeds))}",
        f"copy = {measure} {direction} {copy:g}, near copy = {measure} {direction} {near:g} "
        f"(share of generations); {settings.gt_aggregate} over training images; median over "
        f"{len(result.target.group)} prompts of the mean over seeds"
        + (f"; control: {len(result.control.group)} prompts aimed at never-trained images"
           if result.control else ""),
        tabulate(rows, headers=headers, tablefmt="simple"), ""]
    last = config.steps
    per_prompt = [[r["prompt"][:60],
                   f"{_fmt(r['checkpoints'][0]['copy_rate'])} -> "
                   f"{_fmt(r['checkpoints'][-1]['copy_rate'])}",
                   f"{_fmt(r['checkpoints'][0]['near_copy_rate'])} -> "
                   f"{_fmt(r['checkpoints'][-1]['near_copy_rate'])}",
                   f"{_fmt(r['checkpoints'][0]['median'], 4)} -> "
                   f"{_fmt(r['checkpoints'][-1]['median'], 4)}"]
                  for r in prompt_rows(result.target, settings)]
    lines.append(tabulate(per_prompt, headers=[f"prompt (0 -> {last} steps)", "copies", "near",
                                               f"median {measure} over seeds"],
                          tablefmt="simple"))
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figures


def curve_plot(result: AttackResult) -> bytes:
    """PNG: copy rate (near copies dotted) and median score against attack steps, target and
    control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result.settings
    copy, near = copy_thresholds(settings)
    measure = settings.measure
    direction = MEASURES[measure].symbol
    fig, (ax_rate, ax_med) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [(result.target, "tab:blue", "target (training images)")]
    if result.control is not None:
        runs.append((result.control, "tab:gray", "control (never-trained images)"))
    for run, colour, label in runs:
        rows = checkpoint_rows(run, settings)
        steps = [r["steps"] for r in rows]
        ax_rate.plot(steps, [r["copy_rate"] for r in rows], "-o", color=colour,
                     label=f"{label}: copies")
        ax_rate.plot(steps, [r["near_copy_rate"] for r in rows], ":", color=colour,
                     label=f"{label}: near copies")
        ax_med.plot(steps, [r["median"] for r in rows], "-o", color=colour, label=label)
    if result.control is not None:
        ax_rate.axhline(result.config.control_limit, color="tab:red", linestyle="--",
                        linewidth=0.8, label="control limit")
    ax_med.axhline(copy, color="black", linestyle="--", linewidth=0.8, label="copy threshold")
    # Step 0 (before the attack) must show, so a log axis that is linear below one step.
    steps = list(result.config.checkpoints)
    for ax in (ax_rate, ax_med):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlim(-0.1, steps[-1] * 1.3)  # no empty negative half of the linear part
        ax.minorticks_off()
        ax.set_xlabel(f"attack steps (Adam, lr {result.config.lr:g})")
        ax.legend(fontsize=7)
    if not MEASURES[measure].higher_is_similar:
        ax_med.set_yscale("log")  # distances span decades between a copy and a miss
    ax_rate.set(ylabel=f"share of generations with {measure} {direction} {copy:g} "
                       f"(near: {near:g})", ylim=(-0.02, 1.02))
    ax_med.set(ylabel=f"median {measure} to the attacked image")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def attack_grid(result: AttackResult, cell: int = 128) -> bytes:
    """PNG: per grid row, the attacked image | the prompt | its generation from the original
    prompt | the generation after the attack (first seed); target rows, then control rows."""
    from PIL import Image, ImageDraw, ImageFont

    from memedit.evaluation.figures import _cell

    runs = [r for r in (result.target, result.control) if r is not None]
    rows = [(run, i) for run in runs for i in range(len(run.grid["attacked"]))]
    labels = ["attacked image", "prompt", "original prompt",
              f"after {result.config.steps} steps"]
    font = ImageFont.load_default(size=11)
    header = 20
    canvas = Image.new("RGB", (cell * len(labels), header + len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(labels):
        draw.text((col * cell + 4, 4), label, fill="black", font=font)
    for row, (run, i) in enumerate(rows):
        top = header + row * cell
        record = run.group.records[i]
        text = textwrap.fill(f"[{run.role}] {record.prompt}", width=cell // 7)
        draw.multiline_text((cell + 4, top + 4), text, fill="black", font=font)
        for col, image in ((0, load_image(record.images[0])), (2, run.grid["original"][i]),
                           (3, run.grid["attacked"][i])):
            canvas.paste(_cell(image, cell), (col * cell, top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def write_outputs(result: AttackResult, folder: Path, context: dict | None = None) -> dict:
    """report.json, table.txt, curve.png and grid.png into ``folder``; returns the report."""
    from memedit.evaluation.report import report_json

    data = build_report(result, context, folder)
    (folder / "report.json").write_bytes(report_json(data))
    (folder / "table.txt").write_text(table(result) + "\n")
    (folder / "curve.png").write_bytes(curve_plot(result))
    (folder / "grid.png").write_bytes(attack_grid(result))
    return data
