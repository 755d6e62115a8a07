"""Where the UNet's cross-attention looks: the start token, the caption's words, or the end
token and its padding.

In Stable Diffusion v1.4 most cross-attention sits on the start token (0.9-0.99 averaged over
positions, as measured in the Hugging Face forum thread "Cross Attention Probabilities in SD 1.4
of start of sentence token"), and under memorization it focuses on the embeddings of a few
specific tokens (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image Diffusion
Models through Cross Attention", ECCV 2024). This measures the shares, so that a model (the
embedded test model, say) can be compared with that picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memedit.errors import MemeditError
from memedit.sampling import SamplingConfig, batches, run_pipeline


@dataclass(frozen=True)
class TokenShares:
    """Shares of cross-attention (they sum to 1), averaged over cross-attention layers, heads,
    image positions, denoising steps and prompts; conditional guidance half only."""

    start: float
    words: float
    end_and_padding: float


def cross_attention_shares(pipe, prompts: Sequence[str], seeds: Sequence[int],
                           config: SamplingConfig) -> TokenShares:
    """Denoise ``prompts`` and measure where every ``attn2`` of the UNet puts its attention.

    Pre-hooks recompute each block's attention probabilities from its own inputs, so the
    forward pass (and the images) are those of the untouched pipeline.
    """
    tokens = pipe.tokenizer(list(prompts), padding="max_length", truncation=True,
                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    lengths = tokens.attention_mask.sum(1)  # start token + words + end token
    # Running [start, words, end + padding] sums, kept on the device: no sync per layer call.
    sums = torch.zeros(3, device=pipe.device)
    current: dict[str, torch.Tensor] = {}

    def hook(attn, args, kwargs) -> None:
        hidden, context = args[0], kwargs["encoder_hidden_states"]
        query = attn.head_to_batch_dim(attn.to_q(hidden))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, key, None).float()
        probs = probs.view(len(hidden), attn.heads, *probs.shape[1:]).mean((1, 2))
        # The conditional rows come last (after the unconditional ones under guidance).
        probs = probs[-len(current["lengths"]):]
        position = torch.arange(probs.shape[1], device=probs.device)
        words = (position[None] >= 1) & (position[None] < current["lengths"][:, None] - 1)
        start = probs[:, 0].sum()
        sums.add_(torch.stack([start, probs[words].sum(), probs[~words].sum() - start]))

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True)
               for name, module in pipe.unet.named_modules() if name.endswith("attn2")]
    if not handles:
        raise MemeditError("the UNet has no cross-attention (attn2) layers to measure",
                           hint="give a text-to-image UNet with transformer blocks, as SD's")
    try:
        first = 0
        for batch in batches(list(zip(prompts, seeds, strict=True)), config.batch_size):
            current["lengths"] = lengths[first:first + len(batch)].to(pipe.device)
            run_pipeline(pipe, [p for p, _ in batch], [s for _, s in batch], config,
                         output_type="latent")
            first += len(batch)
    finally:
        for handle in handles:
            handle.remove()
    totals = sums.double().cpu()
    totals /= totals.sum()
    return TokenShares(*(float(x) for x in totals))
