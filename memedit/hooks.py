"""Forward hooks that stream the method's activation statistics while a pipeline denoises.

For every hooked linear layer the input h (tokens x features) is L2-normalised per row and its
column sums of squares are added to an fp32 accumulator per UNet call: memory is one vector per
(call, layer), whatever the number of prompts. A hook on the UNet itself counts calls and stops
the denoising loop once the calls that matter (the first tau) have been seen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from memedit.targets import TargetLayer


class StopDenoising(Exception):
    """Raised from the UNet's pre-hook to leave the pipeline after the last needed call."""


def accumulate_column_sumsq(accumulator: torch.Tensor, activations: torch.Tensor) -> None:
    """accumulator[j] += sum over rows r of (h[r, j] / ||h[r]||)^2."""
    rows = activations.reshape(-1, activations.shape[-1]).float()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    accumulator.add_(rows.square().sum(dim=0))


class ActivationRecorder:
    """Context manager that hooks ``layers`` of ``pipe`` and fills ``sumsq``.

    ``unet_calls`` is how many UNet calls are recorded per pipeline call; the next one raises
    :class:`StopDenoising`. Text-encoder layers run once per prompt batch (both guidance halves),
    so they have a single "call" slot. ``on_unet_call`` is called after each recorded call
    starts (for progress bars). With no layers it only stops the loop after ``unet_calls``
    (the detector and the locate benchmark use it so).
    """

    def __init__(self, pipe, layers: list[tuple[TargetLayer, nn.Linear]], unet_calls: int,
                 on_unet_call: Callable[[], None] | None = None) -> None:
        self.pipe = pipe
        self.layers = layers
        self.unet_calls = unet_calls
        self.on_unet_call = on_unet_call
        self.call_index = -1
        self.sumsq: dict[str, torch.Tensor] = {}
        for layer, module in layers:
            slots = unet_calls if layer.component == "unet" else 1
            self.sumsq[layer.key] = torch.zeros(
                slots, module.in_features, dtype=torch.float32, device=module.weight.device)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def start_pipeline_call(self) -> None:
        """Reset the call counter before each pipeline call (each batch of prompts)."""
        self.call_index = -1

    def _unet_pre_hook(self, module, args, kwargs) -> None:
        self.call_index += 1
        if self.call_index >= self.unet_calls:
            raise StopDenoising
        if self.on_unet_call is not None:
            self.on_unet_call()

    def _layer_hook(self, layer: TargetLayer):
        accumulator = self.sumsq[layer.key]
        is_unet = layer.component == "unet"

        def hook(module, args) -> None:
            slot = self.call_index if is_unet else 0
            accumulate_column_sumsq(accumulator[slot], args[0])

        return hook

    def __enter__(self) -> ActivationRecorder:
        self._handles.append(
            self.pipe.unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
        for layer, module in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._layer_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
