"""Controls the edit is compared with, in the same harness and expressed the same way (a
dict of boolean masks keyed ``component/parameter_name``, i.e. a Subspace's ``masks``).

- ``random_like``: the same number of weights in each of the same tensors, chosen uniformly.
  If the located edit removes memorization no better than this, the location carries no
  information.
- ``nemo_masks``: a faithful simplification of NeMo (Hintersdorf et al., NeurIPS 2024): for
  each memorized prompt, the output channels of the cross-attention value layers
  (``attn2.to_v``) whose activation on that prompt is an outlier against ordinary prompts
  (z-score), zeroed for the union over prompts. NeMo then refines the set per prompt with
  SSCD checks in the loop; this version stops at the outlier selection (its "initial
  localisation"), capped at ``max_per_prompt`` channels a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memedit.prompts import PromptSet
from memedit.sampling import batches
from memedit.targets import find_target_layers


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


@torch.no_grad()
def value_activations(pipe, prompts: list[str], batch_size: int = 16) -> dict[str, np.ndarray]:
    """Mean absolute output of every ``attn2.to_v`` over the prompt's tokens: ``[N, C]`` per
    layer. ``to_v`` reads only the text embedding, so no denoising step is needed."""
    layers = value_layers(pipe)
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    for batch in batches(prompts, batch_size):
        embeds = pipe.encode_prompt(batch, pipe.device, 1, False)[0]
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


def nemo_masks(pipe, memorized: PromptSet, reference: PromptSet, z_threshold: float = 3.0,
               max_per_prompt: int = 10) -> NemoSelection:
    """NeMo's outlier channels of ``attn2.to_v``, as masks over the rows of its weight (and
    bias, if any): zeroing output channel c of a linear layer zeroes row c of W."""
    mem = value_activations(pipe, memorized.prompts)
    ref = value_activations(pipe, reference.prompts)
    per_prompt = select_outliers(mem, ref, z_threshold, max_per_prompt)
    layers = value_layers(pipe)
    masks: dict[str, torch.Tensor] = {}
    for choices in per_prompt:
        for name, channel, _z in choices:
            layer = layers[name]
            for pname, param in (("weight", layer.weight), ("bias", layer.bias)):
                if param is None:
                    continue
                key = f"unet/{name}.{pname}"
                mask = masks.setdefault(key, torch.zeros(param.shape, dtype=torch.bool))
                mask[channel] = True
    settings = {"method": "NeMo (simplified: outlier selection, no refinement)",
                "layers": "unet attn2.to_v output channels", "statistic":
                "mean |activation| over tokens; z-score vs reference prompts",
                "z_threshold": z_threshold, "max_per_prompt": max_per_prompt,
                "reference_prompts": reference.name, "reference_count": len(reference),
                "channels": sum(len(c) for c in per_prompt),
                "unique_channels": len({(n, c) for p in per_prompt for n, c, _ in p})}
    return NemoSelection(masks, per_prompt, settings)
