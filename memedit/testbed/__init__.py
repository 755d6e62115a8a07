"""memedit's embedded test model: a tiny Stable Diffusion that really memorizes.

A ``StableDiffusionPipeline`` folder (32x32 images, a few MB of safetensors) trained by
``tools/make_testbed.py`` on generated shape scenes plus 20 duplicated image/caption pairs
it memorizes; see ``model/README.md`` for how it was made and what was measured. Shipped
with it: prompt sets (:func:`prompt_file`) and the memorized training images.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT_SETS = ("memorized_locate", "memorized_heldout", "ordinary_seen", "ordinary_unseen")


def model_path() -> Path:
    """The shipped diffusers pipeline folder (load with ``StableDiffusionPipeline``)."""
    return HERE / "model"


def prompt_file(name: str) -> Path:
    """A shipped prompt set (JSONL) by name: one of :data:`PROMPT_SETS`.

    ``memorized_locate`` / ``memorized_heldout``: the memorized captions (halves used to locate
    and to test), each with ``image`` = its training image. ``ordinary_seen`` /
    ``ordinary_unseen``: scene captions whose combination was / was never trained on, each with
    ``scene`` for :func:`memedit.testbed.scenes.score_scene`.
    """
    if name not in PROMPT_SETS:
        raise KeyError(f"unknown prompt set {name!r}; choose from {', '.join(PROMPT_SETS)}")
    return HERE / "prompts" / f"{name}.jsonl"


def images_dir() -> Path:
    """The memorized training images (``mem_00.png`` ... ``mem_19.png``)."""
    return HERE / "images"
