"""Baking zeroes exactly the mask, is idempotent, atomic, and never touches the source."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import folder_digest
from safetensors.torch import load_file

import memedit
from memedit import baking
from memedit.compare import compare_subspaces
from memedit.errors import MemeditError
from memedit.sampling import SamplingConfig

CONFIG = memedit.LocateConfig(k=0.05, tau=3, sampling=SamplingConfig(steps=5, batch_size=2))
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def located(tiny_model_dir):
    pipe, source = memedit.load_pipeline(tiny_model_dir)
    prompts = memedit.PromptSet.from_prompts(["a red cat", "a blue dog", "a painting"], "mem")
    return memedit.locate(pipe, prompts, config=CONFIG, source=source, progress=False)


def test_bake_zeroes_exactly_the_mask(tiny_model_dir, located, tmp_path):
    before = folder_digest(tiny_model_dir)
    result = memedit.bake(tiny_model_dir, located, tmp_path / "out", progress=False)
    assert folder_digest(tiny_model_dir) == before  # the source is untouched
    assert result.zeroed == located.num_selected > 0
    original = load_file(tiny_model_dir / UNET_FILE)
    baked = load_file(tmp_path / "out" / UNET_FILE)
    assert original.keys() == baked.keys()
    for name, tensor in original.items():
        mask = located.masks.get(f"unet/{name}")
        if mask is None:
            assert torch.equal(tensor, baked[name]), name
        else:
            assert (baked[name][mask] == 0).all()
            assert torch.equal(baked[name][~mask], tensor[~mask])
            assert (tensor[mask] != 0).all()  # so the zeros are the bake's doing
    # Every other file is byte-identical, and the subspace travels with the model.
    after = folder_digest(tmp_path / "out")
    for name, digest in before.items():
        if name != UNET_FILE:
            assert after[name] == digest, name
    assert memedit.Subspace.load(tmp_path / "out").num_selected == located.num_selected
    assert memedit.verify_sanitized(tmp_path / "out").ok


def test_baked_model_loads_with_plain_diffusers(tiny_model_dir, located, tmp_path):
    from diffusers import StableDiffusionPipeline

    memedit.bake(tiny_model_dir, located, tmp_path / "out", progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    reference, _ = memedit.load_pipeline(tiny_model_dir)
    memedit.apply_subspace(reference, located)
    for name, param in reference.unet.named_parameters():
        assert torch.equal(param, pipe.unet.get_parameter(name)), name


def test_bake_is_idempotent(tiny_model_dir, located, tmp_path):
    first = memedit.bake(tiny_model_dir, located, tmp_path / "once", progress=False)
    second = memedit.bake(tmp_path / "once", located, tmp_path / "twice", progress=False)
    assert not first.already_sanitized and second.already_sanitized
    once, twice = folder_digest(tmp_path / "once"), folder_digest(tmp_path / "twice")
    weights = [name for name in once if name.endswith(".safetensors")]
    assert weights and all(once[name] == twice[name] for name in weights)


def test_interrupted_bake_leaves_nothing_behind(tiny_model_dir, located, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(baking, "rewrite_component", interrupted)
    with pytest.raises(KeyboardInterrupt):
        memedit.bake(tiny_model_dir, located, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_memedits_own_output(tiny_model_dir, located, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's")
    with pytest.raises(MemeditError, match="exists already"):
        memedit.bake(tiny_model_dir, located, tmp_path / "out", progress=False)
    with pytest.raises(MemeditError, match="was not written by memedit"):
        memedit.bake(tiny_model_dir, located, tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's"
    memedit.bake(tiny_model_dir, located, tmp_path / "baked", progress=False)
    (tmp_path / "baked" / "stale.txt").write_text("old")
    memedit.bake(tiny_model_dir, located, tmp_path / "baked", overwrite=True, progress=False)
    assert not (tmp_path / "baked" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked", "out"]


def test_fp16_variant_files_are_sanitized_too(tiny_model_dir, located, tmp_path):
    source = tmp_path / "with-variant"
    shutil.copytree(tiny_model_dir, source)
    state = load_file(source / UNET_FILE)
    from safetensors.torch import save_file

    save_file({k: v.half() for k, v in state.items()},
              str(source / "unet/diffusion_pytorch_model.fp16.safetensors"))
    memedit.bake(source, located, tmp_path / "out", progress=False)
    variant = load_file(tmp_path / "out/unet/diffusion_pytorch_model.fp16.safetensors")
    for key, mask in located.masks.items():
        tensor = variant[key.partition("/")[2]]
        assert tensor.dtype == torch.float16 and (tensor[mask] == 0).all()


def test_compare_identical_and_disjoint_subspaces(located):
    rows, total = compare_subspaces(located, located)
    assert total.iou == 1.0 and all(r.iou == 1.0 for r in rows if r.union)
    flipped = memedit.Subspace({k: ~v for k, v in located.masks.items()}, located.manifest)
    _, total = compare_subspaces(located, flipped)
    assert total.intersection == 0 and total.iou == 0.0


def test_subspace_roundtrip_and_manifest(located, tmp_path):
    located.save(tmp_path / "sub")
    loaded = memedit.Subspace.load(tmp_path / "sub")
    assert loaded.masks.keys() == located.masks.keys()
    assert all(torch.equal(loaded.masks[k], located.masks[k]) for k in located.masks)
    manifest = loaded.manifest
    assert manifest["method"]["k"] == 0.05 and manifest["method"]["tau"] == 3
    assert manifest["prompts"]["memorized"][0]["count"] == 3
    assert manifest["total"]["selected"] == located.num_selected
    for key, entry in manifest["model"]["tensors"].items():
        assert entry["sha256_before"] != entry["sha256_after"], key
