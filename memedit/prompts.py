"""Prompt sets: plain text, JSONL (Wen et al.'s format) and CSV, read strictly.

A prompt file may name training images per prompt (a JSONL ``image``/``images`` field or a CSV
``image`` column, paths relative to the file); evaluation compares generations with them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memedit.errors import MemeditError

PROMPT_FIELDS = ("prompt", "caption", "text")
IMAGE_FIELDS = ("image", "images", "image_path", "image_paths", "gt", "ground_truth")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, with the training images it is known to reproduce (if any) and extra fields."""

    prompt: str
    images: tuple[Path, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class PromptSet:
    """An ordered list of prompts with where they came from."""

    name: str
    records: tuple[PromptRecord, ...]
    source: str | None = None

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sha256(self) -> str:
        """Hash of the prompts in order (not of the file), recorded in every manifest."""
        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(prompt.encode("utf-8") + b"\n")
        return digest.hexdigest()

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], name: str = "prompts") -> PromptSet:
        return cls(name=name, records=tuple(PromptRecord(p) for p in prompts))

    def subset(self, indices: Sequence[int], name: str | None = None) -> PromptSet:
        return PromptSet(name or self.name, tuple(self.records[i] for i in indices), self.source)


def empty_reference(count: int) -> PromptSet:
    """The authors' default reference set: the empty prompt, once per memorized prompt."""
    return PromptSet.from_prompts([""] * count, name="empty-prompt")


def read_prompts(path: str | Path, name: str | None = None) -> PromptSet:
    """Read a prompt file: ``.jsonl``, ``.csv``/``.tsv``, or anything else as one prompt a line."""
    path = Path(path)
    if not path.exists():
        raise MemeditError(f"Prompt file {path} does not exist.", "Check the path you passed.")
    if path.is_dir():
        raise MemeditError(f"Prompt file {path} is a folder.", "Pass a .txt, .jsonl or .csv file.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MemeditError(
            f"Prompt file {path} is not UTF-8 text (byte {err.start} is invalid).",
            "Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`.",
        ) from None
    if not text:
        raise MemeditError(
            f"Prompt file {path} is empty.", "Write one prompt a line (or JSONL/CSV)."
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(text, path)
    elif suffix in (".csv", ".tsv"):
        records = _read_csv(text, path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        records = [PromptRecord(line.strip()) for line in text.splitlines() if line.strip()]
    if not records or all(not r.prompt.strip() for r in records):
        raise MemeditError(
            f"Prompt file {path} holds no prompt: every line is blank.",
            "Write one prompt a line; the reference set defaults to the empty prompt already.",
        )
    return PromptSet(name or path.stem, tuple(records), str(path))


def _prompt_of(row: dict, where: str, path: Path) -> str:
    for key in PROMPT_FIELDS:
        if key in row and row[key] is not None:
            return str(row[key]).strip()
    raise MemeditError(
        f"{path}, {where}: no prompt field (looked for {', '.join(PROMPT_FIELDS)}).",
        "Name the prompt field `prompt` or `caption`.",
    )


def _images_of(row: dict, base: Path) -> tuple[Path, ...]:
    for key in IMAGE_FIELDS:
        value = row.get(key)
        if value in (None, ""):
            continue
        values = value if isinstance(value, list) else str(value).split("|")
        return tuple((base / str(v).strip()) for v in values if str(v).strip())
    return ()


def _read_jsonl(text: str, path: Path) -> list[PromptRecord]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MemeditError(
                f"{path}, line {number}: not valid JSON ({err.msg}).",
                "Each line of a .jsonl file must be one JSON object.",
            ) from None
        if not isinstance(row, dict):
            raise MemeditError(
                f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.",
                'Write objects such as {"prompt": "..."}.',
            )
        prompt = _prompt_of(row, f"line {number}", path)
        extra = {k: v for k, v in row.items() if k not in PROMPT_FIELDS + IMAGE_FIELDS}
        records.append(PromptRecord(prompt, _images_of(row, path.parent), extra))
    return records


def _read_csv(text: str, path: Path, delimiter: str) -> list[PromptRecord]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    if not any(c in PROMPT_FIELDS for c in columns):
        raise MemeditError(
            f"{path}: no prompt column in the header {reader.fieldnames}.",
            "Add a header row with a `prompt` (or `caption`) column.",
        )
    records = []
    for number, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): v for k, v in raw.items()}
        prompt = _prompt_of(row, f"row {number}", path)
        extra = {k: v for k, v in row.items() if k not in PROMPT_FIELDS + IMAGE_FIELDS}
        records.append(PromptRecord(prompt, _images_of(row, path.parent), extra))
    return records
