"""The located subspace as an artifact: boolean masks (safetensors) plus a JSON manifest.

The manifest records how the subspace was found (method and parameters, prompt-set hashes),
on which model (the sha256 of every tensor it edits, before and after zeroing) and how big it
is (per-layer and total counts), so that a subspace can be audited, compared and re-applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memedit.errors import MemeditError
from memedit.outputs import atomic_output_dir

FORMAT = "memedit-subspace"
FORMAT_VERSION = 1
MASKS_FILE = "masks.safetensors"
MANIFEST_FILE = "subspace.json"


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
        if (folder / "memedit" / MANIFEST_FILE).is_file():
            folder = folder / "memedit"
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
                               "Restore the file from the original subspace.") from None
        if manifest.get("format") != FORMAT:
            raise MemeditError(f"{manifest_path} is not a memedit subspace manifest.",
                               "Pass a folder written by `memedit locate`.")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise MemeditError(f"{folder} was written by a newer memedit.",
                               "Upgrade memedit to read it.")
        with safe_open(str(masks_path), "pt") as handle:
            masks = {key: handle.get_tensor(key).bool() for key in handle.keys()}  # noqa: SIM118
        return cls(masks, manifest)
