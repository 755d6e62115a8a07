"""Find, validate and load a diffusers Stable Diffusion pipeline: local folder or hub id.

Weights are read with safetensors only, unless the user opts into pickled checkpoints with
``allow_pickle`` (``--allow-pickle``): unpickling runs code from the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from memedit.errors import MemeditError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a pipeline comes from: what the user typed and the local folder it resolved to."""

    spec: str
    path: Path
    hub_id: str | None = None
    allow_pickle: bool = False  # the user opted into pickled weights for this model

    @property
    def components(self) -> dict[str, list]:
        """The ``model_index.json`` entries that name a (library, class) component."""
        path = self.path / "model_index.json"
        try:
            index = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MemeditError(f"{path} is not valid JSON ({err}).",
                               "Restore the file from the model's original copy (diffusers "
                               "writes it with save_pretrained).") from None
        if not isinstance(index, dict):
            raise MemeditError(f"{path} holds a JSON {type(index).__name__}, not an object.",
                               "Restore the file from the model's original copy.")
        return {k: v for k, v in index.items()
                if isinstance(v, list) and len(v) == 2 and v[0] is not None}


def default_model_path() -> Path:
    """The embedded test model shipped inside the package (see ``memedit.testbed``)."""
    from memedit.testbed import model_path

    return model_path()


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "~"))
        and not any(c in spec for c in "\\: ")
    )


def resolve_model(model: str | os.PathLike | None, allow_pickle: bool = False) -> ModelSource:
    """Resolve ``model`` to a validated local pipeline folder.

    ``None`` means the embedded test model. A path that exists is used as it is; a string of
    the form ``org/name`` that is not a local path is fetched from (or found in the cache of)
    the Hugging Face hub, honouring ``HF_HUB_OFFLINE``.
    """
    if model is None:
        source = ModelSource("memedit-testbed", default_model_path())
    else:
        spec = str(model)
        path = Path(spec).expanduser()
        if path.exists():
            source = ModelSource(spec, path.resolve(), allow_pickle=allow_pickle)
        elif _looks_like_hub_id(spec):
            source = ModelSource(spec, _download(spec, allow_pickle), spec, allow_pickle)
        else:
            raise MemeditError(
                f"Model folder {spec} does not exist.",
                "Pass a diffusers pipeline folder (with model_index.json) or a hub id such as "
                "CompVis/stable-diffusion-v1-4.",
            )
    validate_pipeline_folder(source.path, allow_pickle)
    return source


def _download(hub_id: str, allow_pickle: bool) -> Path:
    from diffusers import DiffusionPipeline
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        folder = DiffusionPipeline.download(hub_id, use_safetensors=None if allow_pickle else True)
    except Exception as err:  # the hub raises many types (OSError, HTTP, LocalEntryNotFound)
        if HF_HUB_OFFLINE:
            raise MemeditError(
                f"{hub_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set.",
                "Download it once online (unset HF_HUB_OFFLINE), or pass a local folder.",
            ) from None
        if "safetensors" in str(err) and not allow_pickle:
            raise MemeditError(
                f"{hub_id} has no safetensors weights; memedit refuses pickled checkpoints.",
                "Pass --allow-pickle if you trust the repository (unpickling can run code).",
            ) from None
        raise MemeditError(
            f"Could not fetch {hub_id} from the hub: {type(err).__name__}: {err}",
            "Check the id, your network and `huggingface-cli login` for gated models.",
        ) from None
    return Path(folder)


def component_weight_files(component_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of one component folder (all variants), safetensors first.

    Raises if the folder only has pickled weights and ``allow_pickle`` is false.
    """
    safe = sorted(p for p in component_dir.iterdir() if p.suffix in SAFE_SUFFIXES)
    if safe:
        return safe
    pickled = sorted(p for p in component_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and not allow_pickle:
        raise MemeditError(
            f"{component_dir} holds only pickled weights ({pickled[0].name}); memedit loads "
            "safetensors only.",
            "Pass --allow-pickle if you trust the file (unpickling can run code), or convert "
            "it to safetensors first.",
        )
    return pickled


def validate_pipeline_folder(path: Path, allow_pickle: bool = False) -> None:
    """Check that ``path`` is a diffusers text-to-image pipeline folder memedit can edit."""
    if not path.is_dir():
        raise MemeditError(
            f"{path} is a file, not a diffusers pipeline folder.",
            "For a single-file checkpoint, convert it first: "
            "StableDiffusionPipeline.from_single_file(path).save_pretrained(folder).",
        )
    if not (path / "model_index.json").is_file():
        raise MemeditError(
            f"{path} is not a diffusers pipeline folder: it has no model_index.json.",
            "Pass the folder that `save_pretrained` wrote (with unet/, text_encoder/, ...).",
        )
    source = ModelSource(str(path), path)
    for name in ("unet", "text_encoder", "tokenizer"):
        if name not in source.components or not (path / name).is_dir():
            raise MemeditError(
                f"{path} has no {name}/ component; memedit edits text-to-image pipelines "
                "such as Stable Diffusion 1.x/2.x.",
                "Pass a Stable Diffusion pipeline folder.",
            )
    for name in source.components:
        folder = path / name
        if folder.is_dir() and name not in ("tokenizer", "scheduler", "feature_extractor"):
            component_weight_files(folder, allow_pickle)


def choose_device_dtype(
    device: str | None = None, dtype: str | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA and fp16 where a GPU is present, CPU and fp32 otherwise; either can be forced."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MemeditError("--device cuda was asked for, but torch sees no CUDA GPU.",
                           "Use --device cpu, or install a CUDA build of torch.")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MemeditError(f"Unknown device {device!r}.",
                           "Use auto, cpu, cuda or cuda:N (as torch names devices).") from None
    if dtype in (None, "auto"):
        return resolved, torch.float16 if resolved.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MemeditError(f"Unknown dtype {dtype!r}.", f"Use one of {', '.join(DTYPES)}.")
    return resolved, DTYPES[dtype]


def load_pipeline(
    model: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
):
    """Load a text-to-image pipeline for locating or evaluating.

    Returns ``(pipeline, source)``. The safety checker is not loaded: it would blank the very
    generations that memorization is measured on. It stays in any folder memedit writes.
    """
    from diffusers import DiffusionPipeline

    source = resolve_model(model, allow_pickle)
    torch_device, torch_dtype = choose_device_dtype(device, dtype)
    # None lets diffusers prefer safetensors and fall back to pickles per component.
    kwargs: dict = {"torch_dtype": torch_dtype, "use_safetensors": None if allow_pickle else True}
    if "safety_checker" in source.components:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = DiffusionPipeline.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:
        raise MemeditError(
            f"diffusers could not load {source.path}: {err}",
            "Check that the folder is a complete pipeline written by save_pretrained.",
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch_device), source
