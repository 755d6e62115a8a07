"""A baked model's README.md is a model card of the edit; the source card is kept beside it;
evaluate/attack --update-card add their table, only to a folder memedit baked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import folder_digest, write_prompts
from huggingface_hub import ModelCard, constants

import memedit
from memedit import distributed
from memedit.card import SOURCE_CARD, update_card
from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.hub import HubPush, push_folder
from memedit.outputs import _lock_path
from memedit.sampling import SamplingConfig

SOURCE_CARD_TEXT = ("---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n\n"
                    "# The source model\n\nIts own card, which the edit must not claim.\n")
QUICK_EVAL = ["--steps", "2", "--seeds", "1", "--detector-steps", "1", "--ordinary-seeds", "1",
              "--controls", "none", "--quiet"]


def run(*args, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def baked(tiny_model_dir, tmp_path_factory):
    """A tiny model with a card of its own, a subspace located on it, and `memedit bake`."""
    work = tmp_path_factory.mktemp("card")
    source = work / "source"
    shutil.copytree(tiny_model_dir, source)
    (source / "README.md").write_text(SOURCE_CARD_TEXT)
    pipe, resolved = memedit.load_pipeline(source)
    prompts = memedit.PromptSet.from_prompts(["a red cat", "a blue dog"], "mem")
    config = memedit.LocateConfig(k=0.05, tau=3, sampling=SamplingConfig(steps=3, batch_size=2))
    subspace = memedit.locate(pipe, prompts, config=config, source=resolved, progress=False)
    subspace.save(work / "subspace")
    before = folder_digest(source)
    run("bake", "--model", source, "--subspace", work / "subspace", "--out", work / "baked")
    assert folder_digest(source) == before  # the source, its card included, is untouched
    return source, work / "baked", subspace


def test_baked_readme_is_a_card_of_the_edit(baked):
    source, out, subspace = baked
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and "memedit" in data["tags"]
    assert data["license"] == "creativeml-openrail-m"  # the source's terms still apply
    assert "base_model" not in data  # a local folder is no hub id: named in the text instead
    text = " ".join(card.text.split())  # table cells are padded
    assert str(source) in text and subspace.manifest["model"]["identity"]["sha256"] in text
    assert "Chavhan et al." in text and "arxiv.org/abs/2406.18566" in text
    assert "wanda-contrast" in text
    assert "| k (per output row: the top fraction of inputs by Wanda score) | 0.05 |" in text
    assert "| tau (the first UNet calls aggregated) | 3 |" in text
    assert "The source model" not in text  # the source card is not passed off as this one
    layers = subspace.manifest["layers"]
    for key, counts in layers.items():
        assert f"| `{key}` | {counts['selected']:,} | {counts['total']:,} |" in text
    assert f"**{subspace.num_selected:,}**" in text
    for entries in subspace.manifest["prompts"].values():
        for entry in entries:
            assert entry["sha256"] in text
    # The source card, byte for byte, beside it; and the edit still verifies against its source.
    assert (out / SOURCE_CARD).read_bytes() == (source / "README.md").read_bytes()
    assert memedit.verify_sanitized(out).ok


def test_a_model_without_a_card_gets_one(tiny_model_dir, baked, tmp_path):
    _, _, subspace = baked
    memedit.bake(tiny_model_dir, subspace, tmp_path / "out", progress=False)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "had no card" in card.text and not (tmp_path / "out" / SOURCE_CARD).exists()


def test_evaluate_and_attack_update_the_card(baked, tmp_path):
    _, out, _ = baked
    model = tmp_path / "model"
    shutil.copytree(out, model)  # the module's bake stays pristine for the other tests
    before = folder_digest(model)
    memorized = write_prompts(tmp_path, "mem", 2, seed=0)
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("a green square\n")
    run("evaluate", "--model", model, "--memorized", memorized, "--ordinary", ordinary,
        "--out", tmp_path / "eval", "--update-card", *QUICK_EVAL)
    table = (tmp_path / "eval" / "table.txt").read_text().strip()
    card = ModelCard.load(model / "README.md")
    assert "### memedit evaluate" in card.text and table in card.text
    assert "Not measured yet" not in card.text
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    for entry in report["prompt_sets"].values():
        assert entry["sha256"] in card.text
    after = folder_digest(model)  # README.md changed, nothing else, and nothing was left behind
    assert after.keys() == before.keys()
    assert [name for name in after if after[name] != before[name]] == ["README.md"]
    assert memedit.verify_sanitized(model).ok

    run("attack", "--model", model, "--memorized", memorized, "--out", tmp_path / "attack",
        "--attack-steps", "1", "--checkpoints", "1", "--pairs", "1", "--steps", "2",
        "--seeds", "1", "--quiet", "--update-card")
    card = ModelCard.load(model / "README.md")
    attack_table = (tmp_path / "attack" / "table.txt").read_text().strip()
    assert "### memedit attack" in card.text and attack_table in card.text
    assert table in card.text  # the evaluation stays
    # A second evaluation replaces the first one's block instead of piling up.
    update_card(model, tmp_path / "eval")
    assert ModelCard.load(model / "README.md").text.count("### memedit evaluate") == 1


def test_update_card_refuses_a_folder_memedit_did_not_bake(tiny_model_dir, tmp_path):
    before = folder_digest(tiny_model_dir)
    result = run("evaluate", "--model", tiny_model_dir, "--memorized", tmp_path / "none.jsonl",
                 "--out", tmp_path / "eval", "--update-card", code=2)
    assert "will not update the card" in result.output and "memedit did not bake it" in \
        result.output
    assert folder_digest(tiny_model_dir) == before and not (tmp_path / "eval").exists()
    result = run("attack", "--out", tmp_path / "attack", "--update-card", code=2)
    assert "embedded test model" in result.output


def test_update_card_refusals(baked, tmp_path):
    source, out, _ = baked
    model = tmp_path / "model"
    shutil.copytree(out, model)
    # With --k the edits are made in memory: their figures are not this folder's.
    result = run("evaluate", "--model", model, "--k", "0.05", "--out", tmp_path / "e",
                 "--update-card", code=2)
    assert "--update-card with --k" in result.output
    # A card the user rewrote is theirs.
    (model / "README.md").write_text("# my own notes\n")
    with pytest.raises(MemeditError, match="not the card memedit wrote"):
        update_card(model, tmp_path)
    # A report on another model does not go into this model's card.
    shutil.copyfile(out / "README.md", model / "README.md")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"format": "memedit-evaluation",
                                                    "context": {"model": str(source)}}))
    (report / "table.txt").write_text("x\n")
    with pytest.raises(MemeditError, match="reports on"):
        update_card(model, report)
    (report / "report.json").write_text("{}")
    with pytest.raises(MemeditError, match="not a memedit evaluate or attack report"):
        update_card(model, report)
    assert (model / "README.md").read_bytes() == (out / "README.md").read_bytes()


@pytest.mark.slow
def test_onnx_export_carries_the_card_and_pushes(baked, tmp_path, monkeypatch):
    """export --push-to-hub: the ONNX folder gets the edit's card with the export's verdict,
    and is uploaded only after export and checks passed (HfApi replaced: offline)."""
    from huggingface_hub import HfApi, constants

    _, out, subspace = baked
    uploads: list[dict] = []

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append({"repo_id": repo_id, "card": ModelCard.load(Path(folder_path) /
                                                                   "README.md")})

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"hf.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    onnx = tmp_path / "onnx"
    run("export", "--onnx", out, "--out", onnx, "--no-optimum-validation", "--threads", "1",
        "--steps", "2", "--push-to-hub", "me/sanitized-onnx", "--token", "t")
    card = ModelCard.load(onnx / "README.md")
    assert "onnx" in card.data.tags and "memedit" in card.data.tags
    text = " ".join(card.text.split())
    assert "## ONNX export" in text and "Audit and parity: **PASSED**" in text
    assert f"**{subspace.num_selected:,}**" in text  # the edit's own card, figures included
    assert [u["repo_id"] for u in uploads] == ["me/sanitized-onnx"]
    assert uploads[0]["card"].text == card.text


def test_export_card_of_a_model_memedit_did_not_edit(baked, tmp_path):
    from memedit.card import write_export_card
    from memedit.loading import resolve_model

    source, _, _ = baked
    write_export_card(tmp_path, resolve_model(source), "PASSED", "parity: passed")
    card = ModelCard.load(tmp_path / "README.md")
    assert "did not edit this model" in card.text and "parity: passed" in card.text
    assert card.data.license == "creativeml-openrail-m" and "onnx" in card.data.tags
    assert (tmp_path / SOURCE_CARD).read_bytes() == (source / "README.md").read_bytes()


def test_export_card_of_a_baked_model_whose_card_broke(baked, tmp_path):
    """A baked model's card with broken metadata is exported as any other model's README
    (kept byte for byte), not an internal error after the whole export."""
    from memedit.card import write_export_card
    from memedit.loading import resolve_model

    _, out, _ = baked
    model, _ = _editable_copy(out, tmp_path)
    broken = (out / "README.md").read_bytes().replace(b"---\n", b"---\nx: [\n", 1)
    (model / "README.md").write_bytes(broken)
    (tmp_path / "onnx").mkdir()
    write_export_card(tmp_path / "onnx", resolve_model(model), "PASSED", "parity: passed")
    assert "its card does not parse" in ModelCard.load(tmp_path / "onnx" / "README.md").text
    assert (tmp_path / "onnx" / SOURCE_CARD).read_bytes() == broken


def _editable_copy(out: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the module's bake, and a report of an evaluation of that copy."""
    model = tmp_path / "model"
    shutil.copytree(out, model)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"format": "memedit-evaluation",
                                                    "context": {"model": str(model)}}))
    (report / "table.txt").write_text("| prompt | copied |\n")
    return model, report


_START, _END = "<!-- memedit:results -->", "<!-- memedit:results:end -->"
DAMAGES = {  # a card the user edited, which memedit cannot update as it is
    "end marker removed": (lambda t: t.replace(_END, "").encode(), "once each"),
    "markers swapped": (lambda t: t.replace(_START, "@@").replace(_END, _START)
                        .replace("@@", _END).encode(), "in the wrong order"),
    "start marker twice": (lambda t: (t + "\n" + _START + "\n").encode(), "2 and 1 times"),
    "not UTF-8": (lambda t: t.encode() + b"\n\xff\xfe caf\xe9\n", "not UTF-8 text"),
    "broken metadata": (lambda t: t.replace("---\n", "---\nnotes: [unclosed\n", 1).encode(),
                        "metadata of its README.md do not parse"),
    "metadata of an odd type": (lambda t: t.replace("---\n", "---\ntags: 5\n", 1)
                                .replace("tags:\n-", "old_tags:\n-", 1).encode(),
                                "metadata of its README.md do not parse"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_update_card_refuses_a_card_it_cannot_update(baked, tmp_path, damage):
    """A card whose markers, encoding or metadata the user broke is refused up front (before
    the run: no report is written), and update_card refuses it too: a MemeditError, never an
    internal error after the run, never a duplicated block; the card is left as it was."""
    _, out, _ = baked
    model, report = _editable_copy(out, tmp_path)
    damaged, words = DAMAGES[damage]
    (model / "README.md").write_bytes(damaged((out / "README.md").read_text()))
    before = folder_digest(model)
    result = run("evaluate", "--model", model, "--memorized", tmp_path / "none.jsonl",
                 "--out", tmp_path / "eval", "--update-card", code=2)
    assert "will not update the card" in result.output and words in result.output
    assert "Traceback" not in result.output and not (tmp_path / "eval").exists()
    with pytest.raises(MemeditError, match="will not update the card"):
        update_card(model, report)
    assert folder_digest(model) == before


@pytest.mark.parametrize("readme", [b"---\ntags: 5\nlicense: mit\n---\n# odd types\n",
                                    b"---\nlicense: [mit\n---\n# broken YAML\n",
                                    b"---\n- a list\n---\n# no mapping\n",
                                    b"# caf\xe9, not UTF-8\n"])
def test_bake_keeps_a_source_readme_that_is_no_card(tiny_model_dir, baked, tmp_path, readme):
    """A source README.md that does not parse as a card: no metadata taken from it, kept byte
    for byte beside the new card (it used to be an internal error after the whole copy)."""
    _, _, subspace = baked
    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    (source / "README.md").write_bytes(readme)
    memedit.bake(source, subspace, tmp_path / "out", progress=False)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "license" not in card.data.to_dict() and "memedit" in card.data.tags
    assert (tmp_path / "out" / SOURCE_CARD).read_bytes() == readme


def test_baking_a_baked_model_keeps_the_base_models_card(baked, tmp_path):
    """Re-baking: the base model's card (not the first edit's) is the one kept, its license
    still applies, and the card says the model was edited twice."""
    source, out, first = baked
    pipe, resolved = memedit.load_pipeline(out)
    config = memedit.LocateConfig(k=0.05, tau=3, sampling=SamplingConfig(steps=3, batch_size=2))
    subspace = memedit.locate(pipe, memedit.PromptSet.from_prompts(["a green owl"], "mem"),
                              config=config, source=resolved, progress=False)
    memedit.bake(out, subspace, tmp_path / "twice", progress=False)
    twice = tmp_path / "twice"
    assert (twice / SOURCE_CARD).read_bytes() == SOURCE_CARD_TEXT.encode()
    card = ModelCard.load(twice / "README.md")
    assert card.data.license == "creativeml-openrail-m"
    text = " ".join(card.text.split())
    assert "This model was edited twice" in text and f"from `{source}`" in text
    assert f"({first.num_selected:,} weights zeroed)" in text
    assert memedit.verify_sanitized(twice).ok  # against the first bake, its card included


@pytest.fixture()
def other_process_holds(tmp_path):
    """Take a folder's output lock in another process (as a concurrent memedit run would)."""
    holders: list[subprocess.Popen] = []

    def hold(folder: Path) -> None:
        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid other'); print('held', "
                "flush=True); sys.stdin.read()")
        holder = subprocess.Popen([sys.executable, "-c", code, str(_lock_path(folder))],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"

    yield hold
    for holder in holders:
        holder.communicate("")


def test_card_update_and_push_hold_the_model_folders_lock(baked, tmp_path, monkeypatch,
                                                          other_process_holds):
    """While another run holds the model folder (a `bake --overwrite` into it, another
    --update-card), an update and a push are refused instead of losing or mixing writes."""
    from huggingface_hub import HfApi

    _, out, _ = baked
    model, report = _editable_copy(out, tmp_path)
    before = folder_digest(model)
    other_process_holds(model.resolve())
    with pytest.raises(MemeditError, match=r"Another memedit run \(pid other\) is writing"):
        update_card(model, report)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for method in ("create_repo", "upload_folder"):
        monkeypatch.setattr(HfApi, method, lambda *a, **k: pytest.fail("pushed while locked"))
    with pytest.raises(MemeditError, match=r"Another memedit run \(pid other\) is writing"):
        push_folder(model, HubPush("me/x", token="t"))
    assert folder_digest(model) == before


def test_update_card_writes_only_on_the_main_process(baked, tmp_path, monkeypatch):
    """Under a launcher every process runs the command; only the main one touches the card."""
    _, out, _ = baked
    model, report = _editable_copy(out, tmp_path)
    before = folder_digest(model)
    monkeypatch.setattr(distributed, "_state", distributed.ProcessState(rank=1, world=2))
    assert update_card(model, report) is None
    assert folder_digest(model) == before
    monkeypatch.setattr(distributed, "_state", distributed.ProcessState())
    assert update_card(model, report) == model.resolve() / "README.md"
    assert "| prompt | copied |" in (model / "README.md").read_text()


def test_the_api_updates_the_card_as_the_command_does(baked, tmp_path):
    """memedit.evaluate(..., update_card=True) is `evaluate --update-card`; without a report
    folder, or with k, it is refused before any work."""
    _, out, _ = baked
    model = tmp_path / "model"
    shutil.copytree(out, model)
    memorized = write_prompts(tmp_path, "mem", 2, seed=0)
    for call, options in ((memedit.evaluate, {}), (memedit.attack, {}),
                          (memedit.evaluate, {"k": (0.05,), "out": tmp_path / "k"})):
        with pytest.raises(MemeditError, match=r"Pass --out|with --k"):
            call(model, memorized=memorized, update_card=True, **options)
    assert not (tmp_path / "k").exists()
    evaluation = memedit.evaluate(model, memorized=memorized, ordinary=memorized,
                                  out=tmp_path / "eval", update_card=True, steps=2, seeds=1,
                                  detector_steps=1, ordinary_seeds=1, controls="none",
                                  quiet=True)
    assert evaluation.card == model.resolve() / "README.md"
    assert evaluation.table.strip() in ModelCard.load(evaluation.card).text
