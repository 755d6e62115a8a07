"""Export a full-size Stable Diffusion 1.x UNet (random weights) to ONNX: the >2 GB path.

The fp32 SD 1.x UNet (~860 M parameters, ~3.4 GB) is over protobuf's 2 GB limit, so its
weights must go to an external-data file. This tool builds that UNet from its published
config (random weights: no download), zeroes 1 % of every ``ff.net.2`` weight as a sanitized
model would, and exports the UNet alone with Optimum's per-model path (the UNet ONNX config
Optimum uses for ``text-to-image`` + ``optimum.exporters.onnx.convert.export``, which writes
``model.onnx`` + ``model.onnx_data``). It then runs ``onnx.checker`` on the path, one ONNX
Runtime inference against the PyTorch output, and memedit's sanitization audit, and reports
time and peak resident memory (RSS) per phase.

With ``--pipeline`` it goes further: a whole SD 1.x pipeline (this UNet, the CLIP ViT-L/14
text encoder and the SD VAE, random weights), sanitized and saved as ``memedit bake`` would,
then exported by ``memedit.export.api.export_onnx`` exactly as ``memedit export --onnx`` does:
Optimum's text-to-image export, checker, audit through the carried subspace, and parity per
component and for a whole 512x512 image (``--steps``), loaded by Optimum's ORT pipeline.

A watchdog aborts the run if RSS passes ``--max-rss-gb`` (the machine is shared).

    python tools/export_full_size_unet.py --out /tmp/sd-unet-onnx [--json result.json]
    python tools/export_full_size_unet.py --pipeline --out /tmp/sd-pipeline [--steps 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import threading
import time
from pathlib import Path

import psutil

from memedit.testing import SD1_UNET_CONFIG  # the published SD 1.x config

GB = 1024**3


class RssMonitor:
    """Samples this process's RSS every 0.1 s; keeps a per-phase peak; aborts over a limit."""

    def __init__(self, limit_gb: float) -> None:
        self.process = psutil.Process()
        self.limit = limit_gb * GB
        self.peak = 0
        self.overall = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            rss = self.process.memory_info().rss
            self.peak, self.overall = max(self.peak, rss), max(self.overall, rss)
            if rss > self.limit:
                # The machine is shared with a training job: never push it into swap/OOM.
                print(f"ABORT: RSS {rss / GB:.1f} GB over the {self.limit / GB:.1f} GB limit",
                      flush=True)
                os._exit(3)

    def phase(self) -> float:
        """The peak RSS (GB) since the last call, and reset."""
        peak = max(self.peak, self.process.memory_info().rss)
        self.peak = 0
        return round(peak / GB, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/memedit-sd-unet-onnx"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-rss-gb", type=float, default=13.5)
    parser.add_argument("--fraction", type=float, default=0.01,
                        help="share of each ff.net.2 weight zeroed (the audit's subject)")
    parser.add_argument("--keep", action="store_true", help="keep the exported folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--pipeline", action="store_true",
                        help="instead: a whole SD 1.x pipeline through `memedit export`")
    parser.add_argument("--variants", default="fp32:none",
                        help="with --pipeline: comma-separated DTYPE:OPTIMIZE exports of the "
                             "same model, e.g. fp32:none,fp16:none,fp32:basic")
    parser.add_argument("--steps", type=int, default=2,
                        help="denoising steps of the whole-image parity run (--pipeline)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    monitor = RssMonitor(args.max_rss_gb)
    figures = run_pipeline(args, monitor) if args.pipeline else run_unet(args, monitor)
    figures["overall_peak_rss_gb"] = round(monitor.overall / GB, 2)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not args.keep:
        shutil.rmtree(args.out)


def export_unet_alone(unet, folder: Path) -> tuple[Path, int]:
    """Export a UNet by itself with Optimum's per-model path into ``folder``/model.onnx (plus
    external data past 2 GB) and its config; returns the path and the opset used."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the UNet config)
    import torch
    from optimum.exporters.onnx.convert import export
    from optimum.exporters.tasks import TasksManager
    from optimum.exporters.utils import _get_diffusers_submodel_type

    # The attributes Optimum's text-to-image path sets on the UNet config before export
    # (optimum.exporters.utils._get_submodels_for_export_diffusion), for a UNet alone.
    unet.config.requires_aesthetics_score = False
    unet.config.time_cond_proj_dim = None
    unet.config.text_encoder_projection_dim = unet.config.cross_attention_dim
    unet.config.export_model_type = _get_diffusers_submodel_type(unet)
    constructor = TasksManager.get_exporter_config_constructor(
        model=unet, exporter="onnx", library_name="diffusers", task="semantic-segmentation")
    config = constructor(unet.config, int_dtype="int64", float_dtype="fp32")
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "model.onnx"
    with torch.no_grad():
        export(unet, config, model_path, opset=config.DEFAULT_ONNX_OPSET)
    unet.save_config(folder)
    return model_path, config.DEFAULT_ONNX_OPSET


def run_unet(args: argparse.Namespace, monitor: RssMonitor) -> dict:
    """The UNet alone, through Optimum's per-model export."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from diffusers import UNet2DConditionModel

    from memedit.export.audit import audit_onnx_file
    from memedit.export.onnx import onnx_files

    torch.set_num_threads(args.threads)
    figures: dict = {"threads": args.threads}
    if args.out.exists():
        shutil.rmtree(args.out)

    t = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD1_UNET_CONFIG).eval()
    figures["parameters"] = sum(p.numel() for p in unet.parameters())
    # Sanitize like memedit's bake: zero a random 1 % of each FFN output weight.
    gen = torch.Generator().manual_seed(1)
    masks, params = {}, {}
    for name, param in unet.named_parameters():
        if name.endswith("ff.net.2.weight"):
            mask = torch.rand(param.shape, generator=gen) < args.fraction
            param.data[mask] = 0
            masks[name], params[name] = mask, param.detach().clone()
    figures["masked_tensors"] = len(masks)
    figures["masked_weights"] = int(sum(int(m.sum()) for m in masks.values()))
    # One reference output (batch 1, 64x64 latent, 77 tokens) before the model is freed.
    sample = torch.randn(1, 4, 64, 64, generator=gen)
    hidden = torch.randn(1, 77, 768, generator=gen)
    timestep = torch.tensor(500)
    with torch.no_grad():
        t_ref = time.perf_counter()
        reference = unet(sample, timestep, hidden).sample.numpy()
        figures["torch_unet_seconds"] = round(time.perf_counter() - t_ref, 2)
    figures["build_seconds"] = round(time.perf_counter() - t, 1)
    figures["build_peak_rss_gb"] = monitor.phase()
    print(json.dumps(figures), flush=True)

    t = time.perf_counter()
    model_path, figures["opset"] = export_unet_alone(unet, args.out / "unet")
    figures["export_seconds"] = round(time.perf_counter() - t, 1)
    figures["export_peak_rss_gb"] = monitor.phase()
    figures["files_mb"] = {k: round(v / 2**20, 1) for k, v in onnx_files(args.out).items()}
    print(json.dumps(figures), flush=True)
    del unet
    gc.collect()

    t = time.perf_counter()
    onnx.checker.check_model(str(model_path), full_check=True)
    figures["checker_seconds"] = round(time.perf_counter() - t, 1)
    figures["checker_peak_rss_gb"] = monitor.phase()

    t = time.perf_counter()
    report = audit_onnx_file(model_path, params, masks, label="unet/model.onnx")
    figures["audit_seconds"] = round(time.perf_counter() - t, 2)
    figures["audit_passed"] = all(r.passed for r in report)
    figures["audit_statuses"] = sorted({r.status for r in report})
    figures["audit_peak_rss_gb"] = monitor.phase()
    print(json.dumps(figures), flush=True)
    del params
    gc.collect()

    t = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    figures["ort_load_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    # Optimum's UNet graph takes a float scalar timestep.
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy().astype(np.float32),
             "encoder_hidden_states": hidden.numpy()}
    (got,) = session.run(None, feeds)
    figures["ort_unet_seconds"] = round(time.perf_counter() - t, 2)
    diff = np.abs(got - reference)
    figures["parity_max_abs"] = float(diff.max())
    figures["parity_mean_abs"] = float(diff.mean())
    figures["ort_peak_rss_gb"] = monitor.phase()
    del session
    return figures


def run_pipeline(args: argparse.Namespace, monitor: RssMonitor) -> dict:
    """A whole sanitized SD 1.x pipeline through memedit's export (audit + parity)."""
    import torch

    from memedit.export.api import VerificationFailed, export_onnx
    from memedit.export.onnx import ExportOptions
    from memedit.export.parity import ParityInputs

    torch.set_num_threads(args.threads)
    figures: dict = {"threads": args.threads, "mode": "pipeline"}
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    t = time.perf_counter()
    from memedit.testing import build_sd1_shaped_pipeline, save_sanitized

    pipe = build_sd1_shaped_pipeline()
    gen = torch.Generator().manual_seed(1)
    # FFN outputs, and the attention weights ONNX Runtime's fusions pack (Q with K/V in
    # self-attention, K with V in cross-attention).
    targets = ("ff.net.2.weight", "attn1.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight")
    masks = {f"unet/{name}": torch.rand(param.shape, generator=gen) < args.fraction
             for name, param in pipe.unet.named_parameters() if name.endswith(targets)}
    # What `memedit bake` writes, hashes included (the audit is tied to them), without locating.
    model_dir = save_sanitized(pipe, masks, args.out / "model")
    figures["masked_weights"] = sum(int(mask.sum()) for mask in masks.values())
    del pipe
    gc.collect()
    figures["build_save_seconds"] = round(time.perf_counter() - t, 1)
    figures["build_peak_rss_gb"] = monitor.phase()
    print(json.dumps(figures), flush=True)

    figures["variants"] = {}
    for variant in args.variants.split(","):
        dtype, optimize = variant.split(":")
        out = args.out / f"onnx-{dtype}-{optimize}"
        t = time.perf_counter()
        try:
            report = export_onnx(model_dir, out, ExportOptions(
                optimum_validation=False, dtype=dtype, optimize=optimize),
                inputs=ParityInputs(steps=args.steps), threads=args.threads)
        except VerificationFailed as failure:
            report = failure.report
        row = {"export_onnx_total_seconds": round(time.perf_counter() - t, 1),
               "export_onnx_peak_rss_gb": monitor.phase(), "verdict": report.verdict,
               "folder_gb": round(sum(p.stat().st_size for p in out.rglob("*")
                                      if p.is_file()) / GB, 2) if out.exists() else None,
               "report": report.to_dict()}
        figures["variants"][variant] = row
        print(report.table(), flush=True)
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return figures


if __name__ == "__main__":
    main()
