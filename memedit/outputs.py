"""Writing results safely: never into the source model, never over an existing output unless
asked, never a half-written folder (everything goes to a temporary sibling, then one rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from memedit.errors import MemeditError


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> Path:
    """Validate an output folder before any work starts; returns it resolved."""
    out = Path(out).expanduser().resolve()
    if source is not None:
        source = Path(source).resolve()
        if out == source or source in out.parents:
            raise MemeditError(
                f"The output {out} is inside the source model {source}.",
                "Write the output somewhere else: memedit never modifies or nests into the "
                "source model.",
            )
        if out in source.parents:
            raise MemeditError(
                f"The output {out} contains the source model {source}; --overwrite would "
                "delete it.",
                "Choose an output folder outside the source model's path.",
            )
    if out.exists() and not overwrite:
        raise MemeditError(f"The output {out} exists already.",
                           "Pass --overwrite to replace it, or choose another folder.")
    if out.exists() and not out.is_dir():
        raise MemeditError(f"The output {out} is a file.", "Choose a folder path.")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    # Probe by creating a folder: permission bits say nothing for root or read-only mounts.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".memedit-probe-", dir=parent))
    except OSError as err:
        raise MemeditError(f"Cannot write to {parent} ({err.strerror}).",
                           "Choose an output folder you can write to.") from None
    return out


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False,
                      source: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out`` in one rename.

    On any error (or Ctrl-C) the temporary folder is removed and ``out`` is left as it was.
    """
    out = check_output_dir(out, overwrite, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            # Move the old output aside first so that a failure here still leaves one of them.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write one file through a temporary sibling and a rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MemeditError(f"{path} exists already.", "Pass --overwrite to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
