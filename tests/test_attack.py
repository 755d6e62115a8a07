"""The embedding attack on the tiny random pipeline (plumbing: gradients, freezing, errors,
outputs), plus one run on the embedded model (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_prompts

from memedit.errors import MemeditError
from memedit.evaluation.attack import (
    AttackConfig,
    attack,
    denoising_loss,
    draw_pairs,
    encode_images,
    generate_from_embeddings,
    near_threshold,
    optimize_embeddings,
    prompt_embeddings,
    training_scheduler,
)
from memedit.evaluation.cli import attack_command
from memedit.evaluation.harness import EvalSettings
from memedit.evaluation.similarity import MEASURES, load_image
from memedit.prompts import PromptRecord, PromptSet, read_prompts
from memedit.sampling import SamplingConfig, generate_images

FAST = EvalSettings(sampling=SamplingConfig(steps=2, batch_size=4), seeds=(100,),
                    progress=False, grid_prompts=2)
FAST_ARGS = ["--attack-steps", "2", "--steps", "2", "--seeds", "1", "--quiet"]


@pytest.fixture()
def memorized(tmp_path):
    return read_prompts(write_prompts(tmp_path, "mem", 2, seed=0))


@pytest.fixture()
def control(tmp_path):
    return read_prompts(write_prompts(tmp_path, "ctrl", 2, seed=1))


def test_the_attack_lowers_the_denoising_loss(tiny_pipe, memorized):
    y0 = prompt_embeddings(tiny_pipe, memorized.prompts[:1])
    z0 = encode_images(tiny_pipe, [load_image(memorized.records[0].images[0])])
    scheduler = training_scheduler(tiny_pipe)
    # Judge on fixed pairs the optimization never drew, so a lower loss is not luck of the draw.
    eps, t = draw_pairs([torch.Generator().manual_seed(123)], 64, tuple(z0.shape[1:]),
                        scheduler.config.num_train_timesteps, tiny_pipe.device)
    gens = [torch.Generator().manual_seed(0)]
    snapshots, losses = optimize_embeddings(tiny_pipe, y0, z0, AttackConfig(steps=30), gens)
    with torch.no_grad():
        before = denoising_loss(tiny_pipe, scheduler, snapshots[0], z0, eps, t).item()
        after = denoising_loss(tiny_pipe, scheduler, snapshots[30], z0, eps, t).item()
    assert after < 0.99 * before  # the random UNet reads y weakly: a few percent
    assert losses.shape == (1, 30) and losses[0, -5:].mean() < losses[0, :5].mean()


def test_gradient_reaches_only_the_embedding(tiny_pipe, memorized):
    params = {f"{name}.{key}": p for name in ("unet", "text_encoder", "vae")
              for key, p in getattr(tiny_pipe, name).named_parameters()}
    before = {key: p.detach().clone() for key, p in params.items()}
    flags = {key: p.requires_grad for key, p in params.items()}
    result = attack(tiny_pipe, memorized, AttackConfig(steps=3), FAST)
    assert all(torch.equal(p, before[key]) for key, p in params.items())  # bit for bit
    assert all(p.grad is None for p in params.values())
    assert {key: p.requires_grad for key, p in params.items()} == flags  # restored
    drift = result.target.drift  # [prompts, checkpoints 0, 1, 3]: y itself moved
    assert drift.shape == (2, 3) and (drift[:, 0] == 0).all() and (drift[:, 1:] > 0).all()


def test_before_the_attack_it_draws_what_evaluate_draws(tiny_pipe):
    """Step 0 generates from the prompt's own embedding, guided by the empty prompt's: the
    very images ``evaluate`` scores for the prompt."""
    prompts, seeds = ["a red cat", "the dog"], [100, 101]
    negative = prompt_embeddings(tiny_pipe, [""])
    ours = generate_from_embeddings(tiny_pipe, prompt_embeddings(tiny_pipe, prompts), negative,
                                    seeds, FAST)
    theirs = generate_images(tiny_pipe, prompts, seeds, FAST.sampling)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("start", ["prompt", "random", "ordinary"])
def test_batched_prompts_do_not_interact(tiny_pipe, memorized, start):
    ordinary = PromptSet.from_prompts(["a red dog", "a blue cat"])
    runs = [attack(tiny_pipe, memorized, AttackConfig(steps=3, checkpoints=(), start=start,
                                                      prompt_batch=batch), FAST,
                   start_prompts=ordinary) for batch in (1, 2)]
    np.testing.assert_allclose(runs[0].target.losses, runs[1].target.losses, rtol=1e-4)
    np.testing.assert_allclose(runs[0].target.drift, runs[1].target.drift, rtol=1e-4)


def test_velocity_target_for_v_prediction(tiny_pipe, memorized):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config,
                                                    prediction_type="v_prediction")
    scheduler = training_scheduler(tiny_pipe)
    y = prompt_embeddings(tiny_pipe, memorized.prompts[:1])
    z0 = encode_images(tiny_pipe, [load_image(memorized.records[0].images[0])])
    eps, t = draw_pairs([torch.Generator().manual_seed(0)], 4, tuple(z0.shape[1:]), 1000, "cpu")
    alpha = scheduler.alphas_cumprod[t[0]].view(-1, 1, 1, 1)
    velocity = alpha.sqrt() * eps[0] - (1 - alpha).sqrt() * z0
    with torch.no_grad():
        pred = tiny_pipe.unet(scheduler.add_noise(z0.expand(4, -1, -1, -1), eps[0], t[0]),
                              t[0], encoder_hidden_states=y.expand(4, -1, -1)).sample
        loss = denoising_loss(tiny_pipe, scheduler, y, z0, eps, t)
    torch.testing.assert_close(loss, ((pred - velocity) ** 2).mean().view(1))


def test_near_copy_threshold():
    assert near_threshold(MEASURES["mse"], 0.01) == 0.02
    assert near_threshold(MEASURES["sscd"], 0.7) == 0.4


@pytest.mark.parametrize("kwargs, words", [
    ({"steps": 0}, "at least one step"),
    ({"lr": 0.0}, "learning rate must be positive"),
    ({"lr": -0.1}, "learning rate must be positive"),
    ({"steps": 10, "checkpoints": (5, 20)}, "outside the attack's 0..10 steps"),
    ({"start": "somewhere"}, "Unknown attack start"),
    ({"pairs": 0}, "noise/timestep pair"),
])
def test_bad_config(kwargs, words):
    with pytest.raises(MemeditError, match=words) as err:
        AttackConfig(**kwargs)
    assert err.value.hint


def test_default_checkpoints_fit_the_steps():
    assert AttackConfig().checkpoints == (0, 1, 10, 25, 50)
    assert AttackConfig(steps=200).checkpoints == (0, 1, 10, 25, 50, 200)
    assert AttackConfig(steps=20).checkpoints == (0, 1, 10, 20)


def test_a_prompt_without_training_image(tiny_pipe, memorized):
    broken = PromptSet("mixed", (*memorized.records, PromptRecord("a dog with no image")))
    with pytest.raises(MemeditError, match="name no training image") as err:
        attack(tiny_pipe, broken, AttackConfig(steps=1), FAST)
    assert "a dog with no image" in str(err.value) and err.value.hint


def test_ordinary_start_needs_prompts(tiny_pipe, memorized):
    with pytest.raises(MemeditError, match="--start ordinary"):
        attack(tiny_pipe, memorized, AttackConfig(steps=1, start="ordinary"), FAST)


def test_control_too_strong_is_flagged(tiny_pipe, memorized, control):
    # A threshold every generation passes: the control "copies", so the report must say the
    # attack means nothing at this budget.
    settings = EvalSettings(sampling=FAST.sampling, seeds=(100,), progress=False,
                            thresholds=(1.0,))
    result = attack(tiny_pipe, memorized, AttackConfig(steps=1, start="random"), settings,
                    control=control)
    assert result.notes[0].startswith("WARNING: the attack copies images the model never")


def test_cli_writes_the_report(tiny_model_dir, tmp_path):
    memorized = write_prompts(tmp_path, "mem", 2, seed=0)
    control = write_prompts(tmp_path, "ctrl", 2, seed=1)
    out = tmp_path / "attack"
    result = CliRunner().invoke(attack_command, [
        "--model", str(tiny_model_dir), "--memorized", str(memorized), "--control",
        str(control), "--checkpoints", "1", "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 0, result.output
    assert {"report.json", "table.txt", "curve.png", "grid.png"} <= {p.name for p in
                                                                    out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert [row["steps"] for row in report["totals"]["target"]] == [0, 1, 2]
    assert report["control_run"] and report["control_too_strong"] is False
    assert len(report["per_prompt"]["control"]) == 2
    assert "control copies" in result.output


def test_cli_without_control_says_so(tiny_model_dir, tmp_path):
    memorized = write_prompts(tmp_path, "mem", 1, seed=0)
    result = CliRunner().invoke(attack_command, [
        "--model", str(tiny_model_dir), "--memorized", str(memorized), "--json",
        "--out", str(tmp_path / "attack"), *FAST_ARGS])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["control_too_strong"] is None
    assert any(note.startswith("No control was run") for note in report["notes"])


def test_cli_bad_input_exits_2(tiny_model_dir, tmp_path):
    from memedit.cli import cli

    memorized = write_prompts(tmp_path, "mem", 1, seed=0)
    for args, words in ((["--attack-steps", "0"], "at least one step"),
                        (["--lr", "0"], "learning rate"),
                        (["--checkpoints", "5", "--attack-steps", "2"], "outside"),
                        (["--start", "nowhere"], "Unknown attack start")):
        result = CliRunner().invoke(cli, ["attack", "--model", str(tiny_model_dir),
                                          "--memorized", str(memorized), "--out",
                                          str(tmp_path / "out"), *args])
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_embedded_model_control_stays_clean(tmp_path):
    """On the embedded model, the published budget does not copy never-trained images, while
    the memorized ones are copied before and after the attack."""
    from memedit.evaluation.attack import testbed_control
    from memedit.loading import load_pipeline
    from memedit.testbed import prompt_file

    pipe, _ = load_pipeline()
    memorized = read_prompts(prompt_file("memorized_heldout")).subset(range(3))
    settings = EvalSettings(sampling=SamplingConfig(steps=20), seeds=(100, 101),
                            progress=False)
    result = attack(pipe, memorized, AttackConfig(steps=10, prompt_batch=3), settings,
                    control=testbed_control(memorized, tmp_path))
    measure = settings.measure
    for step in (0, 10):
        control = result.control.scores[step]["measures"][measure]
        assert control["rates"]["0.01"]["generation_rate"] == 0
        target = result.target.scores[step]["measures"][measure]
        assert target["median"] < 0.02 < control["median"]


def test_scoring_only_the_last_step_gives_the_same_figures(tiny_pipe, memorized):
    """evaluate's column and calibration score the end only: no step-0 generations, the same
    figures at the end as a full run."""
    from memedit.evaluation.attack import attack_group
    from memedit.evaluation.harness import _scorers

    config = AttackConfig(steps=2, pairs=1, checkpoints=())
    scorers = _scorers(FAST, None)
    negative = prompt_embeddings(tiny_pipe, [""])
    full = attack_group(tiny_pipe, memorized, "target", config, FAST, scorers, None, negative)
    end = attack_group(tiny_pipe, memorized, "target", config, FAST, scorers, None, negative,
                       scored=(config.steps,))
    assert set(full.scores) == {0, 2} and set(end.scores) == {2}
    assert end.scores[2]["measures"] == full.scores[2]["measures"]
