"""Find, validate and load a diffusers Stable Diffusion pipeline: local folder or hub id.

Weights are read with safetensors only, unless the user opts into pickled checkpoints with
``allow_pickle`` (``--allow-pickle``): unpickling runs code from the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from memedit.errors import MemeditError
from memedit.families import family_of_folder, read_json_object

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a pipeline comes from: what the user typed and the local folder it resolved to.

    A resolved source can stand wherever a model is asked for (``resolve_model`` returns it as
    it is) and wherever a path is (``os.fspath`` gives its folder).
    """

    spec: str
    path: Path
    hub_id: str | None = None
    allow_pickle: bool = False  # the user opted into pickled weights for this model
    revision: str | None = None  # the hub revision asked for (branch, tag or commit)
    commit: str | None = None  # the hub commit the download resolved to
    variant: str | None = None  # weight files ``*.{variant}.safetensors`` to load, e.g. fp16

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def components(self) -> dict[str, list]:
        """The ``model_index.json`` entries that name a (library, class) component."""
        index = read_json_object(self.path / "model_index.json")
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


def resolve_model(model: str | os.PathLike | ModelSource | None, allow_pickle: bool = False,
                  revision: str | None = None, variant: str | None = None,
                  token: str | None = None) -> ModelSource:
    """Resolve ``model`` to a validated local pipeline folder.

    ``None`` means the embedded test model. A path that exists is used as it is; a string of
    the form ``org/name`` that is not a local path is fetched from (or found in the cache of)
    the Hugging Face hub by diffusers, honouring ``HF_HUB_OFFLINE``, at ``revision`` (a branch,
    tag or commit), with the ``variant`` weight files (``fp16``) and ``token`` (gated or
    private repositories). A local folder has no revision and needs no token; its ``variant``
    files must be there. A :class:`ModelSource` is already resolved and returned as it is.
    """
    if isinstance(model, ModelSource):
        return model
    if model is None:
        if revision or variant or token:
            raise MemeditError("--revision, --variant and --token apply to the model named "
                               "with --model; the embedded test model has none of them.",
                               "Pass --model with a hub id (or a folder, for --variant).")
        source = ModelSource("memedit-testbed", default_model_path())
    else:
        spec = str(model)
        path = Path(spec).expanduser()
        if path.exists():
            _check_local_options(spec, revision, token)
            source = ModelSource(spec, path.resolve(), allow_pickle=allow_pickle, variant=variant)
        elif _looks_like_hub_id(spec):
            folder = _download(spec, allow_pickle, revision, variant, token)
            source = ModelSource(spec, folder, spec, allow_pickle, revision,
                                 _snapshot_commit(folder), variant)
        else:
            raise MemeditError(
                f"Model folder {spec} does not exist.",
                "Pass a diffusers pipeline folder (with model_index.json) or a hub id such as "
                "CompVis/stable-diffusion-v1-4.",
            )
    validate_pipeline_folder(source.path, allow_pickle)
    _check_variant(source)
    return source


def _check_local_options(spec: str, revision: str | None, token: str | None) -> None:
    """Refuse the options that only a hub id has."""
    for name, value in (("--revision", revision), ("--token", token)):
        if value:
            raise MemeditError(
                f"{name} applies to a hub id, but {spec} is a local folder: it has one "
                "version, and nothing to authenticate to.",
                f"Drop {name}, or pass the hub id (org/name) to download that revision.")


def _check_variant(source: ModelSource) -> None:
    """Refuse a variant whose weight files the (validated) folder does not hold."""
    variant = source.variant
    if variant and not any((source.path / "unet").glob(f"*.{variant}.*")):
        raise MemeditError(
            f"{source.spec} has no {variant!r} variant: unet/ holds no *.{variant}.safetensors.",
            "Drop --variant to load the primary weights, or pass a folder (or hub revision) "
            f"that has them, as save_pretrained(..., variant={variant!r}) writes them.")


def _snapshot_commit(folder: Path) -> str | None:
    """The commit a hub-cache snapshot folder (``.../snapshots/<commit>``) holds, if it is one."""
    name = folder.name
    is_commit = len(name) == 40 and all(c in "0123456789abcdef" for c in name)
    return name if is_commit and folder.parent.name == "snapshots" else None


def _download(hub_id: str, allow_pickle: bool, revision: str | None = None,
              variant: str | None = None, token: str | None = None) -> Path:
    from diffusers import DiffusionPipeline
    from huggingface_hub.constants import HF_HUB_OFFLINE

    at = f" at revision {revision}" if revision else ""
    try:
        folder = DiffusionPipeline.download(hub_id, use_safetensors=None if allow_pickle else True,
                                            revision=revision, variant=variant, token=token)
    except Exception as err:  # the hub raises many types (OSError, HTTP, LocalEntryNotFound)
        if HF_HUB_OFFLINE:
            raise MemeditError(
                f"{hub_id}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set.",
                "Download it once online (unset HF_HUB_OFFLINE), or pass a local folder.",
            ) from None
        if "safetensors" in str(err) and not allow_pickle:
            raise MemeditError(
                f"{hub_id} has no safetensors weights; memedit refuses pickled checkpoints.",
                "Pass --allow-pickle if you trust the repository (unpickling can run code).",
            ) from None
        raise MemeditError(
            f"Could not fetch {hub_id}{at} from the hub: {type(err).__name__}: {err}",
            "Check the id, the revision, the variant, your network, and --token (or "
            "`huggingface-cli login`) for gated or private models.",
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
    components = source.components  # reads model_index.json, with its own clear errors
    # The model family (memedit/families.py) says which components the folder must have; an
    # unknown pipeline class is refused here, before any weight is read.
    family = family_of_folder(path)
    for name in family.components:
        if name not in components or not (path / name).is_dir():
            raise MemeditError(
                f"{path} has no {name}/ component, which a {family.label} pipeline has.",
                "Pass the complete folder that `save_pretrained` wrote.",
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
        from memedit.distributed import default_device

        device = default_device()  # under a launcher: this process's own GPU
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
    model: str | os.PathLike | ModelSource | None = None,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    variant: str | None = None,
    token: str | None = None,
):
    """Load a text-to-image pipeline for locating or evaluating.

    Returns ``(pipeline, source)``. The safety checker is not loaded: it would blank the very
    generations that memorization is measured on. It stays in any folder memedit writes.
    ``revision``, ``variant`` and ``token`` are :func:`resolve_model`'s.
    """
    from diffusers import DiffusionPipeline

    source = resolve_model(model, allow_pickle, revision, variant, token)
    torch_device, torch_dtype = choose_device_dtype(device, dtype)
    # None lets diffusers prefer safetensors and fall back to pickles per component.
    kwargs: dict = {"torch_dtype": torch_dtype, "use_safetensors": None if allow_pickle else True,
                    "variant": source.variant}
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
