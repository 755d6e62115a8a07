"""Inspect a subspace or a sanitized model, and verify a sanitized model against its original:
every weight equal, except exactly the masked ones, which must be zero."""

from __future__ import annotations

import filecmp
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memedit.baking import PROVENANCE_DIR, PROVENANCE_FILE
from memedit.errors import MemeditError
from memedit.loading import PICKLE_SUFFIXES, resolve_model
from memedit.subspace import Subspace
from memedit.weights import read_state, weight_files, zero_masked


@dataclass
class Verification:
    """What ``verify_sanitized`` checked and what it found wrong (empty = the model is exact)."""

    sanitized: str
    original: str
    tensors_checked: int = 0
    edited_tensors: int = 0
    zeroed: int = 0
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def provenance(model_dir: Path) -> dict | None:
    path = Path(model_dir) / PROVENANCE_DIR / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _original_state(folder: Path, name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The original of a sanitized weight file (a pickle may have become safetensors)."""
    candidate = folder / name
    if candidate.is_file():
        return read_state(candidate)
    stem = Path(name).stem
    for suffix in PICKLE_SUFFIXES:
        for pickled in (folder / f"{stem}{suffix}", folder / f"pytorch_model{suffix}"):
            if pickled.is_file() and (stem == pickled.stem or stem == "model") and allow_pickle:
                return read_state(pickled)
    raise FileNotFoundError(name)


def verify_sanitized(model: str | Path, original: str | Path | None = None,
                     allow_pickle: bool = False) -> Verification:
    """Check that ``model`` equals ``original`` with exactly the masked weights zeroed."""
    sanitized = resolve_model(model).path
    info = provenance(sanitized)
    if info is None:
        raise MemeditError(f"{sanitized} was not written by `memedit bake` (no "
                           f"{PROVENANCE_DIR}/{PROVENANCE_FILE}).",
                           "Pass a model folder that memedit baked.")
    subspace = Subspace.load(sanitized)
    original_spec = original if original is not None else info["source"]["path"]
    if original is None and not Path(original_spec).exists():
        raise MemeditError(f"The original model {original_spec} recorded at bake time is gone.",
                           "Pass the original with --original.")
    source = resolve_model(original_spec, allow_pickle).path
    report = Verification(str(sanitized), str(source))
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for key, mask in subspace.masks.items():
        component, _, name = key.partition("/")
        masks.setdefault(component, {})[name] = mask
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or relative.parts[0] == PROVENANCE_DIR:
            continue
        twin = sanitized / relative
        is_weight = path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES
        if not is_weight:
            report.files_checked += 1
            if not twin.is_file() or not filecmp.cmp(path, twin, shallow=False):
                report.problems.append(f"{relative} differs from the original")
    for component_dir in sorted(p for p in sanitized.iterdir() if p.is_dir()):
        if component_dir.name == PROVENANCE_DIR:
            continue
        component_masks = masks.get(component_dir.name, {})
        for weight_file in weight_files(component_dir):
            relative = weight_file.path.relative_to(sanitized)
            try:
                before = _original_state(source / component_dir.name, weight_file.path.name,
                                         allow_pickle)
            except FileNotFoundError:
                report.problems.append(f"{relative} has no counterpart in the original")
                continue
            after = read_state(weight_file.path)
            if before.keys() != after.keys():
                report.problems.append(f"{relative} holds other tensors than the original")
            for name in sorted(before.keys() & after.keys()):
                report.tensors_checked += 1
                expected = before[name]
                if name in component_masks:
                    report.edited_tensors += 1
                    report.zeroed += int(component_masks[name].sum())
                    expected = zero_masked(expected, component_masks[name])
                if not torch.equal(expected, after[name]):
                    what = ("is not the original with exactly the masked weights zeroed"
                            if name in component_masks else "was modified but is not masked")
                    report.problems.append(f"{relative}: {name} {what}")
    missing = set(subspace.masks) - {
        f"{c}/{n}" for c, names in masks.items() for n in names
        if (sanitized / c).is_dir()}
    report.problems += [f"{key}: component missing from the sanitized model" for key in missing]
    return report
