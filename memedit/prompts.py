"""Prompt sets: plain text, JSONL (Wen et al.'s format) and CSV, read strictly.

A prompt file may name training images per prompt (a JSONL ``image``/``images`` field or a CSV
``image`` column, paths relative to the file); evaluation compares generations with them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memedit.errors import MemeditError

PROMPT_FIELDS = ("prompt", "caption", "text")
IMAGE_FIELDS = ("image", "images", "image_path", "image_paths", "gt", "ground_truth")
# CLIP reads 77 tokens (a few hundred characters); a prompt this long is a broken file (lost
# line breaks, a binary pasted in), not a prompt.
MAX_PROMPT_CHARS = 100_000
CSV_DELIMITERS = {",": "comma ','", ";": "semicolon ';'", "\t": "tab", "|": "pipe '|'"}
# Enough lines for csv.Sniffer to see a consistent field count, without reading a big file twice.
_SNIFF_CHARS = 64 * 1024
# pandas writes its index as an unnamed first column ("" or, once read back, "Unnamed: 0").
_INDEX_COLUMN = re.compile(r"(unnamed: \d+)?")
# The loggers that warn about prompts over the tokenizer's limit: transformers' tokenizer (the
# lengths) and diffusers' pipelines (they quote the whole truncated text, once per batch).
TOKENIZER_LOGGERS = ("transformers.tokenization_utils_base", "diffusers.pipelines")

_log = logging.getLogger(__name__)


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

    def describe(self) -> str:
        """One line for the user, e.g. ``12 prompts from mem.jsonl`` or ``1 prompt (reference)``."""
        count = f"{len(self)} prompt{'' if len(self) == 1 else 's'}"
        return f"{count} from {self.source}" if self.source else f"{count} ({self.name})"

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], name: str = "prompts") -> PromptSet:
        return cls(name=name, records=tuple(PromptRecord(p) for p in prompts))

    def subset(self, indices: Sequence[int], name: str | None = None) -> PromptSet:
        return PromptSet(name or self.name, tuple(self.records[i] for i in indices), self.source)


def empty_reference(count: int) -> PromptSet:
    """The authors' default reference set: the empty prompt, once per memorized prompt."""
    return PromptSet.from_prompts([""] * count, name="empty-prompt")


@contextlib.contextmanager
def quiet_tokenizer_warnings() -> Iterator[None]:
    """Hide the warnings about prompts longer than the tokenizer's limit while the block runs.

    Such prompts are legal (CLIP keeps the first 77 tokens) but diffusers quotes everything it
    cut, once per batch: a long prompt would flood stderr. The loggers are lowered whole, so
    their other warnings are hidden too: wrap the sampling calls only, not model loading. Errors
    still show; the levels are restored on exit.
    """
    loggers = [logging.getLogger(name) for name in TOKENIZER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def read_prompts(path: str | Path, name: str | None = None) -> PromptSet:
    """Read a prompt file: ``.jsonl``, ``.csv``/``.tsv``, or anything else as one prompt a line.

    Blank lines separate prompts in a text file; anywhere else an empty prompt, a prompt that
    is not a string or one over ``MAX_PROMPT_CHARS`` raises MemeditError naming the line.
    """
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
        records = _read_csv(text, path, default_delimiter="\t" if suffix == ".tsv" else ",")
    else:
        records = [
            PromptRecord(_checked(line, number, path))
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    if not records:
        raise MemeditError(
            f"Prompt file {path} holds no prompt: every line is blank.",
            "Write one prompt a line; the reference set defaults to the empty prompt already.",
        )
    prompts = PromptSet(name or path.stem, tuple(records), str(path))
    _log.info("%s", prompts.describe())
    return prompts


def _checked(value: object, number: int, path: Path, column: str = "prompt") -> str:
    """``value`` as a prompt (stripped), or MemeditError naming line ``number`` and the cause."""
    if not isinstance(value, str):
        kind = ("null" if value is None else "a boolean" if isinstance(value, bool)
                else "a number" if isinstance(value, int | float)
                else "a list" if isinstance(value, list) else "an object")
        raise MemeditError(
            f"{path}, line {number}: the {column} is {kind}, not a string.",
            'Write the prompt as a JSON string, e.g. {"prompt": "a red cat"}.',
        )
    prompt = value.strip()
    if not prompt:
        raise MemeditError(
            f"{path}, line {number}: the {column} is empty.",
            "Write the prompt or delete the line; the empty prompt is the default reference set "
            "and need not be listed.",
        )
    if len(prompt) > MAX_PROMPT_CHARS:
        raise MemeditError(
            f"{path}, line {number}: the {column} is {len(prompt):,} characters long "
            f"(at most {MAX_PROMPT_CHARS:,} are accepted).",
            "Prompts are truncated to 77 tokens anyway; check that the file's line breaks "
            "survived, or shorten the prompt.",
        )
    return prompt


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
        key = next((k for k in PROMPT_FIELDS if k in row), None)
        if key is None:
            raise MemeditError(
                f"{path}, line {number}: no prompt field among the keys {sorted(row)} "
                f"(looked for {', '.join(PROMPT_FIELDS)}).",
                "Name the prompt field `prompt` or `caption` (lower case).",
            )
        prompt = _checked(row[key], number, path, column=f"`{key}` field")
        extra = {k: v for k, v in row.items() if k not in PROMPT_FIELDS + IMAGE_FIELDS}
        records.append(PromptRecord(prompt, _images_of(row, path.parent), extra))
    return records


def _sniff_delimiter(text: str, default: str) -> str:
    """The delimiter among ``CSV_DELIMITERS`` that gives a prompt column, else ``default``.

    csv.Sniffer alone is not enough: in a one-column file of prompts that all hold a ';' it
    finds ';', which would cut every prompt short. A sniffed delimiter is kept only if the
    sample read with it has a prompt column and no row wider than the header.
    """
    sample = text[:_SNIFF_CHARS]
    if len(text) > len(sample) and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # whole lines only
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters="".join(CSV_DELIMITERS)).delimiter
    except csv.Error:
        return default
    if sniffed == default or _fits(sample, sniffed) or not _fits(sample, default):
        return sniffed
    return default


def _fits(sample: str, delimiter: str) -> bool:
    rows = [r for r in csv.reader(io.StringIO(sample), delimiter=delimiter) if r]
    return bool(rows) and _prompt_column(rows[0]) is not None and all(
        len(r) <= len(rows[0]) for r in rows[1:]
    )


def _prompt_column(header: list[str]) -> int | None:
    names = [name.strip().lower() for name in header]
    return next((names.index(f) for f in PROMPT_FIELDS if f in names), None)


def _read_csv(text: str, path: Path, default_delimiter: str) -> list[PromptRecord]:
    delimiter = _sniff_delimiter(text, default_delimiter)
    used = f"read with the {CSV_DELIMITERS[delimiter]} delimiter"
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header: list[str] | None = None
    records = []
    start = 1
    try:
        for fields in reader:
            # csv.reader yields [] for a blank line, so the next record starts one line later.
            number, start = start, reader.line_num + 1
            if not fields:
                continue
            if header is None:
                header = _csv_header(fields, number, path, used)
                column = _prompt_column(header)
                continue
            if len(fields) > len(header):
                raise MemeditError(
                    f"{path}, line {number}: {len(fields)} fields under a header of "
                    f"{len(header)} ({used}).",
                    "Quote the prompts that contain the delimiter, e.g. \"a cat, sitting\".",
                )
            row = dict(zip(header, fields, strict=False))
            cell = fields[column] if column < len(fields) else ""
            prompt = _checked(cell, number, path, column=f"`{header[column]}` cell")
            extra = {k: v for k, v in row.items()
                     if k not in PROMPT_FIELDS + IMAGE_FIELDS and not _INDEX_COLUMN.fullmatch(k)}
            records.append(PromptRecord(prompt, _images_of(row, path.parent), extra))
    except csv.Error as err:
        raise MemeditError(
            f"{path}, line {start}: not valid CSV ({err}; {used}).",
            "Check the quoting and that the file's line breaks survived; a cell too long for "
            "the csv module is no prompt anyway: prompts are truncated to 77 tokens.",
        ) from None
    if header is None:
        raise MemeditError(
            f"Prompt file {path} holds no prompt: every line is blank.",
            "Write a header row with a `prompt` column, then one prompt a row.",
        )
    if not records:
        raise MemeditError(
            f"Prompt file {path} holds no prompt: the header {header} has no rows under it.",
            "Write one prompt a row under the header.",
        )
    return records


def _csv_header(fields: list[str], number: int, path: Path, used: str) -> list[str]:
    """The header's column names, stripped and lower-cased; MemeditError without a prompt one."""
    header = [name.strip().lower() for name in fields]
    named = [name for name in header if name]
    if len(set(named)) < len(named):
        raise MemeditError(
            f"{path}, line {number}: the header {fields} names a column twice "
            "(names are compared ignoring case and spaces).",
            "Rename or delete the duplicate column.",
        )
    if _prompt_column(header) is None:
        raise MemeditError(
            f"{path}, line {number}: no prompt column among the columns {fields} ({used}).",
            f"Name the prompt column one of {', '.join(PROMPT_FIELDS)} (any case); the "
            f"delimiter is guessed among {', '.join(CSV_DELIMITERS.values())}.",
        )
    return header
