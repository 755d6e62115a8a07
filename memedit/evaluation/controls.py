"""Controls the edit is compared with, in the same harness and expressed the same way (a
dict of boolean masks keyed ``component/parameter_name``, i.e. a Subspace's ``masks``).

- ``random_like``: the same number of weights in each of the same tensors, chosen uniformly.
  If the located edit removes memorization no better than this, the location carries no
  information.
- ``nemo_faithful``: NeMo (Hintersdorf et al., NeurIPS 2024) as its code runs it, checked
  against ml-research/localizing_memorization_in_diffusion_models: the value layers
  (``attn2.to_v``) of the UNet's down blocks and mid block (7 on SD 1.x); per prompt the mean
  |activation| over the 77 text tokens of every output channel, standardized against the mean
  and (unbiased) std over ordinary prompts; the initial selection is |z| > theta plus the
  per-layer top k by activation, theta going 5, 4.75, ... down to 1.25 and k 0, 1, 2, ...
  until deactivating the selection stops the prompt copying; then the refinement re-activates
  whole layers, then single channels, keeping each deactivated only if the prompt copies
  without it. The union over prompts is zeroed (rows of W, and the bias if any).
  What differs is the copy check (see :class:`CopyCheck`): NeMo compares first-step noise
  differences with the unedited model by MS-SSIM (10 seeds, guidance 0), which needs a latent
  of at least 161 pixels a side; here the prompt's generations are scored against its
  training image with evaluate's measure and threshold (else Wen et al.'s detector against the
  ordinary prompts), on a configurable budget of seeds and steps.
- ``nemo_masks``: the older simplification, one-sided z-score outliers of every ``to_v``
  layer (up blocks included) at one threshold, capped per prompt, with no check and no
  refinement: cheap, and a lower bound on what NeMo can do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memedit.evaluation.detector import DetectorConfig, detector_scores, noise_magnitudes
from memedit.evaluation.similarity import Scorer, aggregate_ground_truths
from memedit.families import encode_conditioning, split_conditioning
from memedit.prompts import PromptRecord, PromptSet
from memedit.sampling import SamplingConfig, batches, generate_images
from memedit.targets import find_target_layers

# One NeMo deactivation: output channels per value layer (module name).
Selection = dict[str, tuple[int, ...]]

SIMPLIFIED_METHOD = "NeMo (simplified: outlier selection, no refinement)"


def random_like(masks: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A random mask with the same count of True entries as ``masks`` in every tensor."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(masks):  # sorted: the draw must not depend on dict order
        mask = masks[key]
        count = int(mask.sum())
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[:count]] = True
        out[key] = flat.reshape(mask.shape)
    return out


def value_layers(pipe) -> dict[str, torch.nn.Linear]:
    """The UNet's cross-attention value projections (``attn2.to_v``), by module name."""
    return {layer.module_name: module for layer, module in find_target_layers(pipe, ("attn2_v",))}


def nemo_value_layers(pipe) -> dict[str, torch.nn.Linear]:
    """NeMo's layers: the value projections of the down blocks and the mid block (SD 1.x: 6 +
    1), in UNet order. NeMo hooks transformer block 0 of each attention, the only one SD has;
    a UNet with deeper attentions keeps them all, by the same down-and-mid rule."""
    return {name: module for name, module in value_layers(pipe).items()
            if name.startswith(("down_blocks.", "mid_block."))}


@torch.no_grad()
def value_activations(pipe, prompts: list[str], batch_size: int = 16,
                      layers: Mapping[str, torch.nn.Linear] | None = None
                      ) -> dict[str, np.ndarray]:
    """Mean absolute output of every ``attn2.to_v`` (or of ``layers``) over the prompt's tokens
    (padding included, as NeMo): ``[N, C]`` per layer. ``to_v`` reads only the text embedding,
    so no denoising step is needed. The text embedding is what the family's UNet reads as
    ``encoder_hidden_states`` (SDXL: both encoders' states; the pooled one never reaches
    ``to_v``)."""
    layers = value_layers(pipe) if layers is None else layers
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    for batch in batches(prompts, batch_size):
        embeds, _pooled = split_conditioning(pipe, encode_conditioning(pipe, batch))
        for name, layer in layers.items():
            act = layer(embeds.to(layer.weight.dtype)).float().abs().mean(dim=1)
            out[name].append(act.cpu().numpy())
    return {name: np.concatenate(chunks) for name, chunks in out.items()}


@dataclass(frozen=True)
class NemoSelection:
    """What NeMo chose: the masks, and per prompt the (layer, channel, z) it contributed."""

    masks: dict[str, torch.Tensor]
    per_prompt: list[list[tuple[str, int, float]]]
    settings: dict


def select_outliers(memorized: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                    z_threshold: float, max_per_prompt: int) -> list[list[tuple[str, int, float]]]:
    """Per memorized prompt: channels with z-score above ``z_threshold`` against the reference
    prompts, highest first, at most ``max_per_prompt``. Pure function of the activations."""
    names = sorted(memorized)
    count = next(iter(memorized.values())).shape[0]
    chosen = []
    for i in range(count):
        candidates = []
        for name in names:
            mean = reference[name].mean(axis=0)
            std = reference[name].std(axis=0)
            z = (memorized[name][i] - mean) / np.maximum(std, 1e-8)
            candidates += [(name, int(c), float(z[c])) for c in np.flatnonzero(z > z_threshold)]
        candidates.sort(key=lambda item: -item[2])
        chosen.append(candidates[:max_per_prompt])
    return chosen


def channel_masks(layers: Mapping[str, torch.nn.Linear],
                  channels: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Masks that zero output channel c of a linear layer: row c of W, and entry c of the
    bias if any (so the channel outputs exactly 0, as NeMo's deactivation hook makes it)."""
    masks: dict[str, torch.Tensor] = {}
    for name, channel in channels:
        layer = layers[name]
        for pname, param in (("weight", layer.weight), ("bias", layer.bias)):
            if param is None:
                continue
            key = f"unet/{name}.{pname}"
            mask = masks.setdefault(key, torch.zeros(param.shape, dtype=torch.bool))
            mask[channel] = True
    return masks


def nemo_masks(pipe, memorized: PromptSet, reference: PromptSet, z_threshold: float = 3.0,
               max_per_prompt: int = 10) -> NemoSelection:
    """NeMo's outlier channels of ``attn2.to_v``, as masks over the rows of its weight (and
    bias, if any): zeroing output channel c of a linear layer zeroes row c of W."""
    mem = value_activations(pipe, memorized.prompts)
    ref = value_activations(pipe, reference.prompts)
    per_prompt = select_outliers(mem, ref, z_threshold, max_per_prompt)
    masks = channel_masks(value_layers(pipe), [(name, channel) for choices in per_prompt
                                               for name, channel, _z in choices])
    settings = {"method": SIMPLIFIED_METHOD, "mode": "simplified",
                "layers": "unet attn2.to_v output channels", "statistic":
                "mean |activation| over tokens; z-score vs reference prompts",
                "z_threshold": z_threshold, "max_per_prompt": max_per_prompt,
                "reference_prompts": reference.name, "reference_count": len(reference),
                "channels": sum(len(c) for c in per_prompt),
                "unique_channels": len({(n, c) for p in per_prompt for n, c, _ in p})}
    return NemoSelection(masks, per_prompt, settings)


# ---------------------------------------------------------------------------- NeMo, faithful
# Pure functions first (tests/test_nemo.py checks them against brute force), then the loop.


def abs_z_scores(activations: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """NeMo's two-sided outlier score |a - mean| / std, per channel. A channel that never
    varies over the ordinary prompts (std 0) is scored against a tiny std instead of dividing
    by zero: any departure then counts as an outlier, as it would for NeMo's float division."""
    return np.abs(activations - mean) / np.maximum(std, 1e-12)


def reference_statistics(reference: Mapping[str, np.ndarray]
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer the mean and the unbiased std (torch's default, which NeMo uses) over the
    ordinary prompts' ``[N, C]`` activations."""
    out = {}
    for name, acts in reference.items():
        if acts.shape[0] < 2:
            raise ValueError("NeMo's statistics need at least two ordinary prompts")
        out[name] = (acts.mean(axis=0), acts.std(axis=0, ddof=1))
    return out


def initial_selection(activations: Mapping[str, np.ndarray],
                      statistics: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      theta: float, k: int) -> Selection:
    """One prompt's initial selection at (theta, k): per layer, the channels with |z| > theta
    and the k channels of largest activation (ties to the lower index), sorted."""
    out: Selection = {}
    for name, acts in activations.items():
        mean, std = statistics[name]
        chosen = set(np.flatnonzero(abs_z_scores(acts, mean, std) > theta).tolist())
        if k > 0:
            chosen |= set(np.argsort(-np.abs(acts), kind="stable")[:k].tolist())
        out[name] = tuple(sorted(chosen))
    return out


def threshold_schedule(start: float = 5.0, step: float = 0.25, minimum: float = 1.0,
                       k_start: int = 0) -> list[tuple[float, int]]:
    """NeMo's (theta, k) tries: theta from ``start`` down by ``step``, k up by one with it. Its
    loop stops once theta reaches ``minimum`` without trying it, so the last try is
    ``minimum + step`` (5 ... 1.25: 16 tries with the defaults)."""
    if step <= 0 or start <= minimum:
        raise ValueError("the schedule needs step > 0 and start > minimum")
    out = []
    # Multiples of step rather than repeated subtraction: no rounding drift over the tries.
    while start - len(out) * step > minimum + 1e-9:
        out.append((start - len(out) * step, k_start + len(out)))
    return out


def refine(selection: Selection, stays_clean: Callable[[Selection], bool]) -> Selection:
    """NeMo's refinement: re-activate each layer's channels together (last layer first), then
    each remaining channel alone, and keep a change whenever the prompt still does not copy
    (``stays_clean``). Greedy, one check per layer and per channel."""
    current = {name: tuple(channels) for name, channels in selection.items()}
    for name in reversed(list(current)):
        if current[name]:
            trial = current | {name: ()}
            if stays_clean(trial):
                current = trial
    for name in reversed(list(current)):
        for channel in current[name]:
            trial = current | {name: tuple(c for c in current[name] if c != channel)}
            if stays_clean(trial):
                current = trial
    return current


def selection_size(selection: Selection) -> int:
    return sum(len(channels) for channels in selection.values())


@contextlib.contextmanager
def channels_off(layers: Mapping[str, torch.nn.Linear], selection: Selection) -> Iterator[None]:
    """Deactivate ``selection`` for the block with forward hooks that set the channels' outputs
    to 0, as NeMo does: cheaper than rewriting weights for each of the loop's many checks, and
    the same function as zeroing the rows (and bias entries) that :func:`channel_masks` marks."""
    handles = []

    def hook_for(index: torch.Tensor):
        def hook(_module, _inputs, output):
            output[..., index.to(output.device)] = 0
            return output
        return hook

    try:
        for name, channels in selection.items():
            if channels:
                index = torch.tensor(channels, dtype=torch.long)
                handles.append(layers[name].register_forward_hook(hook_for(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class CopyCheck:
    """How strongly one prompt copies: ``level(record)`` (higher = closer to copying) against
    ``limit`` (above it the prompt copies), on the pipeline as currently hooked.

    ``description`` names the check in the report, since it is where this NeMo differs from the
    published one; ``calls`` counts checks (each is ``len(seeds)`` generations)."""

    level: Callable[[PromptRecord], float]
    limit: float
    description: str
    calls: int = 0

    def __call__(self, record: PromptRecord) -> float:
        self.calls += 1
        return self.level(record)


def image_copy_check(pipe, sampling: SamplingConfig, seeds: Sequence[int], scorer: Scorer,
                     threshold: float, gt_aggregate: str = "max") -> CopyCheck:
    """Copying = some seed's generation is within ``threshold`` of the prompt's training
    image(s) by ``scorer`` (evaluate's measure): the level is the closest seed, signed so that
    higher is more similar, as NeMo takes the max over its seeds."""
    sign = scorer.measure.sign

    def level(record: PromptRecord) -> float:
        images = generate_images(pipe, [record.prompt] * len(seeds), list(seeds), sampling)
        scores = [aggregate_ground_truths(scorer.scores(image, record.images), scorer.measure,
                                          gt_aggregate) for image in images]
        return max(sign * score for score in scores)

    return CopyCheck(level, sign * threshold,
                     f"a generation within {scorer.measure.name} {threshold:g} of the training "
                     f"image ({len(seeds)} seeds x {sampling.steps} steps)")


def detector_copy_check(pipe, config: DetectorConfig, seeds: Sequence[int],
                        ordinary: PromptSet) -> CopyCheck:
    """Without training images: copying = Wen et al.'s score on some seed above every ordinary
    prompt's score on those seeds (the limit is measured once, on the unedited model)."""
    seeds = list(seeds)

    def scores(prompts: Sequence[str]) -> np.ndarray:
        texts = [p for p in prompts for _ in seeds]
        magnitudes = noise_magnitudes(pipe, texts, seeds * len(prompts), config)
        return detector_scores(magnitudes).reshape(len(prompts), len(seeds)).max(axis=1)

    limit = float(scores(ordinary.prompts).max())
    return CopyCheck(lambda record: float(scores([record.prompt])[0]), limit,
                     f"Wen et al.'s detector score above every ordinary prompt's ({limit:.4g}; "
                     f"{len(seeds)} seeds)")


@dataclass
class PromptTrace:
    """What the loop did for one prompt (written to the report)."""

    prompt: str
    copies_unedited: bool
    level_unedited: float
    theta: float | None = None
    k: int | None = None
    initial: int = 0
    level_initial: float | None = None
    stopped_copying: bool = False
    refined: Selection = field(default_factory=dict)
    level_refined: float | None = None

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "copies_unedited": self.copies_unedited,
                "level_unedited": self.level_unedited, "theta": self.theta, "k": self.k,
                "initial_channels": self.initial, "level_initial": self.level_initial,
                "stopped_copying": self.stopped_copying,
                "refined_channels": selection_size(self.refined),
                "refined": {name: list(c) for name, c in self.refined.items() if c},
                "level_refined": self.level_refined}


def nemo_prompt(record: PromptRecord, activations: Mapping[str, np.ndarray],
                statistics: Mapping[str, tuple[np.ndarray, np.ndarray]],
                layers: Mapping[str, torch.nn.Linear], check: CopyCheck,
                schedule: Sequence[tuple[float, int]]) -> PromptTrace:
    """NeMo for one memorized prompt: skip it if it does not copy unedited (as NeMo skips
    prompts its pairwise-SSIM test calls unmemorized), lower theta until the selection stops
    the copying, refine. If no try stops it, refinement keeps what the last try achieved."""
    unedited = check(record)
    trace = PromptTrace(record.prompt, unedited > check.limit, unedited)
    if not trace.copies_unedited:
        return trace

    def level_with(selection: Selection) -> float:
        with channels_off(layers, selection):
            return check(record)

    for theta, k in schedule:
        selection = initial_selection(activations, statistics, theta, k)
        level = level_with(selection)
        if level <= check.limit:
            break
    trace.theta, trace.k = theta, k
    trace.initial, trace.level_initial = selection_size(selection), level
    trace.stopped_copying = level <= check.limit
    limit = check.limit if trace.stopped_copying else level
    trace.refined = refine(selection, lambda trial: level_with(trial) <= limit)
    trace.level_refined = level_with(trace.refined)
    return trace


def nemo_faithful(pipe, memorized: PromptSet, reference: PromptSet, check: CopyCheck,
                  schedule: Sequence[tuple[float, int]] | None = None,
                  progress=None) -> NemoSelection:
    """NeMo on every memorized prompt; the masks are the union of the refined channels."""
    began = time.perf_counter()
    schedule = threshold_schedule() if schedule is None else list(schedule)
    layers = nemo_value_layers(pipe)
    statistics = reference_statistics(value_activations(pipe, reference.prompts, layers=layers))
    acts = value_activations(pipe, memorized.prompts, layers=layers)
    traces = []
    for i, record in enumerate(memorized.records):
        traces.append(nemo_prompt(record, {name: a[i] for name, a in acts.items()}, statistics,
                                  layers, check, schedule))
        if progress is not None:
            progress.update(1)
    chosen = sorted({(name, c) for t in traces for name, cs in t.refined.items() for c in cs})
    per_prompt = [[(name, c, float(abs_z_scores(acts[name][i], *statistics[name])[c]))
                   for name, cs in t.refined.items() for c in cs] for i, t in enumerate(traces)]
    copying = [t for t in traces if t.copies_unedited]
    settings = {
        "method": f"NeMo (simplified: copy check = {check.description})", "mode": "faithful",
        "layers": f"unet attn2.to_v of the down blocks and mid block ({len(layers)}), "
                  "output channels",
        "statistic": "mean |activation| over tokens; |z| vs reference prompts (unbiased std); "
                     "plus per-layer top k by activation",
        "schedule": [[theta, k] for theta, k in schedule],
        "copy_check": check.description, "copy_limit": check.limit,
        "not_as_published": "NeMo's check is the MS-SSIM of first-step noise differences "
                            "with vs without the deactivation (10 seeds, guidance 0)",
        "reference_prompts": reference.name, "reference_count": len(reference),
        "prompts_copying_unedited": len(copying),
        "prompts_stopped": sum(t.stopped_copying for t in copying),
        "channels_initial": sum(t.initial for t in copying),
        "channels": sum(selection_size(t.refined) for t in traces),
        "unique_channels": len(chosen), "checks": check.calls,
        "seconds": round(time.perf_counter() - began, 1),
        "per_prompt": [t.to_json() for t in traces]}
    return NemoSelection(channel_masks(layers, chosen), per_prompt, settings)
