"""Activation statistics of one prompt set: per layer and UNet call, the column sums of squares
of the row-normalised FFN inputs. They are sums, so runs over other prompts (or on other
machines) merge by addition; they are saved as safetensors with their settings."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from memedit.errors import MemeditError
from memedit.outputs import Inputs, atomic_write_bytes, check_output, input_paths

FORMAT = "memedit-activation-stats"


def _metadata_sorted(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its metadata keys in sorted order, so that the same
    statistics give the same bytes: safetensors (0.8) writes them from a hash map, in a
    different order each run, and has no option to sort them. The header is the same JSON
    reordered (the same length, padding kept); tensors and their offsets are untouched."""
    length = int.from_bytes(data[:8], "little")
    text = data[8:8 + length].decode()
    header = json.loads(text)
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    if json.dumps(header, **compact) != text.rstrip(" "):
        return data  # not the compact JSON safetensors writes: leave the file as it is
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    ordered = json.dumps(header, **compact).encode().ljust(length)
    return data[:8] + ordered + data[8 + length:]


@dataclass
class ActivationStats:
    """Column sums of squares for one prompt set.

    ``sumsq[layer_key]`` has shape [calls, in_features]. ``settings`` (model, sampling,
    targets) must agree for two statistics to be merged; ``prompt_sets`` lists the
    (name, count, sha256) of every prompt set summed in.
    """

    sumsq: dict[str, torch.Tensor]
    num_prompts: int
    settings: dict
    prompt_sets: list[dict] = field(default_factory=list)

    def column_norms(self) -> dict[str, torch.Tensor]:
        """a[t, j] = sqrt(sum of squares / number of prompts).

        Dividing by the prompt count makes sets of different sizes comparable; with equal
        counts (the authors' setting) it scales both sets alike and changes no selection.
        """
        return {key: (value / max(self.num_prompts, 1)).sqrt() for key, value in self.sumsq.items()}

    def merge(self, other: ActivationStats) -> ActivationStats:
        """The statistics of both prompt sets together (exact: sums add)."""
        if self.settings != other.settings:
            diff = sorted(k for k in set(self.settings) | set(other.settings)
                          if self.settings.get(k) != other.settings.get(k))
            raise MemeditError(
                f"These statistics were recorded with different settings ({', '.join(diff)}).",
                "Only statistics of the same model, sampler and targets can be merged.",
            )
        twice = {s["sha256"] for s in self.prompt_sets} & {s["sha256"] for s in other.prompt_sets}
        if twice:
            names = sorted(s["name"] for s in other.prompt_sets if s["sha256"] in twice)
            raise MemeditError(
                f"The prompt set {', '.join(names)} is in more than one of these statistics; "
                "merging would count its prompts twice.",
                "Pass each file once. Two recordings of the same prompts (such as the "
                "empty-prompt reference recorded by every shard) hold the same statistics: "
                "use one of them.")
        if self.sumsq.keys() != other.sumsq.keys():
            raise MemeditError("These statistics cover different layers.",
                               "Record both with the same --targets.")
        return ActivationStats(
            {key: self.sumsq[key] + other.sumsq[key].to(self.sumsq[key].device)
             for key in self.sumsq},
            self.num_prompts + other.num_prompts,
            dict(self.settings),
            self.prompt_sets + other.prompt_sets,
        )

    def save(self, path: str | Path, overwrite: bool = False, inputs: Inputs = None) -> Path:
        """Write one ``.stats.safetensors`` file atomically (``inputs``: paths it must spare)."""
        path = Path(path)
        metadata = {
            "format": FORMAT,
            "num_prompts": str(self.num_prompts),
            "settings": json.dumps(self.settings, sort_keys=True),
            "prompt_sets": json.dumps(self.prompt_sets),
        }
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.sumsq.items()}
        atomic_write_bytes(path, _metadata_sorted(save(tensors, metadata=metadata)), overwrite,
                           inputs)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        path = Path(path)
        if not path.is_file():
            raise MemeditError(f"Statistics file {path} does not exist.",
                               "Pass a file written by `memedit locate --save-stats`.")
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types
            raise MemeditError(f"{path} is not a safetensors file: {err}",
                               "Pass a file written by `memedit locate --save-stats`.") from None
        if metadata.get("format") != FORMAT:
            raise MemeditError(f"{path} is not a memedit statistics file.",
                               "Pass a file written by `memedit locate --save-stats`.")
        return cls(tensors, int(metadata["num_prompts"]), json.loads(metadata["settings"]),
                   json.loads(metadata["prompt_sets"]))


StatsInput = ActivationStats | str | os.PathLike


def stats_files(stats: StatsInput | Sequence[StatsInput] | None) -> list[str | os.PathLike]:
    """The files among ``stats`` (the rest are loaded statistics)."""
    if stats is None:
        return []
    items = [stats] if isinstance(stats, ActivationStats | str | os.PathLike) else list(stats)
    return [item for item in items if not isinstance(item, ActivationStats)]


def merge_stats(stats: StatsInput | Sequence[StatsInput], out: str | os.PathLike | None = None,
                overwrite: bool = False, inputs: Inputs = None) -> ActivationStats:
    """Merge statistics of the same model and settings (loaded ones, or files ``locate
    --save-stats`` wrote), as ``memedit merge-stats`` does; with ``out``, the merged file is
    written there under the output policy (``inputs``: further paths it must spare)."""
    items = [stats] if isinstance(stats, ActivationStats | str | os.PathLike) else list(stats)
    if not items:
        raise MemeditError("No statistics were given.", "Pass at least one statistics file.")
    protected = [*stats_files(items), *input_paths(inputs)]
    if out is not None:
        check_output(out, overwrite, protected, kind="file")  # before reading them
    loaded = [item if isinstance(item, ActivationStats) else ActivationStats.load(item)
              for item in items]
    merged = loaded[0]
    for other in loaded[1:]:
        merged = merged.merge(other)
    if out is not None:
        merged.save(out, overwrite, protected)
    return merged
