"""A baked model's README.md is a model card of the edit; the source card is kept beside it;
evaluate/attack --update-card add their table, only to a folder memedit baked."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

import memedit
from memedit.card import SOURCE_CARD, update_card
from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.sampling import SamplingConfig

SOURCE_CARD_TEXT = ("---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n\n"
                    "# The source model\n\nIts own card, which the edit must not claim.\n")
QUICK_EVAL = ["--steps", "2", "--seeds", "1", "--detector-steps", "1", "--ordinary-seeds", "1",
              "--controls", "none", "--quiet"]


def run(*args, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_prompts(folder: Path, name: str, count: int, seed: int) -> Path:
    """A JSONL of ``count`` prompts, each with its own random 32x32 training image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        image = f"{name}{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / image)
        rows.append({"prompt": f"the portrait of cat {i}", "image": image})
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


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
    before = _digest(source)
    run("bake", "--model", source, "--subspace", work / "subspace", "--out", work / "baked")
    assert _digest(source) == before  # the source, its card included, is untouched
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
    before = _digest(model)
    memorized = _write_prompts(tmp_path, "mem", 2, seed=0)
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
    after = _digest(model)  # README.md changed, nothing else, and nothing was left behind
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
    before = _digest(tiny_model_dir)
    result = run("evaluate", "--model", tiny_model_dir, "--memorized", tmp_path / "none.jsonl",
                 "--out", tmp_path / "eval", "--update-card", code=2)
    assert "will not update the card" in result.output and "memedit did not bake it" in \
        result.output
    assert _digest(tiny_model_dir) == before and not (tmp_path / "eval").exists()
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
