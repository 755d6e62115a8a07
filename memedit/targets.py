"""Which layers the method edits: the linear layers of the UNet's transformer blocks (and the
text encoder's MLP), named by the kind of layer rather than by a model-specific path."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from memedit.errors import MemeditError
from memedit.families import Family, family_of


@dataclass(frozen=True)
class TargetKind:
    """A kind of linear layer: where it lives and how it is found inside a transformer block."""

    name: str
    component: str  # "unet" or "text_encoder": the kind of component (the family says which)
    path: str  # attribute path inside a BasicTransformerBlock or a CLIP encoder layer
    description: str


TARGET_KINDS: dict[str, TargetKind] = {
    kind.name: kind
    for kind in (
        TargetKind("ff_out", "unet", "ff.net.2",
                   "second FFN linear of each UNet transformer block (the paper's default)"),
        TargetKind("ff_in", "unet", "ff.net.0.proj",
                   "first FFN projection (GEGLU input) of each UNet transformer block"),
        TargetKind("attn2_k", "unet", "attn2.to_k", "cross-attention key projection"),
        TargetKind("attn2_v", "unet", "attn2.to_v", "cross-attention value projection"),
        TargetKind("text_mlp", "text_encoder", "mlp.fc2",
                   "second MLP linear of each CLIP text-encoder layer (every text encoder)"),
    )
}


@dataclass(frozen=True)
class TargetLayer:
    """One linear layer to be hooked and masked."""

    kind: str
    component: str
    module_name: str  # dotted path inside the component

    @property
    def key(self) -> str:
        """The mask key: ``component/parameter name`` of the layer's weight."""
        return f"{self.component}/{self.module_name}.weight"


def parse_target_kinds(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"ff_out,text_mlp"`` or a sequence -> validated kind names, in a stable order."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in TARGET_KINDS]
    if unknown or not names:
        raise MemeditError(
            f"Unknown target {', '.join(unknown) or '(none)'}.",
            f"Choose from {', '.join(TARGET_KINDS)} (comma-separated for several).",
        )
    return tuple(dict.fromkeys(names))


def _transformer_block_names(unet: nn.Module) -> list[str]:
    from diffusers.models.attention import BasicTransformerBlock

    return [name for name, module in unet.named_modules()
            if isinstance(module, BasicTransformerBlock)]


def _clip_layer_names(text_encoder: nn.Module) -> list[str]:
    # Suffix match keeps working across transformers' renames (text_model.encoder.layers.N).
    return [name for name, module in text_encoder.named_modules()
            if name.split(".")[-2:-1] == ["layers"] and hasattr(module, "mlp")]


def find_target_layers(pipe, kinds: tuple[str, ...]) -> list[tuple[TargetLayer, nn.Linear]]:
    """Every layer of the requested kinds in ``pipe``, with its module.

    Which component(s) a kind names is the model family's (``memedit.families``): ``text_mlp``
    covers both of SDXL's text encoders, keyed ``text_encoder/...`` and ``text_encoder_2/...``,
    and only the encoder layers that can change what the UNet reads
    (:meth:`~memedit.families.Family.text_layers_read`: not ``text_encoder``'s last layer in
    SDXL, whose UNet reads the penultimate state).
    """
    family = family_of(pipe)
    found: list[tuple[TargetLayer, nn.Linear]] = []
    for kind_name in kinds:
        kind = TARGET_KINDS[kind_name]
        for component_name in family.components_for(kind_name):
            found += _layers_of(pipe, family, kind, component_name)
    return found


def _layers_of(pipe, family: Family, kind: TargetKind,
               component_name: str) -> list[tuple[TargetLayer, nn.Linear]]:
    component = getattr(pipe, component_name, None)
    if component is None:
        raise MemeditError(f"The pipeline has no {component_name}.",
                           "Pass a complete pipeline folder (as `save_pretrained` writes it).")
    is_unet = kind.component == "unet"
    parents = _transformer_block_names(component) if is_unet else _clip_layer_names(component)
    if not parents:
        what = ("transformer blocks (BasicTransformerBlock)" if is_unet
                else "CLIP encoder layers with an MLP")
        raise MemeditError(
            f"The {component_name} has no {what}, so target {kind.name} has nothing to edit.",
            "memedit edits UNets built from diffusers' BasicTransformerBlock (SD 1.x/2.x/XL).",
        )
    if not is_unet:  # the layers in order, then only those whose output reaches the UNet
        parents = sorted(parents, key=lambda name: int(name.rsplit(".", 1)[-1]))
        parents = parents[:family.text_layers_read(component_name, len(parents))]
    found = []
    for parent in parents:
        name = f"{parent}.{kind.path}" if parent else kind.path
        module = component.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise MemeditError(f"{component_name}/{name} is a {type(module).__name__}, "
                               "not a linear layer.",
                               "This UNet's transformer blocks differ from Stable "
                               "Diffusion's; choose another target.")
        found.append((TargetLayer(kind.name, component_name, name), module))
    return found
