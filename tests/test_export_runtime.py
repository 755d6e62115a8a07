"""Execution-provider choice: CUDA only when a CUDA session really got CUDA (no mocks)."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from memedit.errors import MemeditError
from memedit.export.runtime import (
    CPU,
    CUDA,
    choose_provider,
    decide_provider,
    probe_session_providers,
)

GPU_PACKAGE = ["TensorrtExecutionProvider", CUDA, CPU]  # what onnxruntime-gpu lists, GPU or not


def test_gpu_package_without_gpu_falls_back_to_cpu_and_says_why():
    # onnxruntime-gpu on a machine with no GPU: CUDA is listed, the session runs on CPU.
    choice = decide_provider(GPU_PACKAGE, [CPU])
    assert choice.provider == CPU
    assert "lists CUDA" in choice.reason and choice.label == "CPU"


def test_gpu_package_with_working_gpu_uses_cuda():
    choice = decide_provider(GPU_PACKAGE, [CUDA, CPU])
    assert choice.provider == CUDA and choice.label == "CUDA"


def test_cpu_package_never_probes_and_uses_cpu():
    choice = decide_provider([CPU], None)
    assert choice.provider == CPU and "CPU package" in choice.reason


def test_failed_probe_counts_as_no_gpu():
    assert decide_provider(GPU_PACKAGE, []).provider == CPU
    assert decide_provider(GPU_PACKAGE, None).provider == CPU


def test_forced_cuda_that_cannot_run_is_an_error():
    with pytest.raises(MemeditError, match="onnxruntime-gpu"):
        decide_provider([CPU], None, "cuda")
    with pytest.raises(MemeditError, match="ran on CPU"):
        decide_provider(GPU_PACKAGE, [CPU], "cuda")
    assert decide_provider(GPU_PACKAGE, [CUDA, CPU], "cuda").provider == CUDA


def test_forced_cpu_and_unknown_request():
    assert decide_provider(GPU_PACKAGE, [CUDA, CPU], "cpu").provider == CPU
    with pytest.raises(MemeditError, match="Unknown provider"):
        decide_provider([CPU], None, "tpu")


def test_this_machine_probe_and_choice_agree():
    probe = probe_session_providers()
    assert CPU in probe
    choice = choose_provider()
    assert choice.provider in (CPU, CUDA)
    if CUDA not in ort.get_available_providers():
        assert choice.provider == CPU
