"""--revision/--variant/--token reach diffusers' download; a local folder's fp16 variant loads;
--push-to-hub is refused up front offline or without a token, and pushes through HfApi after
the output is complete. Offline throughout: the download and HfApi are replaced here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard, constants

import memedit
from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.hub import HubPush, check_push
from memedit.sampling import SamplingConfig
from memedit.testing import build_tiny_pipeline

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run(*args, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def subspace_dir(tiny_model_dir, tmp_path_factory):
    pipe, source = memedit.load_pipeline(tiny_model_dir)
    prompts = memedit.PromptSet.from_prompts(["a red cat", "a blue dog"], "mem")
    config = memedit.LocateConfig(k=0.05, tau=3, sampling=SamplingConfig(steps=3, batch_size=2))
    folder = tmp_path_factory.mktemp("hub") / "subspace"
    memedit.locate(pipe, prompts, config=config, source=source, progress=False).save(folder)
    return folder


@pytest.fixture()
def hub(tiny_model_dir, tmp_path, monkeypatch):
    """``DiffusionPipeline.download`` answering from a hub-cache-shaped copy of the tiny model,
    recording what it was asked."""
    from diffusers import DiffusionPipeline

    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / COMMIT
    shutil.copytree(tiny_model_dir, snapshot)
    calls: list[dict] = []

    def download(name, **kwargs):
        calls.append({"name": name, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(DiffusionPipeline, "download", download)
    return calls


def test_hub_options_reach_the_download_and_the_card(hub, subspace_dir, tmp_path):
    out = tmp_path / "out"
    run("bake", "--model", "org/tiny", "--revision", "v1.0", "--token", "hf_secret",
        "--subspace", subspace_dir, "--out", out)
    assert len(hub) == 1  # resolved once, not once per use
    assert hub[0]["name"] == "org/tiny"
    assert (hub[0]["revision"], hub[0]["token"], hub[0]["variant"]) == ("v1.0", "hf_secret", None)
    assert hub[0]["use_safetensors"] is True
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny" and card.data.base_model_relation == "finetune"
    text = " ".join(card.text.split())  # table cells are padded
    assert "| revision asked for | v1.0 |" in text and f"| commit | {COMMIT} |" in text
    assert "hf_secret" not in card.content
    provenance = json.loads((out / "memedit" / "sanitized.json").read_text())
    assert provenance["source"] | {"path": None} == {
        "spec": "org/tiny", "hub_id": "org/tiny", "path": None, "revision": "v1.0",
        "commit": COMMIT, "variant": None}
    assert "hf_secret" not in json.dumps(provenance)


def test_original_of_inspect_takes_the_hub_options(hub, subspace_dir, tiny_model_dir, tmp_path):
    memedit.bake(tiny_model_dir, memedit.Subspace.load(subspace_dir), tmp_path / "out",
                 progress=False)
    result = run("inspect", tmp_path / "out", "--original", "org/tiny", "--revision", "main",
                 "--json")
    assert hub[0]["revision"] == "main"
    verification = json.loads(result.stdout)["verification"]
    assert verification["ok"] and COMMIT in verification["original"]  # checked against it
    assert any("equals the original's" in line for line in verification["established"])


def test_local_variant_loads_the_variant_files(tmp_path):
    folder = tmp_path / "model"
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    variant = build_tiny_pipeline(seed=1)  # other weights: which files were read shows
    variant.save_pretrained(folder, variant="fp16")
    assert list((folder / "unet").glob("*.fp16.safetensors"))
    pipe, source = memedit.load_pipeline(folder, variant="fp16")
    assert source.variant == "fp16"
    expected = variant.unet.state_dict()
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    primary, _ = memedit.load_pipeline(folder)
    assert not all(torch.equal(t, expected[n]) for n, t in primary.unet.state_dict().items())


def test_local_folder_refuses_hub_only_options(tiny_model_dir, subspace_dir, tmp_path):
    for args, words in ((["--revision", "v1"], "--revision applies to a hub id"),
                        (["--token", "x"], "--token applies to a hub id"),
                        (["--variant", "fp16"], "has no 'fp16' variant")):
        result = run("bake", "--model", tiny_model_dir, "--subspace", subspace_dir,
                     "--out", tmp_path / "out", *args, code=2)
        assert words in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()
    result = run("bake", "--subspace", subspace_dir, "--out", tmp_path / "out", "--revision",
                 "v1", code=2)
    assert "embedded test model" in result.output


@pytest.fixture()
def online(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


def test_push_refused_offline_before_any_work(tiny_model_dir, subspace_dir, tmp_path,
                                              monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run("bake", "--model", tiny_model_dir, "--subspace", subspace_dir, "--out",
                 tmp_path / "out", "--push-to-hub", "me/sanitized", "--token", "t", code=2)
    assert "HF_HUB_OFFLINE is set" in result.output and "nothing was written" in result.output
    assert not (tmp_path / "out").exists()


def test_push_refused_without_token_or_with_a_bad_id(online, tiny_model_dir, subspace_dir,
                                                     tmp_path):
    base = ["bake", "--model", tiny_model_dir, "--subspace", subspace_dir, "--out",
            tmp_path / "out"]
    result = run(*base, "--push-to-hub", "me/sanitized", code=2)
    assert "no Hugging Face token" in result.output
    result = run(*base, "--push-to-hub", "me/bad//name", "--token", "t", code=2)
    assert "not a hub repository id" in result.output
    result = run(*base, "--private", code=2)
    assert "--private applies to --push-to-hub" in result.output
    assert not (tmp_path / "out").exists()


def test_push_uploads_the_complete_output(online, tiny_model_dir, subspace_dir, tmp_path,
                                          monkeypatch):
    from huggingface_hub import HfApi

    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = {"repo_id": repo_id, "token": self.token, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload"] = {"repo_id": repo_id, "folder": folder, **kwargs,
                           "files": sorted(str(p.relative_to(folder))
                                           for p in folder.rglob("*") if p.is_file()),
                           "card": ModelCard.load(folder / "README.md")}

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    result = run("bake", "--model", tiny_model_dir, "--subspace", subspace_dir, "--out", out,
                 "--push-to-hub", "me/sanitized", "--private", "--token", "hf_push")
    assert "Pushed" in result.output and "https://huggingface.co/me/sanitized" in result.output
    assert calls["create"] == {"repo_id": "me/sanitized", "token": "hf_push", "private": True,
                               "exist_ok": True, "repo_type": "model"}
    upload = calls["upload"]
    assert upload["repo_id"] == "me/sanitized" and upload["folder"] == out
    assert "memedit" in upload["card"].data.tags
    assert {"README.md", "model_index.json", "memedit/subspace.json"} <= set(upload["files"])


def test_push_folder_refuses_what_memedit_did_not_write(online, tiny_model_dir, monkeypatch):
    from huggingface_hub import HfApi

    from memedit.hub import push_folder

    for method in ("create_repo", "upload_folder"):  # a broken refusal must not go online
        monkeypatch.setattr(HfApi, method, lambda *a, **k: pytest.fail("reached the hub"))
    with pytest.raises(MemeditError, match="not written by memedit"):
        push_folder(tiny_model_dir, HubPush("me/x", token="t"))
    assert check_push(HubPush("me/x", token="t")) == "t"


@pytest.mark.parametrize("command", ["locate", "locate-and-bake", "bake", "evaluate", "sweep",
                                     "detect", "attack", "export", "verify-onnx", "generate",
                                     "inspect"])
def test_every_command_that_reads_a_model_takes_the_hub_options(command):
    text = run(command, "--help").output
    assert all(option in text for option in ("--revision", "--variant", "--token")), command
    pushes = command in ("bake", "locate-and-bake", "export")
    assert ("--push-to-hub REPO" in text) == pushes and ("  --private " in text) == pushes


def test_push_refused_under_a_launcher(online, tiny_model_dir, subspace_dir, tmp_path,
                                       monkeypatch):
    """Under `accelerate launch` the other processes would wait on the upload: refused up
    front (this process is kept a single one; only the launcher check sees several)."""
    from memedit import distributed

    monkeypatch.setattr(distributed, "_state", distributed.ProcessState())
    monkeypatch.setattr(distributed, "launched", lambda: True)
    result = run("bake", "--model", tiny_model_dir, "--subspace", subspace_dir, "--out",
                 tmp_path / "out", "--push-to-hub", "me/x", "--token", "t", code=2)
    assert "under a launcher" in result.output and not (tmp_path / "out").exists()


def test_evaluation_commands_load_the_resolved_hub_model(hub, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    result = run("detect", "--model", "org/tiny", "--revision", "v2", "--prompts", prompts,
                 "--steps", "2", "--seeds", "1", "--detector-steps", "1", "--json")
    assert [(call["name"], call["revision"]) for call in hub] == [("org/tiny", "v2")]
    assert json.loads(result.stdout)["model"] == "org/tiny"


def test_a_failed_push_says_the_output_was_written(online, tiny_model_dir, subspace_dir,
                                                   tmp_path, monkeypatch):
    """The hub's errors are OSErrors: a failed push must not be told as "nothing was
    written" (the model is complete, checked, and there); it says how to retry the upload."""
    import requests
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from memedit.hub import push_folder

    def unreachable(self, repo_id, **kwargs):
        raise requests.ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    out = tmp_path / "out"
    result = run("bake", "--model", tiny_model_dir, "--subspace", subspace_dir, "--out", out,
                 "--push-to-hub", "me/sanitized", "--token", "t", code=2)
    assert f"{out} was written and checked; pushing it to me/sanitized failed" in result.output
    assert "ConnectionError" in result.output and "huggingface-cli upload me/sanitized" in \
        result.output
    assert "nothing was written" not in result.output and "internal error" not in result.output
    assert memedit.verify_sanitized(out).ok

    def refused(self, *, repo_id, folder_path, **kwargs):
        raise HfHubHTTPError("403 Forbidden: you have no write access to me/sanitized")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"hf.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", refused)
    with pytest.raises(MemeditError, match="was written and checked; pushing it to me/sanitized "
                                           "failed: HfHubHTTPError: 403 Forbidden"):
        push_folder(out, HubPush("me/sanitized", token="t"))


@pytest.mark.parametrize("command", ["evaluate", "attack"])
def test_update_card_is_refused_before_a_hub_model_downloads(hub, command, tmp_path):
    """--update-card cannot apply to a hub id: refused before --revision resolves (and
    downloads) the model, not after."""
    result = run(command, "--model", "org/tiny", "--revision", "v1", "--out", tmp_path / "out",
                 "--update-card", code=2)
    assert "will not update the card of" in result.output and "not a local folder" in \
        result.output
    assert hub == [] and not (tmp_path / "out").exists()


def test_the_api_pushes_as_the_command_does(online, tiny_model_dir, subspace_dir, tmp_path,
                                            monkeypatch):
    """memedit.bake(..., push_to_hub=HubPush(...)) is `bake --push-to-hub`: refused before any
    work without a token, uploaded once written, the URL returned."""
    from huggingface_hub import HfApi

    from memedit.subspace import Subspace

    subspace = Subspace.load(subspace_dir)
    with pytest.raises(MemeditError, match="no Hugging Face token"):
        memedit.bake(tiny_model_dir, subspace, tmp_path / "refused",
                     push_to_hub=HubPush("me/sanitized"))
    assert not (tmp_path / "refused").exists()
    uploaded = []
    monkeypatch.setattr(HfApi, "create_repo",
                        lambda self, repo_id, **_: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder",
                        lambda self, *, folder_path, **_: uploaded.append(Path(folder_path)))
    result = memedit.bake(tiny_model_dir, subspace, tmp_path / "out",
                          push_to_hub=HubPush("me/sanitized", token="t"))
    assert result.pushed == "https://huggingface.co/me/sanitized"
    assert uploaded == [tmp_path / "out"]


def test_push_is_refused_under_a_launcher(online, monkeypatch):
    """Under several processes the others would wait on the upload past their timeout."""
    monkeypatch.setattr("memedit.distributed.launched", lambda: True)
    with pytest.raises(MemeditError, match="launcher of several processes"):
        check_push(HubPush("me/x", token="t"))
