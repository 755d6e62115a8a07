"""Model families (memedit/families.py): every registered family runs the whole tool on its
tiny fixture through the real CLI, and the family-specific parts (SDXL's two text encoders,
pooled embedding and time ids) are checked on their own."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from memedit.artifacts import MANIFEST_FILE
from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.evaluation.attack import (
    AttackConfig,
    generate_from_embeddings,
    optimize_embeddings,
    prompt_embeddings,
)
from memedit.evaluation.attention import CrossAttentionRecorder
from memedit.evaluation.controls import nemo_masks
from memedit.evaluation.detector import DetectorConfig, text_noise_magnitudes
from memedit.evaluation.harness import EvalSettings
from memedit.export.runtime import load_ort_pipeline
from memedit.families import (
    FAMILIES,
    encode_conditioning,
    family_of,
    family_of_folder,
    prediction_type,
    split_conditioning,
)
from memedit.locate import LocateConfig, record_embedding_statistics, record_statistics
from memedit.prompts import PromptSet
from memedit.sampling import SamplingConfig, generate_images
from memedit.subspace import Subspace
from memedit.targets import TARGET_KINDS, find_target_layers
from memedit.testing import build_tiny_pipeline, save_tiny_pipeline

FAST = SamplingConfig(steps=3, guidance_scale=7.5, batch_size=2)
METHOD = ["--steps", "3", "--tau", "2", "--k", "0.05", "--batch-size", "2"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    """Each registered family's tiny fixture, saved as a pipeline folder."""
    name = request.param
    return name, save_tiny_pipeline(tmp_path_factory.mktemp(name) / name, family=name)


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    """Memorized prompts with (random) training images, and ordinary prompts."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"gt{i}.png")
        rows.append({"prompt": f"the painting of cat {i}", "image": f"gt{i}.png"})
    memorized = folder / "memorized.jsonl"
    memorized.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ordinary = folder / "ordinary.jsonl"
    ordinary.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                  ("a red dog", "a blue cat", "photo of a dog")) + "\n")
    return memorized, ordinary


def _cli(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout


def _last_json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


# ---------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_a_fixture_it_is_detected_from(name, tmp_path):
    pipe = build_tiny_pipeline(family=name)
    family = FAMILIES[name]
    assert family_of(pipe) is family
    params = sum(p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                 for p in c.parameters())
    assert params < 2_000_000
    for component in family.components:
        assert getattr(pipe, component) is not None, component
    # Every target kind the family lists exists and names components the family has.
    assert set(family.targets) <= set(TARGET_KINDS)
    assert {c for names in family.targets.values() for c in names} <= set(family.components)
    assert set(family.text_encoders) <= set(family.components)
    pipe.save_pretrained(tmp_path / name, safe_serialization=True)
    assert family_of_folder(tmp_path / name) is family


def test_v_prediction_is_read_from_the_scheduler():
    assert prediction_type(build_tiny_pipeline(family="sd2")) == "v_prediction"
    assert prediction_type(build_tiny_pipeline()) == "epsilon"


def test_unknown_pipeline_is_refused_clearly(tmp_path):
    class KandinskyPipeline:
        unet = None

    with pytest.raises(MemeditError, match="does not know the model family") as err:
        family_of(KandinskyPipeline())
    assert "StableDiffusionXLPipeline" in str(err.value) and "families.py" in str(err.value)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(MemeditError, match="FluxPipeline"):
        family_of_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(MemeditError, match=r"model_index\.json is not valid JSON"):
        family_of_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(MemeditError, match="holds a JSON list, not an object"):
        family_of_folder(tmp_path)


def test_unet_config_that_is_not_utf8_is_refused_naming_the_file(tmp_path, prompt_files):
    folder = save_tiny_pipeline(tmp_path / "model")
    (folder / "unet" / "config.json").write_bytes(b'{"_class_name": "UNet\xff\xfe"}')
    with pytest.raises(MemeditError, match=r"unet/config\.json is not valid JSON.*utf-8"):
        family_of_folder(folder)
    result = CliRunner().invoke(cli, ["locate", "--model", str(folder), "--memorized",
                                      str(prompt_files[0]), "--out", str(tmp_path / "s"),
                                      *METHOD])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "config.json" in result.output
    assert not (tmp_path / "s").exists()


def test_locate_refuses_an_unknown_pipeline_class(tmp_path, prompt_files):
    folder = save_tiny_pipeline(tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    result = CliRunner().invoke(cli, ["locate", "--model", str(folder), "--memorized",
                                      str(prompt_files[0]), "--out", str(tmp_path / "s"),
                                      *METHOD])
    assert result.exit_code == 2, result.output
    assert "does not know the model family" in result.output
    assert not (tmp_path / "s").exists()


def test_sdxl_folder_without_its_second_text_encoder_is_refused(tmp_path, prompt_files):
    import shutil

    folder = save_tiny_pipeline(tmp_path / "model", family="sdxl")
    shutil.rmtree(folder / "text_encoder_2")
    result = CliRunner().invoke(cli, ["locate", "--model", str(folder), "--memorized",
                                      str(prompt_files[0]), "--out", str(tmp_path / "s"),
                                      *METHOD])
    assert result.exit_code == 2, result.output
    assert "has no text_encoder_2/ component" in result.output
    assert "Stable Diffusion XL" in result.output


def test_sd1_subspace_into_sdxl_is_refused_before_anything_is_copied(tmp_path, prompt_files,
                                                                      monkeypatch):
    """The manifest records the family; bake compares it (and that every masked tensor exists
    with the mask's shape) before copying the model. A subspace without the record (older
    memedit) is still checked on keys and shapes, and still bakes into its own model."""
    import memedit.baking

    sd1 = save_tiny_pipeline(tmp_path / "sd1")
    sdxl = save_tiny_pipeline(tmp_path / "sdxl", family="sdxl")
    subspace = tmp_path / "subspace"
    _cli("locate", "--model", sd1, "--memorized", prompt_files[0], "--out", subspace,
         "--targets", "ff_out,text_mlp", *METHOD)
    manifest = json.loads((subspace / MANIFEST_FILE).read_text())
    assert manifest["model"]["family"] == "sd1"

    def copy_tree(*args, **kwargs):
        raise AssertionError("the model was copied before the check")

    monkeypatch.setattr(memedit.baking, "_copy_tree", copy_tree)
    bake = ["bake", "--model", str(sdxl), "--subspace", str(subspace), "--out",
            str(tmp_path / "out")]
    result = CliRunner().invoke(cli, bake)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Stable Diffusion 1.x" in result.output and "Stable Diffusion XL" in result.output
    assert "Locate a subspace on this model" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd1", "sdxl", "subspace"]

    # Same family, another layout (no transformer blocks): the keys are checked before copying.
    blockless = save_tiny_pipeline(tmp_path / "blockless", with_transformer_blocks=False)
    bake[2] = str(blockless)
    result = CliRunner().invoke(cli, bake)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "has no tensor unet/" in result.output

    del manifest["model"]["family"]  # as memedit wrote subspaces before it recorded it
    (subspace / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, bake)  # keys and shapes are still checked first
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "has no tensor unet/" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blockless", "sd1", "sdxl", "subspace"]
    monkeypatch.undo()
    _cli("bake", "--model", sd1, "--subspace", subspace, "--out", tmp_path / "baked")
    assert (tmp_path / "baked" / "model_index.json").is_file()


# ---------------------------------------------------------------------------- SDXL's parts


def test_text_mlp_covers_both_sdxl_text_encoders():
    pipe = build_tiny_pipeline(family="sdxl")
    layers = find_target_layers(pipe, ("text_mlp",))
    per_encoder = {c: [layer.key for layer, _ in layers if layer.component == c]
                   for c in ("text_encoder", "text_encoder_2")}
    # text_encoder's last layer (of 3) feeds nothing the UNet reads; text_encoder_2's feeds
    # the pooled embedding.
    assert (len(per_encoder["text_encoder"]), len(per_encoder["text_encoder_2"])) == (2, 3)
    assert per_encoder["text_encoder_2"][0].startswith("text_encoder_2/")
    assert per_encoder["text_encoder_2"][0].endswith("mlp.fc2.weight")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_text_mlp_layer_named_changes_the_conditioning(name):
    """Zeroing any text_mlp layer memedit names changes what the UNet reads; zeroing one it
    leaves out (SDXL text_encoder's last layer: the UNet reads the penultimate state, and the
    pooled embedding only from text_encoder_2) changes it by exactly nothing."""
    pipe = build_tiny_pipeline(family=name)
    prompts = ["the painting of a cat", "a red dog"]
    before = encode_conditioning(pipe, prompts)
    named = {layer.key for layer, _ in find_target_layers(pipe, ("text_mlp",))}
    family = FAMILIES[name]
    every = {f"{encoder}/{module}.weight" for encoder in family.text_encoders
             for module, _ in getattr(pipe, encoder).named_modules()
             if module.endswith("mlp.fc2")}
    assert named <= every
    left_out = every - named
    assert left_out == ({"text_encoder/text_model.encoder.layers.2.mlp.fc2.weight"}
                        if name == "sdxl" else set())
    for key in sorted(every):
        component, parameter = key.split("/", 1)
        weight = getattr(pipe, component).get_parameter(parameter)
        kept = weight.detach().clone()
        with torch.no_grad():
            weight.zero_()
        change = (encode_conditioning(pipe, prompts) - before).abs().max().item()
        with torch.no_grad():
            weight.copy_(kept)
        assert (change > 0) == (key in named), (key, change)


def test_sdxl_detector_nemo_and_cross_attention_run():
    pipe = build_tiny_pipeline(family="sdxl")
    config = DetectorConfig(steps=2, sampling=FAST)
    together = text_noise_magnitudes(pipe, ["a red cat", "a dog"], [0, 1], config)
    alone = text_noise_magnitudes(pipe, ["a dog"], [1], config)
    assert together.shape == (2, 2) and (together > 0).all()
    np.testing.assert_allclose(alone[0], together[1], rtol=1e-4)

    selection = nemo_masks(pipe, PromptSet.from_prompts(["a red cat"]),
                           PromptSet.from_prompts(["a dog", "photo", "the blue cat"]),
                           z_threshold=1.0, max_per_prompt=3)
    assert selection.masks and all(k.startswith("unet/") and "attn2.to_v" in k
                                   for k in selection.masks)
    # to_v reads the concatenation of both encoders' states (32 + 32 here).
    module = pipe.unet.get_submodule(next(iter(selection.masks))[5:].rsplit(".", 1)[0])
    assert module.in_features == 64

    with CrossAttentionRecorder(pipe) as recorder:
        pipe(["a red cat"], num_inference_steps=2, output_type="latent")
    shares = recorder.shares()
    assert abs(shares.start + shares.words + shares.end_and_padding - 1) < 1e-6
    assert shares.words > 0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_conditioning_reproduces_the_pipelines_own_images(name):
    """Generating from the family's conditioning of a prompt (what the attack optimizes) is
    generating from the prompt: nothing the UNet reads is lost or added."""
    pipe = build_tiny_pipeline(family=name)
    y = prompt_embeddings(pipe, ["a red cat"])
    negative = prompt_embeddings(pipe, [""])
    from_y = generate_from_embeddings(pipe, y, negative, [3], EvalSettings(sampling=FAST))
    from_prompt = generate_images(pipe, ["a red cat"], [3], FAST)
    np.testing.assert_allclose(from_y, from_prompt, atol=1e-5)
    embeds, pooled = split_conditioning(pipe, y)
    assert embeds.shape[1] == 77
    assert (pooled is not None) == FAMILIES[name].pooled


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_recording_from_conditioning_equals_recording_from_prompts(name):
    """Hardening records the UNet's statistics from attacked conditionings: from a prompt's
    own conditioning they are the prompt's statistics, in every family."""
    pipe = build_tiny_pipeline(family=name)
    config = LocateConfig(targets=("ff_out",), tau=2, sampling=FAST)
    prompts = PromptSet.from_prompts(["a red cat", "the blue dog"])
    from_prompts = record_statistics(pipe, prompts, config, progress=False)
    from_y = record_embedding_statistics(pipe, prompt_embeddings(pipe, prompts.prompts), "y",
                                         config, progress=False)
    assert from_y.sumsq.keys() == from_prompts.sumsq.keys()
    for key, value in from_prompts.sumsq.items():
        torch.testing.assert_close(from_y.sumsq[key], value, rtol=1e-4, atol=1e-5)


def test_sdxl_attack_optimizes_tokens_and_pooled_embedding():
    pipe = build_tiny_pipeline(family="sdxl")
    y = prompt_embeddings(pipe, ["a red cat"])
    z0 = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    for p in pipe.unet.parameters():
        p.requires_grad_(False)
    snapshots, losses = optimize_embeddings(
        pipe, y, z0, AttackConfig(steps=2, pairs=2, lr=0.1, checkpoints=(2,)),
        [torch.Generator().manual_seed(0)])
    moved = (snapshots[2] - y).abs()
    assert losses.shape == (1, 2) and np.isfinite(losses).all()
    assert moved[0, :77].max() > 0 and moved[0, 77, :32].max() > 0
    # The padding of the pooled row gets no gradient: Adam leaves it at zero.
    assert moved[0, 77, 32:].max() == 0


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_family_end_to_end_through_the_cli(family_dir, prompt_files, tmp_path):
    """locate-and-bake (UNet and every text encoder) -> evaluate (quick, with the attack
    column and the random and NeMo controls) -> export --onnx with parity and audit ->
    generate with ONNX Runtime."""
    name, model = family_dir
    family = FAMILIES[name]
    memorized, ordinary = prompt_files
    baked = tmp_path / "baked"
    summary = _last_json(_cli("locate-and-bake", "--model", model, "--memorized", memorized,
                              "--targets", "ff_out,text_mlp", "--out", baked, "--json",
                              *METHOD))
    assert summary["total"]["selected"] > 0
    edited = {path.split("/")[0] for path in summary["edited_files"]}
    assert edited == {"unet", *family.text_encoders}
    masks = Subspace.load(baked).masks
    assert {key.split("/")[0] for key in masks} == edited
    for component in family.text_encoders:  # baking zeroed each text encoder's selection
        stored = load_file(next((baked / component).glob("*.safetensors")))
        keys = [k for k in masks if k.startswith(f"{component}/") and masks[k].any()]
        assert keys, component
        for key in keys:
            assert (stored[key.split("/", 1)[1]][masks[key]] == 0).all(), key

    evaluation = tmp_path / "eval"
    _cli("evaluate", "--model", baked, "--memorized", memorized, "--ordinary", ordinary,
         "--out", evaluation, "--steps", "3", "--seeds", "1", "--detector-steps", "2",
         "--attack-steps", "1", "--quiet")
    report = json.loads((evaluation / "report.json").read_text())
    # The default controls run too: a random mask like the edit, and NeMo.
    assert [v["name"] for v in report["variants"]] == ["original", "sanitized", "random", "nemo"]

    onnx_dir = tmp_path / "onnx"
    verified = _last_json(_cli("export", "--onnx", baked, "--out", onnx_dir,
                               "--no-optimum-validation", "--threads", "1", "--steps", "2",
                               "--json"))
    assert verified["verdict"] == "PASSED"
    assert verified["audit"]["passed"] and verified["parity"]["passed"]
    compared = {c["name"] for c in verified["parity"]["comparisons"]}
    expected = set(family.text_encoders) | {"unet", "vae_decoder"}
    if family.text_hidden_state is not None:  # SDXL: the penultimate states the UNet reads
        expected |= {f"{e} hidden_states[{family.text_hidden_state}]"
                     for e in family.text_encoders}
    assert expected <= compared
    assert all((onnx_dir / graph / "model.onnx").is_file() for graph in family.onnx_graphs)
    unet_graph = onnx.load(str(onnx_dir / "unet" / "model.onnx"), load_external_data=False)
    assert [i.name for i in unet_graph.graph.input] == [
        "sample", "timestep", "encoder_hidden_states", *family.unet_extra_inputs]
    audited = {row["key"].split("/")[0] for row in verified["audit"]["parameters"]}
    assert audited == edited

    assert f"optimum.onnxruntime.{family.ort_pipeline_class}" in (
        onnx_dir / "README.md").read_text()  # the export's card names the class that loads it
    ort_pipe, _ = load_ort_pipeline(onnx_dir, "cpu", threads=1)
    assert type(ort_pipe).__name__ == family.ort_pipeline_class
    assert family_of(ort_pipe) is family
    del ort_pipe

    image = tmp_path / "image.png"
    _cli("generate", "--onnx", onnx_dir, "a red cat", "--out", image, "--steps", "2",
         "--provider", "cpu", "--threads", "1")
    from PIL import Image

    assert Image.open(image).size == (32, 32)
