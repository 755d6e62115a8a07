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

from dataclasses import dataclass

import torch

from memedit.errors import MemeditError
from memedit.families import family_of


@dataclass(frozen=True)
class TokenShares:
    """Shares of cross-attention (they sum to 1), averaged over cross-attention layers, heads,
    image positions, denoising steps and prompts; conditional guidance half only."""

    start: float
    words: float
    end_and_padding: float


class CrossAttentionRecorder:
    """Context manager: while it is open, every call of ``pipe`` adds to the shares.

    It wraps generation the caller does anyway, so measuring costs no extra denoising. A
    pre-hook on the text encoder reads each call's token ids (a Stable Diffusion pipeline
    encodes the prompts before the negative prompts, so the first encoding before a run of UNet
    calls is the conditional one); pre-hooks on every ``attn2`` recompute the attention
    probabilities from the block's own inputs, so the images are those of the untouched
    pipeline. Sums stay on the device: no sync per layer call.
    """

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.sums = torch.zeros(3, device=pipe.device)  # start, words, end + padding
        self._encoded: list[torch.Tensor] = []  # token ids encoded since the last UNet call
        self._words: torch.Tensor | None = None  # [prompts, tokens] mask of the current call
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._eos_token_id: int | None = None

    def __enter__(self) -> CrossAttentionRecorder:
        attention = [module for name, module in self.pipe.unet.named_modules()
                     if name.endswith("attn2")]
        if not attention:
            raise MemeditError("the UNet has no cross-attention (attn2) layers to measure",
                               hint="give a text-to-image UNet with transformer blocks, as SD's")
        # The first text encoder sees the token ids every family's pipeline encodes (SDXL's
        # second one reads the same prompt, tokenized alike up to its padding).
        family = family_of(self.pipe)
        text_encoder = getattr(self.pipe, family.text_encoders[0])
        self._eos_token_id = getattr(self.pipe, family.tokenizers[0]).eos_token_id
        self._handles = [
            text_encoder.register_forward_pre_hook(self._text_hook, with_kwargs=True),
            self.pipe.unet.register_forward_pre_hook(self._unet_hook),
            *(module.register_forward_pre_hook(self._attention_hook, with_kwargs=True)
              for module in attention)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _text_hook(self, module, args, kwargs) -> None:
        self._encoded.append(args[0] if args else kwargs["input_ids"])

    def _unet_hook(self, module, args) -> None:
        if self._encoded:  # the first UNet call of a pipeline call
            ids = self._encoded[0]
            self._encoded = []
            # Words sit between the start token and the first end token.
            end = (ids == self._eos_token_id).int().argmax(dim=1)
            position = torch.arange(ids.shape[1], device=ids.device)
            self._words = ((position[None] >= 1) & (position[None] < end[:, None])).to(
                self.sums.device)

    def _attention_hook(self, attn, args, kwargs) -> None:
        if self._words is None:
            raise MemeditError("cross-attention ran with no prompt encoded by the text encoder",
                               hint="pass prompts, not prompt_embeds, while recording")
        hidden, context = args[0], kwargs["encoder_hidden_states"]
        if len(hidden) not in (len(self._words), 2 * len(self._words)):
            raise MemeditError(f"cross-attention saw {len(hidden)} rows for "
                               f"{len(self._words)} prompts",
                               hint="record with one image per prompt")
        query = attn.head_to_batch_dim(attn.to_q(hidden))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, key, None).float()
        probs = probs.view(len(hidden), attn.heads, *probs.shape[1:]).mean((1, 2))
        # The conditional rows come last (after the unconditional ones under guidance).
        probs = probs[-len(self._words):]
        start = probs[:, 0].sum()
        self.sums.add_(torch.stack(
            [start, probs[self._words].sum(), probs[~self._words].sum() - start]))

    def shares(self) -> TokenShares:
        totals = self.sums.double().cpu()
        if totals.sum() == 0:
            raise MemeditError("no cross-attention was recorded",
                               hint="generate with the pipeline inside the `with` block")
        return TokenShares(*(float(x) for x in totals / totals.sum()))
