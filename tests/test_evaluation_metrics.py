"""Each evaluation metric against hand-computed cases, and each bad input as a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memedit.errors import MemeditError
from memedit.evaluation.controls import random_like, select_outliers
from memedit.evaluation.detector import auroc, detector_scores
from memedit.evaluation.harness import memorization_summary
from memedit.evaluation.similarity import (
    MEASURES,
    SSCD,
    Scorer,
    aggregate_ground_truths,
    cosine_similarity,
    load_image,
    pixel_mse,
    resize,
    sscd_preprocess,
    ssim,
)
from memedit.evaluation.utility import drift, scene_utility
from memedit.prompts import PromptRecord


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)


def _save(path, image: np.ndarray):
    from PIL import Image

    Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- pixel measures


def test_mse_identical_shifted_and_unrelated():
    a = np.full((8, 8, 3), 0.2, dtype=np.float32)
    assert pixel_mse(a, a) == 0.0
    assert pixel_mse(a, a + 0.1) == pytest.approx(0.01, abs=1e-7)  # a shift of 0.1 everywhere
    b = a.copy()
    b[:4] = 1.0  # half the image off by 0.8: 0.5 * 0.64
    assert pixel_mse(a, b) == pytest.approx(0.32, abs=1e-6)
    # Two independent uniform images: E[(x - y)^2] = 1/6.
    assert pixel_mse(_image(0, 64), _image(1, 64)) == pytest.approx(1 / 6, abs=0.01)


def test_mse_refuses_different_shapes():
    with pytest.raises(ValueError):
        pixel_mse(_image(0, 8), _image(0, 16))


def test_ssim_identical_is_one_and_unrelated_is_near_zero():
    a = _image(0)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert abs(ssim(a, _image(1))) < 0.1
    # A constant brightness shift keeps structure: SSIM stays high, while MSE is exactly 0.01.
    smooth = resize(_image(2, 8), 32, 32) * 0.8
    assert ssim(smooth, smooth + 0.1) > 0.9
    assert ssim(_image(0, 8), _image(0, 8)) == pytest.approx(1.0, abs=1e-6)  # tiny window


def test_resize_keeps_a_constant_image_and_size():
    a = np.full((16, 24, 3), 0.25, dtype=np.float32)
    out = resize(a, 32, 48)
    assert out.shape == (32, 48, 3)
    np.testing.assert_allclose(out, 0.25, atol=1e-5)
    assert resize(a, 16, 24) is a


def test_aggregate_over_ground_truths():
    mse, sscd = MEASURES["mse"], MEASURES["sscd"]
    assert aggregate_ground_truths([0.3, 0.01, 0.2], mse, "max") == 0.01  # closest image
    assert aggregate_ground_truths([0.3, 0.9], sscd, "max") == 0.9
    assert aggregate_ground_truths([0.2, 0.4], sscd, "mean") == pytest.approx(0.3)
    assert mse.is_memorized(0.009, 0.01) and not mse.is_memorized(0.01, 0.01)
    assert sscd.is_memorized(0.71, 0.7) and not sscd.is_memorized(0.7, 0.7)


def test_memorization_summary_by_hand():
    # 3 prompts x 2 seeds of MSE; threshold 0.01.
    table = np.array([[0.001, 0.5], [0.002, 0.003], [0.4, 0.6]])
    out = memorization_summary(table, "mse", (0.01,))
    assert out["rates"]["0.01"] == {"generation_rate": 0.5,
                                    "generation_rate_se": pytest.approx(np.sqrt(0.25 / 6)),
                                    "prompt_rate": pytest.approx(2 / 3)}
    per_prompt = [0.2505, 0.0025, 0.5]
    assert out["mean"] == pytest.approx(np.mean(per_prompt))
    assert out["median"] == pytest.approx(0.2505)
    assert out["prompts"] == 3 and out["generations"] == 6


# ---------------------------------------------------------------- SSCD


class _Flatten(torch.nn.Module):
    """A stand-in descriptor: global average colour of each channel, plus a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), torch.ones(x.shape[0], 1)], dim=1)


def test_sscd_preprocessing_matches_the_authors():
    image = np.zeros((64, 128, 3), dtype=np.float32)  # black, landscape
    out = sscd_preprocess(image)
    assert out.shape == (3, 288, 576)  # small edge to 288, aspect kept
    expected = [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)


def test_sscd_torchscript_descriptors_and_cosine(tmp_path):
    path = tmp_path / "sscd.torchscript.pt"
    torch.jit.script(_Flatten()).save(str(path))
    model = SSCD(path)
    a, b = _image(0), _image(0) * 0.0
    desc = model.descriptors([a, a, b])
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, rtol=1e-6)
    assert cosine_similarity(desc[0], desc[1])[0] == pytest.approx(1.0)
    assert cosine_similarity(desc[0], desc[2])[0] < 0.99
    assert cosine_similarity([1.0, 0.0], [0.0, 2.0])[0] == pytest.approx(0.0)
    assert cosine_similarity([1.0, 1.0], [-3.0, -3.0])[0] == pytest.approx(-1.0)
    gt = _save(tmp_path / "gt.png", a)
    scorer = Scorer("sscd", model)
    assert scorer.scores(a, [gt])[0] == pytest.approx(1.0, abs=1e-3)


def test_sscd_path_that_is_not_torchscript(tmp_path):
    state = tmp_path / "sscd_state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, state)
    with pytest.raises(MemeditError, match="not a TorchScript file") as err:
        SSCD(state)
    assert err.value.hint
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(MemeditError, match="not a TorchScript file"):
        SSCD(text)
    with pytest.raises(MemeditError, match="does not exist"):
        SSCD(tmp_path / "missing.pt")


# ---------------------------------------------------------------- images


def test_missing_and_unreadable_images(tmp_path):
    with pytest.raises(MemeditError, match="does not exist") as err:
        load_image(tmp_path / "nope.png")
    assert "relative to the prompt file" in err.value.hint
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(MemeditError, match="Cannot read the image"):
        load_image(broken)
    good = _save(tmp_path / "good.png", _image(3))
    np.testing.assert_allclose(load_image(good), _image(3), atol=0.5 / 255 + 1e-6)


def test_scorer_mse_resizes_the_training_image(tmp_path):
    gt = _save(tmp_path / "gt.png", np.full((64, 64, 3), 0.5, dtype=np.float32))
    scorer = Scorer("mse")
    gen = np.full((32, 32, 3), 0.6, dtype=np.float32)
    # The PNG stores 0.5 as 128/255; the resize of a constant image changes nothing.
    assert scorer.scores(gen, [gt])[0] == pytest.approx((0.6 - 128 / 255) ** 2, rel=1e-4)
    with pytest.raises(MemeditError, match="needs the SSCD model"):
        Scorer("sscd")
    with pytest.raises(MemeditError, match="Unknown similarity"):
        Scorer("lpips")


# ---------------------------------------------------------------- detector


def test_auroc_by_hand():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2]) == 0.5
    assert auroc([2], [2]) == 0.5  # a tie counts one half
    assert auroc([5, 1], [2, 3, 4]) == pytest.approx(3 / 6)
    assert auroc([], [1]) is None


def test_detector_scores_average_first_steps():
    magnitudes = np.array([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]])
    np.testing.assert_allclose(detector_scores(magnitudes), [3.0, 2.0])
    np.testing.assert_allclose(detector_scores(magnitudes, 2), [2.0, 2.0])
    np.testing.assert_allclose(detector_scores(magnitudes, 1), [1.0, 2.0])


# ---------------------------------------------------------------- utility and controls


def test_drift_identical_and_shifted():
    a = [_image(0), _image(1)]
    out = drift(a, a)
    np.testing.assert_allclose(out["mse"], 0.0)
    np.testing.assert_allclose(out["ssim"], 1.0, atol=1e-6)
    shifted = drift([np.full((8, 8, 3), 0.3)], [np.full((8, 8, 3), 0.5)])
    assert shifted["mse"][0] == pytest.approx(0.04)


def test_scene_utility_averages_numeric_fields():
    def scorer(image, scene):
        return {"all": scene["ok"], "colour": 1.0, "label": "ignored"}

    records = [PromptRecord("a", extra={"scene": {"ok": True}}),
               PromptRecord("b", extra={"scene": {"ok": False}}),
               PromptRecord("c")]  # no scene: not counted
    images = [_image(0)] * 3
    assert scene_utility(images, records, scorer) == {"all": 0.5, "colour": 1.0, "n": 2}
    assert scene_utility(images, [PromptRecord("x")] * 3, scorer) is None


def test_random_like_keeps_every_tensors_count():
    masks = {"unet/a.weight": torch.zeros(4, 8, dtype=torch.bool),
             "unet/b.weight": torch.zeros(3, 5, dtype=torch.bool)}
    masks["unet/a.weight"][0, :5] = True
    masks["unet/b.weight"][:, 0] = True
    control = random_like(masks, seed=1)
    assert {k: int(v.sum()) for k, v in control.items()} == {"unet/a.weight": 5,
                                                             "unet/b.weight": 3}
    assert all(control[k].shape == masks[k].shape for k in masks)
    assert all(torch.equal(control[k], random_like(masks, seed=1)[k]) for k in masks)
    assert not torch.equal(control["unet/a.weight"], masks["unet/a.weight"])


def test_nemo_outlier_selection_by_hand():
    # Reference: channel means 1, stds 1 (values 0 and 2); prompt 0 is 10 sigma out on
    # channel 1 and 4 sigma out on channel 2; prompt 1 is ordinary.
    reference = {"l": np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])}
    memorized = {"l": np.array([[1.0, 11.0, 5.0], [1.0, 1.0, 1.0]])}
    chosen = select_outliers(memorized, reference, z_threshold=3.0, max_per_prompt=10)
    assert chosen == [[("l", 1, 10.0), ("l", 2, 4.0)], []]
    capped = select_outliers(memorized, reference, z_threshold=3.0, max_per_prompt=1)
    assert capped == [[("l", 1, 10.0)], []]


def test_clip_score_with_a_local_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from memedit.evaluation.utility import CLIPScorer
    from memedit.testing import _byte_vocab_tokenizer

    tokenizer = _byte_vocab_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 16,
                       "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2},
        projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer)
    processor.save_pretrained(tmp_path / "clip")
    scorer = CLIPScorer(tmp_path / "clip")
    images = [_image(0), _image(1), _image(0)]
    scores = scorer.scores(images, ["a red cat", "a dog", "a red cat"], batch_size=2)
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()
    assert scores[0] == pytest.approx(scores[2], abs=1e-4)  # same pair, other batch
    with pytest.raises(MemeditError, match="does not exist"):
        CLIPScorer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemeditError, match="could not load a CLIP model"):
        CLIPScorer(tmp_path / "empty")


def test_scene_utility_plugs_into_the_embedded_scorer():
    from memedit.testbed import scenes

    rng = np.random.default_rng(0)
    spec = scenes.make_scene(scenes.combinations()[0], rng)
    records = [PromptRecord(scenes.caption(spec), extra={"scene": spec})] * 2
    images = [scenes.render(spec), np.full((32, 32, 3), 0.5, dtype=np.float32)]
    out = scene_utility(images, records)  # the scorer is found by itself
    assert out["overall"] == 0.5 and out["n"] == 2  # the render passes, grey fails


def test_nearest_distinct_training_pair(tmp_path):
    from memedit.evaluation.harness import nearest_distinct_pair
    from memedit.prompts import PromptSet

    paths = [_save(tmp_path / f"{i}.png", np.full((8, 8, 3), v / 255, dtype=np.float32))
             for i, v in enumerate((51, 77, 230))]
    records = tuple(PromptRecord(f"p{i}", (p,)) for i, p in enumerate(paths))
    # The same image named twice counts once.
    group = PromptSet("mem", (*records, PromptRecord("again", (paths[0],))))
    assert nearest_distinct_pair(Scorer("mse"), {"heldout": group}) == \
        pytest.approx((26 / 255) ** 2, rel=1e-6)
    assert nearest_distinct_pair(Scorer("mse"), {"heldout": group.subset([0])}) is None


class _RecordingCrossAttention:
    """Plain softmax(q k^T / sqrt(d)) attention that keeps every probability tensor."""

    def __init__(self, store: list) -> None:
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = torch.softmax(query @ key.transpose(1, 2) * attn.scale, dim=-1)
        self.store.append(probs.view(len(hidden_states), attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(probs @ value)
        return attn.to_out[1](attn.to_out[0](out))


def test_cross_attention_shares_match_explicit_attention(tiny_pipe):
    from memedit.evaluation.attention import CrossAttentionRecorder
    from memedit.sampling import SamplingConfig, generate_images

    prompts = ["a red circle", "a blue square on the left over a gray background", "x"]
    config = SamplingConfig(steps=2, guidance_scale=5.0, batch_size=2, height=32, width=32)
    with CrossAttentionRecorder(tiny_pipe) as recorder:
        generate_images(tiny_pipe, prompts, [0, 1, 2], config)
    shares = recorder.shares()
    # Closed: further generations add nothing.
    generate_images(tiny_pipe, ["a green triangle"], [3], config)
    assert recorder.shares() == shares

    store: list[torch.Tensor] = []
    tiny_pipe.unet.set_attn_processor({
        name: _RecordingCrossAttention(store) if "attn2" in name else processor
        for name, processor in tiny_pipe.unet.attn_processors.items()})
    lengths = [len(tiny_pipe.tokenizer(p).input_ids) for p in prompts]  # with start and end
    sums = {"start": 0.0, "words": 0.0, "end_and_padding": 0.0}
    for first in (0, 2):
        batch = prompts[first:first + 2]
        store.clear()
        tiny_pipe(prompt=batch, num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                  generator=[torch.Generator().manual_seed(first + i) for i in range(len(batch))],
                  output_type="latent")
        for probs in store:
            for row, length in enumerate(lengths[first:first + len(batch)]):
                p = probs[len(batch) + row].mean((0, 1))  # conditional half: heads, positions
                for token, value in enumerate(p.tolist()):
                    kind = ("start" if token == 0 else "words" if token < length - 1
                            else "end_and_padding")
                    sums[kind] += value
    total = sum(sums.values())
    assert shares.start + shares.words + shares.end_and_padding == pytest.approx(1.0)
    for kind, value in sums.items():
        assert getattr(shares, kind) == pytest.approx(value / total, abs=1e-5), kind


def test_cross_attention_recorder_refuses_what_it_cannot_measure(tiny_pipe):
    from memedit.evaluation.attention import CrossAttentionRecorder
    from memedit.testing import build_tiny_pipeline

    with pytest.raises(MemeditError, match="no cross-attention"):
        CrossAttentionRecorder(build_tiny_pipeline(with_transformer_blocks=False)).__enter__()
    with CrossAttentionRecorder(tiny_pipe) as recorder:
        pass
    with pytest.raises(MemeditError, match="no cross-attention was recorded"):
        recorder.shares()
