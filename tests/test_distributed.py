"""memedit under a launcher: two CPU processes (gloo) give the one-process result, only the main
process writes, and a process that dies takes the run down with a message and no output.

The end-to-end tests launch the real CLI with `accelerate launch` (torchrun underneath) on the
embedded model, one thread per process, offline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from memedit import distributed
from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.outputs import atomic_output_dir, atomic_write_bytes, check_output, hold_output
from memedit.sampling import SamplingConfig, generate_images
from memedit.subspace import Subspace
from memedit.testbed import prompt_file

LOCATE = ["--steps", "4", "--tau", "2", "--k", "0.05", "--batch-size", "2"]
TIMEOUT_S = 60  # MEMEDIT_DIST_TIMEOUT in these tests


# ------------------------------------------------------------------------ one process


def test_one_process_needs_no_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "_state", None)
    current = distributed.state()
    assert (current.rank, current.world, current.is_main, current.distributed) == \
        (0, 1, True, False)
    assert distributed.all_gather("x") == ["x"]
    distributed.barrier()
    assert list(distributed.ordered_map(lambda v: v * 2, [1, 2, 3])) == \
        [(2, True), (4, True), (6, True)]


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_bad_timeout_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    with pytest.raises(MemeditError, match=distributed.TIMEOUT_ENV):
        distributed.collective_timeout()


@pytest.mark.parametrize("value", ["two", "0", "", "-1"])
def test_malformed_world_size_is_a_user_error(monkeypatch, tmp_path, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    monkeypatch.setattr(distributed, "_state", None)
    with pytest.raises(MemeditError, match="WORLD_SIZE"):
        distributed.state()
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "WORLD_SIZE" in result.output, result.output


def test_timeout_default_and_override(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.collective_timeout() == 12.5


def test_other_processes_never_write(monkeypatch, tmp_path):
    """Rank 1 of 2: no check (the main process does it), no lock, nothing in place; what it
    writes into an output folder lands in a scratch folder that is removed afterwards."""
    monkeypatch.setattr(distributed, "_state", distributed.ProcessState(1, 2, 1))
    existing = tmp_path / "existing"
    existing.mkdir()
    assert check_output(existing) == existing.resolve()  # rank 0 would refuse it
    with hold_output(tmp_path / "held") as held:
        assert held == (tmp_path / "held").resolve()
    with atomic_output_dir(tmp_path / "out") as folder:
        (folder / "report.json").write_text("{}")
        assert tmp_path not in folder.parents
    assert not folder.exists()
    assert atomic_write_bytes(tmp_path / "file.json", b"{}") == tmp_path / "file.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def _as_other_process(monkeypatch) -> None:
    """This process as one that is not the main one, its exchanges all local (a run of one):
    what it writes goes nowhere, so any read of an output back from disk fails."""
    monkeypatch.setattr(distributed, "_state", distributed.ProcessState(1, 1, 0))


def test_other_processes_read_no_output_back(monkeypatch, tmp_path):
    """The command's output is the API call's return value, not what the main process wrote
    (it may not exist yet): `attack` on another process succeeds and writes nothing."""
    _as_other_process(monkeypatch)
    result = CliRunner().invoke(cli, ["attack", "--steps", "2", "--attack-steps", "1",
                                      "--pairs", "1", "--seeds", "1", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []


def test_other_processes_do_not_bake(monkeypatch, tmp_path):
    """Baking copies and rewrites the whole model: only the main process does it."""
    from memedit import baking

    subspace = Subspace.load(_testbed_subspace(tmp_path))
    _as_other_process(monkeypatch)

    def no_copy(*_args) -> None:
        raise AssertionError("another process copied the model")

    monkeypatch.setattr(baking, "_copy_tree", no_copy)
    monkeypatch.setattr(baking, "read_tensors", no_copy)
    assert baking.bake(None, subspace, tmp_path / "baked") is None
    result = CliRunner().invoke(cli, ["bake", "--subspace", str(tmp_path / "subspace"),
                                      "--out", str(tmp_path / "baked")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subspace"]


def _testbed_subspace(tmp_path: Path) -> Path:
    out = tmp_path / "subspace"
    result = CliRunner().invoke(cli, ["locate", *LOCATE, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_peer_failing_after_the_outputs_were_written_says_so(monkeypatch, tmp_path):
    """At the end of a run the main process has written its outputs: the error names them."""
    monkeypatch.setattr(distributed, "_state", distributed.ProcessState(0, 2, 0))
    import torch.distributed as dist

    def peer_died() -> None:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "barrier", peer_died)
    with pytest.raises(distributed.DistributedError, match="Nothing was written"):
        distributed.barrier()
    with pytest.raises(distributed.DistributedError) as raised:
        distributed.barrier([tmp_path / "out"])
    assert "Nothing was written" not in str(raised.value)
    assert f"had written {tmp_path / 'out'}" in str(raised.value)
    monkeypatch.setattr(distributed, "_state", distributed.ProcessState(1, 2, 1))
    with pytest.raises(distributed.DistributedError, match="may have written"):
        distributed.barrier([])


def test_generated_images_are_in_c_order(tiny_pipe):
    """The pipeline hands back a channel-first view; sent between processes it would arrive
    in C order, and numpy's sums (the scores) follow memory order: one layout for both."""
    images = generate_images(tiny_pipe, ["a red square", "a blue circle", "a green dot"],
                             [0, 1, 2], SamplingConfig(steps=2, batch_size=2))
    assert images.shape[0] == 3 and images.flags["C_CONTIGUOUS"]


# ------------------------------------------------------------------------ launched


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         distributed.TIMEOUT_ENV: str(TIMEOUT_S)}


def _launch(processes: int, *args) -> list[str]:
    """The command line for ``memedit ARGS`` on ``processes`` CPU processes (1: no launcher).
    Every launcher option is given, so no accelerate config file is read or needed."""
    memedit = [sys.executable, "-m", "memedit.cli", *map(str, args)]
    if processes == 1:
        return memedit
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            *memedit[1:]]


def _run(processes: int, *args) -> subprocess.CompletedProcess:
    result = subprocess.run(_launch(processes, *args), env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _stats(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


@pytest.mark.slow
def test_two_process_locate_is_the_one_process_locate(tmp_path):
    outputs = {}
    for processes in (1, 2):
        out, stats = tmp_path / f"subspace{processes}", tmp_path / f"stats{processes}"
        result = _run(processes, "locate", *LOCATE, "--out", out, "--save-stats", stats,
                      "--json")
        outputs[processes] = (out, stats, result)
    (one, one_stats, one_run), (two, two_stats, two_run) = outputs[1], outputs[2]
    assert (one / "masks.safetensors").read_bytes() == (two / "masks.safetensors").read_bytes()
    manifests = [json.loads((p / "subspace.json").read_text()) for p in (one, two)]
    assert manifests[0]["layers"] == manifests[1]["layers"]
    assert manifests[0]["model"]["tensors"] == manifests[1]["model"]["tensors"]
    for name in ("memorized", "reference"):
        meta_one, tensors_one = _stats(one_stats / f"{name}.stats.safetensors")
        meta_two, tensors_two = _stats(two_stats / f"{name}.stats.safetensors")
        assert meta_one == meta_two
        assert tensors_one.keys() == tensors_two.keys()
        for key, value in tensors_one.items():  # bit for bit, not within a tolerance
            assert torch.equal(value.view(torch.int32), tensors_two[key].view(torch.int32))
        assert (one_stats / f"{name}.stats.safetensors").read_bytes() == \
            (two_stats / f"{name}.stats.safetensors").read_bytes()
    # Only the main process printed the summary, once.
    assert two_run.stdout.count('"subspace"') == one_run.stdout.count('"subspace"') == 1
    # The run's statistics still merge with another job's (here: one process on other prompts).
    others = tmp_path / "others.txt"
    others.write_text("a red square in the corner\na blue circle at the top\n")
    _run(1, "locate", *LOCATE, "--memorized", others, "--out", tmp_path / "o",
         "--save-stats", tmp_path / "o_stats")
    merged = tmp_path / "merged.stats.safetensors"
    _run(1, "merge-stats", two_stats / "memorized.stats.safetensors",
         tmp_path / "o_stats" / "memorized.stats.safetensors", "--out", merged)
    assert json.loads(_stats(merged)[0]["num_prompts"]) == 12


@pytest.mark.slow
def test_two_process_hardened_locate_and_bake_are_the_one_process_ones(tmp_path):
    """Hardening's attack chunks are shared out as the attack's are (the same edit), and a
    launched bake (main process only) writes the one-process model."""
    hardened = [*LOCATE, "--harden-rounds", "1", "--attack-steps", "2"]
    for processes in (1, 2):
        _run(processes, "locate", *hardened, "--out", tmp_path / f"subspace{processes}")
        _run(processes, "bake", "--subspace", tmp_path / "subspace1", "--out",
             tmp_path / f"baked{processes}")
    one, two = (json.loads((tmp_path / f"subspace{n}" / "subspace.json").read_text())
                for n in (1, 2))
    assert one["hardening"] == two["hardening"] and one["layers"] == two["layers"]
    assert (tmp_path / "subspace1" / "masks.safetensors").read_bytes() == \
        (tmp_path / "subspace2" / "masks.safetensors").read_bytes()
    weights = sorted(p.relative_to(tmp_path / "baked1")
                     for p in (tmp_path / "baked1").rglob("*.safetensors"))
    assert weights
    for path in weights:
        assert (tmp_path / "baked1" / path).read_bytes() == \
            (tmp_path / "baked2" / path).read_bytes()


def _small_prompt_sets(tmp_path: Path) -> list[str]:
    """A few memorized prompts (training-image paths made absolute) and ordinary ones."""
    def head(name: str, count: int) -> Path:
        source = prompt_file(name)
        rows = [json.loads(line) for line in source.read_text().splitlines()[:count]]
        for row in rows:
            if "image" in row:
                row["image"] = str((source.parent / row["image"]).resolve())
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    return ["--memorized", head("memorized_heldout", 4), "--locate-prompts",
            head("memorized_locate", 3), "--ordinary", head("ordinary_unseen", 5)]


@pytest.mark.slow
def test_two_process_evaluate_is_the_one_process_evaluate(tmp_path):
    """Locate at one k, then generation, detector, the embedding-attack column and the drift
    from the original (scores of gathered images), shared out: the same report."""
    prompts = _small_prompt_sets(tmp_path)
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"eval{processes}"
        _run(processes, "evaluate", *prompts, "--k", "0.05", "--tau", "2", "--controls",
             "none", "--steps", "4", "--seeds", "2", "--batch-size", "2", "--attack-steps", "2",
             "--quiet", "--out", out)
        reports[processes] = (json.loads((out / "report.json").read_text()),
                              (out / "table.txt").read_text())

    def figures(report: dict) -> dict:
        report = dict(report)
        report.pop("created", None)  # the clock, and the attack's seconds, are not results
        for variant in report["variants"]:
            for group in variant["memorization"].values():
                group.get("under_attack", {}).pop("seconds", None)
        return report

    assert reports[1][1] == reports[2][1]
    assert figures(reports[1][0]) == figures(reports[2][0])


@pytest.mark.slow
def test_two_process_attack_is_the_one_process_attack(tmp_path):
    """The attack (prompt chunks and generations shared out) under the launcher: exit 0, the
    table printed once, and the one-process report (the other process reads nothing back)."""
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"attack{processes}"
        result = _run(processes, "attack", "--steps", "2", "--attack-steps", "1", "--pairs",
                      "1", "--seeds", "1", "--out", out)
        runs[processes] = (json.loads((out / "report.json").read_text()), result.stdout)

    def figures(report: dict) -> dict:
        report = dict(report)
        for key in ("created", "seconds", "prompt_sets"):  # clock; each run's own --out
            report.pop(key)
        return report

    assert runs[1][1] == runs[2][1] and runs[1][1].count("embedding attack:") == 1
    assert figures(runs[1][0]) == figures(runs[2][0])
    for processes, (report, _) in runs.items():  # the control images where they ended up
        source = Path(report["prompt_sets"]["control"]["source"])
        assert source == tmp_path / f"attack{processes}" / "control_images"
        assert len(list(source.glob("*.png"))) == report["prompt_sets"]["control"]["count"]


def _children(parent: int) -> dict[int, dict[str, str]]:
    """The live child processes of ``parent`` and their environments."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            ppid = int(next(line.split()[1] for line in status.splitlines()
                            if line.startswith("PPid:")))
            if ppid != parent:
                continue
            raw = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration, ValueError):
            continue
        found[int(entry.name)] = dict(item.decode(errors="replace").split("=", 1)
                                      for item in raw if b"=" in item)
    return found


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


SLOW_LOCATE = ["--steps", "20", "--tau", "10", "--k", "0.05", "--batch-size", "1"]


def _assert_no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow
def test_killed_process_under_the_launcher_leaves_no_output(tmp_path):
    """SIGKILL rank 1 mid-run: the launcher stops rank 0, which says why and writes nothing;
    a rerun starts clean."""
    command = _launch(2, "locate", *SLOW_LOCATE, "--out", tmp_path / "out")
    launcher = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ranks: dict[str, int] = {}

        def both_running() -> bool:
            ranks.update({env.get("RANK"): pid for pid, env in _children(launcher.pid).items()})
            # rank 0 holds the output's lock from its checks to the end of the run
            return "1" in ranks and (tmp_path / ".out.memedit-lock").exists()

        _wait_for(both_running, 120)
        time.sleep(0.5)
        os.kill(ranks["1"], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=TIMEOUT_S + 30)
        assert time.monotonic() - killed < TIMEOUT_S
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert ("was stopped by the launcher" in stderr
            or "another process of this run failed" in stderr), stderr[-3000:]
    _assert_no_output(tmp_path)
    _run(1, "locate", *LOCATE, "--out", tmp_path / "out")
    assert (tmp_path / "out" / "masks.safetensors").is_file()


@pytest.mark.slow
def test_survivor_without_a_launcher_notices_the_dead_peer(tmp_path):
    """Processes started by hand (as on several machines without one launcher watching them
    all): the survivor fails at its next exchange with memedit's message, exit status 2."""
    port = _free_port()
    command = [sys.executable, "-m", "memedit.cli", "locate", *SLOW_LOCATE, "--out",
               str(tmp_path / "out")]
    processes = []
    for rank in (0, 1):
        env = _env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    survivor, victim = processes
    try:
        _wait_for(lambda: (tmp_path / ".out.memedit-lock").exists(), 120)
        time.sleep(0.5)
        victim.kill()
        killed = time.monotonic()
        _, stderr = survivor.communicate(timeout=TIMEOUT_S + 30)
        assert time.monotonic() - killed < TIMEOUT_S
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert survivor.returncode == 2, stderr[-3000:]
    assert "another process of this run failed" in stderr
    _assert_no_output(tmp_path)


def test_saved_statistics_are_the_same_bytes_every_time(tmp_path):
    """Jobs compare and merge statistics files: the same statistics, the same bytes (safetensors
    writes metadata keys in a random order; memedit sorts them)."""
    from memedit.statistics import ActivationStats

    stats = ActivationStats({"unet/a": torch.arange(6.0).reshape(2, 3), "unet/b": torch.ones(1, 4)},
                            3, {"model": "m", "é": [1, 2]}, [{"name": "p", "count": 3}])
    files = [stats.save(tmp_path / f"{i}.stats.safetensors") for i in range(6)]
    assert len({path.read_bytes() for path in files}) == 1
    data = files[0].read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    loaded = ActivationStats.load(files[0])
    assert (loaded.num_prompts, loaded.settings, loaded.prompt_sets) == \
        (stats.num_prompts, stats.settings, stats.prompt_sets)
    assert all(torch.equal(loaded.sumsq[key], value) for key, value in stats.sumsq.items())
