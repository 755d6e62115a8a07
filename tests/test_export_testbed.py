"""Slow: export the embedded test model (memedit/testbed/model) and prove it, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

import memedit
from memedit.export.api import export_onnx
from memedit.export.onnx import ExportOptions
from memedit.export.parity import ParityInputs

TESTBED = Path(memedit.__file__).parent / "testbed" / "model"

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_testbed_model_exports_with_parity(tmp_path):
    report = export_onnx(TESTBED, tmp_path / "testbed-onnx", ExportOptions(),
                         inputs=ParityInputs(steps=20, guidance_scale=5.0), threads=1)
    assert report.passed, report.table()
    assert report.export.optimum_validation == "passed"
    assert {c.name for c in report.parity.comparisons} >= {"text_encoder", "unet", "vae_decoder"}
