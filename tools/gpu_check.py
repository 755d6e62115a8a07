"""One prepared GPU check: fp16 and bf16 exports on CUDA EP and TensorRT EP vs PyTorch fp16.

For a machine lent a GPU (e.g. one H200), with a CUDA build of torch and ``onnxruntime-gpu``
installed in place of ``onnxruntime`` (see ``GPU_INSTALL_HINT`` in ``export/runtime.py``).
It builds the SD 1.x-shaped pipeline (real architecture, random weights; no download),
sanitizes it (1 % of each FFN output and cross-attention K/V weight zeroed, as ``memedit
bake`` would), and for each variant

- ``fp16`` (ONNX Runtime's converter), ``fp16-full`` (the CUDA fusion recipe: NhwcConv,
  GroupNorm, packed QKV/KV), ``bf16`` (Optimum's bf16 export on CUDA):

runs ``memedit.export.api.export_onnx`` (audit + parity, on the CUDA provider), then times the
UNet step (CFG batch 2, 64x64 latents) on the CUDA EP (IO binding on) and on the TensorRT EP
(fp16 engines, engine cache in the work folder; the first call builds the engine and is
reported apart), next to PyTorch fp16 on the same GPU, with each output's error against
PyTorch fp16. Everything goes to one JSON file.

``--dry-run`` runs the same code on memedit's tiny pipeline and the CPU, with the GPU-only
rows recorded as skipped: a check that the script is wired, before device time is spent.

    python tools/gpu_check.py --out gpu_check.json --work /tmp/gpu-check
    python tools/gpu_check.py --dry-run --out /tmp/dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import traceback
from pathlib import Path

from bench_export import first_and_median  # tools/ is on sys.path when run as a script

VARIANTS = {  # name -> ExportOptions keywords
    "fp16": {"dtype": "fp16"},
    "fp16-full": {"dtype": "fp16", "optimize": "full"},
    "bf16": {"dtype": "bf16"},
}


def build_model(work: Path, dry_run: bool, fraction: float = 0.01) -> Path:
    """The sanitized pipeline folder (SD 1.x-shaped, or tiny for a dry run)."""
    import torch

    from memedit.testing import build_sd1_shaped_pipeline, build_tiny_pipeline, save_sanitized

    pipe = build_tiny_pipeline() if dry_run else build_sd1_shaped_pipeline()
    gen = torch.Generator().manual_seed(1)
    targets = ("ff.net.2.weight", "attn2.to_k.weight", "attn2.to_v.weight")
    masks = {f"unet/{name}": torch.rand(p.shape, generator=gen) < fraction
             for name, p in pipe.unet.named_parameters() if name.endswith(targets)}
    return save_sanitized(pipe, masks, work / "model")


def unet_inputs(model: Path):
    import torch

    config = json.loads((model / "unet" / "config.json").read_text())
    size = config["sample_size"]
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, config["in_channels"], size, size, generator=gen),
            torch.tensor(500),
            torch.randn(2, 77, config["cross_attention_dim"], generator=gen))


def torch_fp16_step(model: Path, inputs, cuda: bool, repeats: int) -> dict:
    """PyTorch's UNet step, fp16 on CUDA (fp32 on CPU for a dry run): the reference."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=dtype).to(device)
    sample, timestep, hidden = (t.to(device) for t in inputs)
    sample, hidden = sample.to(dtype), hidden.to(dtype)

    def step():
        with torch.no_grad():
            out = unet(sample, timestep, hidden).sample
        if cuda:
            torch.cuda.synchronize()
        return out
    first, median = first_and_median(step, repeats)
    reference = step().float().cpu().numpy()
    return {"row": {"device": device, "dtype": str(dtype), "first_call_s": first,
                    "unet_step_s": median}, "reference": reference.astype(np.float32)}


def ort_step(folder: Path, provider: str, inputs, reference, repeats: int, threads: int,
             work: Path) -> dict:
    """The UNet step of an export on one provider, through memedit's runtime settings."""
    import numpy as np

    from memedit.export.runtime import SessionSettings, load_ort_pipeline

    options = ()
    if provider == "tensorrt":
        options = (("trt_fp16_enable", "True"), ("trt_engine_cache_enable", "True"),
                   ("trt_engine_cache_path", str(work / "trt-cache")))
    settings = SessionSettings(threads=threads, provider_options=options,
                               io_binding=provider != "cpu")
    start = time.perf_counter()
    pipe, choice = load_ort_pipeline(folder, provider, settings=settings)
    load = time.perf_counter() - start
    sample, timestep, hidden = inputs

    def step():
        return np.asarray(pipe.unet(sample=sample, timestep=timestep,
                                    encoder_hidden_states=hidden).sample)
    first, median = first_and_median(step, repeats)
    out = step().astype(np.float32)
    diff = np.abs(out - reference)
    return {"provider": choice.label, "reason": choice.reason, "load_s": load,
            "first_call_s": first, "unet_step_s": median,
            "max_abs_vs_torch_fp16": float(diff.max()),
            "mean_abs_vs_torch_fp16": float(diff.mean()), "finite": bool(np.isfinite(out).all())}


def guarded(results: dict, key: str, fn) -> None:
    """Record ``fn()``, or the error it raised: one failing row must not lose the others."""
    try:
        results[key] = fn()
    except Exception as err:
        results[key] = {"error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc(limit=5)}
    print(key, json.dumps(results[key], default=str)[:400], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--work", type=Path, default=Path("/tmp/memedit-gpu-check"))
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny pipeline on CPU: checks the wiring, no GPU needed")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="full-image parity steps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import onnxruntime as ort
    import torch

    from memedit.export.api import VerificationFailed, export_onnx
    from memedit.export.onnx import ExportOptions
    from memedit.export.parity import ParityInputs
    from memedit.export.runtime import CUDA, TENSORRT, choose_provider

    cuda = torch.cuda.is_available() and not args.dry_run
    results: dict = {
        "dry_run": args.dry_run, "host": platform.node(), "torch": torch.__version__,
        "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "ort_choice": choose_provider("auto").reason}
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    model = build_model(args.work, args.dry_run)
    inputs = unet_inputs(model)
    reference = torch_fp16_step(model, inputs, cuda, args.repeats)
    results["torch"] = reference["row"]
    if cuda:
        torch.cuda.empty_cache()  # the PyTorch UNet is gone with torch_fp16_step's frame
    providers = ["cuda", "tensorrt"] if cuda else ["cpu"]
    for name, keywords in VARIANTS.items():
        row: dict = {}
        results[name] = row
        if not cuda and (name == "bf16" or keywords.get("optimize") == "full"):
            row["skipped"] = "needs CUDA (bf16 export / CUDA-only fused operators)"
            continue
        folder = args.work / name

        def export(keywords=keywords, folder=folder) -> dict:
            start = time.perf_counter()
            try:
                report = export_onnx(model, folder, ExportOptions(optimum_validation=False,
                                                                  **keywords),
                                     inputs=ParityInputs(steps=args.steps),
                                     threads=args.threads)
            except VerificationFailed as failed:
                report = failed.report
            return {"seconds": time.perf_counter() - start, "verdict": report.verdict,
                    "parity_provider": report.parity.provider if report.parity else None,
                    "report": report.to_dict()}
        guarded(row, "export", export)
        if not folder.exists():
            continue
        for provider in providers:
            guarded(row, provider, lambda p=provider, f=folder: ort_step(
                f, p, inputs, reference["reference"], args.repeats, args.threads, args.work))
    results["providers_used"] = sorted({r.get(p, {}).get("provider", "") for r in results.values()
                                        if isinstance(r, dict) for p in ("cuda", "tensorrt",
                                                                         "cpu")} - {""})
    results["expected_gpu_providers"] = [CUDA, TENSORRT]
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
