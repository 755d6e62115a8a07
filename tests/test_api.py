"""Library first: each command is one API call that gives what the command gives, and a
locate-and-bake reads the targeted weights from disk at most twice."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from click.testing import CliRunner

import memedit
from memedit.cli import cli

FAST = {"steps": 4, "tau": 2, "k": 0.05, "batch_size": 2}
FAST_ARGS = ["--steps", "4", "--tau", "2", "--k", "0.05", "--batch-size", "2"]
EVAL_FAST = {"steps": 4, "seeds": 1, "detector_steps": 2, "quiet": True}
EVAL_ARGS = ["--steps", "4", "--seeds", "1", "--detector-steps", "2", "--quiet"]


def run(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def config() -> memedit.LocateConfig:
    return memedit.LocateConfig(k=FAST["k"], tau=FAST["tau"], sampling=memedit.SamplingConfig(
        steps=FAST["steps"], batch_size=FAST["batch_size"]))


class ReadCounter:
    """Counts every tensor memedit reads from a weight file, by file and tensor name.

    memedit reads weight files through safetensors' ``safe_open`` (tensor by tensor) and
    ``load_file`` (whole files, to rewrite them); both are wrapped where memedit imports them.
    diffusers' own loading of the pipeline is not memedit's and not counted.
    """

    def __init__(self, monkeypatch):
        self.reads: list[tuple[Path, str]] = []
        real_open, real_load = safetensors.safe_open, safetensors.torch.load_file
        counter = self

        class Handle:
            def __init__(self, path, *args, **kwargs):
                self.path = Path(path).resolve()
                self.handle = real_open(path, *args, **kwargs)

            def __enter__(self):
                self.handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def get_tensor(self, name):
                counter.reads.append((self.path, name))
                return self.handle.get_tensor(name)

            def __getattr__(self, name):
                return getattr(self.handle, name)

        def load_file(path, *args, **kwargs):
            state = real_load(path, *args, **kwargs)
            self.reads += [(Path(path).resolve(), name) for name in state]
            return state

        for module in ("memedit.weights", "memedit.subspace", "memedit.inspection"):
            monkeypatch.setattr(f"{module}.safe_open", Handle)
        monkeypatch.setattr("memedit.weights.load_file", load_file)

    def per_tensor(self, keys, under: Path | None = None) -> Counter:
        """How often each targeted tensor (``component/name``) was read (from ``under``)."""
        counts: Counter = Counter()
        for path, name in self.reads:
            if under is not None and not path.is_relative_to(Path(under).resolve()):
                continue
            for key in keys:
                component, param = key.split("/", 1)
                if name == param and path.parent.name == component:
                    counts[key] += 1
        return counts


def test_locate_and_bake_reads_the_targeted_weights_at_most_twice(monkeypatch, tmp_path,
                                                                   tiny_model_dir):
    """Once for locate (fingerprint and manifest), once as bake rewrites the copy (checked
    there against the manifest); via the API and via the command alike."""
    file = tmp_path / "mem.txt"
    file.write_text("a red cat\na blue dog\n")
    prompts = memedit.read_prompts(file, "memorized")
    pipe, source = memedit.load_pipeline(tiny_model_dir, "cpu", "float32")
    counter = ReadCounter(monkeypatch)
    result = memedit.locate_and_bake(pipe, tmp_path / "api", prompts, config=config(),
                                     source=source, progress=False)
    keys = list(result.subspace.masks)
    assert len(keys) == 4
    assert counter.per_tensor(keys) == Counter({key: 2 for key in keys})
    assert counter.per_tensor(keys, under=tiny_model_dir) == Counter({key: 1 for key in keys})

    counter.reads.clear()
    run("locate-and-bake", "--model", tiny_model_dir, "--memorized", file, "--out",
        tmp_path / "cli", *FAST_ARGS)
    assert counter.per_tensor(keys) == Counter({key: 2 for key in keys})
    # The same edit either way.
    assert memedit.Subspace.load(tmp_path / "cli").differences(result.subspace) == []


def test_locate_from_saved_statistics_equals_the_command(tmp_path, tiny_model_dir):
    file = tmp_path / "mem.txt"
    file.write_text("a red cat\na blue dog\n")
    stats = tmp_path / "stats"
    run("locate", "--model", tiny_model_dir, "--memorized", file, "--save-stats", stats,
        "--out", tmp_path / "first", *FAST_ARGS)
    saved = ["--memorized-stats", stats / "memorized.stats.safetensors",
             "--reference-stats", stats / "reference.stats.safetensors"]
    run("locate", "--model", tiny_model_dir, *saved, "--out", tmp_path / "cli", *FAST_ARGS)
    pipe, source = memedit.load_pipeline(tiny_model_dir, "cpu", "float32")
    subspace = memedit.locate(pipe, config=config(), source=source,
                              memorized_stats=stats / "memorized.stats.safetensors",
                              reference_stats=[stats / "reference.stats.safetensors"])
    assert memedit.Subspace.load(tmp_path / "cli").differences(subspace) == []
    # Two saved halves merge into the statistics of the whole.
    halves = [memedit.record_statistics(pipe, memedit.PromptSet.from_prompts([p], "m"),
                                        config(), source, progress=False)
              for p in ("a red cat", "a blue dog")]
    merged = memedit.locate(pipe, config=config(), source=source, memorized_stats=halves,
                            reference_stats=stats / "reference.stats.safetensors")
    assert all(torch.equal(merged.masks[key], subspace.masks[key]) for key in subspace.masks)


def test_locate_refuses_prompts_and_statistics_together(tmp_path, tiny_model_dir):
    pipe, source = memedit.load_pipeline(tiny_model_dir, "cpu", "float32")
    stats = memedit.record_statistics(pipe, memedit.PromptSet.from_prompts(["x"], "m"),
                                      config(), source, progress=False)
    with pytest.raises(memedit.MemeditError, match="not both"):
        memedit.locate(pipe, memedit.PromptSet.from_prompts(["x"]), config=config(),
                       source=source, memorized_stats=stats)
    with pytest.raises(memedit.MemeditError, match="required for a model other than the "
                                                   "embedded one"):
        memedit.locate(pipe, config=config(), source=source)


def test_detect_equals_the_command(tmp_path, tiny_model_dir, prompt_files):
    memorized, ordinary = prompt_files
    both = tmp_path / "candidates.jsonl"
    both.write_text(memorized.read_text() + ordinary.read_text())
    printed = CliRunner().invoke(cli, ["detect", "--model", str(tiny_model_dir), "--prompts",
                                       str(both), "--json", *EVAL_ARGS])
    assert printed.exit_code == 0, printed.output
    ranking = memedit.detect(tiny_model_dir, both, **EVAL_FAST)
    assert ranking == json.loads(printed.stdout)
    assert [row["score"] for row in ranking["ranking"]] == sorted(
        (row["score"] for row in ranking["ranking"]), reverse=True)


def _comparable(report: dict) -> dict:
    """A report without what differs between two runs of the same evaluation (when, how long)."""
    report = dict(report)
    report.pop("created")
    for variant in report["variants"]:
        variant.pop("seconds", None)
    return report


def test_evaluate_equals_the_command(tmp_path, tiny_model_dir, prompt_files):
    """A baked model: the baseline (recorded at bake time), the random control and the
    prompt split are chosen by memedit.evaluate as by `memedit evaluate`."""
    memorized, ordinary = prompt_files
    pipe, source = memedit.load_pipeline(tiny_model_dir, "cpu", "float32")
    located_on = memedit.read_prompts(memorized, "memorized").subset([0, 1], "locate")
    memedit.locate_and_bake(pipe, tmp_path / "sanitized", located_on, config=config(),
                            source=source, progress=False)
    options = ["--memorized", memorized, "--ordinary", ordinary, "--controls", "random"]
    run("evaluate", "--model", tmp_path / "sanitized", *options, "--out", tmp_path / "cli",
        *EVAL_ARGS)
    evaluation = memedit.evaluate(tmp_path / "sanitized", memorized=memorized,
                                  ordinary=ordinary, controls=["random"],
                                  out=tmp_path / "api", **EVAL_FAST)
    from_cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert _comparable(from_cli) == _comparable(evaluation.report)
    assert [v["name"] for v in evaluation.report["variants"]] == ["original", "sanitized",
                                                                  "random"]
    assert (tmp_path / "api" / "table.txt").read_text() == evaluation.table + "\n"
    assert (tmp_path / "cli" / "table.txt").read_text() == evaluation.table + "\n"


def test_api_calls_refuse_what_the_commands_refuse(tmp_path, tiny_pipe):
    """Careless calls get the commands' messages before any work (nothing is loaded)."""
    cases = [
        (lambda: memedit.sweep(out=tmp_path / "s"), "needs the k values"),
        (lambda: memedit.evaluate("m", "b", k=(0.01,)), "--baseline has no role"),
        (lambda: memedit.evaluate(k=(0.01,), also=["x"]), "Drop --also"),
        (lambda: memedit.evaluate(k=()), "--k is empty"),
        (lambda: memedit.evaluate(controls="random,bogus"), "Unknown control bogus"),
        (lambda: memedit.detect(), "needs the candidate prompts"),
        (lambda: memedit.locate_and_bake(tiny_pipe, tmp_path / "out",
                                         memedit.PromptSet.from_prompts(["x"])),
         "an in-memory pipeline has none"),
    ]
    for call, message in cases:
        with pytest.raises(memedit.MemeditError, match=message):
            call()
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()
    with pytest.raises(TypeError, match="nemo_modes"):  # a misspelt option is not ignored
        memedit.evaluate(nemo_modes="faithful")


def test_hardened_locate_reads_the_targeted_weights_once(monkeypatch, tiny_model_dir):
    """Every hardening round selects again and records the attack's statistics: all of them
    share locate's one read (and its fingerprint)."""
    from memedit.evaluation.attack import AttackConfig
    from memedit.hardening import HardenConfig
    from memedit.testbed import prompt_file

    pipe, source = memedit.load_pipeline(tiny_model_dir, "cpu", "float32")
    memorized = memedit.read_prompts(prompt_file("memorized_locate")).subset(range(2), "mem2")
    hardening = HardenConfig(rounds=2, attack=AttackConfig(lr=0.05, steps=2, pairs=2,
                                                           checkpoints=()))
    counter = ReadCounter(monkeypatch)
    hardened = memedit.locate(pipe, memorized, config=config(), source=source,
                              hardening=hardening, progress=False)
    assert [r["round"] for r in hardened.manifest["hardening"]["rounds_run"]] == [1, 2]
    assert counter.per_tensor(hardened.masks) == Counter({key: 1 for key in hardened.masks})


def test_generate_equals_the_command(tmp_path, tiny_model_dir):
    """memedit.generate writes the PNGs the command writes, named after --out."""
    run("generate", "--model", tiny_model_dir, "a red cat", "a blue dog", "--num-images", "2",
        "--steps", "2", "--out", tmp_path / "cli" / "img.png")
    result = memedit.generate(["a red cat", "a blue dog"], out=tmp_path / "api" / "img.png",
                              model=tiny_model_dir, num_images=2, steps=2)
    assert [(image.prompt, image.seed) for image in result.images] == [
        ("a red cat", 0), ("a red cat", 1), ("a blue dog", 0), ("a blue dog", 1)]
    assert [image.path.name for image in result.images] == [f"img-{i}.png" for i in range(4)]
    for image in result.images:
        assert image.path.read_bytes() == (tmp_path / "cli" / image.path.name).read_bytes()
    assert result.pixels.shape[0] == 4


def test_generate_names_its_files_png(tmp_path, tiny_model_dir):
    """An --out without a suffix gets .png; another suffix is refused before the model loads,
    and nothing is written."""
    result = memedit.generate(["a red cat"], out=tmp_path / "picture", model=tiny_model_dir,
                              steps=1)
    assert [image.path.name for image in result.images] == ["picture.png"]
    refused = CliRunner().invoke(cli, ["generate", "--model", str(tiny_model_dir), "a red cat",
                                       "--steps", "1", "--out", str(tmp_path / "x.jpg")])
    assert refused.exit_code == 2, refused.output
    assert "does not end in .png" in refused.output and "x.png" in refused.output
    assert not (tmp_path / "x.jpg").exists()
