"""memedit over several processes: ``accelerate launch`` (or ``torchrun``) of the same command.

Run without a launcher, memedit is one process and nothing here does any communication. Under
a launcher (``WORLD_SIZE`` > 1) accelerate's :class:`~accelerate.PartialState` joins the
processes (NCCL between GPUs, gloo on CPU) and sets each one's GPU, and the loops that sample
deal their batches out round-robin: process ``r`` runs batches ``r, r + W, r + 2W, ...`` with
exactly the batches, prompts and per-prompt seeds one process would use, and after every round
the results are gathered on every process in batch order. What follows the loop (summing
statistics, scoring images, selecting weights) then runs on identical data on every process, so
the result is the single-process result bit for bit: the same per-batch numbers, summed in the
same order. (Two machines of different kinds, or different thread settings, may round
differently in the UNet itself; that is the same on one process.)

Only the main process (rank 0) writes outputs and prints (see :mod:`memedit.outputs` and the
CLI). A process that fails or is killed makes the others fail at their next exchange with a
:class:`DistributedError`, before anything is written; a peer that hangs is given up after
:data:`TIMEOUT_ENV` seconds (default :data:`DEFAULT_TIMEOUT_S`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from memedit.errors import MemeditError

TIMEOUT_ENV = "MEMEDIT_DIST_TIMEOUT"
# Longest wait for a peer at one exchange: a round of batches, or the main process writing the
# outputs (baking a full-size model) while the others wait at the end.
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")
R = TypeVar("R")


class DistributedError(MemeditError):
    """Another process of the run failed, was killed, or did not answer within the timeout."""


class StoppedByLauncher(KeyboardInterrupt):
    """SIGTERM from the launcher, which ends every process of a run when one of them fails.

    A KeyboardInterrupt, as Ctrl-C: no library's ``except Exception`` swallows it on its way
    out, and every ``finally`` (removing partial outputs) runs."""


@dataclass(frozen=True)
class ProcessState:
    """Where this process stands in the run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_state: ProcessState | None = None


def launched() -> bool:
    """Whether a launcher started this process as one of several (it sets ``WORLD_SIZE``)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise MemeditError(f"WORLD_SIZE must be a whole number of processes (1 or more), got "
                           f"{text!r}.",
                           "Unset WORLD_SIZE to run as one process; `accelerate launch` or "
                           "`torchrun` set it for each process they start.")
    return world > 1


def collective_timeout() -> float:
    """Seconds an exchange waits for a peer (``MEMEDIT_DIST_TIMEOUT``)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise MemeditError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}.",
                           f"Unset it (default {DEFAULT_TIMEOUT_S:g} s) or set e.g. 300.")
    return value


def state() -> ProcessState:
    """This process's rank and the run's size; joins the launcher's process group on first
    use (``accelerate launch``, ``torchrun``), and is rank 0 of 1 otherwise."""
    global _state
    if _state is None:
        _state = _join() if launched() else ProcessState()
    return _state


def _join() -> ProcessState:
    import torch
    from accelerate import PartialState

    timeout = datetime.timedelta(seconds=collective_timeout())
    # accelerate picks NCCL and one GPU per process where CUDA is present; without it, gloo
    # must be asked for (cpu=True) or accelerate sees a single process.
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "True"
    try:
        accel = PartialState(cpu=cpu, timeout=timeout)
    except Exception as err:  # rendezvous failures come as several torch/OS error types
        raise DistributedError(
            f"Could not join the other processes of this run: {type(err).__name__}: {err}",
            "Check --main_process_ip/--main_process_port (a free port) and that every "
            "machine runs the same command.") from None
    joined = ProcessState(accel.process_index, accel.num_processes, accel.local_process_index)
    _stop_cleanly_on_sigterm(joined)
    return joined


def _stop_cleanly_on_sigterm(joined: ProcessState) -> None:
    """The launcher ends every process with SIGTERM when one fails: turn it into an error, so
    that partial outputs are removed and the process says why it stopped."""

    def stop(_signum, _frame) -> None:
        raise StoppedByLauncher(
            f"process {joined.rank} of {joined.world} was stopped by the launcher (SIGTERM), "
            "which ends every process when one of them fails; nothing was written. The "
            "failing process's own message names the cause; a rerun starts clean.")

    signal.signal(signal.SIGTERM, stop)


def default_device() -> str:
    """What ``--device auto`` means for this process: its own GPU under a launcher."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    current = state()
    return f"cuda:{current.local_rank % torch.cuda.device_count()}" if current.distributed \
        else "cuda"


NOTHING_WRITTEN = "Nothing was written."


@contextlib.contextmanager
def _exchange(what: str, outcome: str = NOTHING_WRITTEN) -> Iterator[None]:
    """Turn a failed exchange (a peer died, hung past the timeout) into one clear error;
    ``outcome`` says what this process had written by then."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as err:  # gloo/NCCL raise RuntimeError subclasses with long texts
        current = state()
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise DistributedError(
            f"Process {current.rank} of {current.world}: another process of this run failed, "
            f"was killed or did not answer within {collective_timeout():g} s ({what}: "
            f"{type(err).__name__}{': ' + detail if detail else ''}). {outcome}",
            "The failing process's own message names the cause; rerun when it is fixed (a "
            f"rerun starts clean). {TIMEOUT_ENV} sets the timeout.") from None


def all_gather(value: object) -> list:
    """Every process's ``value`` (any picklable object), in rank order."""
    current = state()
    if not current.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * current.world
    with _exchange("gathering results"):
        dist.all_gather_object(gathered, value)
    return gathered


def barrier(written: Sequence[object] | None = None) -> None:
    """Wait for every process (a no-op for one). ``written``: the outputs this process put in
    place before it (None: before any output), named in the error when a peer fails."""
    current = state()
    if not current.distributed:
        return
    import torch.distributed as dist

    with _exchange("waiting for the other processes", _outcome(current, written)):
        dist.barrier()


def _outcome(current: ProcessState, written: Sequence[object] | None) -> str:
    if written is None:
        return NOTHING_WRITTEN
    if written:
        return (f"This process had written {', '.join(map(str, written))}: check "
                f"{'it' if len(written) == 1 else 'them'} before use, or rerun.")
    if current.is_main:
        return NOTHING_WRITTEN
    return ("The main process may have written the outputs already: check them before use, "
            "or rerun.")


def ordered_map(fn: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[R, bool]]:
    """``(fn(item), computed_here)`` for every item, in item order, on every process.

    The items are dealt round-robin (item ``i`` runs on process ``i % W``), and each round's
    results are gathered before the next round starts, so a failed peer is noticed within one
    round and only a round's results are in flight. Consume the iterator to the end on every
    process: each round is an exchange all of them take part in.
    """
    current = state()
    if not current.distributed:
        for item in items:
            yield fn(item), True
        return
    for start in range(0, len(items), current.world):
        index = start + current.rank
        mine = fn(items[index]) if index < len(items) else None
        for offset, result in enumerate(all_gather(mine)[: len(items) - start]):
            yield result, offset == current.rank


def map_batches(fn: Callable[[list], R], batches: Sequence[list], progress=None) -> list[R]:
    """``[fn(batch) for batch in batches]``, shared out over the processes (see
    :func:`ordered_map`); ``progress`` (a tqdm bar) advances by each batch's length."""
    out = []
    for result, _ in ordered_map(fn, batches):
        out.append(result)
        if progress is not None:
            progress.update(len(batches[len(out) - 1]))
    return out


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Only the main process prints: the others' stdout and stderr (tables, progress bars,
    "Wrote ...") go nowhere for the block, and memedit's notices below warnings too. Errors
    raised out of it still print afterwards, on every process."""
    if state().is_main:
        yield
        return
    notices = logging.getLogger("memedit")
    level = notices.level
    notices.setLevel(max(level, logging.WARNING))
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            yield
    finally:
        notices.setLevel(level)
