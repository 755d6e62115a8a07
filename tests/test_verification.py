"""Verification that someone with write access to the model folder cannot fool silently.

Each tamper case gets its verdict (exit 1 FAILED, 3 NOT VERIFIABLE, 2 user error) and a
message naming the cause, never a traceback, and leaves every input byte as it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import folder_digest
from safetensors.torch import load_file, save_file

import memedit
from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.sampling import SamplingConfig
from memedit.subspace import Subspace
from memedit.testing import save_tiny_pipeline
from memedit.weights import split_key, tensor_sha256

# The TorchScript exporter's tracer warnings are expected noise here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = memedit.LocateConfig(k=0.05, tau=3, sampling=SamplingConfig(steps=5, batch_size=2))
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
MASKS = "memedit/masks.safetensors"
MANIFEST = "memedit/subspace.json"
VERIFY_FAST = ["--provider", "cpu", "--threads", "1", "--steps", "2"]


def run(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def expect(result, status: int, *needles: str) -> None:
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def snapshot(*folders: Path) -> dict[str, str]:
    return {str(folder): folder_digest(folder) for folder in folders}


@contextlib.contextmanager
def untouched(*folders: Path) -> Iterator[None]:
    """The command under test must not change a byte of its inputs."""
    before = snapshot(*folders)
    yield
    assert snapshot(*folders) == before


@pytest.fixture(scope="module")
def located(tiny_model_dir) -> Subspace:
    pipe, source = memedit.load_pipeline(tiny_model_dir)
    prompts = memedit.PromptSet.from_prompts(["a red cat", "a blue dog", "a painting"], "mem")
    return memedit.locate(pipe, prompts, config=CONFIG, source=source, progress=False)


@pytest.fixture(scope="module")
def kept(located, tmp_path_factory) -> Path:
    """The subspace as `memedit locate` wrote it, kept outside the model folder."""
    return located.save(tmp_path_factory.mktemp("kept") / "subspace")


@pytest.fixture(scope="module")
def baked(tiny_model_dir, located, tmp_path_factory) -> Path:
    """A sanitized model. Read-only: tamper tests copy it first."""
    out = tmp_path_factory.mktemp("baked") / "sanitized"
    memedit.bake(tiny_model_dir, located, out, progress=False)
    return out


@pytest.fixture()
def model(baked, tmp_path) -> Path:
    """A copy of the sanitized model to tamper with."""
    return Path(shutil.copytree(baked, tmp_path / "model"))


def restore_weight(model: Path, original: Path, clear_bit: bool) -> str:
    """Put one zeroed weight back to its original value; optionally hide it by clearing its
    bit in the mask the model carries. Returns the tensor's key."""
    masks = load_file(model / MASKS)
    key = sorted(masks)[0]
    index = tuple(int(i) for i in masks[key].nonzero()[0])
    name = split_key(key)[1]
    state = load_file(model / UNET_FILE)
    state[name][index] = load_file(original / UNET_FILE)[name][index]
    save_file(state, str(model / UNET_FILE), metadata={"format": "pt"})
    if clear_bit:
        masks[key][index] = 0
        save_file(masks, str(model / MASKS), metadata={"format": "memedit-subspace"})
    return key


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


# --- inspect ---------------------------------------------------------------------------------

def test_untouched_model_is_ok_and_says_what_rests_on_the_folder(baked, kept, tiny_model_dir):
    with untouched(baked, kept, tiny_model_dir):
        result = run("inspect", baked)
        expect(result, 0, "verification: OK", "hash to the manifest's sha256_after",
               "model.identity", "pass --subspace or --expect-digest")
        digest = run("inspect", "--digest", kept)
        expect(digest, 0)
        assert digest.output.strip() == Subspace.load(kept).digest()
        result = run("inspect", baked, "--subspace", kept, "--expect-digest",
                     digest.output.strip(), "--original", tiny_model_dir, "--json")
    expect(result, 0)
    verification = json.loads(result.stdout)["verification"]
    assert verification["verdict"] == "OK" and verification["not_established"] == []
    assert "the carried subspace equals the one in" in " ".join(verification["established"])


@pytest.mark.parametrize("with_original", [False, True], ids=["recorded-original", "--original"])
def test_restored_weight_with_its_mask_bit_cleared_fails(model, kept, tiny_model_dir,
                                                         with_original):
    key = restore_weight(model, tiny_model_dir, clear_bit=True)
    extra = ["--original", tiny_model_dir] if with_original else []
    with untouched(model, tiny_model_dir):
        result = run("inspect", model, *extra)
    expect(result, 1, "verification: FAILED", f"{split_key(key)[1]} is not the tensor the "
           "manifest records after baking (sha256_after differs)", "the manifest records")
    # An independent copy of the subspace names the cleared bit itself.
    expect(run("inspect", model, "--subspace", kept), 1, "1 mask bits differ")


def test_restored_weight_with_the_original_gone_still_fails(model, tiny_model_dir, tmp_path):
    restore_weight(model, tiny_model_dir, clear_bit=True)
    info = json.loads((model / "memedit/sanitized.json").read_text())
    info["source"]["path"] = str(tmp_path / "gone")
    (model / "memedit/sanitized.json").write_text(json.dumps(info))
    with untouched(model):
        expect(run("inspect", model), 1, "sha256_after differs", "is gone (pass --original)")


def test_restored_weight_with_its_mask_intact_fails(model, tiny_model_dir):
    key = restore_weight(model, tiny_model_dir, clear_bit=False)
    with untouched(model):
        result = run("inspect", model)
    expect(result, 1, f"{split_key(key)[1]} has 1 masked weights that are not zero",
           "sha256_after differs")


def test_deleted_provenance_file_is_not_verifiable(model, tiny_model_dir):
    (model / "memedit/sanitized.json").unlink()
    with untouched(model, tiny_model_dir):
        result = run("inspect", model)
        expect(result, 3, "verification: NOT VERIFIABLE", "sanitized.json",
               "provenance was removed")
        # Naming the original does not make it OK: the provenance is still gone.
        expect(run("inspect", model, "--original", tiny_model_dir), 3, "NOT VERIFIABLE")


def test_deleted_carried_subspace_is_not_verifiable(model, kept, tiny_model_dir):
    (model / MASKS).unlink()
    (model / MANIFEST).unlink()
    with untouched(model, kept, tiny_model_dir):
        expect(run("inspect", model), 3, "carries no subspace", "memedit/masks.safetensors")
        result = run("inspect", model, "--subspace", kept, "--original", tiny_model_dir)
    # With a kept subspace the weights are still checked, but the verdict cannot be OK.
    expect(result, 3, "NOT VERIFIABLE", "hash to the manifest's sha256_after")


def test_edited_manifest_counts_fail(model):
    def bump(manifest: dict) -> None:
        key = sorted(manifest["layers"])[0]
        manifest["layers"][key]["selected"] += 1

    edit_manifest(model, bump)
    with untouched(model):
        expect(run("inspect", model), 1, "FAILED", "the manifest records")


def test_consistent_rewrite_is_caught_only_from_outside_the_folder(model, kept, tiny_model_dir):
    """Restore a weight and rewrite masks, counts and sha256_after to match: the folder is
    self-consistent, so only --subspace and --expect-digest can tell."""
    key = restore_weight(model, tiny_model_dir, clear_bit=True)
    tensor = load_file(model / UNET_FILE)[split_key(key)[1]]
    selected = int(load_file(model / MASKS)[key].sum())

    def rewrite(manifest: dict) -> None:
        manifest["model"]["tensors"][key]["sha256_after"] = tensor_sha256(tensor)
        manifest["layers"][key]["selected"] = selected
        manifest["total"]["selected"] -= 1

    edit_manifest(model, rewrite)
    digest = Subspace.load(kept).digest()
    with untouched(model, kept, tiny_model_dir):
        expect(run("inspect", model), 0, "the carried subspace itself: nothing outside")
        expect(run("inspect", model, "--subspace", kept), 1, "differs from", "mask bits differ")
        expect(run("inspect", model, "--expect-digest", digest), 1, "not the expected")


def test_model_baked_from_a_pickled_checkpoint_is_inspectable(tiny_model_dir, tmp_path):
    original = Path(shutil.copytree(tiny_model_dir, tmp_path / "pickled"))
    torch.save(load_file(original / UNET_FILE), original / "unet/diffusion_pytorch_model.bin")
    (original / UNET_FILE).unlink()
    pipe, source = memedit.load_pipeline(original, allow_pickle=True)
    prompts = memedit.PromptSet.from_prompts(["a red cat"], "mem")
    subspace = memedit.locate(pipe, prompts, config=CONFIG, source=source, progress=False)
    memedit.bake(original, subspace, tmp_path / "out", allow_pickle=True, progress=False)
    with untouched(original, tmp_path / "out"):
        expect(run("inspect", tmp_path / "out"), 2, "pickled", "--allow-pickle")
        expect(run("inspect", tmp_path / "out", "--allow-pickle"), 0, "verification: OK")


# --- bake --------------------------------------------------------------------------------------

def test_subspace_without_hashes_is_not_baked_onto_another_model(kept, tmp_path):
    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    stripped = Path(shutil.copytree(kept, tmp_path / "stripped"))
    manifest = json.loads((stripped / "subspace.json").read_text())
    for record in manifest["model"]["tensors"].values():
        del record["sha256_before"], record["sha256_after"]
    (stripped / "subspace.json").write_text(json.dumps(manifest))
    with untouched(other, stripped):
        result = run("bake", "--model", other, "--subspace", stripped, "--out", tmp_path / "out")
    expect(result, 2, "cannot be baked", "records no sha256", "sha256_before/after")
    assert not (tmp_path / "out").exists()


def test_unet_that_differs_outside_the_subspace_is_not_baked(tiny_model_dir, kept, tmp_path):
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "other"))
    state = load_file(other / UNET_FILE)
    state["conv_in.bias"] = state["conv_in.bias"] + 1.0
    save_file(state, str(other / UNET_FILE), metadata={"format": "pt"})
    with untouched(other, kept):
        result = run("bake", "--model", other, "--subspace", kept, "--out", tmp_path / "out")
    expect(result, 2, "model.identity mismatch")
    assert not (tmp_path / "out").exists()


def test_manifest_states_what_its_identity_covers(located, baked):
    identity = located.manifest["model"]["identity"]
    assert "except the tensors this subspace edits" in identity["covers"]
    assert identity["tensors"] > 0 and len(identity["sha256"]) == 64
    # Baking leaves it unchanged: the sanitized model has the located model's identity.
    carried = Subspace.load(baked)
    assert carried.digest() == located.digest()


# --- corrupt subspaces --------------------------------------------------------------------------

def _truncate_masks(folder: Path) -> None:
    data = (folder / "masks.safetensors").read_bytes()
    (folder / "masks.safetensors").write_bytes(data[: len(data) // 2])


def _string_version(folder: Path) -> None:
    manifest = json.loads((folder / "subspace.json").read_text())
    manifest["format_version"] = "1"
    (folder / "subspace.json").write_text(json.dumps(manifest))


def _list_manifest(folder: Path) -> None:
    (folder / "subspace.json").write_text("[1, 2, 3]")


def _layers_as_list(folder: Path) -> None:
    manifest = json.loads((folder / "subspace.json").read_text())
    manifest["layers"] = list(manifest["layers"])
    (folder / "subspace.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("damage", "needle"), [
    (_truncate_masks, "is not a readable safetensors file"),
    (_string_version, "format_version is '1', not an integer"),
    (_list_manifest, "is not a memedit subspace manifest"),
    (_layers_as_list, "layers is a list, not an object"),
], ids=["truncated-masks", "string-format-version", "list-manifest", "layers-list"])
def test_corrupt_subspace_is_a_message(kept, model, tiny_model_dir, tmp_path, damage, needle):
    folder = Path(shutil.copytree(kept, tmp_path / "damaged"))
    damage(folder)
    damage(model / "memedit")
    with pytest.raises(MemeditError):
        Subspace.load(folder)
    with untouched(folder, model, tiny_model_dir):
        expect(run("inspect", folder), 2, needle, "Hint:")
        expect(run("inspect", model), 2, needle)
        expect(run("bake", "--model", tiny_model_dir, "--subspace", folder, "--out",
                   tmp_path / "out"), 2, needle)
    assert not (tmp_path / "out").exists()


# --- ONNX ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(baked, tmp_path_factory) -> Path:
    """The sanitized model exported once (audit only; parity runs in verify-onnx)."""
    from memedit.export.api import export_onnx
    from memedit.export.onnx import ExportOptions

    out = tmp_path_factory.mktemp("onnx") / "export"
    report = export_onnx(baked, out, ExportOptions(optimum_validation=False), parity=False,
                         threads=1)
    assert report.verdict == "PASSED", report.table()
    return out


@pytest.fixture()
def export_copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "export"))


def test_verify_onnx_passes_an_untouched_export(exported, baked, kept):
    with untouched(exported, baked):
        result = run("verify-onnx", exported, "--subspace", kept, *VERIFY_FAST)
    expect(result, 0, "RESULT: PASSED", "matches")


def test_verify_onnx_fails_a_source_with_a_restored_hidden_weight(exported, model,
                                                                  tiny_model_dir):
    restore_weight(model, tiny_model_dir, clear_bit=True)
    with untouched(exported, model):
        result = run("verify-onnx", exported, "--model", model, *VERIFY_FAST)
    expect(result, 1, "RESULT: FAILED", "Sanitization audit failed")
    assert "nonzero-in-source" in result.output


def test_export_refuses_a_model_with_a_restored_hidden_weight(model, tiny_model_dir, tmp_path):
    """The weight is back and its mask bit cleared, so the graph keeps zeros wherever the
    carried mask says: only the manifest's sha256_after and counts give it away."""
    key = restore_weight(model, tiny_model_dir, clear_bit=True)
    with untouched(model):
        result = run("export", "--onnx", model, "--out", tmp_path / "o", "--no-parity",
                     "--no-optimum-validation", "--threads", "1")
    expect(result, 1, "Sanitization audit failed", "sha256_after differs", key)
    assert "source-not-as-baked" in result.output and not (tmp_path / "o").exists()


def test_verify_onnx_fails_a_graph_weight_restored_behind_a_cleared_bit(export_copy, baked,
                                                                        kept):
    import numpy as np
    import onnx

    masks = load_file(export_copy / MASKS)
    key = sorted(masks)[0]
    index = tuple(int(i) for i in masks[key].nonzero()[0])
    weight = load_file(baked / UNET_FILE)[split_key(key)[1]].numpy()
    graph = onnx.load(str(export_copy / "unet/model.onnx"))
    for init in graph.graph.initializer:
        values = onnx.numpy_helper.to_array(init)
        if values.shape == weight.T.shape and np.array_equal(values, weight.T):
            restored = values.copy()
            restored[index[::-1]] = 0.5
            init.CopyFrom(onnx.numpy_helper.from_array(restored, init.name))
    onnx.save(graph, str(export_copy / "unet/model.onnx"))
    masks[key][index] = 0
    save_file(masks, str(export_copy / MASKS), metadata={"format": "memedit-subspace"})
    with untouched(export_copy, baked, kept):
        result = run("verify-onnx", export_copy, *VERIFY_FAST)
        expect(result, 1, "RESULT: FAILED", "the manifest records")
        expect(run("verify-onnx", export_copy, "--subspace", kept, *VERIFY_FAST), 1,
               "the subspace the export stored differs from", "mask bits differ")


def test_verify_onnx_without_provenance_is_not_verifiable(export_copy, model):
    shutil.rmtree(export_copy / "memedit")
    with untouched(export_copy, model):
        # The model's own subspace still audits cleanly, but the export's record is gone.
        expect(run("verify-onnx", export_copy, "--model", model, *VERIFY_FAST), 3,
               "RESULT: NOT VERIFIABLE", "onnx_export.json) is missing")
    shutil.rmtree(model / "memedit")
    with untouched(export_copy, model):
        expect(run("verify-onnx", export_copy, "--model", model, *VERIFY_FAST), 3,
               "there is no subspace to audit against", "Sanitization audit: not run")


def test_corrupt_onnx_is_a_message(export_copy):
    data = (export_copy / "unet/model.onnx").read_bytes()
    (export_copy / "unet/model.onnx").write_bytes(data[: len(data) // 3])
    with untouched(export_copy):
        expect(run("verify-onnx", export_copy, *VERIFY_FAST), 2, "not a readable ONNX model")
        expect(run("generate", "--onnx", export_copy, "a cat", "--steps", "1", "--out",
                   export_copy.parent / "x.png", "--threads", "1"), 2,
               "not a readable ONNX model", "verify-onnx")


def test_mismatched_onnx_graph_is_a_message(export_copy):
    shutil.copyfile(export_copy / "text_encoder/model.onnx", export_copy / "unet/model.onnx")
    with untouched(export_copy):
        expect(run("verify-onnx", export_copy, *VERIFY_FAST), 1, "no ONNX initializer holds")
        expect(run("generate", "--onnx", export_copy, "a cat", "--steps", "1", "--out",
                   export_copy.parent / "x.png", "--threads", "1"), 2,
               "Optimum could not load", "timestep")


def _drop_record(path: Path) -> None:
    path.unlink()


def _fail_audit(path: Path) -> None:
    record = json.loads(path.read_text())
    record["report"]["audit"]["passed"] = False
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(("damage", "needle"), [
    (_drop_record, "has no export record"), (_fail_audit, "audit did not pass")],
    ids=["record-missing", "audit-failed"])
def test_generate_warns_when_the_export_is_not_vouched_for(export_copy, tmp_path, damage,
                                                          needle):
    damage(export_copy / "memedit/onnx_export.json")
    with untouched(export_copy):
        result = run("generate", "--onnx", export_copy, "a cat", "--steps", "1", "--out",
                     tmp_path / "cat.png", "--threads", "1")
    expect(result, 0, "memedit: warning:", needle, "memedit verify-onnx")
    assert (tmp_path / "cat.png").is_file()


def test_generate_is_quiet_for_an_audited_export(exported, tmp_path):
    result = run("generate", "--onnx", exported, "a cat", "--steps", "1", "--out",
                 tmp_path / "cat.png", "--threads", "1")
    expect(result, 0)
    assert "Warning" not in result.output
