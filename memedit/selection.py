"""The method's arithmetic, as pure functions on tensors (step 4-6 of ../shared/method.md).

Everything here is deterministic and device-agnostic; tests compare it with brute-force loops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

GRANULARITIES = ("weight", "neuron")


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """S[i, j] = |W[i, j]| * a[j] (Sun et al. 2023)."""
    return weight.abs() * column_norms.unsqueeze(0)


def per_row_count(in_features: int, k: float) -> int:
    """How many inputs each output row may keep: floor(k * in_features)."""
    return math.floor(k * in_features + 1e-9)


def select_step(weight: torch.Tensor, norms_mem: torch.Tensor, norms_ref: torch.Tensor,
                k: float) -> torch.Tensor:
    """One UNet call's mask: per row, the top-k inputs by S_mem that also beat S_ref."""
    s_mem = wanda_scores(weight, norms_mem)
    s_ref = wanda_scores(weight, norms_ref)
    count = per_row_count(weight.shape[1], k)
    mask = torch.zeros_like(s_mem, dtype=torch.bool)
    if count == 0:
        return mask
    top = torch.topk(s_mem, count, dim=1).indices
    mask.scatter_(1, top, True)
    return mask & (s_mem > s_ref)


def select_step_neurons(weight: torch.Tensor, norms_mem: torch.Tensor, norms_ref: torch.Tensor,
                        k: float) -> torch.Tensor:
    """Neuron-level variant: whole input columns, scored by sum_i S[i, j] = a[j] * ||W[:, j]||_1."""
    column_weight = weight.abs().sum(dim=0)
    score_mem = column_weight * norms_mem
    score_ref = column_weight * norms_ref
    count = per_row_count(weight.shape[1], k)
    chosen = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
    if count:
        chosen[torch.topk(score_mem, count).indices] = True
    chosen &= score_mem > score_ref
    return chosen.unsqueeze(0).expand_as(weight).clone()


def aggregate_steps(step_masks: Iterable[torch.Tensor], tau: int, rho: float) -> torch.Tensor:
    """Keep a weight flagged in more than rho * tau of the steps (rho = 0: the union)."""
    counts = None
    for mask in step_masks:
        counts = mask.to(torch.int32) if counts is None else counts + mask.to(torch.int32)
    if counts is None:
        raise ValueError("no step masks to aggregate")
    return counts > rho * tau


def select_layer(weight: torch.Tensor, norms_mem: torch.Tensor, norms_ref: torch.Tensor,
                 k: float, tau: int, rho: float, granularity: str = "weight") -> torch.Tensor:
    """The layer's mask from per-call column norms [calls, in] of both prompt sets.

    Only the first ``tau`` calls count (fewer if the layer was called fewer times, as the
    text encoder, which runs once per prompt).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}")
    step = select_step if granularity == "weight" else select_step_neurons
    weight = weight.float()
    calls = min(tau, norms_mem.shape[0])
    masks = (step(weight, norms_mem[t].float(), norms_ref[t].float(), k) for t in range(calls))
    return aggregate_steps(masks, calls, rho)
