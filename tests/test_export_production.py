"""Production exports of the tiny pipeline: fp16, ONNX Runtime's fusions, int8, runtime options.

The subspace zeroes weights where fusion moves them: self-attention Q (packed into one QKV
initializer), cross-attention K and V (packed into one KV initializer by ``--optimize full``),
the UNet FFN output and the CLIP MLP output. Every variant must pass the audit on the files it
wrote; a zeroed weight put back in a fused, fp16 or int8 graph must be refused.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.export.api import export_onnx
from memedit.export.onnx import ExportOptions, read_record
from memedit.export.parity import DTYPE_THRESHOLDS, ParityInputs
from memedit.export.runtime import (
    SessionSettings,
    StaticShapes,
    decide_provider,
    generate,
    load_ort_pipeline,
)
from memedit.sampling import SamplingConfig
from memedit.subspace import Subspace
from memedit.testing import build_tiny_pipeline, save_sanitized

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAST = ParityInputs(steps=3)
TARGETS = ("ff.net.2.weight", "attn1.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight")


def _masks(pipe, suffixes: tuple[str, ...], fraction: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    masks = {}
    for component, names in (("unet", suffixes), ("text_encoder", ("mlp.fc2.weight",))):
        for name, param in getattr(pipe, component).named_parameters():
            if name.endswith(names):
                masks[f"{component}/{name}"] = torch.rand(param.shape, generator=gen) < fraction
    return masks


def _sanitized(folder, masks_of, pipe=None) -> object:
    """A model (default: the tiny one) zeroed with ``masks_of(pipe)``, its subspace (with the
    manifest's hashes) in memedit/, as `memedit bake` writes it."""
    pipe = pipe or build_tiny_pipeline()
    return save_sanitized(pipe, masks_of(pipe), folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _sanitized(tmp_path_factory.mktemp("prod") / "model", lambda p: _masks(p, TARGETS))


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory):
    """Each variant exported once: name -> (folder, report)."""
    root = tmp_path_factory.mktemp("variants")
    variants = {
        "fp32": (ExportOptions(optimum_validation=False), True),
        "fp16": (ExportOptions(optimum_validation=False, dtype="fp16"), True),
        "basic": (ExportOptions(optimum_validation=False, optimize="basic"), True),
        "int8": (ExportOptions(optimum_validation=False, quantize="int8"), True),
        # CUDA-only fusions: no parity without a GPU, the audit still runs.
        "full-fp16": (ExportOptions(optimum_validation=False, optimize="full", dtype="fp16"),
                      False),
    }
    return {name: (root / name, export_onnx(model_dir, root / name, options, parity=parity,
                                            inputs=FAST, threads=1))
            for name, (options, parity) in variants.items()}


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()
               and ".onnx" in p.name)


def test_fp16_export_passes_audit_and_parity_at_half_the_size(exports):
    folder, report = exports["fp16"]
    assert report.verdict == "PASSED" and report.audit.passed and report.parity.passed
    assert report.parity.provider == "CPUExecutionProvider"  # the CPU provider runs fp16
    assert report.parity.thresholds == DTYPE_THRESHOLDS["fp16"].__dict__
    assert all(", fp16)" in m for r in report.audit.results for m in r.matches)
    ratio = _size(folder) / _size(exports["fp32"][0])
    assert 0.45 <= ratio <= 0.6, ratio
    # Inputs and outputs stay fp32: the same Optimum pipeline feeds the graph.
    unet = onnx.load(str(folder / "unet/model.onnx"), load_external_data=False)
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_record(folder)["report"]["export"]["dtype"] == "fp16"


def test_basic_fusion_runs_on_cpu_and_audit_finds_packed_qkv(exports):
    folder, report = exports["basic"]
    assert report.verdict == "PASSED" and report.parity.passed
    ops = {n.op_type for n in onnx.load(str(folder / "unet/model.onnx")).graph.node}
    assert {"Attention", "MultiHeadAttention", "SkipLayerNormalization"} <= ops
    q = [r for r in report.audit.results if r.key.endswith("attn1.to_q.weight")]
    assert q and all("slot 1 of 3" in r.matches[0] for r in q)


def test_full_fusion_packs_kv_and_audit_finds_each_slot_without_gpu(exports):
    folder, report = exports["full-fp16"]
    assert report.audit.passed and report.parity is None
    assert report.verdict == "NOT VERIFIABLE"
    assert any("CUDA" in item for item in report.not_established)
    by_suffix = {s: [r.matches for r in report.audit.results if r.key.endswith(s)]
                 for s in ("attn2.to_k.weight", "attn2.to_v.weight")}
    assert all("slot 1 of 2" in m[0] for m in by_suffix["attn2.to_k.weight"])
    assert all("slot 2 of 2" in m[0] for m in by_suffix["attn2.to_v.weight"])
    ops = {n.op_type for n in onnx.load(str(folder / "unet/model.onnx")).graph.node}
    assert {"NhwcConv", "GroupNorm", "MultiHeadAttention"} <= ops


def test_int8_zeroed_weights_quantize_to_exact_zero(exports):
    folder, report = exports["int8"]
    assert report.verdict == "PASSED" and report.audit.passed and report.parity.passed
    assert all(", int8)" in r.matches[0] for r in report.audit.results)
    unet = onnx.load(str(folder / "unet/model.onnx"))
    zero_points = [numpy_helper.to_array(t) for t in unet.graph.initializer
                   if t.name.endswith("_zero_point") and t.data_type == onnx.TensorProto.INT8]
    assert zero_points and all(int(z) == 0 for z in zero_points)  # symmetric
    assert _size(folder) < _size(exports["fp32"][0])


def _tamper(src, dst, name: str, mask: np.ndarray) -> None:
    """Copy ``src``; in its UNet graph, put a non-zero (0.5, or q = 1 for int8) back at the
    zeroed positions of initializer ``name``: its exact zeros when packed (the untouched
    weights around them are never exactly zero), else ``mask``'s positions in ``W^T``."""
    shutil.copytree(src, dst)
    path = dst / "unet/model.onnx"
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.name == name)
    values = numpy_helper.to_array(tensor).copy()
    if values.dtype == np.int8:  # small untouched weights quantize to 0 too: use the mask
        values.reshape(mask.shape[::-1]).T[mask] = 1
    else:
        values[values == 0] = 0.5
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("variant,suffix", [
    ("full-fp16", "attn2.to_v.weight"),  # packed cross-attention K/V, fp16
    ("fp16", "ff.net.2.weight"),  # an fp16 MatMul weight
    ("int8", "ff.net.2.weight"),  # an int8 weight
])
def test_audit_refuses_a_zeroed_weight_put_back(exports, tmp_path, variant, suffix):
    folder, report = exports[variant]
    result = next(r for r in report.audit.results if r.key.endswith(suffix))
    name = result.matches[0].split(" (")[0]
    mask = Subspace.load(folder).masks[result.key].numpy()
    tampered = tmp_path / "tampered"
    _tamper(folder, tampered, name, mask)
    result = CliRunner().invoke(cli, ["verify-onnx", str(tampered), "--threads", "1",
                                      "--steps", "2"])
    assert result.exit_code == 1, result.output
    assert "a zeroed weight is not zero in the ONNX graph" in result.stderr
    assert name in result.stdout


def test_ort_diffusion_pipeline_loads_every_cpu_variant(exports):
    from optimum.onnxruntime import ORTDiffusionPipeline

    for name in ("fp32", "fp16", "basic", "int8"):
        pipe = ORTDiffusionPipeline.from_pretrained(exports[name][0], local_files_only=True,
                                                    provider="CPUExecutionProvider")
        image = pipe("a cat", num_inference_steps=2, output_type="np").images
        assert np.isfinite(image).all(), name


def test_cuda_only_variant_is_refused_on_cpu_with_the_way_out(exports):
    folder, _ = exports["full-fp16"]
    with pytest.raises(MemeditError, match="CUDA-only fused operators") as raised:
        load_ort_pipeline(folder, "cpu", 1)
    assert "--optimize basic" in raised.value.hint
    result = CliRunner().invoke(cli, ["verify-onnx", str(folder), "--provider", "cpu"])
    assert result.exit_code == 2 and "CUDA-only" in result.stderr


def test_full_fusion_with_parity_and_no_gpu_is_refused_before_writing(model_dir, tmp_path):
    out = tmp_path / "full"
    result = CliRunner().invoke(cli, ["export", "--onnx", str(model_dir), "--out", str(out),
                                      "--optimize", "full"])
    assert result.exit_code == 2, result.output
    assert "Parity cannot be checked here" in result.stderr and "--no-parity" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_fused_weights_that_cannot_be_matched_are_refused(tmp_path):
    # NhwcConv stores a 3x3 conv weight channels-last: no layout the audit knows holds it,
    # so the zeroed weight cannot be located and the export is refused, nothing written.
    def conv_mask(pipe):
        weight = pipe.unet.conv_in.weight
        return {"unet/conv_in.weight": torch.rand(weight.shape,
                                                  generator=torch.Generator().manual_seed(0))
                < 0.1}

    model = _sanitized(tmp_path / "model", conv_mask)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", "--onnx", str(model), "--out", str(out),
                                      "--optimize", "full", "--no-parity",
                                      "--no-optimum-validation"])
    assert result.exit_code == 1, result.output
    assert "no ONNX initializer holds this weight" in result.stderr
    assert not out.exists()


def test_bad_option_combinations_are_user_errors(model_dir, tmp_path):
    with pytest.raises(MemeditError, match="applies to fp32 graphs"):
        ExportOptions(dtype="fp16", quantize="int8")
    with pytest.raises(MemeditError, match="bf16 ONNX export needs a CUDA GPU"):
        export_onnx(model_dir, tmp_path / "bf16", ExportOptions(dtype="bf16"))
    with pytest.raises(MemeditError, match="Unknown dtype"):
        ExportOptions(dtype="fp8")
    result = CliRunner().invoke(cli, ["export", "--onnx", str(model_dir), "--out",
                                      str(tmp_path / "x"), "--fp16", "--dtype", "fp32"])
    assert result.exit_code == 2 and "--fp16 contradicts --dtype fp32" in result.stderr
    assert not list(tmp_path.iterdir())


def test_unknown_or_missing_provider_is_a_clear_error(exports, tmp_path):
    with pytest.raises(MemeditError, match="Unknown provider 'tpu'"):
        decide_provider(["CPUExecutionProvider"], None, "tpu")
    with pytest.raises(MemeditError, match="no TensorRT provider"):
        decide_provider(["CPUExecutionProvider"], None, "tensorrt")
    folder, _ = exports["fp32"]
    out = tmp_path / "img.png"
    result = CliRunner().invoke(cli, ["generate", "a cat", "--onnx", str(folder), "--out",
                                      str(out), "--provider", "tensorrt"])
    assert result.exit_code == 2 and "TensorRT" in result.stderr
    result = CliRunner().invoke(cli, ["generate", "a cat", "--onnx", str(folder), "--out",
                                      str(out), "--provider", "cpu", "--trt-engine-cache",
                                      str(tmp_path / "cache")])
    assert result.exit_code == 2 and "runs on the CPU provider" in result.stderr
    assert not list(tmp_path.iterdir())


def test_batched_prompts_in_one_call_match_one_by_one(exports):
    folder, _ = exports["fp16"]
    config = SamplingConfig(steps=2, batch_size=4)
    prompts, seeds = ["a cat", "a cat", "a dog", "a dog"], [0, 1, 0, 1]
    together, choice = generate(folder, prompts, seeds, config, "cpu", 1)
    alone, _ = generate(folder, prompts[2:3], seeds[2:3], SamplingConfig(steps=2), "cpu", 1)
    assert together.shape[0] == 4 and choice.label == "CPU"
    np.testing.assert_allclose(together[2], alone[0], atol=2e-3)


def test_static_shapes_fix_free_dimensions_at_load(exports):
    folder, _ = exports["fp32"]
    static = SessionSettings(threads=1, graph_optimization="extended", io_binding=True,
                             static=StaticShapes(batch=2, height=32, width=32))
    pipe, _ = load_ort_pipeline(folder, "cpu", settings=static)
    config = SamplingConfig(steps=2, batch_size=2)
    images = generate_with(pipe, ["a", "b"], config)
    assert images.shape == (2, 32, 32, 3)
    # A batch the sessions were not fixed to is rejected by ONNX Runtime: the override holds.
    with pytest.raises(Exception, match=r"(?i)dimension|shape|invalid"):
        generate_with(pipe, ["a"], SamplingConfig(steps=2, batch_size=1))


def generate_with(pipe, prompts, config):
    from memedit.sampling import generate_images

    return generate_images(pipe, prompts, list(range(len(prompts))), config)


@pytest.mark.slow
def test_embedded_model_fp16_and_fused_exports_pass_audit_and_parity(tmp_path):
    from memedit.loading import load_pipeline
    from memedit.testbed import model_path

    pipe, _ = load_pipeline(model_path(), "cpu", "float32")
    model = _sanitized(tmp_path / "model", lambda p: _masks(p, TARGETS), pipe)
    sizes = {}
    for name, options in (("fp32", ExportOptions(optimum_validation=False)),
                          ("fp16", ExportOptions(optimum_validation=False, dtype="fp16")),
                          ("fused", ExportOptions(optimum_validation=False, optimize="basic"))):
        report = export_onnx(model, tmp_path / name, options, inputs=FAST, threads=1)
        assert report.verdict == "PASSED", report.table()
        assert len(report.audit.results) > 0 and report.parity.passed
        sizes[name] = _size(tmp_path / name)
    assert 0.45 <= sizes["fp16"] / sizes["fp32"] <= 0.6


def test_fp16_audit_allows_the_converters_raise_of_tiny_weights(tmp_path):
    # ORT's converter raises |w| < 2^-24 to 2^-24 where numpy's cast gives 0: a weight
    # holding such a value must still be matched (the full-size UNet has them), and its
    # zeroed positions still checked.
    from onnx import TensorProto, helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    from memedit.export.audit import audit_onnx_file

    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[0, 0] = 1e-9
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[1, :3] = True
    weight[mask] = 0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(weight.numpy().T.copy(), "w")])
    model = OnnxModel(helper.make_model(graph))
    model.convert_float_to_float16(keep_io_types=True)
    path = tmp_path / "model.onnx"
    model.save_model_to_file(str(path))
    (result,) = audit_onnx_file(path, {"k": weight}, {"k": mask})
    assert result.status == "ok" and result.matches == ["w (W^T, fp16)"]
