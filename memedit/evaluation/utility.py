"""What an edit costs on ordinary prompts.

- ``clip_scores``: CLIP score (Hessel et al. 2021, as torchmetrics defines it:
  ``100 * max(cos(image, text), 0)``) with a CLIP model from a local folder, when the user has
  one.
- ``drift``: how far each ordinary generation of the edited model moved from the original
  model's generation for the same prompt and seed (pixel MSE and SSIM). Needs no weights, so
  it always works offline; 0 MSE / 1 SSIM means the edit changed nothing there.
- ``scene_utility``: on the embedded test model, its own exact scorer
  (``memedit.testbed.scenes.score_scene``) for prompts that carry a ``scene`` field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from memedit.errors import MemeditError
from memedit.evaluation.similarity import pixel_mse, ssim, to_pil
from memedit.prompts import PromptRecord
from memedit.sampling import batches


class CLIPScorer:
    """A transformers CLIP model and processor read from a local folder."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not folder.is_dir():
            raise MemeditError(f"CLIP model folder {folder} does not exist.",
                               "Pass a local folder saved with CLIPModel.save_pretrained "
                               "(with its processor), e.g. openai/clip-vit-large-patch14.")
        try:
            self.model = CLIPModel.from_pretrained(folder).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as err:
            raise MemeditError(f"transformers could not load a CLIP model from {folder}: {err}",
                               "The folder needs config.json, the weights, and the "
                               "tokenizer/preprocessor files.") from None
        self.folder = folder
        self.device = torch.device(device)

    @torch.no_grad()
    def scores(self, images: Sequence[np.ndarray], prompts: Sequence[str],
               batch_size: int = 16) -> np.ndarray:
        """One CLIP score per (image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError("one prompt per image")
        out = []
        for pairs in batches(list(zip(images, prompts, strict=True)), batch_size):
            pil = [to_pil(im) for im, _ in pairs]
            text = [prompt for _, prompt in pairs]
            inputs = self.processor(text=text, images=pil, return_tensors="pt", padding=True,
                                    truncation=True).to(self.device)
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"],
                                               attention_mask=inputs["attention_mask"])
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            out.append((100.0 * cos.clamp(min=0)).cpu().numpy())
        return np.concatenate(out).astype(np.float64)


def drift(images: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-pair pixel MSE and SSIM between edited and original generations (same seeds)."""
    if len(images) != len(reference):
        raise ValueError("one reference image per image")
    return {"mse": np.array([pixel_mse(a, b) for a, b in zip(images, reference, strict=True)]),
            "ssim": np.array([ssim(a, b) for a, b in zip(images, reference, strict=True)])}


def scene_scorer():
    """The embedded test model's exact scorer, or ``None`` where this build has none."""
    try:
        from memedit.testbed.scenes import score_scene
    except ImportError:
        return None
    return score_scene


def scene_utility(images: Sequence[np.ndarray], records: Sequence[PromptRecord],
                  scorer=None) -> dict[str, float] | None:
    """Mean of each numeric field that ``score_scene(image, scene)`` returns, over the
    generations whose prompt carries a ``scene``; ``None`` when none does or no scorer exists.
    """
    scorer = scorer or scene_scorer()
    if scorer is None:
        return None
    if len(images) != len(records):
        raise ValueError("one record per image")
    totals: dict[str, list[float]] = {}
    for image, record in zip(images, records, strict=True):
        scene = record.extra.get("scene")
        if scene is None:
            continue
        for key, value in scorer(image, scene).items():
            if isinstance(value, (bool, int, float, np.bool_, np.number)):
                totals.setdefault(key, []).append(float(value))
    if not totals:
        return None
    return {key: float(np.mean(values)) for key, values in totals.items()} | {
        "n": len(next(iter(totals.values())))}


def headline(scene: dict[str, float]) -> str:
    """The field that sums a scene score up: ``overall`` (or ``all``), else the first one."""
    for key in ("overall", "all"):
        if key in scene:
            return key
    return next(k for k in scene if k != "n")
