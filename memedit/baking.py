"""Bake: zero the subspace's weights once and write a complete diffusers pipeline folder.

The source model is never touched: the folder is copied to a temporary sibling of the output,
the weight files holding masked tensors are rewritten there, the subspace is stored alongside
(``memedit/``) for provenance and audits, and the folder is moved into place in one rename.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memedit import distributed
from memedit.artifacts import PROVENANCE_DIR, PROVENANCE_FILE, VERSION
from memedit.card import source_record, write_card
from memedit.errors import MemeditError
from memedit.families import FAMILIES, family_of_folder
from memedit.hub import HubPush, check_push, push_output
from memedit.loading import ModelSource, resolve_model
from memedit.outputs import Inputs, atomic_output_dir, check_output, input_paths
from memedit.subspace import Subspace, model_identity
from memedit.weights import read_tensors, rewrite_component, stored_shapes, tensor_sha256


@dataclass
class BakeResult:
    path: Path
    source: str
    zeroed: int
    files: list[str] = field(default_factory=list)
    already_sanitized: bool = False
    subspace: Subspace | None = field(default=None, repr=False)  # the one baked in
    pushed: str | None = None  # the hub URL, with push_to_hub


def check_model_matches(source: ModelSource, subspace: Subspace,
                        allow_pickle: bool = False) -> bool:
    """Refuse a model whose edited tensors differ from those the subspace was located on.

    The subspace must record each edited tensor's sha256 before and after baking: without
    them nothing tells this model from any other of the same layout. ``model.identity``, where
    recorded, pins the UNet's other tensors too. Returns True when the model is already
    sanitized with this subspace (baking again is a no-op on the weights: bake is idempotent).
    """
    _check_records(subspace)
    check_layout(source, subspace, allow_pickle)
    stored = read_tensors(source.path, list(subspace.masks), allow_pickle)
    already = all([_check_tensor(source, subspace, key, stored[key]) for key in subspace.masks])
    _check_identity(source, subspace, allow_pickle)
    return already


def _check_records(subspace: Subspace) -> None:
    """Refuse a subspace that lacks the records a bake is checked against."""
    problems, gaps = subspace.check_manifest()
    issues = gaps + problems
    if issues:
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        raise MemeditError(
            f"The subspace cannot be baked: {issues[0]}{more}.",
            "Use a subspace written by `memedit locate` (it records every edited tensor's "
            "sha256 before and after, as model.tensors[key].sha256_before/after, and the "
            "per-layer counts), or locate again on this model.")


def check_layout(source: ModelSource, subspace: Subspace, allow_pickle: bool = False) -> None:
    """Refuse a model of another family than the one the subspace was located on (where the
    manifest records ``model.family``), or one lacking a masked tensor of the mask's shape:
    from the config files and the weight files' headers, before a bake copies anything."""
    recorded = subspace.manifest.get("model", {}).get("family")
    if recorded is not None:
        family = family_of_folder(source.path)
        if family.name != recorded:
            label = FAMILIES[recorded].label if recorded in FAMILIES else recorded
            raise MemeditError(
                f"The subspace was located on a {label} model ({recorded}), but "
                f"{source.spec} is a {family.label} model ({family.name}).",
                f"Locate a subspace on this model (`memedit locate --model {source.spec}`), "
                f"or bake the {label} model the subspace came from.")
    shapes = stored_shapes(source.path, list(subspace.masks), allow_pickle)
    _check_complete(source, subspace, shapes)
    for key, mask in subspace.masks.items():
        _check_shape(source, key, shapes[key], tuple(mask.shape))


def _check_shape(source: ModelSource, key: str, stored: tuple[int, ...],
                 masked: tuple[int, ...]) -> None:
    if stored != masked:
        raise MemeditError(
            f"{key} has shape {stored} in {source.spec} but {masked} in the subspace.",
            "This subspace was located on another model: locate again on this one.")


def _check_complete(source: ModelSource, subspace: Subspace, found: Iterable[str]) -> None:
    missing = sorted(subspace.masks.keys() - set(found))
    if missing:
        raise MemeditError(f"{source.spec} has no tensor {missing[0]}.",
                           "This subspace was located on a model of another layout.")


def _check_tensor(source: ModelSource, subspace: Subspace, key: str,
                  stored: torch.Tensor) -> bool:
    """Refuse an edited tensor that is neither the one located on nor its sanitized form;
    True when it is already sanitized."""
    _check_shape(source, key, tuple(stored.shape), tuple(subspace.masks[key].shape))
    recorded = subspace.tensor_records()[key]
    digest = tensor_sha256(stored)
    if digest == recorded["sha256_after"]:
        return True
    if digest != recorded["sha256_before"]:
        raise MemeditError(
            f"{key} in {source.spec} differs from the weights the subspace was located on "
            "(sha256 mismatch).",
            "Locate again on this model, or bake the model the subspace came from.")
    return False


def _check_identity(source: ModelSource, subspace: Subspace, allow_pickle: bool) -> None:
    identity = subspace.identity()
    if identity is not None and identity.get("sha256") != model_identity(
            source.path, subspace.masks, allow_pickle)["sha256"]:
        raise MemeditError(
            f"The UNet of {source.spec} differs from the one the subspace was located on in "
            "tensors the subspace does not edit (model.identity mismatch).",
            "Locate again on this model, or bake the model the subspace came from.")


def _copy_tree(source: Path, target: Path, progress: bool) -> None:
    """Copy a pipeline folder (following hub-cache symlinks) without memedit provenance."""
    files = [p for p in sorted(source.rglob("*"))
             if p.is_file() and PROVENANCE_DIR not in p.relative_to(source).parts[:1]]
    for path in tqdm(files, desc="copying model", unit="file", disable=not progress):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)  # follows symlinks; copies content only


def bake(model: str | os.PathLike | None, subspace: Subspace, out: str | os.PathLike,
         overwrite: bool = False, allow_pickle: bool = False, progress: bool = True,
         inputs: Inputs = None, push_to_hub: HubPush | None = None) -> BakeResult | None:
    """Write ``model`` with ``subspace`` zeroed to the new pipeline folder ``out``.

    ``inputs`` are further paths the output must not touch (the subspace's folder, prompt
    files); the source model is always one. Under several processes (``accelerate launch``)
    only the main one bakes (reads, copies and rewrites the model); the others return None at
    once, as :func:`memedit.locate_and_bake` does. With ``push_to_hub`` the written model is
    uploaded too (checked before any work: refused offline or without a token).
    """
    if push_to_hub is not None:
        check_push(push_to_hub)
    if not distributed.state().is_main:
        return None
    source = resolve_model(model, allow_pickle)
    protected = [source.path, *input_paths(inputs)]
    check_output(out, overwrite, protected)  # before reading any weights
    if not subspace.num_selected:
        raise MemeditError("The subspace selects no weight: baking it would write an unedited "
                           "copy of the model.",
                           "Locate again with a larger --k, or check the memorized prompts.")
    # What check_model_matches checks, with the edited tensors checked in the copy as it is
    # rewritten (the copy's bytes are the source's): the targeted weights are read once.
    _check_records(subspace)
    check_layout(source, subspace, allow_pickle)  # before copying the model
    sanitized: dict[str, bool] = {}  # per edited tensor: already sanitized

    def check(component: str, name: str, tensor: torch.Tensor) -> None:
        key = f"{component}/{name}"
        sanitized[key] = _check_tensor(source, subspace, key, tensor)

    with atomic_output_dir(out, overwrite, protected, "sanitized-model") as tmp:
        _copy_tree(source.path, tmp, progress)
        written = []
        for component, masks in subspace.by_component().items():
            written += rewrite_component(tmp / component, masks, allow_pickle,
                                         functools.partial(check, component))
        _check_complete(source, subspace, sanitized)
        _check_identity(source, subspace, allow_pickle)
        already = all(sanitized.values())
        subspace.write_into(tmp / PROVENANCE_DIR)
        provenance = {
            "memedit_version": VERSION,
            "source": source_record(source),
            "edited_files": [str(p.relative_to(tmp)) for p in written],
            "zeroed": subspace.num_selected,
        }
        (tmp / PROVENANCE_DIR / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        write_card(tmp, subspace.manifest, source)  # README.md; the source's card is kept
        files = [str(p.relative_to(tmp)) for p in written]
    return BakeResult(Path(out), source.spec, subspace.num_selected, files, already, subspace,
                      push_output(out, push_to_hub))
