"""Model families as data: what memedit needs to know about each kind of pipeline it edits.

One entry per family, in the spirit of Optimum's per-architecture export configs: the diffusers
pipeline class(es) it matches, its components and text encoders, which component(s) each
target kind names, what the UNet consumes besides the token embeddings, and which ONNX graphs
an export holds and parity feeds. Locating, baking, evaluating, the controls, the attack,
export, audit and parity ask :func:`family_of` instead of assuming Stable Diffusion 1.x.

A new family is one :func:`register` call here plus a tiny fixture in
:func:`memedit.testing.build_tiny_pipeline`; ``tests/test_families.py`` runs every registered
family end to end.

v-prediction is not a family: it is the scheduler's ``prediction_type`` (SD 2.x 768 models use
``v_prediction``, the 512 ones ``epsilon``), read by :func:`prediction_type`.

The conditioning. What the UNet reads from the text is, for SD 1.x/2.x, the token embeddings
``[N, 77, d]``; SDXL concatenates both encoders' penultimate hidden states (``d = d1 + d2``)
and also feeds the second encoder's pooled, projected embedding ``[N, p]`` (``text_embeds``)
and the size/crop conditioning ``time_ids`` through ``added_cond_kwargs``. memedit passes
conditionings around as one tensor ``y [N, T, d]`` (the embedding attack optimizes it, the
harness stores it): for a family with a pooled embedding, ``y`` carries it as one extra row,
zero-padded from ``p`` to ``d`` (:func:`encode_conditioning`, :func:`split_conditioning`). So the
attack on SDXL optimizes the pooled embedding too: the UNet consumes it, and an attack that
left it at the prompt's own value would attack less than the model reads. ``time_ids`` are not
text: they are rebuilt from the image size (:func:`unet_conditioning`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memedit.errors import MemeditError

UNET_KINDS = ("ff_out", "ff_in", "attn2_k", "attn2_v")


@dataclass(frozen=True)
class Family:
    """One model family. Everything here is data; the functions below interpret it.

    ``targets``: target kind -> the component(s) whose layers it names (mask keys are
    ``component/param``, so SDXL's second text encoder's keys start ``text_encoder_2/``).
    ``unet_config``: UNet config values that tell this family from another with the same
    pipeline class (SD 2.x's linear projections). ``unet_extra_inputs``: the UNet's inputs
    besides sample, timestep and encoder_hidden_states (the keys of diffusers'
    ``added_cond_kwargs``, and the ONNX graph's input names): SDXL's ``text_time`` conditioning
    reads the last text encoder's pooled projection (``text_embeds``) and ``time_ids``.
    ``text_hidden_state``: the encoder hidden state the UNet reads when it is not the last,
    normed one (SDXL: the penultimate, -2); parity compares it too. The layers after it cannot
    change what the UNet reads from an encoder, unless the UNet also reads that encoder's
    ``pooled_encoder`` output (computed from the last layer): :meth:`text_layers_read`.
    ``onnx_graphs``: the folders Optimum writes, each with a ``model.onnx``; parity compares
    each of them (the VAE encoder only where exported) and the whole image.
    """

    name: str
    label: str
    pipeline_classes: tuple[str, ...]
    components: tuple[str, ...]
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    targets: Mapping[str, tuple[str, ...]]
    onnx_graphs: tuple[str, ...]
    ort_pipeline_class: str
    unet_config: Mapping[str, object] = field(default_factory=dict)
    unet_extra_inputs: tuple[str, ...] = ()
    text_hidden_state: int | None = None  # None: the last, normed state; SDXL: -2
    pooled_encoder: str | None = None  # the encoder whose pooled output the UNet reads

    @property
    def pooled(self) -> bool:
        """The UNet reads a pooled text embedding, carried as the conditioning's last row."""
        return "text_embeds" in self.unet_extra_inputs

    def text_layers_read(self, encoder: str, layer_count: int) -> int:
        """How many of ``encoder``'s first layers (of ``layer_count``) can change what the UNet
        reads: all, unless the UNet reads an earlier hidden state and not this encoder's pooled
        output (SDXL's ``text_encoder``: its last layer feeds nothing the UNet sees)."""
        if self.text_hidden_state is None or encoder == self.pooled_encoder:
            return layer_count
        # hidden_states holds the embeddings and then each layer's output: state h (< 0) is
        # the output of layer layer_count + h, so layers 0 .. layer_count + h feed it.
        return layer_count + 1 + self.text_hidden_state

    def components_for(self, kind: str) -> tuple[str, ...]:
        if kind not in self.targets:
            raise MemeditError(f"Target {kind} does not apply to {self.label} models.",
                               f"Choose from {', '.join(self.targets)}.")
        return self.targets[kind]


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (names are unique)."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name} is registered twice")
    FAMILIES[family.name] = family
    return family


_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SD_GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
_UNET_TARGETS = {kind: ("unet",) for kind in UNET_KINDS}

register(Family(
    name="sd1", label="Stable Diffusion 1.x",
    pipeline_classes=("StableDiffusionPipeline",),
    components=_SD_COMPONENTS, text_encoders=("text_encoder",), tokenizers=("tokenizer",),
    targets={**_UNET_TARGETS, "text_mlp": ("text_encoder",)},
    onnx_graphs=_SD_GRAPHS, ort_pipeline_class="ORTStableDiffusionPipeline",
    # SD 1.x's transformer blocks project in and out with 1x1 convolutions.
    unet_config={"use_linear_projection": False},
))
register(Family(
    name="sd2", label="Stable Diffusion 2.x (epsilon or v-prediction)",
    pipeline_classes=("StableDiffusionPipeline",),
    components=_SD_COMPONENTS, text_encoders=("text_encoder",), tokenizers=("tokenizer",),
    targets={**_UNET_TARGETS, "text_mlp": ("text_encoder",)},
    onnx_graphs=_SD_GRAPHS, ort_pipeline_class="ORTStableDiffusionPipeline",
    unet_config={"use_linear_projection": True},
))
register(Family(
    name="sdxl", label="Stable Diffusion XL (base)",
    pipeline_classes=("StableDiffusionXLPipeline",),
    components=(*_SD_COMPONENTS, "text_encoder_2", "tokenizer_2"),
    text_encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"),
    targets={**_UNET_TARGETS, "text_mlp": ("text_encoder", "text_encoder_2")},
    onnx_graphs=("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"),
    ort_pipeline_class="ORTStableDiffusionXLPipeline",
    unet_extra_inputs=("text_embeds", "time_ids"), text_hidden_state=-2,
    pooled_encoder="text_encoder_2",
))


def _match(class_names: Sequence[str], unet_config: Mapping[str, object], what: str) -> Family:
    for family in FAMILIES.values():
        if not set(class_names) & {*family.pipeline_classes, family.ort_pipeline_class}:
            continue
        if all(bool(unet_config.get(key, False)) == bool(value)
               for key, value in family.unet_config.items()):
            return family
    known = sorted({name for f in FAMILIES.values() for name in f.pipeline_classes})
    raise MemeditError(
        f"memedit does not know the model family of {what} ({class_names[0]}).",
        f"memedit edits {', '.join(f.label for f in FAMILIES.values())} pipelines "
        f"({', '.join(known)}); a new family is one entry in memedit/families.py.")


def family_of(pipe) -> Family:
    """The family of a loaded pipeline: diffusers' or Optimum's ORT pipeline of it (which
    Optimum picks from the export's ``model_index.json``)."""
    names = [cls.__name__ for cls in type(pipe).__mro__]
    unet = getattr(pipe, "unet", None)
    config = dict(getattr(unet, "config", {}) or {})
    return _match(names, config, "this pipeline")


def family_of_folder(folder: str | Path) -> Family:
    """The family of a saved pipeline folder, from its ``model_index.json`` and UNet config."""
    folder = Path(folder)
    index = read_json_object(folder / "model_index.json")
    config_path = folder / "unet" / "config.json"
    config = read_json_object(config_path) if config_path.is_file() else {}
    name = str(index.get("_class_name", "(no _class_name)"))
    return _match([name], config, str(folder))


def read_json_object(path: Path) -> dict:
    """A pipeline folder's JSON file (model_index.json, a config) that must hold an object;
    anything else is a MemeditError naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise MemeditError(f"Cannot read {path}: {err}",
                           "Pass the pipeline folder that `save_pretrained` wrote.") from None
    except ValueError as err:  # not JSON, or bytes that are not UTF-8
        raise MemeditError(f"{path} is not valid JSON ({err}).",
                           "Restore the file from the model's original copy (diffusers "
                           "writes it with save_pretrained).") from None
    if not isinstance(value, dict):
        raise MemeditError(f"{path} holds a JSON {type(value).__name__}, not an object.",
                           "Restore the file from the model's original copy.")
    return value


def prediction_type(pipe) -> str:
    """``epsilon`` or ``v_prediction`` (SD 2.x 768), as the scheduler config says."""
    return str(pipe.scheduler.config.get("prediction_type", "epsilon"))


# ---------------------------------------------------------------------------- conditioning


@torch.no_grad()
def encode_conditioning(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """The conditioning the UNet reads for each prompt, as one float32 tensor ``[N, T, d]``.

    The pipeline's own ``encode_prompt`` does the encoding (SDXL: both encoders' penultimate
    states, concatenated); with a pooled embedding, it is appended as row ``T - 1``.

    The empty prompt is memedit's unconditional branch: where the pipeline forces zeros for
    it (SDXL's ``force_zeros_for_empty_prompt``), its conditioning is zeros, as the pipeline's
    own unconditional branch is."""
    family = family_of(pipe)
    if not family.pooled:
        embeds, _ = pipe.encode_prompt(list(prompts), pipe.device, 1, False)
        return embeds.float()
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts), device=pipe.device, num_images_per_prompt=1,
        do_classifier_free_guidance=False)
    y = pack_pooled(embeds.float(), pooled.float())
    if pipe.config.get("force_zeros_for_empty_prompt", False):
        y[[i for i, prompt in enumerate(prompts) if prompt == ""]] = 0.0
    return y


def pack_pooled(embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``[N, 77, d]`` and ``[N, p]`` (p <= d) -> ``[N, 78, d]``, the pooled row zero-padded."""
    if pooled.shape[-1] > embeds.shape[-1]:
        raise MemeditError(f"The pooled text embedding ({pooled.shape[-1]}) is wider than the "
                           f"token embeddings ({embeds.shape[-1]}).",
                           "This SDXL-like pipeline is not one memedit knows how to condition.")
    row = torch.nn.functional.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))
    return torch.cat([embeds, row[:, None]], dim=1)


def split_conditioning(pipe, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y`` from :func:`encode_conditioning` -> (token embeddings, pooled embedding or None)."""
    if not family_of(pipe).pooled:
        return y, None
    width = pipe.text_encoder_2.config.projection_dim
    return y[:, :-1], y[:, -1, :width]


def time_ids(pipe, height: int, width: int, count: int) -> torch.Tensor:
    """SDXL's ``time_ids`` for an image of ``height x width`` (original = target size, no
    crop), as the pipeline builds them by default: ``[count, 6]``."""
    ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config
                                 .projection_dim)
    return ids.repeat(count, 1)


def unet_conditioning(pipe, y: torch.Tensor, height: int, width: int) -> dict:
    """The UNet's keyword arguments for the conditioning ``y`` (images ``height x width``):
    ``encoder_hidden_states`` and, for a pooled family, ``added_cond_kwargs``."""
    family = family_of(pipe)
    embeds, pooled = split_conditioning(pipe, y)
    dtype, device = pipe.unet.dtype, pipe.unet.device
    kwargs: dict = {"encoder_hidden_states": embeds.to(device, dtype)}
    if family.unet_extra_inputs:
        values = {"text_embeds": pooled, "time_ids": time_ids(pipe, height, width, len(y))}
        kwargs["added_cond_kwargs"] = {name: values[name].to(device, dtype)
                                       for name in family.unet_extra_inputs}
    return kwargs


def pipeline_conditioning(pipe, y: torch.Tensor, negative: torch.Tensor | None = None) -> dict:
    """The pipeline-call arguments that replace ``prompt`` (and ``negative_prompt``) by the
    conditionings ``y`` (and ``negative``, one row per row of ``y``)."""
    dtype, device = pipe.unet.dtype, pipe.device
    embeds, pooled = split_conditioning(pipe, y)
    kwargs: dict = {"prompt_embeds": embeds.to(device, dtype)}
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = pooled.to(device, dtype)
    if negative is not None:
        negative_embeds, negative_pooled = split_conditioning(pipe, negative)
        kwargs["negative_prompt_embeds"] = negative_embeds.to(device, dtype)
        if negative_pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = negative_pooled.to(device, dtype)
    return kwargs
