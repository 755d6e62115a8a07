"""Shared fixtures: a tiny Stable Diffusion pipeline built in code, on one CPU thread, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from memedit.testing import build_tiny_pipeline, save_tiny_pipeline

torch.set_num_threads(1)


# Plain helpers, imported by the test files (``from conftest import ...``).


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden files included), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_prompts(folder: Path, name: str, count: int, seed: int) -> Path:
    """A JSONL of ``count`` prompts, each with its own random 32x32 training image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        image = f"{name}{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / image)
        rows.append({"prompt": f"the portrait of cat {i}", "image": image})
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny pipeline folder. Treat it as read-only: tests that edit copy it first."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture()
def tiny_pipe():
    """A fresh in-memory tiny pipeline (tests may modify it)."""
    return build_tiny_pipeline()


@pytest.fixture()
def prompt_files(tmp_path):
    """Memorized prompts with (random) training images, and ordinary prompts."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / f"gt{i}.png")
        rows.append({"prompt": f"the portrait of cat {i}", "image": f"gt{i}.png",
                     "memorized": True})
    memorized = tmp_path / "memorized.jsonl"
    memorized.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ordinary = tmp_path / "ordinary.jsonl"
    ordinary.write_text("\n".join(json.dumps({"prompt": p, "memorized": False})
                                  for p in ("a red dog", "a blue cat", "photo of a dog")) + "\n")
    return memorized, ordinary
