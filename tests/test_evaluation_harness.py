"""The evaluation harness and commands on the tiny random pipeline (plumbing, not findings),
plus the detector's finding on the embedded test model (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from memedit.errors import MemeditError
from memedit.evaluation.cli import detect_command, evaluate_command, sweep_command
from memedit.evaluation.controls import nemo_masks
from memedit.evaluation.detector import DetectorConfig, text_noise_magnitudes
from memedit.evaluation.harness import check_ground_truths, masks_applied, split_memorized
from memedit.evaluation.similarity import Scorer
from memedit.outputs import MARKER_FILE
from memedit.prompts import PromptSet, read_prompts
from memedit.sampling import SamplingConfig, run_pipeline
from memedit.testing import save_tiny_pipeline

FAST = SamplingConfig(steps=4, guidance_scale=7.5, batch_size=4)
FAST_ARGS = ["--steps", "4", "--seeds", "1", "--detector-steps", "2", "--quiet"]


def _invoke(command, args):
    result = CliRunner().invoke(command, args, catch_exceptions=True)
    return result


def test_detector_shape_and_batch_independence(tiny_pipe):
    config = DetectorConfig(steps=2, sampling=FAST)
    together = text_noise_magnitudes(tiny_pipe, ["a red cat", "a dog", "photo"], [0, 1, 2], config)
    alone = text_noise_magnitudes(tiny_pipe, ["a dog"], [1], config)
    assert together.shape == (3, 2) and (together > 0).all()
    np.testing.assert_allclose(alone[0], together[1], rtol=1e-4)


def test_detector_needs_guidance(tiny_pipe):
    config = DetectorConfig(steps=2, sampling=SamplingConfig(steps=4, guidance_scale=1.0))
    with pytest.raises(MemeditError, match="classifier-free guidance"):
        text_noise_magnitudes(tiny_pipe, ["a dog"], [0], config)


def test_masks_applied_zeroes_then_restores_exactly(tiny_pipe):
    key = "unet/mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"
    param = tiny_pipe.unet.get_parameter(key.split("/", 1)[1])
    before = param.detach().clone()
    mask = torch.zeros_like(param, dtype=torch.bool)
    mask[:, :3] = True
    with masks_applied(tiny_pipe, {key: mask}):
        assert (param[mask] == 0).all()
        assert torch.equal(param[~mask], before[~mask])
    assert torch.equal(param, before)


def test_nemo_masks_select_whole_value_rows(tiny_pipe):
    memorized = PromptSet.from_prompts(["the portrait of cat 0", "xyzzy qqq"], "mem")
    ordinary = PromptSet.from_prompts(["a red dog", "a blue cat", "photo of a dog", "a cat"])
    selection = nemo_masks(tiny_pipe, memorized, ordinary, z_threshold=1.0, max_per_prompt=3)
    assert selection.masks, "a 1-sigma threshold must pick something"
    for key, mask in selection.masks.items():
        assert key.startswith("unet/") and key.endswith("attn2.to_v.weight")
        rows = mask.any(dim=1)
        assert torch.equal(mask, rows[:, None].expand_as(mask))  # whole output channels
    assert all(len(c) <= 3 for c in selection.per_prompt)
    assert sum(int(m.any(dim=1).sum()) for m in selection.masks.values()) == \
        selection.settings["unique_channels"]


def test_prompts_and_images_that_do_not_line_up(tmp_path, prompt_files):
    memorized, _ = prompt_files
    lines = memorized.read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + "\n" + json.dumps({"prompt": "no image here"}) + "\n")
    groups = {"heldout": read_prompts(broken)}
    with pytest.raises(MemeditError, match="name no training image while the others do"):
        check_ground_truths(groups, Scorer("mse"))
    # No images at all: similarity is skipped, the detector still runs.
    plain = {"heldout": PromptSet.from_prompts(["a", "b"])}
    assert check_ground_truths(plain, Scorer("mse")) is False
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "p", "image": "gone.png"}) + "\n")
    with pytest.raises(MemeditError, match="does not exist"):
        check_ground_truths({"heldout": read_prompts(missing)}, Scorer("mse"))


def test_split_memorized_in_file_order():
    prompts = PromptSet.from_prompts(["a", "b", "c", "d", "e"], "mem")
    locate, heldout = split_memorized(prompts, 0.4)
    assert locate.prompts == ["a", "b"] and heldout.prompts == ["c", "d", "e"]
    with pytest.raises(MemeditError, match="leaves one part empty"):
        split_memorized(prompts, 0.01)


def test_evaluate_reports_copies_under_attack_for_every_variant(tmp_path, tiny_model_dir,
                                                                 prompt_files):
    memorized, ordinary = prompt_files
    out = tmp_path / "sweep"
    result = _invoke(sweep_command, ["--model", str(tiny_model_dir), "--memorized",
                                     str(memorized), "--ordinary", str(ordinary), "--k", "0.05",
                                     "--tau", "2", "--controls", "random", "--attack-steps", "2",
                                     "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "under attack locate / heldout" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["attack"]["steps"] == 2
    for variant in report["variants"]:
        for group in ("locate", "heldout"):
            attacked = variant["memorization"][group]["under_attack"]
            rates = attacked["measures"]["mse"]["rates"]
            assert set(rates) == {"0.01", "0.02"}  # the copy and the near-copy threshold
            assert 0 <= rates["0.01"]["generation_rate"] <= 1


def test_sweep_command_end_to_end(tmp_path, tiny_model_dir, prompt_files):
    memorized, ordinary = prompt_files
    out = tmp_path / "sweep"
    result = _invoke(sweep_command, ["--model", str(tiny_model_dir), "--memorized",
                                     str(memorized), "--ordinary", str(ordinary), "--k",
                                     "0.05,0.1", "--tau", "2", "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert {p.name for p in out.iterdir()} == {"report.json", "table.txt", "grid.png",
                                               "sweep.png", MARKER_FILE}
    report = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["original", "located k=0.05", "random k=0.05", "located k=0.1",
                     "random k=0.1", "nemo"]
    by_name = {v["name"]: v for v in report["variants"]}
    # The random control zeroes exactly as many weights as the located mask.
    assert by_name["random k=0.1"]["zeroed"] == by_name["located k=0.1"]["zeroed"]
    assert by_name["original"]["zeroed"] is None
    heldout = by_name["original"]["memorization"]["heldout"]
    assert heldout["prompt_set"] == "memorized[2:]"
    assert set(heldout["measures"]) == {"mse", "ssim"}
    assert "0.01" in heldout["measures"]["mse"]["rates"]
    assert report["prompt_sets"]["locate"]["count"] == 2
    assert report["settings"]["seeds_memorized"] == [100]
    assert report["settings"]["aggregation"]["ground_truths"].startswith("max")
    assert report["context"]["locate"]["ks"] == [0.05, 0.1]
    assert "drift_from_original" in by_name["nemo"]["utility"]
    assert 0.0 <= by_name["nemo"]["detector"]["auroc"]["heldout"] <= 1.0
    assert "memorized = mse < 0.01" in result.output


def test_evaluate_with_baseline_and_nemo(tmp_path, tiny_model_dir, prompt_files):
    memorized, ordinary = prompt_files
    out = tmp_path / "eval"
    args = ["--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--memorized",
            str(memorized), "--ordinary", str(ordinary), "--out", str(out), "--controls",
            "nemo", "--nemo-z", "1.0", "--measure", "ssim", *FAST_ARGS]
    result = _invoke(evaluate_command, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    by_name = {v["name"]: v for v in report["variants"]}
    # The model was not baked by memedit: it is called "model", not "sanitized".
    assert list(by_name) == ["original", "model", "nemo"]
    # Same weights, same seeds: the model here is the original, exactly.
    assert by_name["model"]["utility"]["drift_from_original"]["mse"]["mean"] == 0.0
    assert by_name["model"]["memorization"] == by_name["original"]["memorization"]
    # SSIM has no agreed threshold: no rate is reported for it.
    assert "rates" not in by_name["original"]["memorization"]["heldout"]["measures"]["ssim"]
    # The output exists now: a second run refuses to overwrite it.
    again = _invoke(evaluate_command, args)
    assert isinstance(again.exception, MemeditError) and "exists" in str(again.exception)
    # The random control needs the subspace of a baked model; this folder has none.
    random = _invoke(evaluate_command, [*args[:-len(FAST_ARGS)], "--controls", "random",
                                        "--overwrite", *FAST_ARGS])
    assert isinstance(random.exception, MemeditError)
    assert "subspace" in str(random.exception)


def test_evaluate_rejects_bad_inputs_before_sampling(tmp_path, tiny_model_dir, prompt_files):
    memorized, ordinary = prompt_files
    base = ["--model", str(tiny_model_dir), "--ordinary", str(ordinary), *FAST_ARGS]
    not_ts = tmp_path / "sscd.pt"
    torch.save({"w": torch.zeros(1)}, not_ts)
    result = _invoke(evaluate_command, [*base, "--memorized", str(memorized), "--sscd",
                                        str(not_ts), "--out", str(tmp_path / "a")])
    assert isinstance(result.exception, MemeditError)
    assert "not a TorchScript file" in str(result.exception)
    (tmp_path / "gt1.png").write_bytes(b"not an image")
    result = _invoke(evaluate_command, [*base, "--memorized", str(memorized), "--out",
                                        str(tmp_path / "b")])
    assert isinstance(result.exception, MemeditError)
    assert "Cannot read the image" in str(result.exception)
    result = _invoke(evaluate_command, [*base, "--memorized", str(memorized), "--k", "a,b",
                                        "--out", str(tmp_path / "c")])
    assert isinstance(result.exception, MemeditError)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_detect_command_ranks_and_scores(tmp_path, tiny_model_dir, prompt_files):
    memorized, ordinary = prompt_files
    both = tmp_path / "candidates.jsonl"
    both.write_text(memorized.read_text() + ordinary.read_text())
    out = tmp_path / "ranking.json"
    result = _invoke(detect_command, ["--model", str(tiny_model_dir), "--prompts", str(both),
                                      "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads(out.read_text())
    scores = [row["score"] for row in data["ranking"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 7
    assert 0.0 <= data["auroc"] <= 1.0
    assert data["settings"]["seeds"] == [100]
    # --json: the same ranking on stdout, nothing else there.
    printed = CliRunner().invoke(detect_command, ["--model", str(tiny_model_dir), "--prompts",
                                                  str(both), "--json", *FAST_ARGS])
    assert printed.exit_code == 0
    assert json.loads(printed.stdout)["ranking"] == data["ranking"]


def _embedded():
    """The embedded test model's folder and prompt files (shipped with the package)."""
    from memedit.loading import default_model_path
    from memedit.testbed import prompt_file

    model = default_model_path()
    files = {name: prompt_file(name) for name in
             ("memorized_locate", "memorized_heldout", "ordinary_unseen")}
    return model, files


@pytest.mark.slow
def test_detector_separates_memorized_prompts_on_embedded_model():
    """Wen et al.'s score is higher for prompts the test model memorized than for ordinary
    ones (a direction, not a threshold: see docs/testbed notes)."""
    from memedit.loading import load_pipeline

    model, files = _embedded()
    pipe, _ = load_pipeline(model, "cpu", "float32")
    memorized = read_prompts(files["memorized_heldout"])
    ordinary = read_prompts(files["ordinary_unseen"]).subset(range(len(memorized)))
    config = DetectorConfig(steps=1, sampling=SamplingConfig(steps=20, guidance_scale=7.5))
    seeds = [100] * len(memorized)
    mem = text_noise_magnitudes(pipe, memorized.prompts, seeds, config).mean()
    ordi = text_noise_magnitudes(pipe, ordinary.prompts, seeds, config).mean()
    assert mem > ordi


def test_evaluate_baked_model_with_random_control(tmp_path, tiny_model_dir, prompt_files):
    from memedit import LocateConfig, bake, load_pipeline, locate

    memorized, ordinary = prompt_files
    pipe, source = load_pipeline(tiny_model_dir, "cpu", "float32")
    located_on = read_prompts(memorized, "memorized").subset([0, 1], "locate")
    subspace = locate(pipe, located_on, None, LocateConfig(k=0.05, tau=2, sampling=FAST),
                      source=source, progress=False)
    baked = bake(tiny_model_dir, subspace, tmp_path / "sanitized", progress=False).path
    locate_file = tmp_path / "locate.jsonl"
    locate_file.write_text("\n".join(memorized.read_text().splitlines()[:2]) + "\n")
    out = tmp_path / "eval"
    result = _invoke(evaluate_command, [
        "--model", str(baked), "--memorized", str(memorized),
        "--locate-prompts", str(locate_file), "--ordinary", str(ordinary), "--controls",
        "random", "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    by_name = {v["name"]: v for v in report["variants"]}
    # No --baseline: the original recorded at bake time is used.
    assert report["context"]["baseline"] == str(Path(tiny_model_dir).resolve())
    assert list(by_name) == ["original", "sanitized", "random"]
    assert by_name["sanitized"]["zeroed"] == by_name["random"]["zeroed"] == subspace.totals()
    assert set(by_name["sanitized"]["memorization"]) == {"locate", "heldout"}
    # The held-out file holds the locate prompts too; the report says so.
    assert any("not fully held out" in note for note in report["notes"])


def test_detector_equals_the_first_steps_of_a_full_run(tiny_pipe):
    """Stopping early must not change what the first steps see."""
    sampling = SamplingConfig(steps=6, guidance_scale=5.0, batch_size=2)
    early = text_noise_magnitudes(tiny_pipe, ["a red cat", "a dog"], [3, 4],
                                  DetectorConfig(steps=3, sampling=sampling))
    gaps = []

    def record(_module, _inputs, output):
        uncond, cond = output[0].float().chunk(2)
        gaps.append((cond - uncond).flatten(1).pow(2).mean(dim=1).sqrt())

    handle = tiny_pipe.unet.register_forward_hook(record)
    try:
        run_pipeline(tiny_pipe, ["a red cat", "a dog"], [3, 4], sampling, output_type="latent")
    finally:
        handle.remove()
    full = torch.stack(gaps, dim=1).numpy()
    assert full.shape == (2, 6) and early.shape == (2, 3)
    np.testing.assert_allclose(early, full[:, :3], rtol=1e-5)


def test_evaluate_another_edit_side_by_side(tmp_path, tiny_model_dir, prompt_files):
    """--also: a second edit of the same original (as a hardened one) gets its own row, the
    same scores as evaluating it on its own, and its own same-size random control."""
    from memedit import LocateConfig, bake, load_pipeline, locate

    memorized, ordinary = prompt_files
    pipe, source = load_pipeline(tiny_model_dir, "cpu", "float32")
    located_on = read_prompts(memorized, "memorized").subset([0, 1], "locate")
    edits = {}
    for name, k in (("small", 0.02), ("large", 0.1)):
        subspace = locate(pipe, located_on, None, LocateConfig(k=k, tau=2, sampling=FAST),
                          source=source, progress=False)
        edits[name] = (bake(tiny_model_dir, subspace, tmp_path / name, progress=False).path,
                       subspace)
    common = ["--memorized", str(memorized), "--ordinary", str(ordinary), "--controls",
              "random", *FAST_ARGS]
    result = _invoke(evaluate_command, ["--model", str(edits["small"][0]), "--also",
                                        str(edits["large"][0]), "--out", str(tmp_path / "both"),
                                        *common])
    assert result.exit_code == 0, result.output + repr(result.exception)
    both = {v["name"]: v for v in json.loads((tmp_path / "both/report.json").read_text())[
        "variants"]}
    assert list(both) == ["original", "sanitized", "large", "random", "random (large)"]
    assert both["large"]["zeroed"] == both["random (large)"]["zeroed"] == \
        edits["large"][1].totals()
    alone = _invoke(evaluate_command, ["--model", str(edits["large"][0]), "--out",
                                       str(tmp_path / "alone"), *common])
    assert alone.exit_code == 0, alone.output
    single = {v["name"]: v for v in json.loads((tmp_path / "alone/report.json").read_text())[
        "variants"]}
    # Applied in memory to the original, the edit scores exactly as the baked model does.
    assert both["large"]["memorization"] == single["sanitized"]["memorization"]
    # An edit of another model is refused.
    other = save_tiny_pipeline(tmp_path / "other", seed=3)
    other_pipe, other_source = load_pipeline(other, "cpu", "float32")
    foreign = locate(other_pipe, located_on, None, LocateConfig(k=0.05, tau=2, sampling=FAST),
                     source=other_source, progress=False)
    bake(other, foreign, tmp_path / "foreign", progress=False)
    refused = _invoke(evaluate_command, ["--model", str(edits["small"][0]), "--also",
                                         str(tmp_path / "foreign"), "--out",
                                         str(tmp_path / "no"), *common])
    assert isinstance(refused.exception, MemeditError)
    assert "differs from the weights" in str(refused.exception)
