"""Measure the embedded test model's memorization, leak, utility and what an edit leaves.

The figures of its model card that ``memedit sweep`` does not report (all on the original
model but the last):

* the distance calibration behind the memorization threshold: pixel MSE between distinct
  memorized training images, from each memorized image to the nearest ordinary scene, and to
  the nearest rendering of its own caption's scene phrase (the shape over an ordinary
  background: what a generation that draws the caption without the memorized image is);
* memorization per half: the share of generations of each memorized caption (several seeds)
  within the MSE threshold of its own training image;
* leak: the share of ordinary generations within the threshold of ANY memorized image, and of
  generations of each memorized caption's scene phrase alone ("a magenta circle at the
  bottom", its title left out) within the threshold of that caption's image;
* utility: ``score_scene`` on ordinary prompts seen and unseen in training;
* where cross-attention looks: the share of the UNet's cross-attention (conditional half,
  averaged over layers, heads, positions and steps) on the start token, the caption's words and
  the end token with its padding, recorded during the generations above
  (``memedit.evaluation.attention``), to compare with Stable Diffusion v1, where most of it
  sits on the start token.

* what the edit leaves (``--edit-k``, default the method's k = 1%): the mask is located on the
  locate half with memedit's defaults but k, then for the held-out half, original vs located vs
  a random mask of the same size: the copies, and whether a generation that is no longer a copy
  has lost the memorized image (nearest training image, MSE within twice the threshold) or
  draws what its caption's scene phrase says (``score_scene``), which is what removal should
  fall back to (and how many do so while no longer a copy).

The full located-vs-random comparison on utility comes from ``memedit sweep`` (see the model
card).

Usage::

    python tools/measure_testbed.py [--testbed DIR] [--steps 50] [--guidance 7.5] [--seeds 4]
                                    [--edit-k 0.01 0.03 | --edit-k]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memedit.evaluation.attention import CrossAttentionRecorder  # noqa: E402
from memedit.evaluation.controls import random_like  # noqa: E402
from memedit.evaluation.harness import masks_applied  # noqa: E402
from memedit.evaluation.similarity import load_image  # noqa: E402
from memedit.locate import LocateConfig, record_statistics, select_subspace  # noqa: E402
from memedit.prompts import empty_reference, read_prompts  # noqa: E402
from memedit.sampling import SamplingConfig, generate_images  # noqa: E402
from memedit.testbed import HERE, scenes  # noqa: E402

THRESHOLD = 0.01  # pixel MSE in [0, 1]; justified by the calibration printed below


def mse_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel MSE between every image of ``a`` [N,H,W,3] and every image of ``b`` [M,H,W,3]."""
    a2 = a.reshape(len(a), -1)
    b2 = b.reshape(len(b), -1)
    return ((a2**2).sum(1)[:, None] + (b2**2).sum(1)[None] - 2 * a2 @ b2.T) / a2.shape[1]


def edit_outcome(images: np.ndarray, own: np.ndarray, mem: np.ndarray,
                 scene_specs: list[dict]) -> dict[str, float]:
    """What memorized-caption generations show: a copy, a degraded copy, or the caption's scene.

    ``own[i]`` indexes generation i's training image in ``mem``; ``scene_specs[i]`` is the scene
    its caption's opening phrase names.
    """
    distances = mse_matrix(images, mem)
    err = distances[np.arange(len(images)), own]
    scores = [scenes.score_scene(image, spec)
              for image, spec in zip(images, scene_specs, strict=True)]
    return {"copies": float((err < THRESHOLD).mean()),
            "median_mse": float(np.median(err)),
            "nearest_is_own_image": float((distances.argmin(1) == own).mean()),
            "within_twice_threshold": float((err < 2 * THRESHOLD).mean()),
            "draws_scene_phrase": float(np.mean([score["overall"] for score in scores])),
            "draws_scene_phrase_not_a_copy": float(np.mean(
                [scenes.draws_scene_not_copy(image, mem[o], spec, THRESHOLD)
                 for image, o, spec in zip(images, own, scene_specs, strict=True)])),
            "scene_colour_right": float(np.mean([score["color"] for score in scores]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--testbed", type=Path, default=HERE,
                        help="a make_testbed.py output folder (model/, prompts/, images/); "
                             "default: the shipped one")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per memorized caption")
    parser.add_argument("--seed-start", type=int, default=100)
    parser.add_argument("--edit-k", type=float, nargs="*", default=[0.01],
                        help="k of the located edits to measure on the held-out half "
                             "(none: skip)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.testbed / "model")
    pipe.set_progress_bar_config(disable=True)
    config = SamplingConfig(steps=args.steps, guidance_scale=args.guidance, batch_size=16)
    start = time.time()
    figures: dict = {"settings": {"steps": args.steps, "guidance": args.guidance,
                                  "seeds": args.seeds, "seed_start": args.seed_start,
                                  "threshold_mse": THRESHOLD, "scheduler": "DDIM"}}

    mem_paths = sorted((args.testbed / "images").glob("mem_*.png"))
    mem = np.stack([load_image(path) for path in mem_paths])
    pairs = list(scenes.ordinary_dataset(2000, seed=0))
    ordinary = np.stack([scenes.render(s) for _, s in pairs])
    d_mem = mse_matrix(mem, mem)
    np.fill_diagonal(d_mem, np.inf)
    # The nearest a faithful drawing of a memorized caption's scene phrase, over an ordinary
    # background, comes to the memorized image: 200 renders of each caption's own scene.
    rng = np.random.default_rng(0)
    own_scene = min(
        float(mse_matrix(image[None], np.stack(
            [scenes.render(scenes.make_scene((combo,), rng)) for _ in range(200)])).min())
        for image, combo in zip(mem, scenes.MEMORIZED_SCENES, strict=True))
    figures["calibration"] = {
        "min_mse_between_memorized_images": float(d_mem.min()),
        "min_mse_memorized_to_ordinary_scene": float(mse_matrix(mem, ordinary).min()),
        "min_mse_memorized_to_its_own_scene_rendered": own_scene,
    }

    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    figures["cross_attention"] = {}  # measured during the generations below
    for half in ("memorized_locate", "memorized_heldout"):
        prompts = read_prompts(args.testbed / "prompts" / f"{half}.jsonl")
        texts = [r.prompt for r in prompts.records for _ in seeds]
        gts = np.stack([load_image(r.images[0]) for r in prompts.records for _ in seeds])
        with CrossAttentionRecorder(pipe) as attention:
            images = generate_images(pipe, texts, seeds * len(prompts), config)
        figures["cross_attention"][half] = asdict(attention.shares())
        err = ((images - gts) ** 2).mean((1, 2, 3))
        figures[half] = {"rate": float((err < THRESHOLD).mean()),
                         "median_mse": float(np.median(err)),
                         "per_prompt_rate": [float((e < THRESHOLD).mean())
                                             for e in err.reshape(len(prompts), -1)]}
        print(half, figures[half]["rate"], figures[half]["median_mse"],
              figures["cross_attention"][half], flush=True)
        if half == "memorized_heldout":
            heldout, heldout_texts, heldout_images = prompts, texts, images

    if args.edit_k:
        names = [path.name for path in mem_paths]
        own = np.array([names.index(Path(r.images[0]).name) for r in heldout.records
                        for _ in seeds])
        scene_specs = [scenes.memorized_scene(scenes.MEMORIZED_CAPTIONS.index(text))
                       for text in heldout_texts]
        locate_half = read_prompts(args.testbed / "prompts" / "memorized_locate.jsonl")
        locate_config = LocateConfig(sampling=config)
        # Statistics do not depend on k (as in `memedit sweep`): record once, select per k.
        stats_mem = record_statistics(pipe, locate_half, locate_config, progress=False)
        stats_ref = record_statistics(pipe, empty_reference(1), locate_config, progress=False)
        figures["edit"] = {"original": edit_outcome(heldout_images, own, mem, scene_specs)}
        for k in args.edit_k:
            subspace = select_subspace(pipe, stats_mem, stats_ref, replace(locate_config, k=k))
            for name, masks in ((f"located k={k:g}", subspace.masks),
                                (f"random k={k:g}", random_like(subspace.masks, seed=0))):
                with masks_applied(pipe, masks):
                    edited = generate_images(pipe, heldout_texts, seeds * len(heldout), config)
                figures["edit"][name] = edit_outcome(edited, own, mem, scene_specs)
                figures["edit"][name]["zeroed"] = subspace.num_selected
        for name, outcome in figures["edit"].items():
            print("held-out,", name, outcome, flush=True)

    for name in ("ordinary_seen", "ordinary_unseen"):
        prompts = read_prompts(args.testbed / "prompts" / f"{name}.jsonl")
        with CrossAttentionRecorder(pipe) as attention:
            images = generate_images(pipe, prompts.prompts, [args.seed_start] * len(prompts),
                                     config)
        figures["cross_attention"][name] = asdict(attention.shares())
        scores = [scenes.score_scene(im, r.extra["scene"])
                  for im, r in zip(images, prompts.records, strict=True)]
        leak = mse_matrix(images, mem).min(1) < THRESHOLD
        figures[name] = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
        figures[name]["leak_rate"] = float(leak.mean())
        print(name, figures[name], figures["cross_attention"][name], flush=True)
    # Each memorized caption's scene phrase without its title ("a magenta circle at the
    # bottom"): an ordinary prompt that shares the caption's words but not its trigger.
    phrases = [scenes.caption(scenes.memorized_scene(i)) for i in range(scenes.N_MEMORIZED)]
    images = generate_images(pipe, [p for p in phrases for _ in seeds], seeds * len(phrases),
                             config)
    own_images = np.repeat(mem, len(seeds), axis=0)
    figures["scene_phrase_leak_rate"] = float(
        (((images - own_images) ** 2).mean((1, 2, 3)) < THRESHOLD).mean())
    # Unconditional generations: does the empty prompt reproduce memorized images?
    images = generate_images(pipe, [""] * 16, list(range(16)), config)
    figures["unconditional_leak_rate"] = float((mse_matrix(images, mem).min(1) < THRESHOLD).mean())
    figures["seconds"] = round(time.time() - start, 1)
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
