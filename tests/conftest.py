"""Shared fixtures: a tiny Stable Diffusion pipeline built in code, on one CPU thread, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from memedit.testing import build_tiny_pipeline, save_tiny_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny pipeline folder. Treat it as read-only: tests that edit copy it first."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture()
def tiny_pipe():
    """A fresh in-memory tiny pipeline (tests may modify it)."""
    return build_tiny_pipeline()
