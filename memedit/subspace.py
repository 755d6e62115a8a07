"""The located subspace as an artifact: boolean masks (safetensors) plus a JSON manifest.

The manifest records how the subspace was found (method and parameters, prompt-set hashes),
on which model (the sha256 of every tensor it edits, before and after zeroing, and
``model.identity``: one sha256 over the UNet's other tensors) and how big it is (per-layer and
total counts), so that a subspace can be audited, compared and re-applied.

Both files can be rewritten by whoever can write the folder that holds them: the manifest's
records catch a model edited behind the manifest's back, not a manifest rewritten to match.
:meth:`Subspace.digest` is the check that can live elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memedit.artifacts import FORMAT, FORMAT_VERSION, MANIFEST_FILE, MASKS_FILE, PROVENANCE_DIR
from memedit.errors import MemeditError
from memedit.loading import PICKLE_SUFFIXES
from memedit.outputs import atomic_output_dir
from memedit.weights import (
    by_component,
    file_keys,
    read_state,
    split_key,
    tensor_sha256,
    weight_files,
)

DIGEST_SCHEME = "memedit-subspace-digest-v1"
IDENTITY_COMPONENT = "unet"
IDENTITY_COVERS = (
    "sha256 over the sha256 of every tensor in unet/'s primary weight files as stored (name "
    "order), except the tensors this subspace edits, which model.tensors hashes before and "
    "after baking; baking leaves it unchanged. Other components are not covered.")
# Manifest sections that memedit reads as JSON objects wherever they are present.
_OBJECT_SECTIONS = ("method", "model", "prompts", "layers", "total")
_RESTORE_HINT = "Restore the subspace from the folder `memedit locate` wrote (or locate again)."


def model_identity(model_dir: Path, edited: Iterable[str], allow_pickle: bool = False) -> dict:
    """``model.identity`` of the pipeline folder ``model_dir``: see :data:`IDENTITY_COVERS`.

    Files are read one tensor at a time (safetensors) so that a 3.4 GB UNet is never held in
    memory; the per-tensor hashes are combined in name order, so resharding does not change it.
    """
    skip = {name for component, name in map(split_key, edited) if component == IDENTITY_COMPONENT}
    hashes: dict[str, str] = {}
    for weight_file in weight_files(Path(model_dir) / IDENTITY_COMPONENT, allow_pickle):
        if not weight_file.primary:
            continue
        path = weight_file.path
        names = [name for name in file_keys(path) if name not in skip]
        if path.suffix in PICKLE_SUFFIXES:
            state = read_state(path)
            hashes.update({name: tensor_sha256(state[name]) for name in names})
        else:
            with safe_open(str(path), "pt") as handle:
                hashes.update({name: tensor_sha256(handle.get_tensor(name)) for name in names})
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(f"{name}={hashes[name]};".encode())
    return {"covers": IDENTITY_COVERS, "tensors": len(hashes), "sha256": digest.hexdigest()}


def parameter(pipe, key: str) -> torch.nn.Parameter:
    """The parameter ``component/name`` of a loaded pipeline: how a mask key finds its weight."""
    component, name = split_key(key)
    try:
        return getattr(pipe, component).get_parameter(name)
    except AttributeError:
        raise MemeditError(f"The pipeline has no parameter {key}.",
                           "This subspace was located on a model of another layout.") from None


@dataclass
class Subspace:
    """Masks keyed ``component/parameter`` (True = zero this weight) and their manifest."""

    masks: dict[str, torch.Tensor]
    manifest: dict

    @property
    def num_selected(self) -> int:
        return sum(int(mask.sum()) for mask in self.masks.values())

    @property
    def num_weights(self) -> int:
        return sum(mask.numel() for mask in self.masks.values())

    def by_component(self) -> dict[str, dict[str, torch.Tensor]]:
        """The masks grouped by component, keyed by parameter name within it."""
        return by_component(self.masks)

    def check(self, pipe) -> None:
        """Raise unless every mask has a parameter of its shape in the loaded ``pipe``."""
        for key, mask in self.masks.items():
            param = parameter(pipe, key)
            if tuple(param.shape) != tuple(mask.shape):
                raise MemeditError(f"{key} has shape {tuple(param.shape)}, the subspace "
                                   f"{tuple(mask.shape)}.",
                                   "This subspace was located on another model.")

    def apply(self, pipe) -> int:
        """Zero the masked weights of a loaded pipeline in place; returns how many were
        masked."""
        self.check(pipe)
        for key, mask in self.masks.items():
            param = parameter(pipe, key)
            param.data.masked_fill_(mask.to(param.device), 0)
        return self.num_selected

    def layer_counts(self) -> dict[str, dict]:
        """Per edited tensor: selected count, total and fraction."""
        return {
            key: {"selected": int(mask.sum()), "total": mask.numel(),
                  "fraction": float(mask.sum()) / mask.numel()}
            for key, mask in self.masks.items()
        }

    def totals(self) -> dict:
        selected, total = self.num_selected, self.num_weights
        return {"selected": selected, "total": total,
                "fraction": selected / total if total else 0.0}

    def tensor_records(self) -> dict[str, dict]:
        """``model.tensors``: per edited tensor, its sha256 before and after baking."""
        return self.manifest.get("model", {}).get("tensors", {})

    def identity(self) -> dict | None:
        """``model.identity`` (see :func:`model_identity`), or None where none was recorded."""
        return self.manifest.get("model", {}).get("identity")

    def missing_hashes(self) -> list[str]:
        """The edited tensors whose sha256 before or after baking the manifest lacks."""
        records = self.tensor_records()
        return [key for key in self.masks
                if not all(isinstance(records.get(key, {}).get(field), str)
                           for field in ("sha256_before", "sha256_after"))]

    def check_manifest(self) -> tuple[list[str], list[str]]:
        """Compare the masks with the manifest's records of them.

        Returns ``(problems, gaps)``: where masks and manifest disagree (per-layer counts,
        total), and which records the manifest lacks (counts, tensor hashes).
        """
        problems: list[str] = []
        gaps = [f"the manifest records no sha256 before/after baking for {key}"
                for key in self.missing_hashes()]
        layers, total = self.manifest.get("layers"), self.manifest.get("total")
        if layers is None or total is None:
            return problems, [*gaps, "the manifest records no per-layer counts or total"]
        for key, counts in self.layer_counts().items():
            recorded = layers.get(key)
            if recorded is None:
                problems.append(f"{key} is masked but the manifest's layers do not list it")
            elif (recorded.get("selected"), recorded.get("total")) != (counts["selected"],
                                                                       counts["total"]):
                problems.append(
                    f"{key}: the mask selects {counts['selected']:,} of {counts['total']:,} "
                    f"weights, the manifest records {recorded.get('selected')} of "
                    f"{recorded.get('total')}")
        problems += [f"the manifest's layers list {key}, which has no mask"
                     for key in sorted(layers.keys() - self.masks.keys())]
        mine = self.totals()
        if (total.get("selected"), total.get("total")) != (mine["selected"], mine["total"]):
            problems.append(f"the masks select {mine['selected']:,} of {mine['total']:,} weights, "
                            f"the manifest's total records {total.get('selected')} of "
                            f"{total.get('total')}")
        return problems, gaps

    def digest(self) -> str:
        """sha256 of the masks and the manifest in canonical form, to keep outside the model
        folder (``memedit inspect --digest``) and check later (``--expect-digest``).

        Canonical: the masks' values and the manifest's content, not the files' bytes, so a
        re-saved or re-indented copy keeps its digest and any edit to either changes it.
        """
        digest = hashlib.sha256(f"{DIGEST_SCHEME}\n".encode())
        for key in sorted(self.masks):
            digest.update(f"{key}={tensor_sha256(self.masks[key].bool())}\n".encode())
        digest.update(json.dumps(self.manifest, sort_keys=True, separators=(",", ":"),
                                 ensure_ascii=False).encode())
        return digest.hexdigest()

    def differences(self, other: Subspace) -> list[str]:
        """What differs between two subspaces, masks first (empty: the same subspace)."""
        found = [f"{key} is masked in only one of them"
                 for key in sorted(self.masks.keys() ^ other.masks.keys())]
        for key in sorted(self.masks.keys() & other.masks.keys()):
            mine, theirs = self.masks[key], other.masks[key]
            if mine.shape != theirs.shape:
                found.append(f"{key}: masks of shape {tuple(mine.shape)} and "
                             f"{tuple(theirs.shape)}")
            elif not torch.equal(mine, theirs):
                found.append(f"{key}: {int((mine ^ theirs).sum()):,} mask bits differ")
        sections = sorted(name for name in self.manifest.keys() | other.manifest.keys()
                          if self.manifest.get(name) != other.manifest.get(name))
        if sections:
            found.append(f"the manifests differ in {', '.join(sections)}")
        return found

    def check_fields(self, fields: Iterable[str]) -> None:
        """Raise (naming them) if the manifest lacks any of the dotted ``fields``."""
        missing = []
        for field in fields:
            value: object = self.manifest
            for part in field.split("."):
                if not isinstance(value, dict) or part not in value:
                    missing.append(field)
                    break
                value = value[part]
        if missing:
            raise MemeditError(f"The subspace manifest lacks {', '.join(missing)}.", _RESTORE_HINT)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``masks.safetensors`` and ``subspace.json`` into a new folder, atomically."""
        with atomic_output_dir(folder, overwrite, kind="subspace") as tmp:
            self.write_into(tmp)
        return Path(folder)

    def write_into(self, folder: Path) -> None:
        """Write both files into an existing folder (used inside a baked model too)."""
        folder.mkdir(parents=True, exist_ok=True)
        masks = {key: mask.to(torch.uint8).cpu().contiguous() for key, mask in self.masks.items()}
        save_file(masks, str(folder / MASKS_FILE), metadata={"format": FORMAT})
        (folder / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: str | Path) -> Subspace:
        """Read a subspace folder (or a sanitized model folder, which carries one in memedit/)."""
        folder = Path(folder)
        if (folder / PROVENANCE_DIR / MANIFEST_FILE).is_file():
            folder = folder / PROVENANCE_DIR
        manifest_path, masks_path = folder / MANIFEST_FILE, folder / MASKS_FILE
        if not manifest_path.is_file() or not masks_path.is_file():
            raise MemeditError(
                f"{folder} is not a memedit subspace: it needs {MANIFEST_FILE} and {MASKS_FILE}.",
                "Pass the folder written by `memedit locate --out`, or a model baked by memedit.",
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise MemeditError(f"{manifest_path} is not valid JSON ({err.msg}).",
                               _RESTORE_HINT) from None
        except UnicodeDecodeError:
            raise MemeditError(f"{manifest_path} is not UTF-8 text.", _RESTORE_HINT) from None
        _check_manifest(manifest_path, manifest)
        try:
            with safe_open(str(masks_path), "pt") as handle:
                masks = {key: handle.get_tensor(key).bool() for key in handle.keys()}  # noqa: SIM118
        except SafetensorError as err:
            raise MemeditError(f"{masks_path} is not a readable safetensors file ({err}).",
                               _RESTORE_HINT) from None
        return cls(masks, manifest)


def _check_manifest(path: Path, manifest: object) -> None:
    """Refuse a manifest whose structure memedit cannot read: a message, not a traceback."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MemeditError(f"{path} is not a memedit subspace manifest (a JSON object with "
                           f'"format": "{FORMAT}").', "Pass a folder written by `memedit locate`.")
    version = manifest.get("format_version")
    if type(version) is not int:  # bool is an int subclass; a string compares with a TypeError
        raise MemeditError(f"{path}: format_version is {version!r}, not an integer.",
                           _RESTORE_HINT)
    if version > FORMAT_VERSION:
        raise MemeditError(f"{path.parent} was written by a newer memedit.",
                           "Upgrade memedit to read it.")
    model = manifest.get("model")
    sections = {name: manifest.get(name) for name in _OBJECT_SECTIONS}
    if isinstance(model, dict):
        sections |= {"model.tensors": model.get("tensors"), "model.identity": model.get("identity")}
    for name, value in sections.items():
        if value is not None and not isinstance(value, dict):
            raise MemeditError(f"{path}: {name} is a {type(value).__name__}, not an object.",
                               _RESTORE_HINT)
    for name in ("layers", "model.tensors"):
        if not all(isinstance(entry, dict) for entry in (sections.get(name) or {}).values()):
            raise MemeditError(f"{path}: an entry of {name} is not an object.", _RESTORE_HINT)


def apply_subspace(pipe, subspace: Subspace) -> int:
    """:meth:`Subspace.apply`: zero ``subspace`` in a loaded pipeline, in place."""
    return subspace.apply(pipe)
