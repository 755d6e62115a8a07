"""Reading and rewriting the weight files of a pipeline folder, tensor by tensor.

memedit edits files, not loaded models: the stored dtype is kept, every variant file
(e.g. ``diffusion_pytorch_model.fp16.safetensors``) is edited alike so that no variant keeps
the memorized weights, and every other byte of the folder is copied unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from memedit.errors import MemeditError
from memedit.loading import PICKLE_SUFFIXES, component_weight_files

T = TypeVar("T")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (as stored: no dtype conversion)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def split_key(key: str) -> tuple[str, str]:
    """``"unet/a.b.weight"`` -> ``("unet", "a.b.weight")``."""
    component, _, name = key.partition("/")
    return component, name


def by_component(items: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """``{"unet/a.weight": x}`` -> ``{"unet": {"a.weight": x}}``: entries keyed
    ``component/parameter`` grouped by component, as each component's files hold them."""
    grouped: dict[str, dict[str, T]] = {}
    for key, value in items.items():
        component, name = split_key(key)
        grouped.setdefault(component, {})[name] = value
    return grouped


def is_variant(path: Path) -> bool:
    """``x.fp16.safetensors`` is a variant; ``x.safetensors`` and shards ``x-0001-of-0002`` not."""
    return "." in path.stem


@dataclass(frozen=True)
class WeightFile:
    path: Path
    primary: bool  # what diffusers loads without a ``variant=`` argument


def weight_files(component_dir: Path, allow_pickle: bool = False) -> list[WeightFile]:
    files = component_weight_files(component_dir, allow_pickle)
    any_primary = any(not is_variant(p) for p in files)
    return [WeightFile(p, not is_variant(p) or not any_primary) for p in files]


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a truncated or corrupt weight file into an error that names it (not a traceback)."""
    try:
        yield
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        raise MemeditError(f"{path} is not a readable weight file ({err}); it may be truncated "
                           "or corrupt.",
                           "Restore it from the model's original copy (compare its size and "
                           "checksum), then run again.") from None


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file (pickled files only reach here with --allow-pickle)."""
    with reading(path):
        if path.suffix in PICKLE_SUFFIXES:
            return torch.load(path, map_location="cpu", weights_only=True)
        return load_file(str(path))


def file_keys(path: Path) -> list[str]:
    if path.suffix in PICKLE_SUFFIXES:
        return list(read_state(path))
    with reading(path), safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def _files_holding(model_dir: Path, keys: list[str], allow_pickle: bool,
                   primary_only: bool) -> Iterator[tuple[str, Path, set[str]]]:
    """(component, weight file, the parameter names it holds) for mask keys ``component/param``."""
    for component, names in by_component(dict.fromkeys(keys)).items():
        folder = model_dir / component
        if not folder.is_dir():
            raise MemeditError(f"{model_dir} has no {component}/ folder.",
                               "This subspace was located on a model of another layout.")
        for weight_file in weight_files(folder, allow_pickle):
            if primary_only and not weight_file.primary:
                continue
            present = set(names).intersection(file_keys(weight_file.path))
            if present:
                yield component, weight_file.path, present


def read_tensors(model_dir: Path, keys: list[str], allow_pickle: bool = False,
                 primary_only: bool = True) -> dict[str, torch.Tensor]:
    """The stored tensors for mask keys ``component/param`` from the primary weight files."""
    found: dict[str, torch.Tensor] = {}
    for component, path, present in _files_holding(model_dir, keys, allow_pickle, primary_only):
        if path.suffix in PICKLE_SUFFIXES:
            state = read_state(path)
            found.update({f"{component}/{n}": state[n] for n in present})
        else:
            with reading(path), safe_open(str(path), "pt") as handle:
                found.update({f"{component}/{n}": handle.get_tensor(n) for n in present})
    return found


def stored_shapes(model_dir: Path, keys: list[str],
                  allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """The shapes of the stored tensors for mask keys, from the primary safetensors files'
    headers alone (no weight is read; a pickled file is read whole)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for component, path, present in _files_holding(model_dir, keys, allow_pickle, True):
        if path.suffix in PICKLE_SUFFIXES:
            state = read_state(path)
            shapes.update({f"{component}/{n}": tuple(state[n].shape) for n in present})
        else:
            with reading(path), safe_open(str(path), "pt") as handle:
                shapes.update({f"{component}/{n}": tuple(handle.get_slice(n).get_shape())
                               for n in present})
    return shapes


def zero_masked(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with the masked entries set to exactly zero (dtype kept)."""
    return tensor.masked_fill(mask.to(tensor.device), 0)


def rewrite_component(component_dir: Path, masks: dict[str, torch.Tensor],
                      allow_pickle: bool = False,
                      check: Callable[[str, torch.Tensor], None] | None = None) -> list[Path]:
    """Zero ``masks`` (param name -> bool mask) in every weight file of a copied component.

    ``check(name, tensor)`` sees each masked tensor of the primary files (what diffusers
    loads) before it is zeroed, and may refuse it. Pickled files are rewritten as safetensors
    (and the pickle removed) so that the output is safe to load. Returns the files written.
    """
    written = []
    for weight_file in weight_files(component_dir, allow_pickle):
        path = weight_file.path
        present = set(masks).intersection(file_keys(path))
        if not present:
            continue
        state = read_state(path)
        for name in sorted(present):
            if check is not None and weight_file.primary:
                check(name, state[name])
            state[name] = zero_masked(state[name], masks[name]).contiguous()
        if path.suffix in PICKLE_SUFFIXES:
            # transformers names its safetensors file model.safetensors, diffusers keeps the stem.
            stem = "model" if path.stem == "pytorch_model" else path.stem
            target = path.with_name(stem + ".safetensors")
            save_file(state, str(target), metadata={"format": "pt"})
            path.unlink()
            written.append(target)
        else:
            with reading(path), safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {"format": "pt"}
            save_file(state, str(path), metadata=metadata)
            written.append(path)
    return written
