"""A tiny, randomly initialised Stable Diffusion pipeline built in code, for tests and benches.

No weights are downloaded: every component is built from a small config with a fixed seed.
Memorization is not the point of this model (see ``memedit.testbed`` for the one that
memorizes); it exercises shapes, hooks, baking and export in well under a second.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch


def _byte_vocab_tokenizer():
    """A CLIP BPE tokenizer over single characters plus a few merged words."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    words = ["a", "the", "of", "red", "blue", "cat", "dog", "photo", "painting"]
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in words:
        # Merge a word left to right so that the BPE reaches the whole word with </w>.
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    assert len(tokenizer) == len(vocab), "tokenizer lost its vocabulary"
    return tokenizer


def build_tiny_pipeline(seed: int = 0, with_transformer_blocks: bool = True,
                        family: str = "sd1"):
    """A tiny pipeline of the model family ``family`` (a name in ``memedit.families``).

    ``sd1``: a StableDiffusionPipeline of about 1 M parameters, 4 transformer blocks in the
    UNet; ``with_transformer_blocks=False`` builds a UNet with no cross-attention blocks at
    all, which memedit must refuse. ``sd2``: SD 2.x-shaped (linear projections, per-block head
    counts, GELU text encoder, v-prediction). ``sdxl``: SDXL base-shaped (two text encoders,
    the second with a projection, ``text_time`` added conditioning).
    """
    if family != "sd1":
        if not with_transformer_blocks:
            raise ValueError("with_transformer_blocks=False builds an SD 1.x pipeline only")
        builders = {"sd2": _build_tiny_sd2, "sdxl": _build_tiny_sdxl}
        if family not in builders:
            raise ValueError(f"no tiny fixture for family {family!r}")
        pipe = builders[family](seed)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    down = ("DownBlock2D", "CrossAttnDownBlock2D") if with_transformer_blocks else (
        "DownBlock2D", "DownBlock2D")
    up = ("CrossAttnUpBlock2D", "UpBlock2D") if with_transformer_blocks else (
        "UpBlock2D", "UpBlock2D")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if with_transformer_blocks else None,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    tokenizer = _byte_vocab_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, norm_num_groups=8, sample_size=32)


def _tiny_text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 3, "vocab_size": len(tokenizer),
        "max_position_embeddings": 77, "projection_dim": 32, **overrides})


def _build_tiny_sd2(seed: int):
    """SD 2.x as stabilityai/stable-diffusion-2-1 is configured, shrunk: linear projections
    in the transformer blocks, ``attention_head_dim`` per block (SD 2's head counts), a GELU
    (OpenCLIP-style) text encoder, a v-prediction DDIM scheduler, attention upcast."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=8)
    tokenizer = _byte_vocab_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_act="gelu"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction")
    return StableDiffusionPipeline(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=_tiny_vae(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _build_tiny_sdxl(seed: int):
    """SDXL base as stabilityai/stable-diffusion-xl-base-1.0 is configured, shrunk (as in
    diffusers' own SDXL tests): CLIPTextModel + CLIPTextModelWithProjection whose penultimate
    states concatenate to the cross-attention width (32 + 32), ``addition_embed_type
    "text_time"`` whose projection reads 6 time ids x 8 + the pooled 32, transformer depth
    per block, linear projections, an Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8)
    tokenizer = _byte_vocab_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=_byte_vocab_tokenizer(), vae=_tiny_vae(),
        scheduler=scheduler, force_zeros_for_empty_prompt=True)


def save_tiny_pipeline(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it (safetensors) into ``folder``."""
    folder = Path(folder)
    build_tiny_pipeline(seed, **kwargs).save_pretrained(folder, safe_serialization=True)
    return folder


# The published SD 1.x configs (CompVis/stable-diffusion-v1-4): real shapes, random weights.
SD1_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD1_TEXT_CONFIG = {  # CLIP ViT-L/14 text tower
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
    "projection_dim": 768, "hidden_act": "quick_gelu",
}
SD1_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "sample_size": 512,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}


def build_sd1_shaped_pipeline(seed: int = 0):
    """A Stable Diffusion 1.x pipeline with the real architecture and random weights.

    For checks that need real shapes (16 transformer blocks, 1280x5120 FFN weights, a 123 M
    parameter CLIP text encoder) without a download. The tokenizer is the tiny one: its ids
    fall inside CLIP's vocabulary, and nothing here depends on what the words mean.
    """
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _byte_vocab_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SD1_TEXT_CONFIG))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD1_UNET_CONFIG), text_encoder=text_encoder,
        tokenizer=tokenizer, vae=AutoencoderKL(**SD1_VAE_CONFIG), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sanitized(pipe, masks: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Zero ``masks`` in ``pipe`` and save it to ``folder`` as ``memedit bake`` writes a model:
    the subspace in ``memedit/``, with the tensors' hashes before and after and the counts that
    verification ties the weights (and an ONNX export's audit) to. For tests and benchmarks
    that need a sanitized model without locating one."""
    from memedit.subspace import Subspace, apply_subspace, parameter
    from memedit.weights import tensor_sha256

    subspace = Subspace(masks, {"format": "memedit-subspace", "format_version": 1})
    before = {key: tensor_sha256(parameter(pipe, key).detach()) for key in masks}
    apply_subspace(pipe, subspace)
    subspace.manifest |= {
        "model": {"tensors": {key: {"sha256_before": before[key],
                                    "sha256_after": tensor_sha256(parameter(pipe, key).detach())}
                              for key in masks}},
        "layers": subspace.layer_counts(), "total": subspace.totals()}
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    subspace.write_into(folder / "memedit")
    return folder
