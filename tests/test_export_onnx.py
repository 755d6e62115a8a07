"""ONNX export of the tiny pipeline: Optimum layout, checker, parity, audit, CLI, ORT pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.export.api import VerificationFailed, export_onnx, verify_onnx
from memedit.export.audit import audit_export, iter_initializers
from memedit.export.onnx import ExportOptions, read_record
from memedit.export.parity import ParityInputs, Thresholds
from memedit.export.runtime import load_ort_pipeline
from memedit.sampling import SamplingConfig, generate_images
from memedit.subspace import Subspace
from memedit.testing import build_tiny_pipeline, save_sanitized

# The TorchScript exporter's tracer warnings are expected noise here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAST = ParityInputs(steps=4)
# Optimum's own validation repeats what memedit checks; skip it where a test does not need it.
QUICK = ExportOptions(optimum_validation=False)


def ffn_masks(pipe, fraction: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random masks on every UNet ``ff.net.2`` and CLIP ``fc2`` weight (both exporters'
    transposed MatMul weights), built the way memedit keys them."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for component, suffix in (("unet", "ff.net.2.weight"), ("text_encoder", "mlp.fc2.weight")):
        for name, param in getattr(pipe, component).named_parameters():
            if name.endswith(suffix):
                masks[f"{component}/{name}"] = torch.rand(param.shape, generator=gen) < fraction
    return masks


@pytest.fixture(scope="module")
def sanitized_model_dir(tmp_path_factory):
    """A tiny model with its masked weights zeroed and the subspace stored in memedit/,
    as `memedit bake` writes it."""
    pipe = build_tiny_pipeline()
    return save_sanitized(pipe, ffn_masks(pipe), tmp_path_factory.mktemp("sanitized") / "model")


@pytest.fixture(scope="module")
def sanitized_export(sanitized_model_dir, tmp_path_factory):
    """The sanitized model exported once (with Optimum's validation), shared by tests."""
    out = tmp_path_factory.mktemp("onnx") / "sanitized-onnx"
    report = export_onnx(sanitized_model_dir, out, inputs=FAST, threads=1)
    return out, report


def test_export_writes_optimum_layout_that_passes_checker(sanitized_export):
    out, report = sanitized_export
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        path = out / component / "model.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        assert (out / component / "config.json").is_file()
    assert (out / "model_index.json").is_file() and (out / "tokenizer").is_dir()
    assert report.passed and report.export.optimum_validation == "passed"
    assert report.export.files["unet/model.onnx"] > 0
    # The subspace travels with the export so that verify-onnx can audit it later.
    assert Subspace.load(out).masks.keys() == Subspace.load(report.source).masks.keys()
    assert read_record(out)["report"]["passed"] is True


def test_parity_within_thresholds_per_component_and_image(sanitized_export):
    _, report = sanitized_export
    names = [c.name for c in report.parity.comparisons]
    assert names[:4] == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert names[4].startswith("image")
    limits = Thresholds()
    for comparison in report.parity.comparisons[:4]:
        assert comparison.max_abs <= limits.max_abs and comparison.mean_abs <= limits.mean_abs
    image = report.parity.comparisons[4]
    assert image.psnr_db >= limits.image_psnr_db and image.max_abs <= limits.image_max_abs


def test_dynamic_axes_accept_other_batch_and_sequence(sanitized_export):
    import onnxruntime as ort

    out, _ = sanitized_export
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    unet = ort.InferenceSession(str(out / "unet/model.onnx"), options,
                                providers=["CPUExecutionProvider"])
    feeds = {"sample": np.zeros((3, 4, 8, 8), np.float32), "timestep": np.array(10, np.float32),
             "encoder_hidden_states": np.zeros((3, 20, 32), np.float32)}
    (result,) = unet.run(None, feeds)
    assert result.shape == (3, 4, 8, 8)


def test_audit_passes_for_sanitized_export(sanitized_export):
    _, report = sanitized_export
    audit = report.audit
    assert audit.passed
    assert len(audit.results) == 7  # 4 UNet ff.net.2 + 3 CLIP fc2
    # Linear weights come out transposed and renamed: the audit followed them back.
    assert all(any("(W^T)" in m for m in r.matches) for r in audit.results)


def test_audit_fails_when_zeroed_weights_were_altered_in_onnx(sanitized_export, tmp_path):
    out, _ = sanitized_export
    masks = Subspace.load(out).masks
    pipe = build_tiny_pipeline()
    from memedit.subspace import apply_subspace

    apply_subspace(pipe, Subspace(masks, {}))
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    # Put non-zeros back at the zeroed positions of one UNet FFN weight in the graph.
    key = next(k for k in masks if k.startswith("unet/"))
    weight = pipe.unet.get_parameter(key.split("/", 1)[1]).detach().numpy()
    model = onnx.load(str(tampered / "unet/model.onnx"))
    for init in model.graph.initializer:
        values = onnx.numpy_helper.to_array(init)
        if values.shape == weight.T.shape and np.array_equal(values, weight.T):
            restored = values.copy()
            restored[masks[key].numpy().T] = 0.5
            init.CopyFrom(onnx.numpy_helper.from_array(restored, init.name))
            break
    else:
        pytest.fail("the zeroed weight was not found transposed in the graph")
    onnx.save(model, str(tampered / "unet/model.onnx"))
    audit = audit_export(masks, pipe, tampered)
    assert not audit.passed
    bad = [r for r in audit.results if not r.passed]
    assert [r.key for r in bad] == [key]
    assert bad[0].status == "nonzero-in-onnx" and bad[0].nonzero == int(masks[key].sum())
    # verify-onnx (source model from the export record, subspace stored in the folder) refuses.
    result = CliRunner().invoke(cli, ["verify-onnx", str(tampered), "--provider", "cpu",
                                                      "--threads", "1", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["audit"]["passed"] is False and data["parity"] is None
    assert "Sanitization audit failed" in result.stderr


def test_export_refused_when_model_is_not_sanitized_by_its_subspace(
        tiny_model_dir, sanitized_model_dir, tmp_path):
    """An unsanitized model exported against a subspace fails the audit; nothing is left."""
    out = tmp_path / "refused"
    with pytest.raises(VerificationFailed) as failure:
        export_onnx(tiny_model_dir, out, QUICK, subspace=sanitized_model_dir, inputs=FAST,
                    threads=1)
    assert not out.exists() and not list(tmp_path.iterdir())
    audit = failure.value.report.audit
    assert not audit.passed
    assert {r.status for r in audit.results} == {"nonzero-in-source"}
    assert failure.value.report.parity is None  # audit failed first: no parity run


def test_cli_export_refuses_bad_audit_with_nonzero_exit(tiny_model_dir, sanitized_model_dir,
                                                         tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["export",
        "--onnx", str(tiny_model_dir), "--out", str(out), "--subspace", str(sanitized_model_dir),
        "--no-optimum-validation", "--threads", "1", "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["audit"]["passed"] is False
    assert not out.exists()


def test_parity_failure_exits_nonzero_with_report(tiny_model_dir, tmp_path):
    out = tmp_path / "strict"
    result = CliRunner().invoke(cli, ["export",
        "--onnx", str(tiny_model_dir), "--out", str(out), "--no-optimum-validation",
        "--threads", "1", "--steps", "2", "--max-abs", "1e-12", "--mean-abs", "1e-13"])
    assert result.exit_code == 1
    assert "Parity FAILED" in result.stdout and "Sanitization audit: not run" in result.stdout
    assert not out.exists()


def test_overwrite_and_source_protection(tiny_model_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(MemeditError, match="exists already"):
        export_onnx(tiny_model_dir, out, QUICK, parity=False)
    with pytest.raises(MemeditError, match="inside the input"):
        export_onnx(tiny_model_dir, tiny_model_dir / "onnx", QUICK, parity=False)
    with pytest.raises(MemeditError, match="was not written by memedit"):
        export_onnx(tiny_model_dir, out, QUICK, overwrite=True, parity=False)
    export_onnx(tiny_model_dir, tmp_path / "onnx", QUICK, parity=False)
    report = export_onnx(tiny_model_dir, tmp_path / "onnx", QUICK, overwrite=True, parity=False)
    assert report.parity is None and (tmp_path / "onnx/unet/model.onnx").is_file()


def test_bf16_on_cpu_is_refused_clearly(tiny_model_dir, tmp_path):
    # fp16 is converted on the CPU (tests/test_export_production.py); bf16 is traced by
    # Optimum in bf16, which needs CUDA.
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(cli, ["export",
        "--onnx", str(tiny_model_dir), "--out", str(tmp_path / "h"), "--dtype", "bf16"])
    assert result.exit_code == 2
    assert "bf16 ONNX export needs a CUDA GPU" in result.stderr


def test_verify_onnx_cli_reads_record_and_stored_subspace(sanitized_export):
    out, _ = sanitized_export
    result = CliRunner().invoke(cli, ["verify-onnx", str(out), "--threads", "1", "--steps", "2",
                                                      "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Sanitization audit PASSED" in result.stdout and "Parity PASSED" in result.stdout
    report = verify_onnx(out, provider="cpu", threads=1, inputs=FAST)
    assert report.passed and report.audit.passed


def test_ort_pipeline_reproduces_pytorch_image(sanitized_export, sanitized_model_dir):
    """Optimum's ORTDiffusionPipeline on the folder gives memedit's PyTorch image."""
    from diffusers import DiffusionPipeline

    out, _ = sanitized_export
    ort_pipe, choice = load_ort_pipeline(out, "auto", threads=1)
    assert type(ort_pipe).__name__ == "ORTStableDiffusionPipeline"
    assert choice.provider in ort_pipe.unet.session.get_providers()
    pipe = DiffusionPipeline.from_pretrained(sanitized_model_dir)
    pipe.set_progress_bar_config(disable=True)
    config = SamplingConfig(steps=4, batch_size=2)
    prompts, seeds = ["a red cat", "a blue dog"], [3, 4]
    reference = generate_images(pipe, prompts, seeds, config)
    images = generate_images(ort_pipe, prompts, seeds, config)
    assert images.shape == reference.shape == (2, 32, 32, 3)
    assert np.abs(images - reference).max() < 1e-4
    # The saved 8-bit images agree: a float difference of ~1e-7 can still move a value that
    # sits on a rounding boundary by one level (seen on one CPU and not another), so allow
    # that, and only where the two floats straddle the boundary.
    levels, reference_levels = (images * 255).round(), (reference * 255).round()
    differs = levels != reference_levels
    assert np.abs(levels - reference_levels).max() <= 1
    assert differs.sum() <= 3, differs.sum()
    assert (np.abs((reference * 255)[differs] % 1 - 0.5) < 255 * 1e-4).all()


def test_generate_cli_writes_png(sanitized_export, tmp_path):
    out, _ = sanitized_export
    target = tmp_path / "cat.png"
    result = CliRunner().invoke(cli, ["generate",
        "--onnx", str(out), "a red cat", "--steps", "2", "--out", str(target), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime on CPU" in result.stderr
    from PIL import Image

    assert Image.open(target).size == (32, 32)
    again = CliRunner().invoke(cli, ["generate", "--onnx", str(out), "x", "--out", str(target)])
    assert again.exit_code == 2 and "exists already" in again.stderr


def test_initializer_index_reads_every_float_weight(sanitized_export):
    out, _ = sanitized_export
    inits = list(iter_initializers(out / "text_encoder/model.onnx"))
    assert inits and all(i.array().size == i.numel for i in inits)


def test_external_data_export_is_audited_and_loaded(sanitized_model_dir, tmp_path, monkeypatch):
    """The >2 GB path on a small model: Optimum's switch forces model.onnx + model.onnx_data;
    the audit reads the weights through the memory map and ORT loads the folder."""
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    out = tmp_path / "external"
    report = export_onnx(sanitized_model_dir, out, QUICK, inputs=FAST, threads=1)
    assert (out / "unet/model.onnx_data").is_file()
    assert "unet/model.onnx_data" in report.export.files
    assert report.audit.passed and report.parity.passed
    external = [i for i in iter_initializers(out / "unet/model.onnx")
                if i.tensor.data_location == onnx.TensorProto.EXTERNAL]
    assert external and isinstance(external[0].array(), np.memmap)
