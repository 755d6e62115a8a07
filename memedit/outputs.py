"""Where memedit writes, and how: one output policy for every command.

- An output may not be, contain, or lie inside any input (model, subspace, statistics, prompt
  files, training images): replacing it would destroy what the run reads.
- An existing output is replaced only with ``overwrite`` and only if memedit wrote it (it
  carries :data:`MARKER_FILE`); anything else is refused with the reason, even with
  ``--overwrite``: memedit never deletes a folder it did not make.
- A target is locked (``flock`` on a sibling lock file) from the first check to the final
  rename, so a second writer is refused at once instead of racing the first.
- Everything is written into a temporary sibling (``.NAME.partial-*``) and moved into place
  in one rename. A run that is killed leaves that sibling behind; the next run into the same
  place names it and removes it (holding the lock proves its writer is gone).
- Files and folders get the modes the umask gives, as any other tool's output would.
- Under a launcher (``accelerate launch``, see :mod:`memedit.distributed`) only the main
  process checks, locks and writes; the others' writes go to a private scratch folder that is
  removed (or, for single files, nowhere). The path these calls hand back is where the main
  process writes: no process may read an output back from it (commands print what the API
  call returns), since on the others it does not exist, or not yet.
- A full disk or an unwritable path is a :class:`MemeditError` that names the path (and the
  free space), not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from memedit import distributed
from memedit.errors import MemeditError

MARKER_FILE = ".memedit-output.json"
PARTIAL = "partial"  # .NAME.partial-XXXX: a run's output being written
PREVIOUS = "old"  # .NAME.old-XXXX/NAME: the output being replaced, during the swap

log = logging.getLogger("memedit")

# The outputs put in place during each open recorded_writes() block, innermost last.
_recordings: list[list[Path]] = []

Inputs = Path | str | Iterable[Path | str] | None


def _absolute(path: Path | str) -> Path:
    """An absolute path with symlinks resolved (what the file system really touches)."""
    return Path(path).expanduser().resolve()


def input_paths(inputs: Inputs) -> list[Path]:
    if inputs is None:
        return []
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    return [_absolute(p) for p in inputs if p is not None]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path, is_dir: bool) -> None:
    """Give a file made by ``tempfile`` (0700/0600) the mode the user's umask asks for."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _apply_umask_tree(folder: Path) -> None:
    """Libraries write some files 0600 (safetensors does): give the whole output the modes
    the umask asks for, as any other tool's output would have. Executable bits are kept."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def written_by_memedit(folder: Path) -> dict | None:
    """The marker memedit leaves in every folder it writes, or None."""
    marker = Path(folder) / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("writer") == "memedit" else None


def check_not_an_input(out: Path, inputs: Inputs) -> None:
    """Refuse an output that is, contains, or lies inside one of ``inputs``."""
    for source in input_paths(inputs):
        if out == source:
            raise MemeditError(f"The output {out} is one of this run's inputs.",
                               "Write the output somewhere else: memedit never modifies or "
                               "replaces what it reads.")
        if source in out.parents:
            raise MemeditError(f"The output {out} is inside the input {source}.",
                               "Write the output somewhere else: memedit never modifies or "
                               "nests into what it reads.")
        if out in source.parents:
            raise MemeditError(f"The output {out} contains the input {source}; replacing it "
                               "would delete that input.",
                               "Choose an output path that holds none of the inputs.")


def _probe_writable(out: Path) -> None:
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    # Probe by creating a folder: permission bits say nothing for root or read-only mounts.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".memedit-probe-", dir=parent))
    except OSError as err:
        raise MemeditError(f"Cannot write to {parent} ({err.strerror}).",
                           "Choose an output location you can write to.") from None


def check_output(out: Path | str, overwrite: bool = False, inputs: Inputs = None,
                 kind: str = "folder") -> Path:
    """Validate an output (``kind`` folder or file) before any work starts; returns it absolute.

    Call it for every output a run will write, before the long work: an output that cannot
    be written must not cost the user a locate.
    """
    given = Path(out).expanduser()
    if not distributed.state().is_main:
        return _absolute(given)  # the main process checks, and is the only one to write
    if given.is_symlink():
        raise MemeditError(f"The output {given} is a symbolic link.",
                           "Pass the real path: memedit does not write through links.")
    out = _absolute(given)
    check_not_an_input(out, inputs)
    if out.exists():
        if kind == "folder" and not out.is_dir():
            raise MemeditError(f"The output {out} is a file.", "Choose a folder path.")
        if kind == "file" and out.is_dir():
            raise MemeditError(f"The output {out} is a folder.", "Choose a file path.")
        if not overwrite:
            raise MemeditError(f"The output {out} exists already.",
                               "Pass --overwrite to replace it, or choose another path.")
        if kind == "folder" and written_by_memedit(out) is None:
            raise MemeditError(
                f"The output {out} exists and was not written by memedit (it has no "
                f"{MARKER_FILE}); --overwrite only replaces memedit's own outputs.",
                "Choose a new folder, or remove this one yourself if you mean to replace it.")
    _probe_writable(out)
    return out


# ------------------------------------------------------------------------------------ locks

_held: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth): reentrant per process


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.memedit-lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``out``; a second holder (another run) is refused at once."""
    path = _lock_path(out)
    if path in _held:
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[path]
            _held[path] = (fd, depth - 1)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise MemeditError(
                f"Another memedit run ({holder}) is writing {out} right now.",
                "Wait for it to finish, or write to another path.") from None
        # The previous holder unlinks the file before unlocking; a lock taken on an unlinked
        # file guards nothing, so take it again on the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
    _held[path] = (fd, 0)
    try:
        _recover_interrupted(out)
        yield
    finally:
        del _held[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _recover_interrupted(out: Path) -> None:
    """Clean up after a run into ``out`` that was killed (only called under the lock)."""
    for previous in sorted(out.parent.glob(f".{out.name}.{PREVIOUS}-*")):
        kept = previous / out.name
        if kept.is_dir() and not out.exists():
            # Killed between moving the old output aside and moving the new one in.
            os.replace(kept, out)
            log.warning("restored %s, which an interrupted run had moved aside", out)
        shutil.rmtree(previous, ignore_errors=True)
    for partial in sorted(out.parent.glob(f".{out.name}.{PARTIAL}-*")):
        size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file()) \
            if partial.is_dir() else partial.stat().st_size
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        log.warning("removed %s (%.1f MB), left by an interrupted run", partial, size / 2**20)


@contextlib.contextmanager
def hold_output(out: Path | str, overwrite: bool = False, inputs: Inputs = None,
                kind: str = "folder") -> Iterator[Path]:
    """Check ``out`` and keep it locked for the whole run (the writes re-enter the lock)."""
    resolved = check_output(out, overwrite, inputs, kind)
    if not distributed.state().is_main:
        yield resolved
        return
    with output_lock(resolved):
        yield resolved


# ----------------------------------------------------------------------------------- writes


@contextlib.contextmanager
def recorded_writes() -> Iterator[list[Path]]:
    """The outputs this process puts in place during the block, in order (the end-of-run
    message of a launched run names them when a peer fails after they were written)."""
    written: list[Path] = []
    _recordings.append(written)
    try:
        yield written
    finally:
        _recordings.remove(written)


def _record(out: Path) -> None:
    for written in _recordings:
        written.append(out)


def _no_space_or_permission(err: OSError, out: Path) -> MemeditError | None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        parent = out.parent if out.parent.exists() else Path(out.anchor)
        free = shutil.disk_usage(parent).free
        return MemeditError(f"No space left while writing {out} ({free / 2**20:.0f} MB free "
                            f"on that file system).",
                            "Free some space or write to another disk; nothing was written.")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MemeditError(f"Cannot write {out} ({err.strerror}).",
                            "Choose an output location you can write to; nothing was written.")
    return None


def _marker(kind: str) -> bytes:
    from memedit import __version__

    return json.dumps({"writer": "memedit", "version": __version__, "kind": kind},
                      indent=2).encode()


@contextlib.contextmanager
def atomic_output_dir(out: Path | str, overwrite: bool = False, inputs: Inputs = None,
                      kind: str = "output") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out`` in one rename.

    On any error (or Ctrl-C) the temporary folder is removed and ``out`` is left as it was.
    ``kind`` is recorded in the marker (``subspace``, ``sanitized-model``, ...).
    """
    out = check_output(out, overwrite, inputs)
    if not distributed.state().is_main:
        # The other processes of a launched run compute the same output and may read back
        # what they wrote (the attack's control images): a private scratch folder, dropped.
        scratch = Path(tempfile.mkdtemp(prefix=f"memedit-rank{distributed.state().rank}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    with output_lock(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{PARTIAL}-", dir=out.parent))
        try:
            yield tmp
            (tmp / MARKER_FILE).write_bytes(_marker(kind))
            _apply_umask_tree(tmp)
            # Under the lock no memedit run can have written ``out`` meanwhile, but another
            # program may have: the same rules apply at the moment of replacing.
            check_output(out, overwrite, inputs)
            if out.exists():
                # Move the old output aside first so that a failure here still leaves one.
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{PREVIOUS}-", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
            _record(out)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError) and (friendly := _no_space_or_permission(err, out)):
                raise friendly from None
            raise


def atomic_write_bytes(path: Path | str, data: bytes, overwrite: bool = False,
                       inputs: Inputs = None) -> Path:
    """Write one file through a temporary sibling and a rename, under the output policy."""
    path = check_output(path, overwrite, inputs, kind="file")
    if not distributed.state().is_main:
        return path  # written once, by the main process
    with output_lock(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{PARTIAL}-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            apply_umask(Path(tmp), is_dir=False)
            check_output(path, overwrite, inputs, kind="file")
            os.replace(tmp, path)
            _record(path)
        except BaseException as err:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(err, OSError) and (friendly := _no_space_or_permission(err, path)):
                raise friendly from None
            raise
    return path
